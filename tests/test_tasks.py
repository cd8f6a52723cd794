"""Task specs, splits, the catalogue and the LM data layer, through the real CLI and SQLite."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import cli, ok, one_line_error


def tasks_rows() -> list[dict]:
    conn = sqlite3.connect(os.environ["RECYCLE_DB"])
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("select * from tasks order by name")]
    finally:
        conn.close()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reviews(n=60, start=0):
    return [
        {"text": f"review number {i} was {'great' if i % 2 else 'awful'}", "label": "pos" if i % 2 else "neg"}
        for i in range(start, start + n)
    ]


SPEC = """\
name = "{name}"
description = "toy reviews"
template = "Review: {{text}}\\nIs the sentiment positive or negative? Answer:"
choices = [" positive", " negative"]
label_field = "label"
label_values = ["pos", "neg"]

[source]
builder = "json"
data_files = "{data}"
"""


def write_spec(folder: Path, body: str, name="spec.toml") -> Path:
    p = folder / name
    p.write_text(body)
    return p


@pytest.fixture
def user_task(tmp_path) -> Path:
    rows = reviews(60) + reviews(5)  # five exact duplicates: removed before splitting
    write_jsonl(tmp_path / "reviews.jsonl", rows)
    return write_spec(tmp_path, SPEC.format(name="toy", data="reviews.jsonl"))


def test_user_spec_over_local_jsonl_registers_and_previews(user_task):
    result = cli("add-task", user_task)
    assert result.exit_code == 0, result.output
    (row,) = tasks_rows()
    assert row["name"] == "toy" and row["kind"] == "classification" and row["n_choices"] == 2
    assert (row["n_train"], row["n_validation"], row["n_test"]) == (48, 6, 6)  # 60 unique
    spec = json.loads(row["spec"])
    assert Path(spec["source"]["data_files"]).is_absolute()  # relative to the spec file
    assert "reviews.jsonl" in row["source"]

    result = cli("tasks", "preview", "toy", "-n", "3")
    assert result.exit_code == 0, result.output
    assert result.output.count("Review: review number") == 3
    assert "choices: [' positive', ' negative']" in result.output
    assert "gold:" in result.output

    result = cli("tasks", "preview", "toy", "-n", "2", "--split", "test", "--json")
    shown = json.loads(result.output)
    assert len(shown) == 2 and shown[0]["answer"] == shown[0]["choices"][shown[0]["label"]]

    listed = json.loads(cli("tasks", "list", "--json").output)
    assert [t["name"] for t in listed] == ["toy"]
    result = cli("tasks", "show", "toy")
    assert result.exit_code == 0 and "train 48" in result.output


def test_adding_twice_is_a_no_op_and_a_changed_spec_needs_replace(user_task, tmp_path):
    assert cli("add-task", user_task).exit_code == 0
    again = cli("add-task", user_task, "--json")
    assert again.exit_code == 0 and json.loads(again.output)["status"] == "unchanged"
    body = SPEC.format(name="toy", data="reviews.jsonl").replace("[source]", "max_chars = 20\n\n[source]")
    changed = write_spec(tmp_path, body, "b.toml")
    refused = cli("add-task", changed)
    assert refused.exit_code == 2 and "--replace" in refused.stderr
    assert cli("add-task", changed, "--replace").exit_code == 0
    assert len(tasks_rows()) == 1 and json.loads(tasks_rows()[0]["spec"])["max_chars"] == 20


def test_splits_are_disjoint_deterministic_and_seeded(tmp_path):
    from recycle.tasks import build_splits, load_spec_file

    rows = reviews(300) + reviews(40, start=100)  # 40 duplicated texts
    write_jsonl(tmp_path / "d.jsonl", rows)
    spec = load_spec_file(write_spec(tmp_path, SPEC.format(name="s", data="d.jsonl")))
    a = build_splits(spec)
    texts = {k: [e.text for e in v] for k, v in a.items()}
    assert sum(len(v) for v in texts.values()) == 300
    for k, v in texts.items():
        assert len(v) == len(set(v)), k
    assert not set(texts["test"]) & (set(texts["train"]) | set(texts["validation"]))
    assert not set(texts["train"]) & set(texts["validation"])
    # the same spec loaded again gives the same splits; another seed another split
    again = build_splits(load_spec_file(tmp_path / "spec.toml"))
    assert [e.text for e in again["test"]] == texts["test"]
    body = (tmp_path / "spec.toml").read_text() + "\n[split]\nseed = 1\ntrain = 0.8\nvalidation = 0.1\ntest = 0.1\n"
    other = build_splits(load_spec_file(write_spec(tmp_path, body.replace('name = "s"', 'name = "s1"'), "s1.toml")))
    assert set(e.text for e in other["test"]) != set(texts["test"])


def test_named_splits_drop_test_texts_from_train(tmp_path):
    from recycle.tasks import build_splits, load_spec_file

    write_jsonl(tmp_path / "train.jsonl", reviews(50))
    write_jsonl(tmp_path / "test.jsonl", reviews(20, start=40))  # 10 overlap with train
    body = SPEC.format(name="named", data="x").replace(
        'data_files = "x"', 'data_files = {train = "train.jsonl", test = "test.jsonl"}'
    ) + '\n[split]\ntrain = "train"\ntest = "test"\nvalidation_fraction = 0.1\n'
    s = build_splits(load_spec_file(write_spec(tmp_path, body)))
    assert len(s["test"]) == 20
    assert len(s["train"]) + len(s["validation"]) == 40
    assert not {e.text for e in s["test"]} & {e.text for e in s["train"] + s["validation"]}


def test_disk_source_generation_and_choices_field(tmp_path):
    import datasets

    from recycle.tasks import build_splits, load_spec_file

    datasets.Dataset.from_list(
        [{"q": f"what is {i} plus one", "a": str(i + 1), "opts": ["yes", "no", "maybe"], "gold": i % 3}
         for i in range(40)]
    ).save_to_disk(str(tmp_path / "ds"))
    gen = write_spec(tmp_path, """
name = "gen"
template = "Q: {q}\\nA:"
target_field = "a"
[source]
disk = "ds"
""", "gen.toml")
    ex = build_splits(load_spec_file(gen))["train"][0]
    assert ex.choices is None and ex.label is None and ex.answer.startswith(" ") and ex.prompt.startswith("Q: what is")
    mc = write_spec(tmp_path, """
name = "mc"
template = "Q: {q}\\nA:"
choices_field = "opts"
label_field = "gold"
[source]
disk = "ds"
""", "mc.toml")
    ex = build_splits(load_spec_file(mc))["test"][0]
    assert ex.choices == ["yes", "no", "maybe"] and ex.answer == ex.choices[ex.label]


TEMPLATE_LINE = 'template = "Review: {text}\\nIs the sentiment positive or negative? Answer:"\n'


def sub(old, new):
    def edit(body):
        assert old in body, old
        return body.replace(old, new)
    return edit


def add(text):
    return lambda body: body + text


BAD = {
    "missing name": (sub('name = "toy"\n', ""), "missing required key 'name'"),
    "missing template": (sub(TEMPLATE_LINE, ""), "missing required key 'template'"),
    "missing label field": (sub('label_field = "label"\n', ""), "missing required key 'label_field'"),
    "unknown key": (sub('name = "toy"\n', 'name = "toy"\ncolour = "red"\n'), "unknown key(s) colour"),
    "template field the data lacks": (sub("{text}", "{body}"), "template names field {body} the data lacks"),
    "one choice": (sub('[" positive", " negative"]', '[" positive"]'), "at least 2 answers"),
    "label outside the choices": (sub('["pos", "neg"]', '["pos", "meh"]'), "label 'neg', not one of label_values"),
    "fractions over one": (add("\n[split]\ntrain = 0.8\nvalidation = 0.2\ntest = 0.2\n"), "add up to 1.2"),
    "empty split": (add("\n[split]\ntrain = 0.999\nvalidation = 0.0\ntest = 0.001\n"), "split 'test' is empty"),
    "unknown preparer": (sub('builder = "json"\ndata_files = "reviews.jsonl"', 'preparer = "nope"\nfile = "reviews.jsonl"'),
                         "unknown preparer 'nope'"),
    "missing data file": (sub('"reviews.jsonl"', '"absent.jsonl"'), "absent.jsonl does not exist"),
    "no source": (sub('[source]\nbuilder = "json"\ndata_files = "reviews.jsonl"\n', ""), "missing [source] table"),
    "not toml": (sub('name = "toy"', "name = toy"), "not valid TOML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_is_one_line_exit_2(case, tmp_path):
    edit, message = BAD[case]
    write_jsonl(tmp_path / "reviews.jsonl", reviews(30))
    spec = write_spec(tmp_path, edit(SPEC.format(name="toy", data="reviews.jsonl")))
    result = cli("add-task", spec)
    assert result.exit_code == 2, (case, result.output)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, (case, err)
    assert "Traceback" not in result.output


def test_label_index_outside_choices(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "y": i % 3} for i in range(30)])
    spec = write_spec(tmp_path, """
name = "idx"
template = "{text} ->"
choices = [" a", " b"]
label_field = "y"
[source]
builder = "json"
data_files = "d.jsonl"
""")
    result = cli("add-task", spec)
    assert result.exit_code == 2 and "label 2, outside the 2 choices" in result.stderr


def test_missing_spec_file_and_unknown_task():
    from recycle.registry import Registry

    assert "does not exist" in cli("add-task", "nowhere.toml").stderr
    result = cli("tasks", "preview", "nope")  # no registry yet: said so, and none is created
    assert result.exit_code == 2 and "no registry at" in result.stderr
    assert not os.path.exists(os.environ["RECYCLE_DB"])
    Registry()
    result = cli("tasks", "preview", "nope")
    assert result.exit_code == 2 and "no task named 'nope'" in result.stderr


def test_catalogue_registers_ten_real_tasks_offline():
    listed = cli("tasks", "catalogue", "--json")
    names = [t["name"] for t in json.loads(listed.output)]
    assert len(names) >= 10
    result = cli("tasks", "catalogue", "--add")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in tasks_rows()}
    assert set(names) <= set(rows)
    for want in ("vader_tweets", "vader_movies", "vader_amazon", "vader_nyt", "trec_coarse", "sms_spam",
                 "rt_sentiment", "rt_subjectivity", "debates_party", "bbc_topic"):
        r = rows[want]
        assert r["n_train"] > 500 and r["n_test"] >= 200 and r["n_validation"] > 50, want
    trec = rows["trec_coarse"]
    assert 5300 < trec["n_train"] + trec["n_validation"] + trec["n_test"] <= 5381  # 15,452 lines de-duplicated
    preview = cli("tasks", "preview", "trec_coarse", "-n", "1", "--json")
    ex = json.loads(preview.output)[0]
    assert ex["prompt"].startswith("Question: ") and ex["answer"] in ex["choices"]
    # adding one again by name is a no-op
    again = cli("tasks", "catalogue", "--add", "sms_spam", "--json")
    assert json.loads(again.output)[0]["status"] == "unchanged"


def test_package_asset_from_a_wheel_when_not_installed(tmp_path, monkeypatch):
    """A package that isn't importable is read from its wheel in <cache>/wheels."""
    import zipfile

    from recycle.basemodels import cache_dir
    from recycle.tasks import assets

    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels / "fakepkg_data-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fakepkg_data/data/a.txt", "hello")
        zf.writestr("fakepkg_data/data/sub/b.txt", "world")
    assert assets.package_path("fakepkg-data==1.0", "fakepkg_data/data/a.txt").read_text() == "hello"
    folder = assets.package_path("fakepkg-data==1.0", "fakepkg_data/data/sub")
    assert (folder / "b.txt").read_text() == "world"


# ---- the LM data layer -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def test_encode_lm_masks_the_prompt_and_cuts_it_from_the_left(tok):
    from recycle.data import encode_lm

    e = encode_lm(tok, "Text: abc\nAnswer:", " yes", 64)
    target = tok(" yes", add_special_tokens=False)["input_ids"]
    assert e["input_ids"][-len(target):] == target
    assert e["labels"] == [-100] * (len(e["input_ids"]) - len(target)) + target
    short = encode_lm(tok, "x" * 100 + "END:", " yes", 16)
    assert len(short["input_ids"]) == 16
    assert short["input_ids"][-len(target):] == target  # never the target
    assert tok.decode(short["input_ids"][: -len(target)]).endswith("END:")


def test_collate_and_endless_seeded_batches(tok):
    from recycle.data import Example, collate, encode_lm, lm_batches

    enc = [encode_lm(tok, "ab:", " c", 32), encode_lm(tok, "abcdef:", " c", 32)]
    b = collate(enc, pad_id=0)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["attention_mask"][0].tolist() == [1] * len(enc[0]["input_ids"]) + [0] * (b["input_ids"].shape[1] - len(enc[0]["input_ids"]))
    assert (b["labels"][0, len(enc[0]["labels"]):] == -100).all()

    exs = [Example(f"p{i}:", [" a", " b"], " a", 0, f"p{i}") for i in range(10)]
    first = [x["input_ids"].tolist() for x in itertools.islice(lm_batches(exs, tok, 4, 32, seed=3), 6)]
    again = [x["input_ids"].tolist() for x in itertools.islice(lm_batches(exs, tok, 4, 32, seed=3), 6)]
    other = [x["input_ids"].tolist() for x in itertools.islice(lm_batches(exs, tok, 4, 32, seed=4), 6)]
    assert first == again and first != other
    assert all(len(x) == 4 for x in first)  # full batches across epochs


def test_load_examples_samples_by_seed(user_task):
    from recycle.tasks import load_examples
    from recycle.registry import Registry

    assert cli("add-task", user_task).exit_code == 0
    reg = Registry()
    a = load_examples(reg, "toy", "train", n=5, seed=1)
    assert [e.text for e in a] == [e.text for e in load_examples(reg, "toy", "train", n=5, seed=1)]
    assert [e.text for e in a] != [e.text for e in load_examples(reg, "toy", "train", n=5, seed=2)]
    assert len(load_examples(reg, "toy", "test")) == 6


def test_templates_are_plain_fields(world, tmp_path):
    spec = tmp_path / "t.toml"
    text = world["specs"]["t_alpha"].read_text().replace('data_files = "', f'data_files = "{world["root"]}/')
    for template in ("{text!r:>99999999}", "{text:>999}", "{text!s}", "{text.upper}", "{text[0]}"):
        spec.write_text(text.replace('"Alpha: {text}\\nAnswer:"', json.dumps(template)))
        err = one_line_error(cli("add-task", spec))
        assert "plain field" in err, err


@pytest.mark.parametrize("split, data, words", [
    ("train = nan\ntest = 0.5", None, "split.train"),
    ("train = 0.6\nvalidation = 0.1\ntest = 0.2", None, "add up to 0.9"),
    (None, "", "is empty"),
    (None, "\n  \n", "is empty"),
    (None, "not json\nat all\n", "cannot load"),
])
def test_task_data_errors(tmp_path, split, data, words):
    f = tmp_path / "d.jsonl"
    f.write_text(data if data is not None else "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n"
                                                        for i in range(30)))
    spec = tmp_path / "t.toml"
    spec.write_text('name = "t"\ntemplate = "T: {text}"\nchoices = [" a", " b"]\nlabel_field = "label"\n'
                    f'[source]\nbuilder = "json"\ndata_files = "{f.name}"\n' + (f"[split]\n{split}\n" if split else ""))
    assert words in one_line_error(cli("add-task", spec))


def test_data_prints_literally(world, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f":x: [bold]item[/bold] {i}", "label": i % 2}) + "\n" for i in range(30)))
    spec = tmp_path / "t.toml"
    spec.write_text('name = "lit"\ntemplate = "T: {text}"\nchoices = [" a", " b"]\nlabel_field = "label"\n'
                    f'[source]\nbuilder = "json"\ndata_files = "{f.name}"\n')
    ok("add-task", spec)
    out = ok("tasks", "preview", "lit", "-n", "3").stdout
    assert ":x: [bold]item[/bold]" in out and "❌" not in out


def test_a_hub_data_set_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    spec = tmp_path / "t.toml"
    spec.write_text('name = "remote"\ntemplate = "T: {text}"\nchoices = [" a", " b"]\nlabel_field = "label"\n'
                    '[source]\nhub = "some-org/not-cached-anywhere"\n')
    t0 = time.time()
    err = one_line_error(cli("add-task", spec))
    assert "cannot load" in err and time.time() - t0 < 20
