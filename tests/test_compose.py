"""compose and predict through the CLI, on a tiny Llama, real PEFT adapters and real gates."""

from __future__ import annotations

import json

import pytest

from tests.conftest import cli, ok, one_line_error, train_real_gates


def test_phatgoose_without_gates_is_refused_naming_the_experts(registered):
    err = one_line_error(cli("compose", "pg", "--method", "phatgoose", "--all"))
    assert "ea" in err and "eb" in err and "train-gates" in err
    train_real_gates(["ea"])
    err = one_line_error(cli("compose", "pg", "--method", "phatgoose", "--all"))
    assert err.endswith(": eb")
    train_real_gates(["eb"])
    ok("compose", "pg", "--method", "phatgoose", "--all", "--top-k", "1")
    row = json.loads(ok("compose", "show", "pg", "--json").stdout)
    assert row["method"] == "phatgoose" and row["settings"]["top_k"] == 1
    assert sorted(m["name"] for m in row["members"]) == ["ea", "eb"]


def test_compose_list_show_remove_replace(registered):
    ok("compose", "u", "--method", "uniform", "--experts", "ea,eb")
    assert "(unchanged)" in ok("compose", "u", "--method", "uniform", "--all").stderr  # the same again
    one_line_error(cli("compose", "u", "--method", "arrow", "--all"))
    ok("compose", "u", "--method", "arrow", "--all", "--replace", "--top-k", "1")
    rows = json.loads(ok("compose", "list", "--json").stdout)
    assert [(r["name"], r["method"]) for r in rows] == [("u", "arrow")]
    assert "arrow" in ok("compose", "list").stdout
    ok("compose", "remove", "u")
    assert json.loads(ok("compose", "list", "--json").stdout) == []
    one_line_error(cli("compose", "show", "u"))


def test_compose_without_a_method_builds_the_recommended_one(registered):
    from recycle import methods

    train_real_gates(["ea", "eb"])
    out = ok("compose", "mine", "--all")
    assert "recycle train mine" in out.stderr  # the recommended method (COSMO) trains its gate
    row = json.loads(ok("compose", "show", "mine", "--json").stdout)
    assert row["method"] == methods.RECOMMENDED and methods.RECOMMENDED in methods.METHODS
    assert sorted(m["name"] for m in row["members"]) == ["ea", "eb"]


def test_bad_compose_settings(registered):
    assert "unknown method" in one_line_error(cli("compose", "x", "--method", "magic", "--all"))
    assert "--top-k" in one_line_error(cli("compose", "x", "--method", "arrow", "--all", "--top-k", "0"))
    assert "weighting" in one_line_error(cli("compose", "x", "--method", "arrow", "--all", "--weighting", "max"))
    assert "no expert named" in one_line_error(cli("compose", "x", "--method", "uniform", "--experts", "ea,zz"))


def test_task_methods_need_registered_tasks(registered, world, make_adapter):
    orphan = make_adapter(world["root"] / "orphan", seed=13)
    ok("add-expert", orphan, "--base", "tiny-llama")
    err = one_line_error(cli("compose", "aa", "--method", "avg-activation", "--all"))
    assert err.endswith(": orphan")


def test_predict_single_equals_peft_model(registered, tiny_base):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recycle.data import Example
    from recycle.scoring import score_choices

    ok("compose", "only_a", "--method", "single ea")
    r = ok("predict", "only_a", "--prompt", "Alpha: thing\nAnswer:", "--choices", " a, b")
    (out,) = [json.loads(line) for line in r.stdout.splitlines()]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), registered["adapters"]["ea"]).eval()
    (want,) = score_choices(peft_model, tok, [Example("Alpha: thing\nAnswer:", [" a", " b"], " a", 0, "")])
    assert list(out["scores"].values()) == pytest.approx(want, abs=1e-5)
    assert out["answer"] == [" a", " b"][int(torch.tensor(want).argmax())]


def test_predict_phatgoose_jsonl_with_explain(registered, tmp_path):
    train_real_gates(["ea", "eb"])
    ok("compose", "pg", "--method", "phatgoose", "--all", "--top-k", "1")
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        json.dumps({"id": 1, "prompt": "Alpha: one\nAnswer:", "choices": [" a", " b"]}) + "\n"
        + json.dumps({"id": 2, "prompt": "Beta: two\nPick one:", "choices": [" c", " d e"]}) + "\n"
    )
    out_file = tmp_path / "out.jsonl"
    ok("predict", "pg", "--input", inp, "--explain", "--output", out_file)
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [x["id"] for x in lines] == [1, 2]
    for line in lines:
        assert line["answer"] in line["scores"]
        assert line["experts"], "explain lists the experts used per routed module"
        for used in line["experts"].values():
            assert set(used) <= {"ea", "eb"} and len(used) >= 1


def test_predict_oracle_uses_the_task_expert(registered, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        json.dumps({"prompt": "Beta: q\nPick one:", "choices": [" c", " d e"], "task": "t_beta"}) + "\n"
        + json.dumps({"prompt": "Alpha: q\nAnswer:", "choices": [" a", " b"], "task": "t_alpha"}) + "\n"
    )
    r = ok("predict", "oracle", "--input", inp)
    assert [json.loads(x)["expert"] for x in r.stdout.splitlines()] == ["eb", "ea"]
    inp.write_text(json.dumps({"prompt": "x", "choices": [" a", " b"], "task": "nope"}) + "\n")
    assert "no expert for task" in one_line_error(cli("predict", "oracle", "--input", inp))


def test_predict_retrieval_picks_the_nearest_task(registered):
    r = ok("predict", "retrieval", "--prompt", "t_beta item 3 xxx", "--choices", " c, d e")
    assert json.loads(r.stdout)["expert"] == "eb"


def test_predict_generation(registered):
    ok("compose", "u", "--method", "uniform", "--all")
    r = ok("predict", "u", "--prompt", "Hello", "--max-new-tokens", "3")
    assert isinstance(json.loads(r.stdout)["answer"], str)


def test_predict_bad_input(registered, tmp_path):
    ok("compose", "u", "--method", "uniform", "--all")
    assert "exactly one" in one_line_error(cli("predict", "u"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    assert "bad.jsonl:2: not JSON" in one_line_error(cli("predict", "u", "--input", bad))
    assert "no composition named" in one_line_error(cli("predict", "zz", "--prompt", "x"))


def test_changed_member_is_refused(registered, world, tmp_path):
    ok("compose", "u", "--method", "uniform", "--all")
    from recycle.registry import Registry

    reg = Registry()
    with reg.transaction() as db:
        db.execute("update experts set sha256 = 'f' || substr(sha256, 2) where name = 'ea'")
    assert "changed since it was composed" in one_line_error(cli("predict", "u", "--prompt", "x", "--choices", "a,b"))
