"""Routed inference against its peers: PEFT's PeftModel, PEFT's Arrow, explicit formulas.

Tiny models (Llama from conftest.py, T5 here) from config, adapters written by plain PEFT."""

import copy
import math

import pytest
import torch
from peft import ArrowConfig, PeftModel, create_arrow_model
from transformers import T5Config, T5ForConditionalGeneration

from recycle.errors import RecycleError
from recycle.methods import build_routed_model
from recycle.routing import (
    ExpertModule,
    GateRouter,
    RetrievalIndex,
    RoutedLoraLinear,
    SentenceEmbedder,
    compute_prototypes,
    load_expert,
    save_vectors,
)
from recycle.routing.kernels import add_csr
from tests.conftest import inputs, logits, random_gates, write_adapter

T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


@torch.no_grad()
def peft_logits(base, folder, batch):
    return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()(**batch).logits


def test_scaling_matches_peft(llama, adapters):
    for name in "de":
        ours = load_expert(adapters[name])
        peft_model = PeftModel.from_pretrained(copy.deepcopy(llama), adapters[name])
        for path, m in ours.modules.items():
            layer = peft_model.base_model.model.get_submodule(path)
            assert m.scaling == pytest.approx(layer.scaling["default"])
            assert torch.equal(m.A, layer.lora_A["default"].weight)
            assert m.rank == layer.r["default"]
    d = load_expert(adapters["d"])
    assert d.modules["model.layers.1.self_attn.q_proj"].rank == 2
    assert d.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(16 / math.sqrt(8))
    assert "model.layers.0.self_attn.k_proj" not in d.modules


@pytest.mark.parametrize("name", ["a", "d"])
def test_one_expert_equals_peft(llama, adapters, name):
    batch = inputs()
    expected = peft_logits(llama, adapters[name], batch)
    assert not torch.allclose(expected, logits(llama, batch), atol=1e-3)
    with build_routed_model(llama, adapters, f"single {name}"):
        torch.testing.assert_close(logits(llama, batch), expected, atol=1e-5, rtol=1e-5)
    gates = random_gates(llama, adapters, [name])
    with build_routed_model(llama, {name: adapters[name]}, "phatgoose", top_k=1, gates=gates):
        torch.testing.assert_close(logits(llama, batch), expected, atol=1e-5, rtol=1e-5)


def test_arrow_matches_peft(llama, adapters):
    names = ["a", "b", "c"]
    batch = inputs(batch=3, seq=9)
    peft_arrow = create_arrow_model(
        copy.deepcopy(llama), [adapters[n] for n in names], ArrowConfig(top_k=2, router_temperature=0.7, rng_seed=3)
    ).eval()
    probe = "model.layers.1.mlp.down_proj"
    peft_layer = peft_arrow.base_model.model.get_submodule(probe)
    seen = {}
    peft_layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        expected = peft_arrow(**batch).logits
    protos = peft_layer.lora_arrow["arrow_router"].prototypes
    peft_choice = torch.topk(torch.abs(seen["x"].reshape(-1, protos.shape[1]) @ protos.T), 2, dim=1).indices

    handle = build_routed_model(llama, {n: adapters[n] for n in names}, "arrow", top_k=2, temperature=0.7, seed=3)
    with handle.record() as rec:
        got = logits(llama, batch)
    torch.testing.assert_close(handle.layers[probe].router.keys, protos)
    assert torch.equal(rec.calls[probe][0].idx.sort(1).values, peft_choice.sort(1).values)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    handle.remove()


def test_uniform_is_mean_of_products(llama, adapters):
    names = ["a", "b", "d"]
    experts = [load_expert(adapters[n]) for n in names]
    explicit, cross = copy.deepcopy(llama), copy.deepcopy(llama)
    with torch.no_grad():
        for path in {p for e in experts for p in e.modules}:
            mods = [e.modules[path] for e in experts if path in e.modules]
            explicit.get_submodule(path).weight += sum(m.delta_weight() for m in mods) / len(experts)
        for path in experts[0].modules:  # a and b only: same rank and scaling everywhere
            a, b = experts[0].modules[path], experts[1].modules[path]
            cross.get_submodule(path).weight += a.scaling * ((a.B + b.B) / 2) @ ((a.A + b.A) / 2)
    batch = inputs()
    with build_routed_model(llama, {n: adapters[n] for n in names}, "uniform"):
        got = logits(llama, batch)
    torch.testing.assert_close(got, logits(explicit, batch), atol=1e-5, rtol=1e-5)
    with build_routed_model(llama, {n: adapters[n] for n in "ab"}, "uniform"):
        got_ab = logits(llama, batch)
    assert not torch.allclose(got_ab, logits(cross, batch), atol=1e-4)


def routed_layer(base, experts, n, make_router):
    layer = RoutedLoraLinear(base, "lin", experts, n)
    layer.set_router(make_router(layer))
    return layer


def route(layer, x):
    r = layer.router(x, layer)
    return r.idx, r.weight


def make_layer(n, present, seed):
    """A routed layer with ``n`` experts of varied ranks/scalings, of which ``present`` adapt it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(24, 40)
    experts = []
    for i in present:
        r = 1 + (i * 3) % 7
        m = ExpertModule(torch.randn(r, 24, generator=g), torch.randn(40, r, generator=g), 2.0 / math.sqrt(r))
        experts.append((i, f"e{i}", m))
    gates = {f"e{i}": {"lin": torch.randn(24, generator=g)} for i in range(n)}
    return base, experts, gates


#: (dense, devices where grouped_mm is used): padded blocks, grouped_mm, dense
# (dense, grouped_mm devices, csr): sparse-dense products, padded blocks, grouped_mm, dense
DISPATCHES = [(False, ("cuda",), True), (False, ("cuda",), False), (False, ("cpu",), False), (True, ("cuda",), False)]


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("weighting", ["softmax", "sigmoid"])
def test_sparse_dispatch_equals_dense(n, k, weighting):
    present = [i for i in range(n) if n == 1 or i % 3 != 1]  # some experts absent here
    base, experts, gates = make_layer(n, present, seed=n * 10 + k)
    layer = routed_layer(base, experts, n, lambda lay: GateRouter(lay, gates, k, weighting))
    x = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(k))
    idx, w = route(layer, x)
    assert idx.shape == (33, min(k, len(present)))
    x2d = x.reshape(-1, 24)
    explicit = torch.zeros(33, 40)
    for t in range(33):
        for j, p in zip(idx[t].tolist(), w[t].tolist()):
            m = experts[j][2]
            explicit[t] += p * m.scaling * (m.B @ (m.A @ x2d[t]))
    torch.testing.assert_close(layer.dense_delta(x2d, idx, w), explicit, atol=1e-4, rtol=1e-4)
    assert layer._use_grouped_mm  # 24 and 40 float32 features: 16-byte aligned rows
    for dense, devices, csr in DISPATCHES:
        layer.dense, layer.grouped_mm_devices, layer.csr = dense, devices, csr
        torch.testing.assert_close(layer.sparse_delta(x2d, idx, w), explicit, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + explicit.view(3, 11, 40), atol=1e-4, rtol=1e-4)
    # -1 entries (expert absent) are skipped
    idx2 = idx.clone()
    idx2[::2, 0] = -1
    layer.router.may_skip = True
    for dense, devices, csr in DISPATCHES:
        layer.dense, layer.grouped_mm_devices, layer.csr = dense, devices, csr
        got = layer.sparse_delta(x2d, idx2, w)
        torch.testing.assert_close(got, layer.dense_delta(x2d, idx2, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("skew", [0.0, 0.9])
def test_sparse_blocks_balanced_and_skewed(skew):
    """The padded blocks give the explicit formula whether routing is balanced (a block per
    expert) or skewed (the heavy expert split into blocks, unused experts skipped), in one
    chunk or many, in inference and with gradients (the weights' gradient too), and
    grouped_mm and the sparse-dense products agree."""
    n = 6
    base, experts, gates = make_layer(n, range(n), seed=7)
    layer = routed_layer(base, experts, n, lambda lay: GateRouter(lay, gates, 2))
    layer.dense = False
    layer.set_router(layer.router)  # the sparse layout
    layer.dense = False
    g = torch.Generator().manual_seed(8)
    t = 200
    x = torch.randn(t, 24, generator=g)
    idx = torch.stack([torch.randperm(n - 1, generator=g)[:2] for _ in range(t)])  # expert 5 unused
    heavy = torch.rand(t, generator=g) < skew
    idx[heavy, 0] = 0
    idx[heavy, 1] = torch.where(idx[heavy, 1] == 0, 1, idx[heavy, 1])
    w = torch.rand(t, 2, generator=g, requires_grad=True)
    explicit = torch.zeros(t, 40, dtype=torch.float64)
    for i in range(t):
        for j, p in zip(idx[i].tolist(), w[i].tolist()):
            m = experts[j][2]
            explicit[i] += p * m.scaling * (m.B.double() @ (m.A.double() @ x[i].double()))
    with torch.no_grad():
        assert layer.csr  # the sparse-dense products first, then the blocks
        torch.testing.assert_close(layer.sparse_delta(x, idx, w).double(), explicit, atol=1e-5, rtol=1e-5)
        layer.csr = False
        torch.testing.assert_close(layer.sparse_delta(x, idx, w).double(), explicit, atol=1e-5, rtol=1e-5)
        layer.chunk_bytes = 1  # a chunk per block
        torch.testing.assert_close(layer.sparse_delta(x, idx, w).double(), explicit, atol=1e-5, rtol=1e-5)
        layer.grouped_mm_devices = ("cpu",)
        torch.testing.assert_close(layer.sparse_delta(x, idx, w).double(), explicit, atol=1e-5, rtol=1e-5)
        layer.grouped_mm_devices = ("cuda",)
    got = layer.sparse_delta(x, idx, w)  # with gradients: out of place
    got.sum().backward()
    grad = torch.zeros(t, 2, dtype=torch.float64)
    for i in range(t):
        for c, j in enumerate(idx[i].tolist()):
            m = experts[j][2]
            grad[i, c] = (m.scaling * (m.B.double() @ (m.A.double() @ x[i].double()))).sum()
    torch.testing.assert_close(got.detach().double(), explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), grad, atol=1e-4, rtol=1e-5)


def csr_layout(layer):
    return layer.A_rows, layer.BT_rows, layer.row_start, layer.rank_of, layer.common_rank


@pytest.mark.parametrize("skip", [False, True])
def test_sparse_dense_products_with_repeated_and_skipped_picks(skip):
    """The CSR dispatch: a token that picks one expert twice gets both (the blocks add
    them), skipped picks (-1, computation-free indices past N) add nothing, and tokens
    left with no pick at all get nothing."""
    n = 5
    base, experts, gates = make_layer(n, range(n), seed=3)
    layer = routed_layer(base, experts, n, lambda lay: GateRouter(lay, gates, 3))
    layer.dense = False
    layer.set_router(layer.router)
    g = torch.Generator().manual_seed(4)
    t = 40
    x = torch.randn(t, 24, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:3] for _ in range(t)])
    if skip:
        layer.router.may_skip = True
        idx[::3, 0] = -1
        idx[1::4, 2] = n + 1  # a computation-free expert
        idx[5] = -1  # nothing at all
    w = torch.rand(t, 3, generator=g)

    def explicit(idx):
        out = torch.zeros(t, 40, dtype=torch.float64)
        for i in range(t):
            for j, p in zip(idx[i].tolist(), w[i].tolist()):
                if 0 <= j < n:
                    m = experts[j][2]
                    out[i] += p * m.scaling * (m.B.double() @ (m.A.double() @ x[i].double()))
        return out

    with torch.no_grad():
        assert add_csr(torch.zeros(t, 40), x, *csr_layout(layer), idx, w, skip)  # the CSR path itself ran
        torch.testing.assert_close(layer.sparse_delta(x, idx, w).double(), explicit(idx), atol=1e-5, rtol=1e-5)
        twice = idx.clone()
        twice[7, 1] = twice[7, 0] = 2
        assert not add_csr(torch.zeros(t, 40), x, *csr_layout(layer), twice, w, skip)  # left to the blocks
        torch.testing.assert_close(layer.sparse_delta(x, twice, w).double(), explicit(twice), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dispatch_in_other_dtypes(dtype):
    """float64 (no grouped_mm) and bfloat16 (ranks padded to 16 bytes)
    give the float64 formula, to the precision of the dtype, in both dispatches."""
    base, experts, gates = make_layer(8, range(8), seed=1)
    x = torch.randn(50, 24, generator=torch.Generator().manual_seed(1))
    for dense_max in (0, 10**9):
        default, RoutedLoraLinear.dense_max_columns = RoutedLoraLinear.dense_max_columns, dense_max
        try:
            layer = routed_layer(base.to(dtype), experts, 8, lambda lay: GateRouter(lay, gates, 2))
        finally:
            RoutedLoraLinear.dense_max_columns = default
        assert layer._use_grouped_mm == (dtype != torch.float64) and layer.dense == bool(dense_max)
        assert (layer.lora_A_cat is not None) == bool(dense_max)  # the dense kernel's A, where it may run
        xd = x.to(dtype)
        idx, w = route(layer, xd)
        got = layer.sparse_delta(xd, idx, w).double()
        expected = torch.zeros(50, 40, dtype=torch.float64)
        for t in range(50):
            for j, p in zip(idx[t].tolist(), w[t].tolist()):
                m = experts[j][2]
                expected[t] += p * m.scaling * (m.B.double() @ (m.A.double() @ xd[t].double()))
        tol = 1e-10 if dtype == torch.float64 else 2e-2 * expected.abs().max().item()
        torch.testing.assert_close(got, expected, atol=tol, rtol=0)
        if dtype == torch.bfloat16 and not dense_max:  # CSR in float32 on a float32 copy of the rows, no blocks
            assert layer._padded_cache is None and layer._float32_cache[1].dtype == torch.float32
            want = torch.zeros(50, 40)
            assert add_csr(want, xd.float(), layer.A_rows.float(), layer.BT_rows.float(), layer.row_start,
                           layer.rank_of, layer.common_rank, idx, w.to(dtype).float(), False)
            assert torch.equal(layer.sparse_delta(xd, idx, w), want.to(dtype))  # one rounding, at the end
            twice = idx.clone()
            twice[7, 1] = twice[7, 0] = 2  # a token picking one expert twice: left to the padded blocks
            m = experts[2][2]
            row7 = (w[7, 0] + w[7, 1]).item() * m.scaling * (m.B.double() @ (m.A.double() @ xd[7].double()))
            torch.testing.assert_close(layer.sparse_delta(xd, twice, w)[7].double(), row7, atol=tol, rtol=0)
            assert layer._padded_cache is not None


def test_set_router_never_relays_out_the_factors():
    """The stacked factors are allocated once, in one layout, when the layer is built:
    setting a router (dense or sparse dispatch, computation-free experts or not) keeps the
    very same tensors, shapes and strides."""
    from recycle.methods.moepp import MoeppSettings
    from recycle.routing.moepp import MoeppRouter

    base, experts, gates = make_layer(4, range(4), seed=2)
    layer = RoutedLoraLinear(base, "lin", experts, 4)

    def buffers():
        return {k: (v.data_ptr(), v.shape, v.stride()) for k, v in layer.named_buffers(recurse=False)}

    before = buffers()
    rows = sum(m.rank for _, _, m in experts)  # ranks differ: stacked without padding
    assert layer.A_rows.shape == (rows, 24) and layer.lora_A_cat.shape == (24, rows)
    assert layer.lora_A.shape == (4, 8, 24)  # the padded layout of the block kernels, made on demand
    moepp = MoeppRouter(layer, {n: {"lin": v["lin"]} for n, v in gates.items()}, MoeppSettings())
    for router, dense in ((GateRouter(layer, gates, 2), True), (moepp, False), (GateRouter(layer, gates, 1), True)):
        layer.set_router(router)
        assert layer.dense == dense and buffers() == before


def test_phatgoose_scores_are_standardised_dot_products():
    """The router never materialises LN(x); its scores still equal LN(x)·LN(v)/sqrt(d), also
    for inputs far from zero mean, and its top-k equals torch.topk (the fast k <= 2 path too)."""
    g = torch.Generator().manual_seed(3)
    base, experts, gates = make_layer(5, range(5), seed=3)
    layer = routed_layer(base, experts, 5, lambda lay: GateRouter(lay, gates, top_k=2, weighting="softmax"))
    router = layer.router
    v = torch.stack([gates[f"e{i}"]["lin"] for i in range(5)])
    for shift in (0.0, 30.0):
        x = torch.randn(300, 24, generator=g) * torch.rand(300, 1, generator=g) * 4 + shift
        expected = torch.nn.functional.layer_norm(x, (24,)) @ torch.nn.functional.layer_norm(v, (24,)).T / math.sqrt(24)
        torch.testing.assert_close(router.standardised_scores(x), expected, atol=2e-4, rtol=1e-4)
        for k in (1, 2, 3):
            router.top_k = k
            idx, w = route(layer, x)
            top, ref_idx = torch.topk(expected, k, dim=-1)
            assert torch.equal(idx, ref_idx)
            torch.testing.assert_close(w, torch.softmax(top, -1), atol=1e-4, rtol=1e-4)


def test_install_remove_restores_llama(llama, adapters):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    originals = {n: m for n, m in llama.named_modules()}
    batch = inputs()
    ref = logits(llama, batch)
    names = ["a", "b", "c", "d", "e"]
    handle = build_routed_model(llama, {n: adapters[n] for n in names}, "phatgoose", top_k=2,
                                gates=random_gates(llama, adapters, names))  # fmt: skip
    assert not torch.allclose(logits(llama, batch), ref, atol=1e-3)
    q = handle.layers["model.layers.1.self_attn.q_proj"]
    assert q.expert_names == names and handle.layers["model.layers.0.self_attn.k_proj"].expert_names == ["a", "b", "c"]
    handle.remove()
    after = llama.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m is originals[n] for n, m in llama.named_modules())
    assert all(p.requires_grad for p in llama.parameters())
    assert torch.equal(logits(llama, batch), ref)


def test_t5(tmp_path):
    t5 = tiny_t5()
    folders = {n: write_adapter(t5, tmp_path / n, i, r=4, lora_alpha=8, target_modules=T5_TARGETS)
               for i, n in enumerate("ab")}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 128, (2, 6), generator=g),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
        "decoder_input_ids": torch.randint(0, 128, (2, 4), generator=g),
    }
    before = {k: v.clone() for k, v in t5.state_dict().items()}
    ref = logits(t5, batch)
    expected = peft_logits(t5, folders["a"], batch)
    with build_routed_model(t5, folders, "single a"):
        torch.testing.assert_close(logits(t5, batch), expected, atol=1e-5, rtol=1e-5)
    gates = random_gates(t5, folders, ["a", "b"])
    with build_routed_model(t5, folders, "phatgoose", top_k=1, gates=gates) as handle:
        with handle.record() as rec:
            routed = logits(t5, batch)
    assert not torch.allclose(routed, ref, atol=1e-4)
    assert {p.split(".")[0] for p in rec.calls} == {"encoder", "decoder"}
    assert all(torch.equal(before[k], v) for k, v in t5.state_dict().items())
    assert torch.equal(logits(t5, batch), ref)


def test_gates_from_files_and_stats(llama, adapters, tmp_path):
    names = ["a", "b", "c", "d"]
    gate_files = {}
    for n, vectors in random_gates(llama, adapters, names, seed=5).items():
        save_vectors(tmp_path / f"{n}.safetensors", vectors)
        gate_files[n] = tmp_path / f"{n}.safetensors"
    batch = inputs(batch=2, seq=6)
    batch["attention_mask"][1, 4:] = 0
    handle = build_routed_model(llama, {n: adapters[n] for n in names}, "phatgoose", top_k=2, gates=gate_files)
    with handle.record() as rec:
        logits(llama, batch)
    handle.remove()
    stats = rec.stats(batch["attention_mask"])
    for path, s in stats.items():
        assert s["tokens"] == 10
        assert sum(s["load"].values()) == pytest.approx(2.0)  # every token uses k = 2 experts
        assert 0 <= s["entropy"] <= s["max_entropy"] + 1e-6 and 0 <= s["token_entropy"] <= math.log(2) + 1e-6
    assert all(s["tokens"] == 12 for s in rec.stats().values())
    explained = rec.explain(example=1, attention_mask=batch["attention_mask"])
    assert set(explained) == set(stats)
    for path, used in explained.items():
        assert set(used) <= set(rec.expert_names[path]) and sum(used.values()) == pytest.approx(2.0)
    with build_routed_model(llama, {n: adapters[n] for n in names}, "phatgoose", top_k=2, gates=gate_files) as h:
        one = {k: v[1:] for k, v in batch.items()}
        single = h.explain(one)
        assert set(single) == set(explained) and all(sum(v.values()) == pytest.approx(2.0) for v in single.values())
    with pytest.raises(RecycleError, match="gates for experts: e"):
        build_routed_model(llama, {n: adapters[n] for n in "ae"}, "phatgoose", gates={"a": gate_files["a"]})


def test_oracle_and_retrieval(llama, adapters):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from recycle.routing import default_embedder_path

    batch = inputs(batch=2)
    one = {k: v[:1] for k, v in batch.items()}
    two = {k: v[1:] for k, v in batch.items()}
    with build_routed_model(llama, {n: adapters[n] for n in "ad"}, "single a"):
        exp_a = logits(llama, one)
    with build_routed_model(llama, {n: adapters[n] for n in "ad"}, "single d"):
        exp_d = logits(llama, two)
    with build_routed_model(llama, {n: adapters[n] for n in "ad"}, "oracle") as handle:
        handle.set_examples(experts=["a", "d"])
        got = logits(llama, batch)
        handle.set_examples(experts=[None, "d"])  # an example without an expert: base model
        with handle.record() as rec:
            mixed = logits(llama, batch)
    torch.testing.assert_close(got, torch.cat([exp_a, exp_d]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed, torch.cat([logits(llama, one), exp_d]), atol=1e-5, rtol=1e-5)
    for path, s in rec.stats().items():
        assert s["load"] == ({"a": 0.0, "d": 0.5} if "d" in s["load"] else {"a": 0.0})

    torch.manual_seed(0)
    tokenizer = BertTokenizerFast.from_pretrained(default_embedder_path())
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))  # fmt: skip
    embedder = SentenceEmbedder(bert, tokenizer)
    e = embedder.encode(["a movie review", "what is the capital of france ?"])
    assert e.shape == (2, 32) and torch.allclose(e.norm(dim=-1), torch.ones(2))
    texts = {"a": ["great film, loved it", "terrible acting"], "d": ["who wrote hamlet ?", "how far is the moon ?"]}
    index = RetrievalIndex.build(embedder, texts)
    from recycle.data import Example
    from recycle.methods import get

    with build_routed_model(llama, {n: adapters[n] for n in "ad"}, "retrieval", embedder=embedder,
                            index=index) as handle:  # fmt: skip
        exs = [Example("p", None, "", None, t) for t in ("terrible acting", "how far is the moon ?")]
        chosen = get("retrieval").assign(handle, None, exs, [None, None])
        assert chosen == ["a", "d"] and handle.set_examples(chosen) == ["a", "d"]
        torch.testing.assert_close(logits(llama, batch), got, atol=1e-5, rtol=1e-5)


def test_avg_activation_prototypes(llama, adapters):
    batches = {"a": [inputs(batch=2, seed=3)], "b": [inputs(batch=1, seed=4)]}
    batches["a"][0]["attention_mask"][0, 5:] = 0
    path = "model.layers.0.mlp.down_proj"
    protos = compute_prototypes(llama, batches, [path, "model.layers.1.self_attn.q_proj"])
    seen = []
    h = llama.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        llama(**batches["a"][0])
    h.remove()
    mask = batches["a"][0]["attention_mask"].bool()
    torch.testing.assert_close(protos["a"][path], seen[0][mask].mean(0))
    # route with the prototypes at all of a's and b's modules
    full = compute_prototypes(llama, batches, sorted(load_expert(adapters["a"]).modules))
    with build_routed_model(llama, {n: adapters[n] for n in "ab"}, "avg-activation", top_k=1, prototypes=full) as h2:
        with h2.record() as rec:
            logits(llama, inputs())
    assert rec.calls
