"""recycle lm-eval: lm-evaluation-harness on a local multiple-choice task (no hub), its
log-likelihoods against recycle's own scorer, its acc against recycle eval's accuracy; and
the per-example export of evaluation runs."""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from recycle.cli import app

from tests.conftest import ok, train_real_gates

runner = CliRunner()
N = 6  # the tiny tasks' test splits hold 6 examples


@pytest.fixture
def registered(world):
    for spec in world["specs"].values():
        ok("add-task", spec)
    ok("add-expert", world["adapters"]["ea"], "--task", "t_alpha", "--base", "tiny-llama")
    return world


def write_lm_eval_tasks(folder, registry):
    """lm-eval YAML tasks over local JSON files holding recycle's own test examples of
    t_alpha and t_beta (the seeded sample ``recycle eval -n N`` scores), so both harnesses
    see the same prompts, choices and labels. ``target_delimiter: ""``: recycle's choices
    carry their own leading space."""
    from recycle.tasks import load_examples

    folder.mkdir(exist_ok=True)
    for task in ("t_alpha", "t_beta"):
        exs = load_examples(registry, task, "test", n=N, seed=0)
        data = folder / f"{task}.json"
        data.write_text(json.dumps([{"prompt": e.prompt, "choices": e.choices, "label": e.label} for e in exs]))
        (folder / f"lm_{task}.yaml").write_text(f"""task: lm_{task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
""")
    return folder


def recycle_sums(plan, examples):
    """recycle's own scorer on the plan: per choice, mean log-prob per token × tokens."""
    from recycle import methods
    from recycle.basemodels import load_base, resolve_base

    model, tok = load_base(resolve_base(plan.base))
    scorer = methods.get(plan.method).scorer(plan, model, tok)
    try:
        means = scorer.score(examples, [None] * len(examples), batch_size=4, max_length=256).scores
    finally:
        scorer.close()
    return [[m * len(tok(c, add_special_tokens=False)["input_ids"]) for m, c in zip(ms, ex.choices)]
            for ms, ex in zip(means, examples)]


def full_sequence_sums(examples):
    """The base model's log-likelihood sums computed the plain way: one forward over
    prompt + choice, no cache, no recycle scorer."""
    from recycle.basemodels import load_base, resolve_base

    model, tok = load_base(resolve_base("tiny-llama"))
    out = []
    for ex in examples:
        row = []
        p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        for c in ex.choices:
            ci = tok(c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([p + ci])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            row.append(sum(float(lp[len(p) - 1 + k, t]) for k, t in enumerate(ci)))
        out.append(row)
    return out


def hflm_sums(folder):
    """The harness's own Hugging Face model class (HFLM) on the tiny base, same task: what it
    computes for every choice."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from recycle.basemodels import load_base, resolve_base

    model, tok = load_base(resolve_base("tiny-llama"))
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=["lm_t_beta"],
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                          log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["lm_t_beta"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


@pytest.mark.parametrize("method", ["base", "single ea"])
def test_harness_receives_recycles_log_likelihoods(registered, tmp_path, method):
    """In one worker (no Ray): the log-likelihoods lm-eval's harness got for every choice
    equal recycle's scorer's sums, document for document, to 1e-4; for the base model also
    a plain full-sequence forward's and the harness's own HFLM's."""
    from recycle import compose
    from recycle.lmeval import LMEvalJob, run_lmeval_job
    from recycle.registry import Registry
    from recycle.tasks import load_examples

    reg = Registry()
    folder = write_lm_eval_tasks(tmp_path / "lm_tasks", reg)
    plan = compose.plan(reg, method=method)
    res = run_lmeval_job(LMEvalJob(plan.label, plan.to_dict(), "lm_t_beta", str(folder), batch_size=4))
    got = res["tasks"]["lm_t_beta"]
    examples = load_examples(reg, "t_beta", "test", n=N, seed=0)
    assert len(examples) == N and got["extra"]["doc_ids"] == list(range(len(examples)))
    assert got["extra"]["choices"] == [e.choices for e in examples]
    assert got["labels"] == [e.label for e in examples]
    want = recycle_sums(plan, examples)
    for g, w in zip(got["scores"], want):
        assert g == pytest.approx(w, abs=1e-4)
    if method == "base":
        assert got["scores"] == [pytest.approx(w, abs=1e-4) for w in full_sequence_sums(examples)]
        assert got["scores"] == [pytest.approx(w, abs=1e-4) for w in hflm_sums(folder)]
    # the harness's own acc is the argmax of what it received
    assert got["accuracy"] == pytest.approx(res["results"]["results"]["lm_t_beta"]["acc,none"])


def test_lm_eval_command_stores_a_run(registered, tmp_path, ray_local):
    """recycle lm-eval through Ray: the run is an eval run like any other, lm-eval's JSON is
    written, and on the same examples its acc equals recycle eval's accuracy where both
    rank the same way: on t_alpha (every choice two tokens, two characters) acc, acc_norm
    and acc_bytes all equal it; on t_beta (choices of 2 and 4 tokens) recycle's mean per
    token equals acc_bytes and acc_norm here (this byte-level tokenizer has one token per
    byte), not acc (the sum)."""
    from recycle.registry import Registry

    folder = write_lm_eval_tasks(tmp_path / "lm_tasks", Registry())
    out = tmp_path / "lm.json"
    r = ok("lm-eval", "--method", "single ea", "--tasks", "lm_t_alpha,lm_t_beta", "--include-path", folder,
           "--output", out, "--json", "--batch-size", "4")
    run = json.loads(r.stdout)["run"]
    harness = json.loads(out.read_text())
    assert set(harness["results"]) == {"lm_t_alpha", "lm_t_beta"} and harness["recycle"]["run"] == run
    ours = json.loads(ok("eval", "--methods", "single ea", "--tasks", "t_alpha,t_beta", "-n", N, "--json").stdout)
    acc = {x["task"]: x["accuracy"] for x in ours["results"]}
    a, b = harness["results"]["lm_t_alpha"], harness["results"]["lm_t_beta"]
    assert a["acc,none"] == a["acc_norm,none"] == a["acc_bytes,none"] == pytest.approx(acc["t_alpha"])
    assert b["acc_bytes,none"] == b["acc_norm,none"] == pytest.approx(acc["t_beta"])
    # stored as a run: eval runs / show / export read it
    runs = json.loads(ok("eval", "runs", "--json").stdout)
    assert {x["id"] for x in runs} == {run, ours["run"]}
    shown = json.loads(ok("eval", "show", run, "--json").stdout)
    assert {x["task"] for x in shown["results"]} == {"lm_t_alpha", "lm_t_beta"}
    conn = sqlite3.connect(os.environ["RECYCLE_DB"])
    (n,) = conn.execute("select n from eval_results where run_id = ? and task = 'lm_t_alpha'", [run]).fetchone()
    assert n == N
    # per example, out: the lm-eval run's rows carry the harness's documents and choices
    rows = [json.loads(x) for x in ok("eval", "export", run).stdout.splitlines()]
    assert len(rows) == 2 * N and {r["method"] for r in rows} == {"single ea"}
    alpha = [r for r in rows if r["task"] == "lm_t_alpha"]
    assert [r["example_id"] for r in alpha] == list(range(N))
    assert all(r["choices"] == [" a", " b"] and r["prediction"] == max(range(2), key=r["scores"].__getitem__)
               for r in alpha)
    assert sum(r["correct"] for r in alpha) / N == pytest.approx(a["acc,none"])
    assert all(r["routing"] == {"expert_share": {"ea": 1.0}} for r in rows)  # every token through its one expert
    shown = ok("eval", "show", run, "--examples", "lm_t_beta").stdout
    assert shown.count("single ea") == N and "' d e'" in shown


def test_export_of_an_eval_run(registered, tmp_path, ray_local):
    """recycle eval export / show --examples: one row per (example, method), the choices
    re-read from the task, in jsonl, csv and parquet; the same rows in every format."""
    import pyarrow.parquet as pq

    from recycle.registry import Registry
    from recycle.tasks import load_examples

    r = ok("eval", "--methods", "base,single ea", "--tasks", "t_beta", "--json")
    run = json.loads(r.stdout)["run"]
    rows = [json.loads(x) for x in ok("eval", "export", run).stdout.splitlines()]
    full = load_examples(Registry(), "t_beta", "test")
    assert len(rows) == 2 * len(full) and [r["method"] for r in rows[:2]] == ["base", "base"]
    for r in rows:
        ex = full[r["example_id"]]
        assert r["choices"] == ex.choices and r["label"] == ex.label and len(r["scores"]) == 2
        assert r["correct"] == (r["prediction"] == r["label"])
    stored = {x["label"]: x["accuracy"] for x in json.loads(ok("eval", "show", run, "--json").stdout)["results"]}
    for label, acc in stored.items():
        mine = [x["correct"] for x in rows if x["method"] == label]
        assert sum(mine) / len(mine) == pytest.approx(acc)
    ok("eval", "export", run, "--format", "csv", "--output", tmp_path / "x.csv")
    with open(tmp_path / "x.csv") as f:
        as_csv = list(csv.DictReader(f))
    assert [json.loads(x["scores"]) for x in as_csv] == [x["scores"] for x in rows]
    ok("eval", "export", run, "--format", "parquet", "--output", tmp_path / "x.parquet")
    table = pq.read_table(tmp_path / "x.parquet").to_pylist()
    assert [x["scores"] for x in table] == [x["scores"] for x in rows]
    assert [x["choices"] for x in table] == [x["choices"] for x in rows]
    shown = ok("eval", "show", run, "--examples", "t_beta").stdout
    assert "' d e'" in shown and shown.count("single ea") == len(full)
    for args, message in ((["eval", "export", run, "--format", "xml"], "choose from"),
                          (["eval", "export", run, "--format", "parquet"], "--output"),
                          (["eval", "show", run, "--examples", "nope"], "no results for task"),
                          (["eval", "export", run, "--output", tmp_path], "not a regular file")):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 2 and message in res.stderr, res.output


def test_routed_moepp_and_cosmo_behind_the_harness(registered, tmp_path, ray_local):
    """PHATGOOSE, MoE++ and a trained COSMO composition through the harness (one worker
    each, in this process): what it received equals what recycle eval stored for the same
    examples: the token-routed ones' mean per token × tokens, COSMO's log-probabilities of
    its combined answer distribution as they are (they sum to 1 over a document's
    choices); and its acc equals recycle eval's accuracy (two-token choices)."""
    from recycle import compose
    from recycle.lmeval import LMEvalJob, run_lmeval_job
    from recycle.registry import Registry

    ok("add-expert", registered["adapters"]["eb"], "--task", "t_beta", "--base", "tiny-llama")
    train_real_gates(["ea", "eb"])
    ok("compose", "pg", "--method", "phatgoose", "--all")
    ok("compose", "moe", "--method", "moepp", "--all")
    ok("compose", "c", "--method", "cosmo", "--all")
    ok("train-cosmo-gate", "c", "--folds", "2", "--examples", "6")
    ours = json.loads(ok("eval", "--compositions", "pg,moe,c", "--tasks", "t_alpha", "-n", N, "--json").stdout)
    conn = sqlite3.connect(os.environ["RECYCLE_DB"])
    stored = {label: json.loads(s) for label, s in conn.execute("select label, scores from eval_results")}
    reg = Registry()
    folder = write_lm_eval_tasks(tmp_path / "lm_tasks", reg)
    for r in ours["results"]:
        label = r["label"]
        plan = compose.plan(reg, composition=label)
        res = run_lmeval_job(LMEvalJob(label, plan.to_dict(), "lm_t_alpha", str(folder), batch_size=4))
        got = res["tasks"]["lm_t_alpha"]
        factor = 1 if label == "c" else 2  # " a" and " b" are two tokens each
        for g, w in zip(got["scores"], stored[label]):
            assert g == pytest.approx([factor * x for x in w], abs=1e-4), label
        assert got["accuracy"] == pytest.approx(r["accuracy"]) == res["results"]["results"]["lm_t_alpha"]["acc,none"]
        if label == "c":
            assert all(sum(math.exp(x) for x in g) == pytest.approx(1.0, abs=1e-6) for g in got["scores"])
            assert len(got["extra"]["p_seen"]) == N
        else:
            assert got["extra"]["lora_products"] > 0 and res["routing"]


def test_lm_eval_errors(registered, tmp_path):
    r = runner.invoke(app, ["lm-eval", "--tasks", "x"])
    assert r.exit_code == 2 and "composition" in r.stderr
    r = runner.invoke(app, ["lm-eval", "--method", "base"])
    assert r.exit_code == 2 and "--tasks" in r.stderr
    r = runner.invoke(app, ["lm-eval", "--method", "base", "--tasks", "x", "--include-path", tmp_path / "nope"])
    assert r.exit_code == 2 and "not a folder" in r.stderr
    r = runner.invoke(app, ["lm-eval", "--method", "base", "--tasks", "x", "--output", tmp_path / "no" / "x.json"])
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_missing_lm_eval_is_one_line(registered, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: its import fails
    r = runner.invoke(app, ["lm-eval", "--method", "base", "--tasks", "arc_easy"])
    assert r.exit_code != 0 and len(r.stderr.strip().splitlines()) == 1
    assert 'pip install -e ".[lm-eval]"' in r.stderr


def test_gold_index_of_a_harness_sample():
    from recycle.lmeval import _gold

    args = [("Q:", " yes"), ("Q:", " no")]
    assert [_gold({"target": t, "arguments": args}) for t in (1, "1", "no", " yes", 5, "maybe", [0, 1])] == \
        [1, 1, 1, 0, None, None, None]
