"""COSMO: the smoothing formula by hand, the identifier and the logistic gate, leaving experts
out (a fold never uses its held-out experts), and train-cosmo-gate on a real Ray with the gate
saved, used by eval and predict, and refused when changed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recycle.errors import RecycleError
from recycle.methods import cosmo as C

from tests.conftest import cli, ok, one_line_error, train_real_gates


def test_adaptive_smoothing_by_hand():
    ps, pu = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    g, theta, t = 0.3, 0.5, 0.1
    p_u = 1 / (1 + math.exp(-(0.5 - 0.3) / 0.1))  # σ((θ − g)/T)
    raw = [p_u * (float(pu[i]) + (1 - p_u) / 3) + (1 - p_u) * (float(ps[i]) + p_u / 3) for i in range(3)]
    got, got_pu = C.combine(ps, pu, g, theta, t)
    assert got_pu == pytest.approx(p_u)
    assert got.tolist() == pytest.approx([r / sum(raw) for r in raw])
    # over the same choices the smoothing terms are equal for every choice: the argmax is the soft mixture's
    plain, _ = C.combine(ps, pu, g, theta, t, smoothing="none")
    assert int(got.argmax()) == int(plain.argmax())
    hard, hard_pu = C.combine(ps, pu, g, theta, t, gate="hard", smoothing="none")
    assert hard_pu == 1.0 and hard.tolist() == pytest.approx(pu.tolist())
    const, _ = C.combine(ps, pu, 0.9, theta, t, smoothing="constant", gamma=0.5)
    assert const.sum().item() == pytest.approx(1.0)


def test_identifier_and_logistic_gate():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    data = {f"e{i}": centres[i] + torch.randn(50, 8, generator=g) for i in range(3)}
    stats = {n: C.member_stats(h) for n, h in data.items()}
    ident = C.identifier(stats, ["e0", "e2"])  # e1 left out
    post, d_min = C.identify(ident, torch.cat([data["e0"][:5], data["e2"][:5], data["e1"][:5]]))
    assert post.shape == (15, 2)
    assert post[:5].argmax(-1).eq(0).all() and post[5:10].argmax(-1).eq(1).all()
    assert d_min[10:].mean() > 3 * d_min[:10].mean()  # the left-out expert's inputs are far from both
    x = torch.randn(200, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).double()
    lr = C.fit_logistic(x, y)
    p = C.predict_logistic(lr, x)
    assert ((p > 0.5).double() == y).double().mean() > 0.95
    # optimality of C Σ log-loss + ½‖w‖² on the standardised features: zero gradient
    w = lr["w"].clone().requires_grad_(True)
    b = lr["b"].clone().requires_grad_(True)
    z = (x - lr["mean"]) / lr["std"]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="sum") + 0.5 * w @ w
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4
    assert C.fold_split(["a", "b", "c", "d", "e"], 2, 0) == C.fold_split(["a", "b", "c", "d", "e"], 2, 0)
    assert sorted(sum(C.fold_split(["a", "b", "c", "d", "e"], 2, 0), [])) == ["a", "b", "c", "d", "e"]


def test_folds_leave_whole_families_out():
    groups = {"a": "f1", "b": "f1", "c": "f1", "d": "f2", "e": "f3", "f": "f3"}
    folds = C.fold_split(list(groups), 2, 0, groups)
    assert folds == C.fold_split(list(groups), 2, 0, groups)  # seeded
    assert sorted(sum(folds, [])) == sorted(groups)
    for fold in folds:  # a family is held out whole, in one fold
        fams = {groups[n] for n in fold}
        assert all(groups[n] not in fams for other in folds if other is not fold for n in other)
    assert sorted(len(f) for f in folds) == [3, 3]  # largest first into the emptiest fold
    assert len(C.fold_split(list(groups), 8, 0, groups)) == 3  # at most one fold a family
    with pytest.raises(RecycleError, match="at least 2 task families"):
        C.fold_split(["a", "b"], 2, 0, {"a": "f", "b": "f"})


def close(a, b):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_threshold_search_finds_the_gate_that_separates():
    """Seen tasks: the seen side is right, the unseen side wrong; pseudo-unseen tasks the
    opposite; g = 0.9 on seen inputs, 0.2 on the others: a θ between them gives H = 1."""
    rows, seen_side, unseen_side, g = [], [], [], []
    for fold in range(2):
        for task, is_seen in (("a", True), ("b", False)):
            for i in range(5):
                rows.append({"fold": fold, "task": task, "seen": is_seen, "label": 0})
                right, wrong = torch.tensor([0.9, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.8], dtype=torch.float64)
                seen_side.append(right if is_seen else wrong)
                unseen_side.append(wrong if is_seen else right)
                g.append(0.9 if is_seen else 0.2)
    theta, temp, h = C.search_threshold(rows, seen_side, unseen_side, torch.tensor(g))
    assert h == {"S": 1.0, "U": 1.0, "H": 1.0} and 0.2 <= theta < 0.9


def test_a_fold_never_uses_its_held_out_experts(registered):
    """Fold 0 holds out ea: its identifier knows eb only, its seen side is eb's own answers
    and its routed side is PHATGOOSE over eb alone (scores equal to those computed with ea
    not registered at all)."""
    from recycle import compose
    from recycle.basemodels import load_base, resolve_base
    from recycle.methods import get
    from recycle.registry import Registry
    from recycle.scoring import score_choices
    from recycle.tasks import load_examples

    train_real_gates(["ea", "eb"])
    ok("compose", "c", "--method", "cosmo", "--all")
    reg = Registry()
    plan = compose.plan(reg, composition="c")
    exs = load_examples(reg, "t_alpha", "validation") + load_examples(reg, "t_beta", "validation")
    tasks = [None] * len(exs)
    out = C.run_fold_job(C.FoldJob(plan.to_dict(), 0, ["eb"], ["ea"], exs, tasks, batch_size=4, stats=True))
    assert all(len(p) == 1 for p in out["posterior"]) and set(out["chosen"]) == {"eb"}
    model, tok = load_base(resolve_base("tiny-llama"))
    only_eb = compose.plan(reg, method="single eb")
    scorer = get("single").scorer(only_eb, model, tok)
    own = scorer.score(exs, tasks, batch_size=4).scores
    scorer.close()
    close(out["seen"]["top1"], [C.probs(s).log().tolist() for s in own])
    pg_eb = compose.plan(reg, method="phatgoose", experts=["eb"])
    scorer = get("phatgoose").scorer(pg_eb, model, tok)
    routed = scorer.score(exs, tasks, batch_size=4).scores
    scorer.close()
    close(out["routed"], routed)
    close(out["base"], score_choices(model, tok, exs, batch_size=4))
    assert set(out["stats"]) == {"ea", "eb"}  # each expert's own prototype, for the final gate only


def test_folds_sharing_passes_equal_fold_by_fold(registered, ray_local):
    """fold_results (the shared pass once, a routed pass per fold, every (example, expert)
    pair once on Ray) gives each fold what run_fold_job computes for it alone."""
    from recycle import compose
    from recycle.registry import Registry
    from recycle.settings import GateTrainSettings
    from recycle.tasks import load_examples

    train_real_gates(["ea", "eb"])
    ok("compose", "c", "--method", "cosmo", "--all")
    reg = Registry()
    plan = compose.plan(reg, composition="c")
    exs = load_examples(reg, "t_alpha", "validation") + load_examples(reg, "t_beta", "validation")
    tasks = ["t_alpha"] * (len(exs) // 2) + ["t_beta"] * (len(exs) - len(exs) // 2)
    splits = [["ea"], ["eb"]]
    shared = C.fold_results(plan, exs, tasks, splits, GateTrainSettings(batch_size=4))
    assert set(shared[0]["stats"]) == {"ea", "eb"}
    for f, held in enumerate(splits):
        keep = [n for n in ("ea", "eb") if n not in held]
        alone = C.run_fold_job(C.FoldJob(plan.to_dict(), f, keep, held, exs, tasks, batch_size=4, stats=True))
        got = shared[f]
        assert got["keep"] == keep and got["held"] == held and got["chosen"] == alone["chosen"]
        for k in ("posterior", "d_min", "routed", "base"):
            close(got[k], alone[k])
        for mode in ("top1", "posterior"):
            close(got["seen"][mode], alone["seen"][mode])


def test_train_gate_on_ray_saves_and_serves(registered, ray_local, tmp_path):
    from recycle.registry import Registry

    train_real_gates(["ea", "eb"])
    ok("compose", "c", "--method", "cosmo", "--all")
    assert "no gate yet" in one_line_error(cli("predict", "c", "--prompt", "Alpha: x\nAnswer:", "--choices", " a, b"))
    out = json.loads(ok("train-cosmo-gate", "c", "--folds", "2", "--examples", "6", "--json").stdout)
    assert out["status"] == "trained" and len(out["folds"]) == 2
    m = out["metrics"]["top1"]
    assert 0 <= m["auc"] <= 1 and 0 <= m["ece"] <= 1
    # train-gate, the command's first name, is an alias of train-cosmo-gate
    assert json.loads(ok("train-gate", "c", "--folds", "2", "--examples", "6", "--json").stdout)["status"] == "skipped"
    pred = json.loads(ok("predict", "c", "--prompt", "Alpha: t_alpha item 3\nAnswer:", "--choices", " a, b").stdout)
    assert pred["answer"] in (" a", " b") and 0 <= pred["p_seen"] <= 1 and pred["seen_expert"] in ("ea", "eb")
    assert sum(math.exp(v) for v in pred["scores"].values()) == pytest.approx(1.0, abs=1e-6)
    both = json.loads(ok("predict", "c", "--prompt", "Alpha: t_alpha item 3\nAnswer:", "--choices", " a, b",
                         "--explain").stdout)["experts"]
    assert both["seen"]["expert"] in ("ea", "eb") and set(both["seen"]["answers"]) == {" a", " b"}
    assert set(both["unseen"]["answers"]) == {" a", " b"} and both["unseen"]["experts"] and 0 <= both["p_seen"] <= 1
    data = tmp_path / "t_gamma.jsonl"  # a task no member was trained on
    data.write_text("".join(json.dumps({"text": f"gamma {j} {'q' * (j % 5)}", "label": j % 2}) + "\n"
                            for j in range(60)))
    spec = tmp_path / "t_gamma.toml"
    spec.write_text('name = "t_gamma"\ntemplate = "Gamma: {text}\\nOdd or even?"\nchoices = [" odd", " even"]\n'
                    f'label_field = "label"\n\n[source]\nbuilder = "json"\ndata_files = "{data.name}"\n')
    ok("add-task", spec)
    res = json.loads(ok("eval", "--compositions", "c", "--tasks", "all", "--json").stdout)
    assert {r["label"] for r in res["results"]} == {"c"}
    gate = res["summary"]["gates"]["c"]
    assert 0 <= gate["auc"] <= 1 and 0 <= gate["ece"] <= 1 and gate["n"] == 18
    # the gate's numbers are of its P(seen) g (what its folds report), not of the sharpened weight 1 − p_U
    from recycle.stats import expected_calibration_error
    truth = [r["held"] == "in" for r in res["results"] for _ in range(r["n"])]
    g = [v for r in res["results"] for v in r["extra"]["g"]]
    w = [v for r in res["results"] for v in r["extra"]["p_seen"]]
    assert gate["ece"] == pytest.approx(expected_calibration_error(g, truth)["ece"])
    assert gate["weight_ece"] == pytest.approx(expected_calibration_error(w, truth)["ece"])
    assert g != w and "expected calibration error" in ok("eval", "show", str(res["run"])).stdout
    for r in res["results"]:
        assert len(r["extra"]["p_seen"]) == r["n"] and set(r["extra"]["seen_expert"]) <= {"ea", "eb"}
    plot = tmp_path / "gate.png"
    ok("report", str(res["run"]), "--plot", plot)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # whole families out (tasks without one: each its own), a setting of its own key
    fam = json.loads(ok("train-cosmo-gate", "c", "--folds", "2", "--examples", "6", "--leave-out", "families",
                        "--json").stdout)
    assert fam["status"] == "trained" and sorted(fam["folds"]) == [["ea"], ["eb"]]
    assert fam["settings"]["leave_out"] == "families" and "leave_out" not in out["settings"]
    state = Registry().composition("c")["state"]["gate"]
    with open(state["path"], "ab") as f:
        f.write(b"x")
    assert "changed since it was trained" in one_line_error(cli("predict", "c", "--prompt", "x", "--choices", "a,b"))
    assert "no composition named 'nope'" in one_line_error(cli("train-cosmo-gate", "nope"))
    ok("compose", "pg", "--method", "phatgoose", "--all")
    assert "no COSMO gate to train" in one_line_error(cli("train-cosmo-gate", "pg"))


def test_cosmo_shares_the_trunk_of_its_task_group_exactly(registered, make_adapter, ray_local):
    """With experts on the top two layers, COSMO's seen, routed and base passes replay layers
    0-1 recorded once for the task group: the same scores and gate outputs as alone."""
    from recycle import evaluation as E
    from recycle.registry import Registry

    for old in ("ea", "eb"):
        ok("experts", "remove", old, "--yes")
    for name, task, seed in (("ta", "t_alpha", 21), ("tb", "t_beta", 22)):
        folder = make_adapter(registered["root"] / name, seed=seed, targets=("q_proj", "v_proj", "up_proj"),
                              layers_to_transform=[2, 3])
        ok("add-expert", folder, "--task", task, "--base", "tiny-llama", "--name", name)
    train_real_gates(["ta", "tb"])
    ok("compose", "c", "--method", "cosmo", "--all")
    ok("train-cosmo-gate", "c", "--folds", "2", "--examples", "6")
    jobs, _ = E.plan_eval(Registry(), E.EvalRequest(methods=("base", "phatgoose"), compositions=("c",),
                                                    tasks="t_alpha"))
    shared = E.run_eval_group(E.EvalGroup("t_alpha", jobs))
    alone = E.run_eval_group(E.EvalGroup("t_alpha", jobs, share=False))
    assert not [r for r in shared["results"] + alone["results"] if "error" in r], shared["results"]
    assert shared["trunk"] == 2 and alone["trunk"] is None
    assert sorted(bool((r["result"].get("extra") or {}).get("p_seen")) for r in shared["results"]) == [False, False, True]
    for a, b in zip(shared["results"], alone["results"]):
        assert a["result"]["scores"] == b["result"]["scores"]
        assert (a["result"].get("extra") or {}).get("p_seen") == (b["result"].get("extra") or {}).get("p_seen")


def test_unseen_must_name_another_stored_composition(registered):
    """Checked when stored, not when used: no such composition, itself, a path, a method's
    name, a COSMO composition, other members."""
    ok("compose", "u", "--method", "uniform", "--all")
    for unseen, words in (("nope", "no stored composition"), ("c", "its own unseen side"),
                          ("/tmp/x", "no stored composition"), ("phatgoose", "no stored composition"),
                          ("none", "no stored composition")):
        err = one_line_error(cli("compose", "c", "--method", "cosmo", "--all", "--unseen", unseen))
        assert words in err and "--unseen" in err
    ok("compose", "c1", "--method", "cosmo", "--all", "--unseen", "u")
    assert "cannot be the unseen side" in one_line_error(cli("compose", "c2", "--method", "cosmo", "--all",
                                                             "--unseen", "c1"))
    ok("compose", "ua", "--method", "uniform", "--experts", "ea")
    assert "members differ" in one_line_error(cli("compose", "c3", "--method", "cosmo", "--all", "--unseen", "ua"))
    assert sorted(c["name"] for c in json.loads(ok("compose", "list", "--json").stdout)) == ["c1", "u", "ua"]


def test_the_unseen_side_is_arrow_by_default_and_stored_compositions_keep_theirs(registered):
    """Arrow over the members unless told (method:phatgoose, or a stored composition); a
    composition stored before the default changed (unseen = "") keeps PHATGOOSE, its key unchanged."""
    from recycle import compose
    from recycle.registry import Registry

    train_real_gates(["ea", "eb"])  # PHATGOOSE's side needs them; Arrow's does not
    ok("compose", "c", "--method", "cosmo", "--all")
    ok("compose", "cp", "--method", "cosmo", "--all", "--unseen", "method:phatgoose")
    assert "choose from method:arrow, method:phatgoose" in one_line_error(
        cli("compose", "cx", "--method", "cosmo", "--all", "--unseen", "method:spectr"))
    reg = Registry()
    stored = reg.composition("c")
    assert stored["settings"]["unseen"] == "method:arrow"
    compose.create(reg, "old", "cosmo", [m["name"] for m in stored["members"]], {"unseen": ""})
    parts = {n: compose.plan(reg, composition=n).data["parts"]["unseen"]["method"] for n in ("c", "cp", "old")}
    assert parts == {"c": "arrow", "cp": "phatgoose", "old": "phatgoose"}
    assert reg.composition("old")["settings"]["unseen"] == ""


def test_a_gate_trained_for_another_unseen_side_is_refused_not_used(registered):
    """Storing the unseen side anew (other settings) leaves the COSMO composition's gate in
    place but trained for what is gone: using it is refused in one line until it is retrained."""
    prompt = ("predict", "c", "--prompt", "Alpha: t_alpha item 3\nAnswer:", "--choices", " a, b")
    ok("compose", "a", "--method", "arrow", "--all")
    ok("compose", "c", "--method", "cosmo", "--all", "--unseen", "a")
    ok("train-cosmo-gate", "c", "--folds", "2", "--examples", "6")
    before = json.loads(ok(*prompt).stdout)
    ok("compose", "a", "--method", "arrow", "--all", "--top-k", "1", "--replace")
    err = one_line_error(cli(*prompt))
    assert "its gate was trained for another unseen side" in err and "recycle train c" in err
    assert json.loads(ok("train-cosmo-gate", "c", "--folds", "2", "--examples", "6", "--json").stdout)["status"] == \
        "trained"
    after = json.loads(ok(*prompt).stdout)
    assert after["answer"] in (" a", " b") and set(after) == set(before)
