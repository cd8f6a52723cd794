"""--dtype: float32 keys unchanged, other dtypes keyed, recorded, trained parameters float32;
peak memory recorded by every Ray job (tiny model)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from safetensors import safe_open

from tests.conftest import cli, ok, one_line_error

# Hashes computed by the code before --dtype existed (recycle/settings.py at b66d838): what
# stored gates and trained states are keyed by. A float32 setting must keep them.
BEFORE = {
    "GateSettings": "2a36c6220a2d898833b018d4fe3a5d41342886d55dce6e4e6004874eb1fde18d",
    "TrainSettings": "7b28b3412fbdfb7c32ea91fce6a1545c9284f1584f53f226fd484dbfbaa97f2f",
    "RouterTrainSettings": "96187490c6b303c25d5af03ca133cda0b84de1704df4f2b78a34575b27eeecb5",
    "GateTrainSettings": "721b340a67959b1973344fe21adce06284e49eabbed6acdcb81d5b9f06b698fc",
    "EvalSettings": "a70e45af6f7550b6b07b21b7d1d7ce5b2de749f5128de700cac3fecc215b7daf",
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_float32_keeps_every_key_and_other_dtypes_change_it(name):
    from recycle import settings as S

    cls = getattr(S, name)
    assert cls().hash == cls(dtype="float32").hash == BEFORE[name]
    assert "dtype" not in cls().to_dict()
    assert len({cls(dtype=d).hash for d in ("float32", "bfloat16", "float16")}) == 3
    assert S.GateSettings(lr=0.01, steps=7).hash == "bf33905aa61e1a3128987af98dc64baf0e3909dd83405429cb75f936a0c292ab"


def test_result_key_float32_is_the_old_key(registered):
    from recycle import compose as comp
    from recycle.evaluation import EVAL_FORMAT, result_key
    from recycle.registry import Registry

    reg = Registry()
    plan = comp.plan(reg, method="uniform", data_seed=0)
    spec = reg.task("t_alpha")["spec_sha256"]
    before = hashlib.sha256(json.dumps([EVAL_FORMAT, plan.content_key, plan.base, "t_alpha", spec, 12, 0],
                                       sort_keys=True).encode()).hexdigest()  # the key as computed before dtypes
    assert result_key(plan, reg, "t_alpha", 12, 0) == result_key(plan, reg, "t_alpha", 12, 0, "float32") == before
    assert result_key(plan, reg, "t_alpha", 12, 0, "bfloat16") != before


def test_auto_and_bad_dtypes():
    from recycle.cluster import cpu_has_bf16, resolve_dtype
    from recycle.settings import GateSettings

    assert resolve_dtype("auto", 1) == resolve_dtype("auto", 0.25) == "bfloat16"
    assert resolve_dtype("auto", 0) == ("bfloat16" if cpu_has_bf16() else "float32")
    os.environ["RECYCLE_CPU_BF16"] = "0"  # a CPU without bfloat16 instructions
    try:
        assert resolve_dtype("auto", 0) == "float32" and resolve_dtype("auto", 1) == "bfloat16"
        os.environ["RECYCLE_CPU_BF16"] = "1"
        assert resolve_dtype("auto", 0) == "bfloat16"
    finally:
        del os.environ["RECYCLE_CPU_BF16"]
    assert resolve_dtype("float16", 1) == "float16"
    r = cli("train-gates", "--all", "--dtype", "bf16")
    assert "--dtype must be auto or float32 or bfloat16 or float16" in one_line_error(r)


def test_load_base_reads_straight_into_the_dtype(tiny_base):
    import torch

    from recycle.basemodels import load_base, resolve_base

    model, _ = load_base(resolve_base("tiny-llama"), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_alias_loads_from_its_copy_in_the_dtype_equal_to_the_float32_weights_cast(tiny_base, dtype):
    import torch
    from safetensors.torch import load_file

    from recycle.basemodels import alias_dtype_folder, config_hash, load_base, resolve_base

    ref = resolve_base("tiny-llama")
    model, _ = load_base(ref, dtype=dtype)
    copy = alias_dtype_folder("tiny-llama", dtype)
    assert copy == tiny_base.parent / f"tiny-llama.{dtype}"
    assert model.config._name_or_path == str(copy)  # read from the copy, not the float32 folder
    assert config_hash(copy) == ref.config_hash  # the same base: only the stored dtype differs
    assert json.loads((copy / "config.json").read_text())["dtype"] == dtype
    full = load_file(tiny_base / "model.safetensors")
    cast = load_file(copy / "model.safetensors")
    assert full.keys() == cast.keys() and {t.dtype for t in full.values()} == {torch.float32}
    want = getattr(torch, dtype)
    for name, t in full.items():
        assert cast[name].dtype == want and torch.equal(cast[name], t.to(want)), name
    loaded = dict(model.named_parameters())
    for name, t in cast.items():
        if name in loaded:
            assert torch.equal(loaded[name].detach(), t), name
    assert {f.name for f in tiny_base.iterdir()} == {f.name for f in copy.iterdir()}
    assert alias_dtype_folder("tiny-llama", "float32") == tiny_base
    before = (copy / "model.safetensors").stat().st_mtime_ns
    load_base(ref, dtype=dtype)  # made once
    assert (copy / "model.safetensors").stat().st_mtime_ns == before


def test_bfloat16_expert_training_keeps_float32_lora(registered):
    from recycle.registry import Registry
    from recycle.settings import GateSettings, TrainSettings
    from recycle.training import train_expert

    reg = Registry()
    row = train_expert(reg, ["t_alpha"], "tiny-llama", TrainSettings(steps=2, batch_size=4, dtype="bfloat16"),
                       name="bf", progress=False, gates=GateSettings(steps=2, batch_size=4))
    assert row["gates"] == "trained"
    with safe_open(f"{row['path']}/adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {__import__("torch").float32}
    training = json.loads(open(f"{row['path']}/training.json").read())
    assert training["settings"]["dtype"] == "bfloat16"
    (gates,) = reg.gates_rows("bf")
    assert gates["dtype"] == "bfloat16" and gates["settings_hash"] == GateSettings(
        steps=2, batch_size=4, dtype="bfloat16").hash


def test_bfloat16_gates_and_eval_are_keyed_recorded_and_measured(registered, ray_local):
    import torch

    from recycle.gates import load_gates
    from recycle.registry import Registry

    reg = Registry()
    ok("train-gates", "--all", "--steps", "2", "--batch-size", "4", "--max-length", "64")
    ok("train-gates", "--all", "--steps", "2", "--batch-size", "4", "--max-length", "64", "--dtype", "bfloat16")
    rows = reg.gates_rows("ea")
    assert sorted(r["dtype"] for r in rows) == ["bfloat16", "float32"]
    assert len({r["settings_hash"] for r in rows}) == 2
    for r in rows:
        assert r["memory"]["peak_rss_mib"] > 0 and r["memory"]["rss_scope"] in ("task", "process")
        assert {v.dtype for v in load_gates(r["path"]).values()} == {torch.float32}  # trained in float32
    shown = ok("gates", "show", "ea").stdout
    assert "dtype bfloat16" in shown and "peak worker RSS" in shown

    first = json.loads(ok("eval", "--methods", "base,phatgoose", "--tasks", "t_alpha", "-n", "6", "--json").stdout)
    bf = json.loads(ok("eval", "--methods", "base,phatgoose", "--tasks", "t_alpha", "-n", "6", "--dtype", "bfloat16",
                       "--json").stdout)
    assert [r["dtype"] for r in first["results"]] == ["float32"] * 2
    assert [r["dtype"] for r in bf["results"]] == ["bfloat16"] * 2
    assert not {r["key"] for r in first["results"]} & {r["key"] for r in bf["results"]}
    assert all(r["reused_from"] is None and r["memory"]["peak_rss_mib"] > 0 for r in bf["results"])
    shown = cli("eval", "show", str(bf["run"]))
    assert "dtype bfloat16; peak worker RSS" in shown.stderr
    # bfloat16 results are found again under their own key
    again = json.loads(ok("eval", "--methods", "base", "--tasks", "t_alpha", "-n", "6", "--dtype", "bfloat16",
                          "--json").stdout)
    assert again["results"][0]["reused_from"] is not None


def test_pipeline_dtype_default_and_override(tmp_path, registered):
    from recycle import pipeline as P
    from recycle.settings import Precision

    f = tmp_path / "p.toml"
    f.write_text('name = "p"\nbase = "tiny-llama"\ndtype = "bfloat16"\n[gates]\nsteps = 2\n'
                 '[[evaluations]]\nmethods = ["base"]\ndtype = "float16"\n')
    p = P.load(f)
    assert p.train["dtype"] == "bfloat16" and p.gates["dtype"] == "bfloat16"
    assert p.evaluations[0]["dtype"] == "float16"  # a table's own dtype wins
    assert P.load(f, Precision(dtype="float32")).gates["dtype"] == "float32"
    f.write_text('name = "p"\nbase = "tiny-llama"\ndtype = "half"\n')
    with pytest.raises(Exception, match="dtype must be auto or float32"):
        P.load(f)


def test_bfloat16_models_compute_their_last_step_in_float32():
    """The final norm's output and the output projection stay float32 in a bfloat16 model (the
    logits that rank answers carry no bfloat16 rounding); weights, state dict and gradients
    through the head are as before."""
    import torch

    from recycle.basemodels import float32_head, load_base, resolve_base

    ref = resolve_base("tiny-llama")
    m32, _ = load_base(ref, "float32")
    m16, _ = load_base(ref, "bfloat16")
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        want = m32(input_ids=ids).logits
        got = m16(input_ids=ids, output_hidden_states=True)
    assert got.logits.dtype == torch.float32 and got.hidden_states[-1].dtype == torch.float32
    assert m16.lm_head.weight.dtype == torch.bfloat16 and m16.lm_head.weight is m16.model.embed_tokens.weight
    assert {k: v.dtype for k, v in m16.state_dict().items()} == {k: torch.bfloat16 for k in m32.state_dict()}
    torch.testing.assert_close(got.logits, want, atol=0.05, rtol=0)
    assert not float32_head(m16)  # once
    x = torch.randn(2, 3, m16.config.hidden_size, requires_grad=True)
    m16.lm_head(x).sum().backward()  # chunked, and differentiable where training needs it
    assert x.grad is not None and x.grad.dtype == torch.float32
    import recycle.basemodels as B

    old, B.HEAD_CHUNK_BYTES = B.HEAD_CHUNK_BYTES, 4 * m16.config.hidden_size * 7  # 7 rows a chunk
    try:
        with torch.no_grad():
            torch.testing.assert_close(m16(input_ids=ids).logits, got.logits, atol=1e-6, rtol=0)
    finally:
        B.HEAD_CHUNK_BYTES = old
