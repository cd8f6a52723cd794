"""The one-method-one-file design: the table of methods, settings, routers as modules with
saved parameters and cross-layer state, the mixture delta, and SpectR (a router in one file)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from recycle import methods
from recycle.cli import app
from recycle.errors import RecycleError
from recycle.methods import build_routed_model
from recycle.routing import Route, Router, RoutedLoraLinear, install_routed, load_expert
from recycle.settings import parse_cli_settings

from tests.conftest import inputs, logits


def test_every_method_is_one_module_in_the_table():
    for name, m in methods.METHODS.items():
        assert m.name == name and m.summary and m.__module__ == f"recycle.methods.{name.replace('-', '_')}"
        m.settings({"expert": "x"} if "expert" in m.Settings.names() else {})  # the defaults are valid
    assert methods.DEFAULT_EVAL == ("base", "uniform", "arrow", "avg-activation", "retrieval", "phatgoose",
                                    "oracle", "multitask")
    helped = CliRunner().invoke(app, ["compose", "create", "--help"], env={"COLUMNS": "200"}).stdout
    for name in methods.METHODS:
        assert f"{name}: " in helped, name
    assert "--top-k (2)" in helped and "--iters (15)" in helped


def test_settings_are_checked_once_with_one_line_errors():
    arrow = methods.get("arrow")
    assert arrow.settings({"top_k": 3}).top_k == 3
    with pytest.raises(RecycleError, match=r"arrow takes no setting --tau \(its settings: --top-k"):
        arrow.settings({"tau": 0.5})
    with pytest.raises(RecycleError, match="--top-k must be int"):
        arrow.settings({"top_k": "2"})
    with pytest.raises(RecycleError, match="--top-k must be at least 1"):
        arrow.settings({"top_k": 0})
    with pytest.raises(RecycleError, match="--temperature must be float"):
        arrow.settings({"temperature": float("nan")})
    assert arrow.settings({}).hash != arrow.settings({"seed": 1}).hash
    S = arrow.Settings
    assert parse_cli_settings(S, "arrow", ["--top-k", "3", "--weighting=sigmoid"]) == {"top_k": 3, "weighting": "sigmoid"}
    with pytest.raises(RecycleError, match="--top-k must be int, not 'x'"):
        parse_cli_settings(S, "arrow", ["--top-k", "x"])
    with pytest.raises(RecycleError, match="arrow takes no option --zero"):
        parse_cli_settings(S, "arrow", ["--zero", "1"])
    with pytest.raises(RecycleError, match="unexpected argument"):
        parse_cli_settings(S, "arrow", ["stray"])
    assert methods.parse("single ea")[1] == {"expert": "ea"}
    with pytest.raises(RecycleError, match="takes no argument"):
        methods.parse("uniform ea")
    with pytest.raises(RecycleError, match="unknown method"):
        methods.parse("magic")


class ScaledGate(Router):
    """A toy router with a learned parameter and cross-layer state: every token goes to
    expert 0 with weight ``w`` (a parameter), and records how many earlier layers of its kind
    it saw in this forward pass."""

    name = "toy"
    keeps_logits = True

    def __init__(self, layer):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.seen = []

    def forward(self, x, layer):
        x = x.reshape(-1, x.shape[-1])
        prev = layer.context.logits.get(layer.kind)
        self.seen.append(None if prev is None else int(prev[0, 0]))
        logits = torch.full((x.shape[0], layer.n_experts), 0.0 if prev is None else float(prev[0, 0]) + 1)
        idx = torch.zeros(x.shape[0], 1, dtype=torch.long)
        return Route(idx, self.w.expand(x.shape[0], 1), logits)


def test_router_parameters_save_and_load_and_context_carries_state(llama, adapters, tmp_path):
    from recycle.files import load_tensors, save_tensors

    experts = [load_expert(adapters["a"], "a")]
    batch = inputs()
    with install_routed(llama, experts, ScaledGate, "toy") as h:
        ref = logits(llama, batch)
        q0, q1 = h.layers["model.layers.0.self_attn.q_proj"], h.layers["model.layers.1.self_attn.q_proj"]
        # layer 1 saw layer 0's logits of the same kind; the context was reset for the next forward
        assert q0.router.seen == [None] and q1.router.seen == [0]
        logits(llama, batch)
        assert q0.router.seen == [None, None] and q1.router.seen == [0, 0]
        with torch.no_grad():
            for p in h.router_parameters():
                p.fill_(0.5)
        half = logits(llama, batch)
        save_tensors(tmp_path / "router.safetensors", h.router_state())
    assert not torch.allclose(half, ref, atol=1e-4)
    assert h.router_state() == {}  # removed: the layers are gone
    with install_routed(llama, experts, ScaledGate, "toy") as h2:
        torch.testing.assert_close(logits(llama, batch), ref)
        state = load_tensors(tmp_path / "router.safetensors")
        assert set(state) == {f"{p}/w" for p in h2.layers}
        h2.load_router_state(state)
        torch.testing.assert_close(logits(llama, batch), half)
        bad = dict(state)
        bad[next(iter(bad))] = torch.ones(2)
        with pytest.raises(RecycleError, match="has shape"):
            h2.load_router_state(bad)
        with pytest.raises(RecycleError, match="does not route"):
            h2.load_router_state({**state, "model.nowhere/w": torch.ones(1)})


def test_the_layer_hands_back_the_mixture_delta(llama, adapters):
    names = ["a", "b", "d"]
    gates = {n: {p: torch.randn(llama.get_submodule(p).in_features, generator=torch.Generator().manual_seed(i))
                 for p in load_expert(adapters[n]).modules} for i, n in enumerate(names)}
    batch = inputs()
    with build_routed_model(llama, {n: adapters[n] for n in names}, "phatgoose", top_k=2, gates=gates) as h:
        plain = logits(llama, batch)
        h.context.keep_deltas = True
        seen = {}

        def keep(module, args, out):
            seen.setdefault(module.path, (args[0], out.clone()))

        for layer in h.layers.values():
            layer.register_forward_hook(keep)
        kept = logits(llama, batch)
        torch.testing.assert_close(kept, plain)
        q = h.layers["model.layers.1.self_attn.q_proj"]
        x, out = seen[q.path]
        x2d = x.reshape(-1, x.shape[-1])
        route = q.router(x, q)
        delta = h.context.deltas[q.kind]  # the last layer of that kind in this forward: layer 1
        torch.testing.assert_close(delta, q.dense_delta(x2d, route.idx, route.weight), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.reshape(-1, out.shape[-1]), q.base_layer(x2d) + delta, atol=1e-5, rtol=1e-5)
        logits_full = route.logits
        assert logits_full.shape == (x2d.shape[0], 3)
        torch.testing.assert_close(logits_full.topk(2).values.softmax(-1), route.weight, atol=1e-5, rtol=1e-5)


def test_spectr_scores_are_the_spectral_norms_and_mix_the_deltas(llama, adapters):
    from recycle.routing import SpectrRouter

    names = ["a", "b", "c", "e"]
    batch = inputs()
    with build_routed_model(llama, {n: adapters[n] for n in names}, "spectr", top_k=2) as h:
        layer = h.layers["model.layers.0.self_attn.q_proj"]
        assert isinstance(layer.router, SpectrRouter)
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
        scores, _ = layer.router.scores(x)
        for j, (A, B) in enumerate(layer.factors()):
            delta_w = layer.scalings[j] * (B.double() @ A.double())
            _, S, Vh = torch.linalg.svd(delta_w)
            V = Vh[S > S.max() * 1e-9]
            torch.testing.assert_close(scores[:, j].double(), (x.double() @ V.T).norm(dim=-1), atol=1e-4, rtol=1e-4)
        route = layer.router(x, layer)
        assert torch.equal(route.weight, torch.full((5, 2), 0.5))  # the authors' 1/k
        expected = torch.zeros(5, layer.out_features)
        for t in range(5):
            for j in route.idx[t].tolist():
                A, B = list(layer.factors())[j]
                expected[t] += 0.5 * layer.scalings[j] * (B @ (A @ x[t]))
        torch.testing.assert_close(layer.sparse_delta(x, route.idx, route.weight), expected, atol=1e-4, rtol=1e-4)
        routed = logits(llama, batch)
    assert not torch.allclose(routed, logits(llama, batch), atol=1e-4)


def test_spectr_on_rank_one_experts_chooses_as_arrow():
    """With rank-1 deltas, ‖V_iᵀx‖ = |v_i·x|: SpectR picks what Arrow picks."""
    from recycle.routing import SpectrRouter
    from recycle.routing import ArrowRouter, ExpertModule, RoutedLoraLinear

    g = torch.Generator().manual_seed(4)
    base = nn.Linear(32, 16)
    experts = [(i, f"e{i}", ExpertModule(torch.randn(1, 32, generator=g), torch.randn(16, 1, generator=g), 2.0))
               for i in range(6)]
    x = torch.randn(40, 32, generator=g)
    choices = []
    for make in (lambda lay: SpectrRouter(lay, top_k=2), lambda lay: ArrowRouter(lay, top_k=2, iters=200)):
        layer = RoutedLoraLinear(base, "lin", experts, 6)
        layer.set_router(make(layer))
        choices.append(layer.router(x, layer).idx.sort(1).values)
    assert torch.equal(choices[0], choices[1])


def test_token_routers_refuse_bad_settings_and_top_k_is_capped(llama, adapters):
    with pytest.raises(RecycleError, match="--weighting"):
        build_routed_model(llama, {"a": adapters["a"]}, "spectr", weighting="max")
    with build_routed_model(llama, {"a": adapters["a"], "b": adapters["b"]}, "spectr", top_k=5) as h:
        layer = next(iter(h.layers.values()))
        route = layer.router(torch.randn(3, layer.in_features), layer)
        assert route.idx.shape == (3, 2) and math.isclose(float(route.weight.sum(1)[0]), 1.0)


@pytest.mark.parametrize("dense", [True, False])
def test_siblings_share_their_scores_and_a_products(llama, adapters, monkeypatch, dense):
    """q/k/v and gate/up read one input each: with PHATGOOSE routing their standardisation
    and scores (and with dense dispatch their A products) are computed once per input, with
    the same routing and output as each module alone."""
    monkeypatch.setattr(RoutedLoraLinear, "dense_max_columns", 10**6 if dense else 0)
    names = ["a", "b", "c"]
    gates = {n: {p: torch.randn(llama.get_submodule(p).in_features, generator=torch.Generator().manual_seed(i))
                 for p in load_expert(adapters[n]).modules} for i, n in enumerate(names)}
    batch = inputs(batch=3, seq=8)
    with build_routed_model(llama, {n: adapters[n] for n in names}, "phatgoose", top_k=2, gates=gates) as h:
        groups = h.context.groups
        assert all(layer.dense == dense for layer in h.layers.values())
        assert all((g.A is not None) == dense for g in groups)
        assert sorted(sorted(layer.path.rsplit(".", 1)[1] for layer in g.layers) for g in groups) == \
            [["gate_proj", "up_proj"]] * 2 + [["k_proj", "q_proj", "v_proj"]] * 2
        calls = []
        for g in groups:
            real = g._compute
            g._compute = lambda x, eps, real=real: (calls.append(1), real(x, eps))[1]
        with h.record() as shared_rec:
            shared = logits(llama, batch)
        assert len(calls) == 4  # once per group and forward, not once per module
        with torch.inference_mode():  # inference tensors have no version counter
            inference = llama(**batch).logits
        assert len(calls) == 8
        torch.testing.assert_close(inference, shared)
        for layer in h.layers.values():
            layer.group = None
        with h.record() as alone_rec:
            alone = logits(llama, batch)
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    for path, calls_ in shared_rec.calls.items():
        assert torch.equal(calls_[0].idx, alone_rec.calls[path][0].idx), path


@pytest.mark.parametrize("seed", [0, None])
def test_arrow_vectors_batched_by_rank_equal_one_expert_at_a_time(seed):
    """Arrow's router vectors, computed for all experts of a rank at once, are those of the
    power iteration run one expert at a time (mixed ranks and scalings; same start, signs)."""
    from recycle.routing import ArrowRouter, ExpertModule, RoutedLoraLinear

    g = torch.Generator().manual_seed(7)
    base = nn.Linear(48, 24)
    experts = [(i, f"e{i}", ExpertModule(torch.randn(r, 48, generator=g), torch.randn(24, r, generator=g), s))
               for i, (r, s) in enumerate([(4, 2.0), (8, 0.5), (4, 1.0), (2, 4.0), (8, 2.0), (4, 0.25), (1, 1.0)])]
    layer = RoutedLoraLinear(base, "lin", experts, len(experts))
    torch.manual_seed(11)
    batched = ArrowRouter.top_right_singular(layer, seed, 15)
    torch.manual_seed(11)
    single = torch.stack([ArrowRouter._top_right_singular(A, B, seed, 15) for A, B in layer.factors()])
    assert batched.shape == (7, 48)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    # the same keys as the router the method installs
    torch.manual_seed(11)
    torch.testing.assert_close(ArrowRouter(layer, top_k=2, seed=seed).keys, single, rtol=1e-5, atol=1e-6)


def test_spectr_keys_batched_by_rank_equal_one_expert_at_a_time():
    """SpectR's right-singular vectors, computed for all experts of a rank at once, are
    those of each expert alone (mixed ranks and scalings, a rank-deficient expert included)."""
    from recycle.routing import ExpertModule, RoutedLoraLinear, right_singular_vectors
    from recycle.routing.routers import layer_right_singular_vectors

    g = torch.Generator().manual_seed(8)
    base = nn.Linear(40, 20)
    specs = [(4, 2.0), (8, 0.5), (4, 1.0), (2, 4.0), (8, 2.0), (1, 1.0)]
    experts = [(i, f"e{i}", ExpertModule(torch.randn(r, 40, generator=g), torch.randn(20, r, generator=g), s))
               for i, (r, s) in enumerate(specs)]
    deficient = torch.cat([torch.randn(20, 2, generator=g), torch.zeros(20, 2)], 1)  # a rank-4 B of rank 2
    experts.append((6, "e6", ExpertModule(torch.randn(4, 40, generator=g), deficient, 1.0)))
    layer = RoutedLoraLinear(base, "lin", experts, len(experts))
    batched = layer_right_singular_vectors(layer)
    single = [right_singular_vectors(A, B) for A, B in layer.factors()]
    assert [v.shape[0] for v in batched] == [v.shape[0] for v in single] == [4, 8, 4, 2, 8, 1, 2]
    for b, s in zip(batched, single):
        # the same subspace: the projectors agree (singular vectors are defined up to sign)
        torch.testing.assert_close(b.T @ b, s.T @ s, rtol=1e-9, atol=1e-9)


def test_spectr_scores_through_the_stored_rows_equal_the_singular_vectors():
    """SpectR scores ‖M_i A_i x‖ from the layer's own A rows (mixed ranks and scalings, a
    rank-deficient B) equal ‖V_iᵀ x‖ with the right-singular vectors; an ill-conditioned A
    falls back to stored vectors, with the same scores."""
    from recycle.routing import ExpertModule, RoutedLoraLinear, SpectrRouter, right_singular_vectors

    g = torch.Generator().manual_seed(9)
    base = nn.Linear(40, 20)
    specs = [(4, 2.0), (8, 0.5), (4, 1.0), (2, 4.0), (8, 2.0), (1, 1.0)]
    experts = [(i, f"e{i}", ExpertModule(torch.randn(r, 40, generator=g), torch.randn(20, r, generator=g), s))
               for i, (r, s) in enumerate(specs)]
    deficient = torch.cat([torch.randn(20, 2, generator=g), torch.zeros(20, 2)], 1)
    experts.append((6, "e6", ExpertModule(torch.randn(4, 40, generator=g), deficient, 1.0)))
    x = torch.randn(9, 40, generator=g)

    def explicit(layer):
        return torch.stack([(x.double() @ right_singular_vectors(A, B).T).norm(dim=-1) for A, B in layer.factors()], 1)

    layer = RoutedLoraLinear(base, "lin", experts, len(experts))
    router = SpectrRouter(layer)
    assert router.groups is not None and not hasattr(router, "keys")
    torch.testing.assert_close(router.scores(x)[0].double(), explicit(layer), atol=1e-4, rtol=1e-4)
    same = [(i, f"e{i}", ExpertModule(torch.randn(8, 40, generator=g), torch.randn(20, 8, generator=g), 2.0))
            for i in range(5)]  # one rank: the batched path over rows in expert order
    layer = RoutedLoraLinear(base, "lin", same, 5)
    router = SpectrRouter(layer)
    assert router.uniform
    torch.testing.assert_close(router.scores(x)[0].double(), explicit(layer), atol=1e-4, rtol=1e-4)
    bad_a = torch.randn(4, 40, generator=g)
    bad_a[3] = bad_a[2] + 1e-7 * torch.randn(40, generator=g)  # nearly rank 3
    layer = RoutedLoraLinear(base, "lin", [*same[:2], (2, "e2", ExpertModule(bad_a, torch.randn(20, 4, generator=g),
                                                                             1.0))], 3)
    router = SpectrRouter(layer)
    assert router.groups is None and router.keys.shape[0] == 40
    torch.testing.assert_close(router.scores(x)[0].double(), explicit(layer), atol=1e-4, rtol=1e-4)
