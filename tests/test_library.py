"""The 36-expert library: its tasks (catalogue specs over real packaged data), the written
held-out rule and pipelines/library.toml made from it, near/far reporting, and PEFT's own
Arrow as a method against recycle's ``arrow``."""

from __future__ import annotations

import bz2
import tomllib
from pathlib import Path

import pytest

from recycle.errors import RecycleError
from recycle.tasks.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "pipelines" / "library.toml"


def _spec(name, family, **kw):
    return parse_spec({"name": name, "template": "T: {text}\nA:", "choices": [" a", " b"], "label_field": "label",
                       "family": family, "source": {"builder": "json", "data_files": "/x.jsonl"}, **kw})


# ---- specs: family and split.disjoint_from ---------------------------------------------

def test_family_is_a_label_outside_the_tasks_identity():
    plain = parse_spec({"name": "t", "template": "T: {text}\nA:", "choices": [" a", " b"], "label_field": "label",
                        "source": {"builder": "json", "data_files": "/x.jsonl"}})
    named = _spec("t", "  Word   Affect ")
    assert named.family == "word affect" and plain.family is None
    assert named.sha256 == plain.sha256  # naming a family keeps registered results valid
    assert '"family": "word affect"' in named.to_json()
    with pytest.raises(RecycleError, match="family must be a non-empty string"):
        _spec("t", "")
    with pytest.raises(RecycleError, match="disjoint_from must be a list"):
        _spec("t", "x", split={"train": 0.8, "test": 0.2, "disjoint_from": "word_valence"})
    s = _spec("t", "x", split={"train": 0.8, "test": 0.2, "disjoint_from": ["b", "a", "b"]})
    assert s.split["disjoint_from"] == ["a", "b"] and s.sha256 != _spec("t", "x", split={"train": 0.8, "test": 0.2}).sha256


def test_disjoint_from_drops_test_texts_the_named_tasks_train_on(tmp_path):
    from recycle.tasks import catalogue_spec
    from recycle.tasks.build import _dedupe_key, build_splits

    valence = build_splits(catalogue_spec("word_valence"))
    trained = {_dedupe_key(e) for e in valence["train"] + valence["validation"]}
    words = sorted(trained)[:30] + [f"zzword{i}" for i in range(30)]
    data = tmp_path / "w.jsonl"
    data.write_text("".join(f'{{"text": "{w}", "label": "{"a" if i % 2 else "b"}"}}\n' for i, w in enumerate(words)))
    raw = {"name": "t", "template": "W: {text}\nA:", "choices": [" a", " b"], "label_field": "label",
           "source": {"builder": "json", "data_files": str(data)}}
    both = build_splits(parse_spec({**raw, "split": {"train": 0.5, "test": 0.5}}))
    cut = build_splits(parse_spec({**raw, "split": {"train": 0.5, "test": 0.5, "disjoint_from": ["word_valence"]}}))
    assert any(_dedupe_key(e) in trained for e in both["test"])  # the test would have shared words
    assert cut["test"] and not any(_dedupe_key(e) in trained for e in cut["test"])
    assert [e.text for e in cut["test"]] == [e.text for e in both["test"] if _dedupe_key(e) not in trained]
    assert cut["train"] == both["train"]
    with pytest.raises(RecycleError, match="no built-in task 'nope'"):
        build_splits(parse_spec({**raw, "split": {"train": 0.5, "test": 0.5, "disjoint_from": ["nope"]}}))


# ---- preparers ---------------------------------------------------------------------

def test_lexicon_preparer_keeps_words_of_exactly_one_chosen_class(tmp_path):
    from recycle.tasks.preparers import lexicon

    f = tmp_path / "lex.csv.bz2"
    f.write_bytes(bz2.compress(b'dog,ANIMALS\ncat,ANIMALS\n"rose,PLANTS\nrose,COLORS\noak,PLANTS\n'
                               b'oak,ANIMALS\nred fox,ANIMALS\n42,PLANTS\nsky,SKY\n'))
    out = list(lexicon(f, {"classes": {"ANIMALS": "animal", "PLANTS": "plant"}}))
    # oak is under both chosen classes (dropped), "red fox" is two words, 42 no word, sky in neither;
    # the stray quote does not swallow lines (no CSV quoting)
    assert out == [{"text": "dog", "label": "animal"}, {"text": "cat", "label": "animal"},
                   {"text": '"rose', "label": "plant"}]
    with pytest.raises(RecycleError, match="options.classes"):
        list(lexicon(f, {"classes": {"ANIMALS": "animal"}}))


def test_paragraphs_preparer_cuts_speeches(tmp_path):
    from recycle.tasks.preparers import paragraphs

    f = tmp_path / "speeches.csv"
    f.write_text('party,speaker,text\ndemocrat,A,"' + "x" * 90 + '\nshort\n' + "y " * 50 + '"\n'
                 'republican,B,"' + "z" * 85 + '"\n')
    out = list(paragraphs(f, {"text_column": "text", "columns": {"party": "party"}, "min_chars": 80}))
    assert [(r["party"], r["text"][:1]) for r in out] == [("democrat", "x"), ("democrat", "y"), ("republican", "z")]
    with pytest.raises(RecycleError, match="no column"):
        list(paragraphs(f, {"text_column": "speech"}))


# ---- the held-out rule --------------------------------------------------------------

def test_rule_takes_whole_far_families_and_near_tasks_that_keep_enough_test():
    from recycle.tasks.library import held_out_split

    specs = [_spec(f"{f}_{i}", f) for f, n in (("a", 4), ("b", 5), ("c", 3), ("d", 1), ("e", 2), ("g", 6))
             for i in range(n)]
    small = {"b_0", "b_1", "b_2", "b_3"}  # too few test examples left: never near
    out = held_out_split(specs, n_near=3, n_far=3, test_left=lambda t, others: 50 if t in small else 500)
    fam = {s.name: s.family for s in specs}
    assert len(out["far"]) == 3 and len(out["near"]) == 3
    assert {fam[t] for t in out["far"]} == set(out["far_families"])
    for f in out["far_families"]:  # whole families, none held in
        assert not any(fam[t] == f for t in out["held_in"])
    for t in out["near"]:
        assert t not in small and fam[t] not in out["far_families"]
        assert sum(fam[h] == fam[t] for h in out["held_in"]) >= 2
    assert sorted(out["held_in"] + out["near"] + out["far"]) == sorted(fam)
    again = held_out_split(list(reversed(specs)), n_near=3, n_far=3, test_left=lambda t, o: 50 if t in small else 500)
    assert again == out  # a function of the names, not of their order
    with pytest.raises(RecycleError, match="no whole families add up to 2"):
        held_out_split([_spec("x_0", "x"), _spec("y_0", "y"), _spec("y_1", "y"), _spec("y_2", "y")], n_near=1,
                       n_far=2, test_left=lambda t, o: 500)


def test_library_pipeline_is_the_rule_applied_to_the_catalogue():
    from recycle import pipeline
    from recycle.tasks import catalogue_names, catalogue_specs
    from recycle.tasks.library import held_out_split

    specs = catalogue_specs()
    assert all(s.family and s.description for s in specs)
    fams = {s.family for s in specs}
    assert len(specs) >= 48 and len(fams) >= 8
    sources = {(s.source.get("package"), s.source.get("file")) for s in specs}
    assert len(sources) >= 8
    split = held_out_split(specs)
    raw = tomllib.loads(LIBRARY.read_text())
    assert sorted(raw["tasks"]["catalogue"]) == catalogue_names()
    single = [e["task"] for e in raw["experts"] if "task" in e]
    assert sorted(single) == split["held_in"] and len(single) == 36
    (mt,) = [e for e in raw["experts"] if "multitask" in e]
    assert sorted(mt["multitask"]) == split["held_in"]
    assert len(split["near"]) == 6 and len(split["far"]) == 6
    by = {s.name: s.family for s in specs}
    held_fams = {by[t] for t in split["held_in"]}
    assert all(by[t] in held_fams for t in split["near"]) and not any(by[t] in held_fams for t in split["far"])
    assert raw["train"] == tomllib.loads((ROOT / "pipelines" / "benchmark.toml").read_text())["train"]
    validation, every, peer = raw["evaluations"]
    assert every["tasks"] == "all" and set(every["methods"]) | set(every["compositions"]) >= {
        "base", "uniform", "arrow", "spectr", "avg-activation", "retrieval", "phatgoose", "moepp", "moepp-nores",
        "cosmo", "oracle", "multitask"}
    # the MoE++ default was chosen on the held-in tasks' validation splits, never on test examples
    assert (validation["tasks"], validation["split"]) == ("held-in", "validation")
    assert set(validation["compositions"]) >= {"moepp", "moepp-nores"}
    # PEFT's own Arrow beside recycle's on the held-out tasks, at the same sample and seed
    assert peer["tasks"] == "held-out" and set(peer["methods"]) == {"arrow", "peft-arrow"}
    assert (peer["n"], peer["seed"]) == (every["n"], every["seed"])
    p = pipeline.load(LIBRARY)  # the pipeline checker: every key, name and spec
    assert len(p.experts) == 37 and p.tasks_catalogue == raw["tasks"]["catalogue"]


def test_library_tasks_build_with_enough_disjoint_test_examples():
    """Every task builds offline from its package; >= 200 test examples; no held-out test text
    is in any held-in task's train or validation split."""
    from recycle.tasks import catalogue_specs
    from recycle.tasks.build import build_splits
    from recycle.tasks.library import held_out_split, test_texts, trained_texts

    specs = catalogue_specs()
    by = {s.name: s for s in specs}
    for s in specs:
        parts = build_splits(s)
        assert len(parts["test"]) >= 200, s.name
        assert all(parts[k] for k in ("train", "validation")), s.name
    split = held_out_split(specs)
    trained = set().union(*(trained_texts(by[t]) for t in split["held_in"]))
    for t in split["near"] + split["far"]:
        assert not test_texts(by[t]) & trained, t


# ---- near/far reporting --------------------------------------------------------------

def test_near_far_averages_and_table():
    from recycle import evaluation as E
    from recycle.results import add_near_far

    def row(label, task, held, acc):
        return {"label": label, "method": label, "task": task, "held": held, "accuracy": acc, "n": 10,
                "ci_low": acc - 0.1, "ci_high": acc + 0.1}

    rows = [row(m, t, h, a) for m, base in (("base", 0.5), ("phatgoose", 0.6)) for t, h, a in
            (("s1", "in", base + 0.2), ("s2", "out", base), ("g1", "out", base - 0.1), ("g2", "out", base - 0.2))]
    fams = {"s1": "sentiment", "s2": "sentiment", "g1": "geography", "g2": None}
    summary = add_near_far(E.summarise(rows), fams)
    assert summary["near_far"] == {"s2": "near", "g1": "far", "g2": "far"}
    pg = summary["methods"]["phatgoose"]
    assert pg["held_out_near_avg"] == pytest.approx(0.6) and pg["held_out_far_avg"] == pytest.approx(0.45)
    assert pg["U"] == pytest.approx((0.6 + 0.5 + 0.4) / 3) and pg["S"] == pytest.approx(0.8)
    head, body = E.table(summary)
    assert head[-5:] == ["held-out near avg", "held-out far avg", "S", "U", "H"]
    assert "s2 (near)" in head and "g1 (far)" in head and "s1 (in)" in head
    assert body[1][head.index("held-out far avg")] == "0.450"
    plain = E.summarise(rows)  # no family anywhere: the table as before
    assert add_near_far(plain, {}) is plain and "near_far" not in plain
    assert "held-out near avg" not in E.table(plain)[0]


def test_eval_show_reports_near_and_far_from_registered_families(tmp_path):
    import json

    from recycle.registry import Registry
    from recycle.results import task_families
    from recycle.tasks import add_task

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(40)))
    reg = Registry()
    for name, fam in (("a", "x"), ("b", None)):
        raw = {"name": name, "template": "T: {text}\nA:", "choices": [" a", " b"], "label_field": "label",
               "source": {"builder": "json", "data_files": str(data)}}
        add_task(reg, parse_spec({**raw, **({"family": fam} if fam else {})}))
    assert task_families(reg, ["a", "b", "gone"]) == {"a": "x", "b": None, "gone": None}
    # a family named later updates the stored spec, the task's identity (and results) unchanged
    sha = reg.task("b")["spec_sha256"]
    row = add_task(reg, parse_spec({"name": "b", "template": "T: {text}\nA:", "choices": [" a", " b"],
                                    "label_field": "label", "family": "y",
                                    "source": {"builder": "json", "data_files": str(data)}}))
    assert row["status"] == "unchanged" and row["spec_sha256"] == sha
    assert task_families(reg, ["b"]) == {"b": "y"}


def test_a_run_of_held_out_tasks_alone_tells_near_from_far(tmp_path, make_adapter):
    """Near means a held-in task shares the family: held-in as the registry says (a task with
    an expert), so a run that scored only held-out tasks still splits them (it called all far)."""
    import json

    from recycle.experts import add_expert
    from recycle.registry import Registry
    from recycle.results import near_far
    from recycle.tasks import add_task

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(40)))
    reg = Registry()
    for name, fam in (("a", "x"), ("a2", "x"), ("g", "geo")):
        add_task(reg, parse_spec({"name": name, "template": "T: {text}\nA:", "choices": [" a", " b"],
                                  "label_field": "label", "family": fam,
                                  "source": {"builder": "json", "data_files": str(data)}}))
    add_expert(reg, make_adapter(tmp_path / "ea"), task="a", base="tiny-llama")
    methods = {"m": {"tasks": {"a2": 0.6, "g": 0.4}}}
    summary = near_far(reg, {"held": {"a2": "out", "g": "out"}, "methods": methods})
    assert summary["near_far"] == {"a2": "near", "g": "far"}
    assert (methods["m"]["held_out_near_avg"], methods["m"]["held_out_far_avg"]) == (0.6, 0.4)


# ---- PEFT's own Arrow against recycle's ------------------------------------------------

def test_peft_arrow_equals_recycles_arrow_on_a_tiny_model(tiny_base, make_adapter, tmp_path):
    """Same adapters (top layers only, as the library's experts), same seed: the logits of
    PEFT's create_arrow_model and of recycle's arrow agree to float rounding, and removing
    PEFT's layers gives the base model back exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    from recycle import methods
    from recycle.routing import load_expert

    experts = [load_expert(make_adapter(tmp_path / f"e{i}", r=4, seed=30 + i,
                                        targets=("q_proj", "v_proj", "down_proj"), layers_to_transform=[2, 3]),
                           f"e{i}") for i in range(3)]
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = torch.tensor([[1, 5, 9, 20, 33, 2, 7], [3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    outs = {}
    for name in ("peft-arrow", "arrow"):
        m = methods.get(name)
        handle = m.build(model, experts, m.settings({"top_k": 2, "seed": 0}))
        with torch.no_grad():
            outs[name] = model(input_ids=ids).logits
        handle.remove()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, base), name
    assert (outs["peft-arrow"] - base).abs().max() > 1e-2  # the experts do change the output
    torch.testing.assert_close(outs["peft-arrow"], outs["arrow"], rtol=1e-5, atol=1e-5)
    m = methods.get("peft-arrow")
    with pytest.raises(RecycleError, match="top_k 4 is more than the 3 experts"):
        m.build(model, experts, m.settings({"top_k": 4}))
