"""recycle eval: rank classification, stored results, S/U/H, and Ray determinism."""

from __future__ import annotations

import json
import math
import os
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from recycle.cli import app
from recycle.data import Example
from recycle.stats import suh, wilson
from recycle.scoring import score_choices

from tests.conftest import cli, ok, one_line_error, train_real_gates

runner = CliRunner()


@pytest.fixture
def registered(world, tmp_path):
    for spec in world["specs"].values():
        ok("add-task", spec)
    ok("add-expert", world["adapters"]["ea"], "--task", "t_alpha", "--base", "tiny-llama")
    return world


def test_rank_classification_hand_computed(tiny_base):
    """All weights zero: every next token has probability 1/V, so every choice scores
    exactly -log V whatever its length (the mean over its tokens, not the sum)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    V = model.config.vocab_size
    (s,) = score_choices(model, tok, [Example("Q:", [" a", " bbbbbbbb"], " a", 0, "")])
    assert s == pytest.approx([-math.log(V), -math.log(V)], abs=1e-5)


def test_suh_and_wilson_constructed():
    r = suh([0.8, 0.6], [0.4])
    assert r["S"] == pytest.approx(0.7) and r["U"] == pytest.approx(0.4)
    assert r["H"] == pytest.approx(2 * 0.7 * 0.4 / 1.1)
    lo, hi = wilson(80, 100)
    assert lo == pytest.approx(0.7112, abs=1e-3) and hi == pytest.approx(0.8666, abs=1e-3)


def test_oracle_equals_single_and_results_are_reused(registered, ray_local):
    r = ok("eval", "--methods", "oracle,single ea", "--tasks", "t_alpha", "-n", "12", "--json")
    res = {x["label"]: x for x in json.loads(r.stdout)["results"]}
    assert res["oracle"]["accuracy"] == res["single ea"]["accuracy"]
    conn = sqlite3.connect(os.environ["RECYCLE_DB"])
    preds = dict(conn.execute("select label, predictions from eval_results"))
    assert preds["oracle"] == preds["single ea"]
    # the same settings again: stored results are reused, not recomputed
    r2 = runner.invoke(app, ["eval", "--methods", "oracle,single ea", "--tasks", "t_alpha", "-n", "12", "--json"])
    assert r2.exit_code == 0 and "reusing 2 stored result" in r2.stderr
    reused = conn.execute("select count(*) from eval_results where reused_from is not null").fetchone()[0]
    assert reused == 2
    runs = json.loads(ok("eval", "runs", "--json").stdout)
    assert [x["results"] for x in runs] == [2, 2]
    shown = json.loads(ok("eval", "show", "2", "--json").stdout)
    assert shown["summary"]["methods"]["oracle"]["tasks"]["t_alpha"] == res["oracle"]["accuracy"]


def test_generalised_zero_shot_table_and_routing_report(registered, ray_local, tmp_path):
    ok("add-expert", registered["adapters"]["eb"], "--task", "t_beta", "--base", "tiny-llama")
    train_real_gates(["ea", "eb"])
    # make t_beta held-out: its expert leaves the registry, its gates with it
    ok("experts", "remove", "eb", "--yes")
    r = ok("eval", "--methods", "base,phatgoose", "--tasks", "all", "-n", "10", "--json")
    summary = json.loads(r.stdout)["summary"]
    assert summary["held"] == {"t_alpha": "in", "t_beta": "out"}
    pg = summary["methods"]["phatgoose"]
    assert pg["S"] == pg["tasks"]["t_alpha"] and pg["U"] == pg["tasks"]["t_beta"]
    if pg["S"] + pg["U"] > 0:
        assert pg["H"] == pytest.approx(2 * pg["S"] * pg["U"] / (pg["S"] + pg["U"]))
    table = ok("eval", "show", "1").stdout
    assert "held-out avg" in table and "H" in table
    csv_out = ok("eval", "show", "1", "--csv").stdout.splitlines()
    assert csv_out[0].startswith("method,t_alpha (in),t_beta (out)")
    plot = tmp_path / "routing.png"
    ok("report", "1", "--plot", plot)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # a plot never replaces a device, a FIFO or a folder; an unwritable place is one line
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad, words in [("/dev/full", "character device"), (fifo, "it is a FIFO"), (tmp_path, "it is a folder"),
                       ("/proc/routing.png", "cannot write"), (tmp_path / "no" / "r.png", "does not exist")]:
        err = one_line_error(runner.invoke(app, ["report", "1", "--plot", str(bad)]))
        assert words in err and "Error:" not in err.removeprefix("Error:"), err
    assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")
    link = tmp_path / "link.png"
    link.symlink_to(plot)
    ok("report", "1", "--plot", link)
    assert link.is_symlink() and plot.read_bytes()[:4] == b"\x89PNG"
    mats = json.loads(ok("report", "1", "--json").stdout)
    assert mats["experts"] == ["ea"] and mats["tasks"] == ["t_alpha", "t_beta"]
    # one routed expert, k=2 capped at 1: every token uses it
    assert all(v == pytest.approx(1.0) for row in mats["task_expert"] for v in row)


def test_bad_eval_requests(registered, ray_local):
    assert "unknown method" in one_line_error(runner.invoke(app, ["eval", "--methods", "magic"]))
    assert "unknown task" in one_line_error(runner.invoke(app, ["eval", "--methods", "base", "--tasks", "nope"]))
    assert "-n must be" in one_line_error(runner.invoke(app, ["eval", "--methods", "base", "-n", "0"]))
    assert "train-gates" in one_line_error(runner.invoke(app, ["eval", "--methods", "phatgoose"]))
    one_line_error(runner.invoke(app, ["eval", "show", "99"]))


def test_one_worker_equals_two_workers(registered):
    """The same evaluation on a 1-CPU and a 2-CPU local Ray gives identical results."""
    import ray

    if ray.is_initialized():  # the module's shared Ray: this test needs its own sizes
        ray.shutdown()
    outs = []
    for cpus in (1, 2):
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            r = ok("eval", "--methods", "base,uniform,arrow", "--tasks", "all", "-n", "8", "--force", "--json")
        finally:
            ray.shutdown()
        outs.append(sorted((x["label"], x["task"], x["correct"], json.dumps(x.get("routing"), sort_keys=True))
                           for x in json.loads(r.stdout)["results"]))
    assert outs[0] == outs[1]
    conn = sqlite3.connect(os.environ["RECYCLE_DB"])
    p = list(conn.execute("select run_id, label, task, predictions from eval_results order by run_id, label, task"))
    first = [x[1:] for x in p if x[0] == 1]
    second = [x[1:] for x in p if x[0] == 2]
    assert first == second


def test_every_choice_score_is_stored_and_methods_compare_paired(registered, ray_local):
    from recycle import evaluation as E
    from recycle.registry import Registry
    from recycle.stats import mcnemar, paired_bootstrap

    ok("add-expert", registered["adapters"]["eb"], "--task", "t_beta", "--base", "tiny-llama")
    outcome = E.evaluate(Registry(), E.EvalRequest(methods=("base", "uniform", "spectr"), tasks="all"))
    assert isinstance(outcome.run_id, int) and not outcome.failures
    rows = Registry().run_results(outcome.run_id)
    assert {r["label"] for r in rows} == {"base", "uniform", "spectr"}
    for r in rows:
        assert len(r["scores"]) == len(r["labels"]) == r["n"] == 6  # the whole test split
        assert all(len(s) == 2 for s in r["scores"])  # both tasks have two choices
        assert r["predictions"] == [max(range(len(s)), key=s.__getitem__) for s in r["scores"]]
        assert r["correct"] == sum(p == y for p, y in zip(r["predictions"], r["labels"]))
    spectr = [r for r in rows if r["label"] == "spectr"][0]
    # top-2: two products at q and v (both experts there), one at up (ea only) and down (eb only)
    assert spectr["extra"]["lora_products"] == pytest.approx(1.5)
    assert spectr["extra"]["kinds"] == {"lora": pytest.approx(1.5)}
    cmp = E.compare(rows, "uniform", "base")
    assert [t["task"] for t in cmp["tasks"]] == ["t_alpha", "t_beta"]
    assert set(cmp["pooled"]) == {"held-in", "all"}
    shown = runner.invoke(app, ["eval", "show", str(outcome.run_id), "--compare", "uniform,base"])
    assert shown.exit_code == 0 and "McNemar p" in shown.stdout and "paired bootstrap p" in shown.stdout
    assert "--compare takes two" in one_line_error(runner.invoke(app, ["eval", "show", str(outcome.run_id),
                                                                       "--compare", "uniform"]))
    assert "no results for 'nope'" in one_line_error(runner.invoke(app, ["eval", "show", str(outcome.run_id),
                                                                         "--compare", "nope,base"]))
    # the statistics against hand computations
    assert mcnemar([1, 1, 0, 0, 1], [0, 0, 0, 1, 1]) == {"a_only": 2, "b_only": 1, "p": 1.0}
    assert mcnemar([1] * 10, [0] * 10)["p"] == pytest.approx(2 / 2**10)
    same = paired_bootstrap([([1, 0, 1, 1], [1, 0, 1, 1])], reps=200)
    assert same["diff"] == 0 and same["p"] == 1.0
    better = paired_bootstrap([([1] * 40, [0] * 20 + [1] * 20)], reps=500)
    assert better["diff"] == 0.5 and better["ci_low"] > 0.3 and better["p"] < 0.01


def test_balanced_accuracy_does_not_reward_the_majority_answer(registered, ray_local):
    """Balanced accuracy (mean recall over a task's classes) by hand, in its paired bootstrap,
    and through ``eval show --metric balanced`` (table and --compare) on a real run."""
    import numpy as np

    from recycle import evaluation as E
    from recycle.registry import Registry
    from recycle.stats import balanced_accuracy, paired_bootstrap, paired_bootstrap_balanced

    # 30 of class 0, 10 of class 1: always answering 0 is right 75% of the time but scores 0.5
    y = [0] * 30 + [1] * 10
    assert balanced_accuracy(y, [0] * 40) == 0.5
    assert balanced_accuracy(y, [0] * 30 + [1] * 5 + [0] * 5) == pytest.approx((1 + 0.5) / 2)
    assert balanced_accuracy([2, 2, 0], [2, 0, 0]) == pytest.approx((1 + 0.5) / 2)  # labels need not be 0..k
    # per row of a resample, over the classes that row holds
    assert list(balanced_accuracy(np.array([[0, 0, 1], [0, 0, 0]]), np.array([[0, 1, 1], [0, 0, 1]]))) == \
        pytest.approx([(0.5 + 1) / 2, 2 / 3])
    with pytest.raises(ValueError):
        balanced_accuracy([0, 1], [0])
    # a method that learnt the other class too: plain accuracy calls the two level, balanced does not
    learnt = [0] * 20 + [1] * 10 + [1] * 10
    assert paired_bootstrap([([p == t for p, t in zip(learnt, y)], [True] * 30 + [False] * 10)], reps=300)["diff"] \
        == pytest.approx(0)
    b = paired_bootstrap_balanced([(y, learnt, [0] * 40)], reps=300)
    assert b["diff"] == pytest.approx((20 / 30 + 1) / 2 - 0.5) and b["ci_low"] > 0
    assert paired_bootstrap_balanced([(y, y, y)], reps=100)["p"] == 1.0

    outcome = E.evaluate(Registry(), E.EvalRequest(methods=("base", "uniform"), tasks="all"))
    rows = Registry().run_results(outcome.run_id)
    summary = E.summarise(rows, "balanced")
    for r in rows:
        assert summary["methods"][r["label"]]["tasks"][r["task"]] == pytest.approx(
            balanced_accuracy(r["labels"], r["predictions"]))
    cmp = E.compare(rows, "uniform", "base", metric="balanced", reps=200)
    assert cmp["metric"] == "balanced" and all(0 <= t["p"] <= 1 for t in cmp["tasks"])
    shown = runner.invoke(app, ["eval", "show", str(outcome.run_id), "--metric", "balanced"])
    assert shown.exit_code == 0 and "balanced accuracy" in shown.stdout
    shown = runner.invoke(app, ["eval", "show", str(outcome.run_id), "--compare", "uniform,base", "--metric", "balanced"])
    assert shown.exit_code == 0 and "mean balanced accuracy difference" in shown.stdout and "bootstrap p" in shown.stdout
    assert "--metric 'f1'" in one_line_error(runner.invoke(app, ["eval", "show", str(outcome.run_id), "--metric", "f1"]))


def test_a_task_group_shares_the_layers_below_the_experts_exactly(registered, make_adapter):
    """Every method of a task on one worker, with experts on the top two layers only: layers
    0-1 run once (recorded by the first method) and are replayed for the others, giving the
    very same scores as each method computed alone."""
    from recycle import evaluation as E
    from recycle.methods import Plan
    from recycle.registry import Registry

    ok("experts", "remove", "ea", "--yes")
    for name, task, seed in (("ta", "t_alpha", 21), ("tb", "t_beta", 22)):
        folder = make_adapter(registered["root"] / name, seed=seed, targets=("q_proj", "v_proj", "up_proj"),
                              layers_to_transform=[2, 3])
        ok("add-expert", folder, "--task", task, "--base", "tiny-llama", "--name", name)
    reg = Registry()
    jobs, _ = E.plan_eval(reg, E.EvalRequest(methods=("base", "uniform", "arrow", "spectr", "oracle"), tasks="t_alpha"))
    assert {E.lowest_adapted_layer(Plan.from_dict(j.plan)) for j in jobs} == {2}
    shared = E.run_eval_group(E.EvalGroup("t_alpha", jobs))
    alone = E.run_eval_group(E.EvalGroup("t_alpha", jobs, share=False))
    assert not [r for r in shared["results"] + alone["results"] if "error" in r], shared["results"]
    assert shared["trunk"] == 2 and alone["trunk"] is None
    assert [r["result"]["scores"] for r in shared["results"]] == [r["result"]["scores"] for r in alone["results"]]


def test_empty_and_repeated_lists(registered):
    """An empty --methods, --compositions or --tasks is refused before anything runs (it used
    to mean every method, or 'no tasks registered'); a task or method named twice runs once."""
    from recycle import evaluation as E
    from recycle.registry import Registry

    for option in ("--methods", "--compositions", "--tasks"):
        for value in ("", " , "):
            err = one_line_error(runner.invoke(app, ["eval", option, value]))
            assert f"{option} is empty" in err
    assert json.loads(ok("eval", "runs", "--json").stdout) == []
    jobs, _ = E.plan_eval(Registry(), E.EvalRequest(methods=("base",), tasks="t_alpha,t_beta,t_alpha"))
    assert [j.task for j in jobs] == ["t_alpha", "t_beta"]
    request = E.EvalRequest(methods=("base", "uniform", "base"), compositions=("c", "c"))
    assert request.methods == ("base", "uniform") and request.compositions == ("c",)


def test_held_in_tasks_can_take_a_smaller_sample(registered):
    """--n-held-in: held-in tasks are sampled to their own size (keyed by it, recorded with the
    run), held-out tasks keep -n; left out, both take -n."""
    from recycle import evaluation as E
    from recycle.registry import Registry

    reg = Registry()
    jobs, _ = E.plan_eval(reg, E.EvalRequest(methods=("base",), tasks="all", n=6, n_held_in=3))
    sizes = {(j.task, j.held): len(j.examples) for j in jobs}
    assert sizes == {("t_alpha", "in"): 3, ("t_beta", "out"): 6}
    same, _ = E.plan_eval(reg, E.EvalRequest(methods=("base",), tasks="all", n=6))
    assert {(j.task, len(j.examples)) for j in same} == {("t_alpha", 6), ("t_beta", 6)}
    keys = {j.task: j.key for j in jobs}
    assert keys["t_beta"] == {j.task: j.key for j in same}["t_beta"] and keys["t_alpha"] != same[0].key
    assert E.EvalRequest(n=6, n_held_in=3).record()["n_held_in"] == 3
    assert "n_held_in" not in E.EvalRequest(n=6).record()
    assert "--n-held-in must be at least 1" in one_line_error(runner.invoke(app, ["eval", "--n-held-in", "0"]))


def test_dead_and_interrupted_runs_agree(world):
    import sqlite3

    from recycle.registry import Registry

    reg = Registry()
    run = reg.start_run({"x": 1})
    conn = sqlite3.connect(reg.path)
    conn.execute("update eval_runs set pid = 999999999 where id = ?", [run])  # a process that is gone
    conn.commit()
    assert reg.mark_dead_runs() == 1
    assert reg.run(run)["status"] == "died"
    shown = cli("eval", "runs", "--json")
    assert json.loads(shown.stdout)[0]["status"] == "died"


def test_the_validation_split_chooses_settings_apart_from_the_test_examples(registered, ray_local):
    """``--split validation`` scores each task's validation examples: its own result keys
    (nothing reused from, or for, the test split), the split in the run's record and table,
    and the exported example ids index the validation split."""
    from recycle.registry import Registry
    from recycle.tasks import load_examples

    test = runner.invoke(app, ["eval", "--methods", "base", "--tasks", "all", "--json"])
    val = runner.invoke(app, ["eval", "--methods", "base", "--tasks", "all", "--split", "validation", "--json"])
    assert test.exit_code == 0 and val.exit_code == 0, val.output
    reg = Registry()
    t_run, v_run = json.loads(test.stdout)["run"], json.loads(val.stdout)["run"]
    assert reg.run(v_run)["settings"]["split"] == "validation" and "split" not in reg.run(t_run)["settings"]
    t_rows, v_rows = reg.run_results(t_run), reg.run_results(v_run)
    assert {r["key"] for r in t_rows}.isdisjoint(r["key"] for r in v_rows)
    assert all(r["reused_from"] is None for r in v_rows)
    prompts = {t: [e.prompt for e in load_examples(reg, t, "validation")] for t in ("t_alpha", "t_beta")}
    exported = [json.loads(line) for line in runner.invoke(app, ["eval", "export", str(v_run)]).stdout.splitlines()]
    assert exported and all(r["example_id"] is not None for r in exported)
    from recycle.results import prompt_id

    assert all(prompt_id(prompts[r["task"]][r["example_id"]]) == r["prompt_id"] for r in exported)
    assert "validation split" in runner.invoke(app, ["eval", "show", str(v_run)]).stdout
    bad = runner.invoke(app, ["eval", "--methods", "base", "--split", "train"])
    assert bad.exit_code == 2 and "train" in bad.output
