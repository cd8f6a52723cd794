"""MoE++ over LoRA experts: each computation-free expert against a hand computation, the
gating residual, zero-initialised equality with PHATGOOSE, the dispatch saving, and
train-router on a real Ray with the trained router saved, found done and used."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from recycle.errors import RecycleError
from recycle.methods import build_routed_model
from recycle.methods.moepp import MoeppSettings
from recycle.routing import ExpertModule, RoutedLoraLinear, RoutingContext
from recycle.routing.moepp import MARGIN, MoeppRouter

from tests.conftest import cli, inputs, logits, ok, one_line_error, random_gates, train_real_gates

D_IN, D_OUT = 24, 40


def moepp_layer(n=3, path="model.layers.1.mlp.down_proj", context=None, **settings):
    g = torch.Generator().manual_seed(7)
    base = nn.Linear(D_IN, D_OUT)
    experts = [(i, f"e{i}", ExpertModule(torch.randn(4, D_IN, generator=g), torch.randn(D_OUT, 4, generator=g), 0.5))
               for i in range(n)]
    vectors = {f"e{i}": {path: torch.randn(D_IN, generator=g)} for i in range(n)}
    layer = RoutedLoraLinear(base, path, experts, n, context or RoutingContext())
    layer.set_router(MoeppRouter(layer, vectors, MoeppSettings(**settings)))
    return layer, experts


def delta_of(experts, j, x):
    m = experts[j][2]
    return m.scaling * (x @ m.A.T @ m.B.T)


def test_untrained_router_is_phatgoose_and_never_picks_a_free_expert():
    layer, experts = moepp_layer()
    x = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(1))
    r = layer.router(x, layer)
    assert int(r.idx.max()) < 3  # LoRA experts only
    lora = r.logits[:, :3]
    # a free expert's logit: the k-th LoRA logit minus the margin (its zero-initialised advantage)
    kth = lora.topk(2).values[:, 1:]
    torch.testing.assert_close(r.logits[:, 3:], (kth - MARGIN).expand(-1, 4))
    torch.testing.assert_close(r.weight, lora.topk(2).values.softmax(-1))
    assert layer.route_names == ["e0", "e1", "e2", "@zero", "@copy", "@constant0", "@constant1"]
    assert not layer.dense  # MoE++ layers always dispatch sparsely


def count_products(layer, monkeypatch) -> tuple[list, list]:
    """The LoRA products the layer computes: assignments handed to the padded blocks, and
    (token, expert) pairs in the sparse-dense products' pattern."""
    blocks, pairs = [], []
    real_blocks, real_sampled = layer._add_products, torch.sparse.sampled_addmm
    r = layer.lora_BT.shape[1]
    layer._add_products = lambda out, x, experts, *a, **kw: (blocks.append(experts.numel()),
                                                             real_blocks(out, x, experts, *a, **kw))[1]
    monkeypatch.setattr(torch.sparse, "sampled_addmm",
                        lambda p, *a, **kw: (pairs.append(p._nnz() // r), real_sampled(p, *a, **kw))[1])
    return blocks, pairs


def test_zero_expert_drops_its_weight_and_halves_the_products(monkeypatch):
    layer, experts = moepp_layer()
    with torch.no_grad():
        layer.router.free_b[0] = 100.0  # the zero expert tops every token
    x = torch.randn(20, D_IN, generator=torch.Generator().manual_seed(2))
    r = layer.router(x, layer)
    assert bool((r.idx[:, 0] == 3).all())
    assert torch.equal(r.weight[:, 0], torch.zeros(20)) and torch.equal(r.weight[:, 1], torch.ones(20))
    expected = torch.stack([delta_of(experts, int(j), x[t]) for t, j in enumerate(r.idx[:, 1])])
    torch.testing.assert_close(layer.delta(x, r), expected, atol=1e-5, rtol=1e-5)
    blocks, pairs = count_products(layer, monkeypatch)
    with torch.no_grad():
        y = layer(x)
        layer.csr = False
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    assert pairs == [20] and blocks == [20]  # one LoRA product per token, not two, either way


def test_copy_reuses_the_previous_delta_and_acts_as_zero_without_one(monkeypatch):
    ctx = RoutingContext()
    layer, experts = moepp_layer(context=ctx)
    with torch.no_grad():
        layer.router.free_b[1] = 100.0  # copy tops every token
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(3))
    r = layer.router(x, layer)  # no previous layer of the kind: copy acts as zero
    assert bool((r.idx[:, 0] == 4).all()) and torch.equal(r.weight[:, 1], torch.ones(6))
    prev = torch.randn(6, D_OUT)
    ctx.deltas[layer.kind] = prev
    r = layer.router(x, layer)
    g = r.weight
    assert bool((g[:, 0] > 0).all()) and torch.allclose(g.sum(-1), torch.ones(6))
    expected = torch.stack([g[t, 0] * prev[t] + g[t, 1] * delta_of(experts, int(r.idx[t, 1]), x[t]) for t in range(6)])
    torch.testing.assert_close(layer.delta(x, r), expected, atol=1e-5, rtol=1e-5)
    # a token routed to zero and copy computes no LoRA product at all
    with torch.no_grad():
        layer.router.free_b[0] = 99.0
    r = layer.router(x, layer)
    assert sorted(r.idx[0].tolist()) == [3, 4]
    blocks, pairs = count_products(layer, monkeypatch)
    for csr in (True, False):
        layer.csr = csr
        torch.testing.assert_close(layer.delta(x, r), prev)  # zero's weight went to copy
    assert blocks == [] and pairs == []


def test_constant_expert_formula():
    layer, experts = moepp_layer()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.router.free_b[2] = 100.0  # constant0 tops every token
        layer.router.const_v.copy_(torch.randn(2, D_OUT, generator=g))
        layer.router.const_w.copy_(torch.randn(2, 2, D_IN, generator=g))
    x = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(6))
    r = layer.router(x, layer)
    assert bool((r.idx[:, 0] == 5).all())
    xh = torch.nn.functional.layer_norm(x, (D_IN,)) / math.sqrt(D_IN)
    expected = []
    for t in range(8):
        gc, gi = r.weight[t]
        d_i = delta_of(experts, int(r.idx[t, 1]), x[t])
        a = torch.softmax(layer.router.const_w[0] @ xh[t], -1)
        # D = the other picks' mixture renormalised to weight 1 = Δ_i
        expected.append(gi * d_i + gc * (a[0] * d_i + a[1] * layer.router.const_v[0]))
    torch.testing.assert_close(layer.delta(x, r), torch.stack(expected).detach(), atol=1e-5, rtol=1e-5)


def test_gating_residual_adds_the_previous_layers_logits():
    ctx = RoutingContext()
    layer, _ = moepp_layer(context=ctx)
    layer.router.residual = nn.Parameter(torch.randn(7, 7, generator=torch.Generator().manual_seed(8)))
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(9))
    plain = layer.router(x, layer).logits
    prev = torch.randn(5, 7)
    ctx.logits[layer.kind] = prev
    got = layer.router(x, layer).logits
    pre = torch.cat([plain[:, :3], plain[:, 3:] - (plain[:, :3].topk(2).values[:, 1:] - MARGIN)], -1) + prev @ layer.router.residual.T
    kth = pre[:, :3].topk(2).values[:, 1:]
    torch.testing.assert_close(got, torch.cat([pre[:, :3], pre[:, 3:] + kth - MARGIN], -1), atol=1e-5, rtol=1e-5)
    # the layer passes its own logits (after the residual) to the next layer of the kind
    with torch.no_grad():
        layer(x)
    torch.testing.assert_close(ctx.logits[layer.kind], got, atol=1e-5, rtol=1e-5)


def test_balance_loss_is_one_when_uniform():
    layer, _ = moepp_layer(tau=1.0)
    logits = torch.zeros(7, 7)
    idx = torch.arange(7).reshape(7, 1)
    assert float(layer.router.balance_loss(logits, idx)) == pytest.approx(1.0)
    layer2, _ = moepp_layer(tau=0.25)
    assert float(layer2.router.balance_loss(logits, idx)) < 1.0


def phatgoose_then_moepp(llama, adapters):
    """A batch, PHATGOOSE top-2's logits on it, and a builder of the zero-initialised MoE++
    composition over the same four experts and gates."""
    names = ["a", "b", "c", "d"]
    gates = random_gates(llama, adapters, names, seed=3)
    batch = inputs(batch=2, seq=9)
    folders = {n: adapters[n] for n in names}
    with build_routed_model(llama, folders, "phatgoose", top_k=2, gates=gates):
        expected = logits(llama, batch)
    return batch, expected, lambda: build_routed_model(llama, folders, "moepp", top_k=2, residual=True, gates=gates)


def test_zero_initialised_composition_equals_phatgoose_on_a_model(llama, adapters):
    batch, expected, moepp = phatgoose_then_moepp(llama, adapters)
    with moepp() as h:
        with h.record() as rec:
            got = logits(llama, batch)
        state = h.router_state()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert all(s["load"][n] == 0 for s in rec.stats().values() for n in s["load"] if n.startswith("@"))
    # learned tensors of every layer, zero; the residual only where a previous layer of the kind exists
    assert all(float(v.abs().max()) == 0 for v in state.values())
    assert "model.layers.1.self_attn.q_proj/residual" in state and "model.layers.0.self_attn.q_proj/residual" not in state


def test_distillation_teacher_is_the_untrained_composition(llama, adapters):
    from recycle.methods.moepp import distill_loss
    from recycle.routing.moepp import plain_routing

    batch, expected, moepp = phatgoose_then_moepp(llama, adapters)
    with moepp() as h:
        assert float(distill_loss(llama, h, batch)) == pytest.approx(0.0, abs=1e-6)  # zero-init: no change yet
        with torch.no_grad():  # "train" it: the zero expert and a residual take over
            for layer in h.routed:
                layer.router.free_b[0] = 5.0
                if layer.router.residual is not None:
                    layer.router.residual.normal_(0, 1.0)
        moved = logits(llama, batch)
        with plain_routing(h):
            teacher = logits(llama, batch)
        again = logits(llama, batch)  # the block restores the trained routing
        loss = distill_loss(llama, h, batch)
    torch.testing.assert_close(teacher, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again, moved)
    assert not torch.allclose(moved, expected, atol=1e-4)
    assert float(loss) > 1e-6 and loss.requires_grad


def test_moepp_settings_are_refused_in_one_line():
    with pytest.raises(RecycleError, match="--tau must be positive"):
        MoeppSettings(tau=0)
    with pytest.raises(RecycleError, match="--zero must be 0 or more"):
        MoeppSettings(zero=-1)
    with pytest.raises(RecycleError, match="100000002 computation-free experts per module; at most 64"):
        MoeppSettings(constant=100_000_000)
    MoeppSettings(zero=0, copy=0, constant=64)  # the limit itself is taken


def test_train_router_on_ray_saves_reuses_and_serves(registered, ray_local, tmp_path):
    from recycle.registry import Registry

    train_real_gates(["ea", "eb"])
    # a runaway expert count is refused when stored, not when it exhausts memory at predict
    assert "at most 64" in one_line_error(cli("compose", "big", "--method", "moepp", "--constant", "100000000",
                                              "--all"))
    assert "big" not in ok("compose", "list").stdout
    ok("compose", "m", "--method", "moepp", "--all", "--tau", "0.25", "--constant", "1")
    assert "no composition named 'nope'" in one_line_error(cli("train-router", "nope"))
    r = ok("train-router", "m", "--steps", "6", "--lr", "0.5", "--beta", "1", "--examples", "16", "--batch-size", "4",
           "--json")
    out = json.loads(r.stdout)
    assert out["status"] == "trained" and out["examples"] == 16 and out["steps"] == 6
    state = Registry().composition("m")["state"]["router"]
    from recycle.files import load_tensors, tensor_metadata

    tensors = load_tensors(state["path"])
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if k.endswith("free_b"))
    assert tensor_metadata(state["path"])["calibration"]["tasks"].keys() == {"t_alpha", "t_beta"}
    # the same settings again: found done
    assert json.loads(ok("train-router", "m", "--steps", "6", "--lr", "0.5", "--beta", "1", "--examples", "16",
                         "--batch-size", "4", "--json").stdout)["status"] == "skipped"
    # eval and predict use the trained router; the routing report shows the free experts as columns
    res = json.loads(ok("eval", "--compositions", "m", "--tasks", "all", "--json").stdout)["results"]
    for r in res:  # the trained router sends tokens to computation-free experts: fewer LoRA products
        kinds = r["extra"]["kinds"]
        assert sum(v for k, v in kinds.items() if k != "lora") > 0 and r["extra"]["lora_products"] < 2.0, kinds
        assert r["extra"]["lora_products"] == pytest.approx(kinds["lora"])
    mats = json.loads(ok("report", "1", "--json").stdout)
    assert {"@zero", "@copy", "@constant0"} <= set(mats["experts"])
    pred = json.loads(ok("predict", "m", "--prompt", "Alpha: one\nAnswer:", "--choices", " a, b").stdout)
    assert pred["answer"] in (" a", " b")
    # a changed router file is refused, not used silently
    with open(state["path"], "ab") as f:
        f.write(b" ")
    assert "changed since they were trained" in one_line_error(cli("predict", "m", "--prompt", "x", "--choices", "a,b"))
    ok("compose", "pg", "--method", "phatgoose", "--all")
    assert "has no router to train" in one_line_error(cli("train-router", "pg"))
