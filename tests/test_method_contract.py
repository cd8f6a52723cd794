"""One contract for every method in ``recycle.methods.METHODS``, through the CLI on the tiny
model: compose, predict, evaluate, train and reload its trained state (where its method
trains), remove. A new method adds a row to ``CASES``, not a test."""

from __future__ import annotations

import json
import math

import pytest

from recycle import methods
from tests.conftest import cli, ok, one_line_error, train_real_gates

# method -> (what --method says, `recycle train` options when the method trains)
CASES = {
    "base": ("base", None),
    "uniform": ("uniform", None),
    "arrow": ("arrow", None),
    "spectr": ("spectr", None),
    "avg-activation": ("avg-activation", None),
    "retrieval": ("retrieval", None),
    "phatgoose": ("phatgoose", None),
    "moepp": ("moepp", ["--steps", "3", "--lr", "0.5", "--examples", "8", "--batch-size", "4"]),
    "cosmo": ("cosmo", ["--folds", "2", "--examples", "4", "--batch-size", "4"]),
    "oracle": ("oracle", None),
    "multitask": ("multitask", None),
    "single": ("single ea", None),
    "peft-arrow": ("peft-arrow", None),
}
ITEM = {"prompt": "Alpha: t_alpha item 3\nAnswer:", "choices": [" a", " b"], "task": "t_alpha"}


def test_every_method_has_a_case():
    assert set(CASES) == set(methods.METHODS)
    for name, m in methods.METHODS.items():  # a method trains exactly when it says how
        assert (CASES[name][1] is not None) == (m.TrainSettings is not None), name
        if m.TrainSettings is not None:
            assert m.state_key and m.state_what and m.train_job is not methods.Method.train_job


@pytest.fixture
def item(tmp_path):
    """``--input`` of one example of a held-in task (the oracle needs its task)."""
    path = tmp_path / "item.jsonl"
    path.write_text(json.dumps(ITEM) + "\n")
    return ["--input", path]


def _predict(name, item):
    out = json.loads(ok("predict", name, *item).stdout)
    assert out["answer"] in (" a", " b") and set(out["scores"]) == {" a", " b"}
    assert all(math.isfinite(v) for v in out["scores"].values())
    return out["scores"]


@pytest.mark.parametrize("name", list(CASES))
def test_method_contract(name, registered, ray_local, make_adapter, tmp_path, item):
    from recycle.registry import Registry

    spec, train_args = CASES[name]
    m = methods.get(name)
    if m.needs == "gates" or name == "cosmo":  # cosmo's unseen side is PHATGOOSE over its members
        train_real_gates(["ea", "eb"])
    if m.members == "multitask":
        ok("add-expert", make_adapter(tmp_path / "mt", seed=21), "--meta", "multitask=1", "--base", "tiny-llama")
    members = [] if m.members in ("one", "multitask") else ["--all"]
    if name == "peft-arrow":  # PEFT's Arrow takes experts of one rank and target set only
        ok("compose", "mixed", "--method", spec, "--all")
        assert "rank mismatch" in one_line_error(cli("predict", "mixed", *item))
        ok("add-expert", make_adapter(tmp_path / "ec", r=4, seed=13, targets=("q_proj", "v_proj", "up_proj")),
           "--name", "ec", "--task", "t_beta", "--base", "tiny-llama")
        members = ["--experts", "ea,ec"]
    ok("compose", "c", "--method", spec, *members)
    assert Registry().composition("c")["method"] == name

    if train_args is None:
        assert "nothing to train" in one_line_error(cli("train", "c"))
    else:
        if name == "cosmo":  # untrained: refused (COSMO), or as composed (MoE++: PHATGOOSE routing)
            assert "no gate yet" in one_line_error(cli("predict", "c", *item))
        else:
            _predict("c", item)
        assert "takes no option --nope" in one_line_error(cli("train", "c", "--nope", "1"))
        out = json.loads(ok("train", "c", *train_args, "--json").stdout)
        assert out["status"] == "trained"
        state = Registry().composition("c")["state"][m.state_key]
        assert state["path"] == out["path"] and state["key"] == out["key"]
        assert json.loads(ok("train", "c", *train_args, "--json").stdout)["status"] == "skipped"
        saved = open(state["path"], "rb").read()
        before = _predict("c", item)
        with open(state["path"], "ab") as f:  # a changed file is refused, not used silently
            f.write(b" ")
        assert "changed since" in one_line_error(cli("predict", "c", *item))
        with open(state["path"], "wb") as f:
            f.write(saved)
        assert _predict("c", item) == before  # the same state loads to the same scores

    _predict("c", item)
    res = json.loads(ok("eval", "--compositions", "c", "--tasks", "all", "-n", "4", "--json").stdout)
    assert {r["task"] for r in res["results"]} == {"t_alpha", "t_beta"}
    stored = Registry().run_results(res["run"])  # every example's every choice scored
    assert all(len(r["scores"]) == 4 and all(len(s) == 2 for s in r["scores"]) for r in stored)
    for r in res["results"]:
        assert r["label"] == "c" and r["n"] == 4 and r["correct"] == round(4 * r["accuracy"])
        assert ("lora_products" in (r["extra"] or {})) == m.token_routed

    ok("compose", "remove", "c")
    assert Registry().composition_or_none("c") is None
    assert "no composition named 'c'" in one_line_error(cli("predict", "c", *item))
