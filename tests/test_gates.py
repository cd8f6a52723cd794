"""PHATGOOSE gate training on tiny-llama with plain-PEFT adapters on synthetic tasks.

Two synthetic tasks a tiny random model can tell apart: after ``letters:`` come random
lowercase letters, after ``digits:`` random digits. Each expert is a LoRA trained on one
task; its gates are then trained on its own task only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from recycle import gates as G
from recycle.losses import answer_loss
from tests.conftest import write_task

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def synthetic(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"{task}-{seed}")
    alphabet = "abcdefghijklmnopqrstuvwxyz" if task == "letters" else "0123456789"
    out = []
    for _ in range(n):
        prompt = f"{task}: " + "".join(rng.choice(alphabet) for _ in range(6)) + " ="
        target = " " + "".join(rng.choice(alphabet) for _ in range(12))
        out.append((prompt, target))
    return out


def encode(tok, pairs, max_length=64) -> dict:
    rows = []
    for prompt, target in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + t)[:max_length]
        labels = ([-100] * len(p) + t)[:max_length]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
    }


def batches(tok, task, batch_size=16, seed=0):
    i = 0
    while True:
        yield encode(tok, synthetic(task, batch_size, seed * 100_000 + i))
        i += 1


def train_lora(base, tok, task, out_dir, steps=100):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    it = batches(tok, task, seed=1)
    for _ in range(steps):
        loss = answer_loss(model, next(it))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, cache_root):
    """tiny-llama with its (tied) embeddings scaled by 4. The random tiny model's
    embeddings (std 0.02) cap every logit near zero, so no LoRA can fit anything on it;
    scaled, it is a base that LoRA experts can adapt."""
    from recycle.basemodels import load_base, resolve_base

    base, tok = load_base(resolve_base("tiny-llama"))
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(4.0)
    out = tmp_path_factory.mktemp("base")
    base.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def experts(tmp_path_factory, base_dir):
    """Two LoRA adapters: ``letters`` and ``digits`` (plain PEFT save_pretrained)."""
    from recycle.basemodels import load_base, resolve_base

    root = tmp_path_factory.mktemp("adapters")
    torch.set_num_threads(1)
    out = {}
    for task in ("letters", "digits"):
        base, tok = load_base(resolve_base(base_dir))
        out[task] = train_lora(base, tok, task, root / task)
    return out


@pytest.fixture(scope="module")
def trained(experts, base_dir):
    """Each expert with its gates trained on its own task (SPEC lr, fewer steps)."""
    out = {}
    settings = G.GateSettings(steps=40, lr=5e-3, batch_size=16, seed=0)
    for task, path in experts.items():
        model, tok = G.load_peft_model(base_dir, path)
        res = G.train_gates(model, batches(tok, task, seed=2), settings)
        out[task] = (model, tok, res)
    return out


def test_settings_hash_and_validation():
    a = G.GateSettings()
    assert a.hash == G.GateSettings().hash
    assert a.hash != G.GateSettings(steps=99).hash
    assert a.warmup_steps == 6
    from recycle.schedule import lr_at

    assert [lr_at(s, 6, 4, 1.0, decay=False) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, 6, 0, 1.0, decay=False) == 1.0
    with pytest.raises(G.RecycleError):
        G.GateSettings(steps=0)
    with pytest.raises(G.RecycleError, match="--lr must be a finite number, not inf"):
        G.GateSettings(lr=float("inf"))  # positive, yet every gate would diverge
    with pytest.raises(G.RecycleError, match="--lr must be positive, not nan"):
        G.GateSettings(lr=float("nan"))


def test_gates_start_at_zero_and_only_gates_change(experts, base_dir):
    model, tok = G.load_peft_model(base_dir, experts["letters"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("lora_A" in k for k in before)
    seen = {}

    def on_step(step, loss):
        if step == 0:
            seen["loss0"] = loss

    with G.Gates(model) as g0:
        assert all(torch.count_nonzero(v) == 0 for v in g0.vectors.values())
        assert set(g0.vectors) == {n for n in G.routed_modules(model)}
        assert all(n.startswith("model.layers.") for n in g0.vectors)
        first = encode(tok, synthetic("letters", 16, 2 * 100_000))
        zero_gate_loss = G.mean_loss(model, [first])
    res = G.train_gates(model, batches(tok, "letters", seed=2), G.GateSettings(steps=5), on_step=on_step)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(not p.requires_grad for p in model.parameters())
    # hooks removed: the model is the plain expert again
    assert all(not m.lora_A["default"]._forward_pre_hooks for m in G.routed_modules(model).values())
    # step 0 ran with zero gates (σ = 0.5 everywhere)
    assert res.loss_start == pytest.approx(zero_gate_loss, rel=1e-5)
    assert seen["loss0"] == res.loss_start
    assert len(res.gates) == 4 * len(TARGETS)
    assert all(v.dtype == torch.float32 and torch.count_nonzero(v) > 0 for v in res.gates.values())


def test_gate_equals_scaled_delta(experts, base_dir):
    """The pre-hook on lora_A gives exactly W x + σ(vᵀx) Δ(x)."""
    model, tok = G.load_peft_model(base_dir, experts["digits"])
    name, layer = next(iter(G.routed_modules(model).items()))
    x = torch.randn(2, 3, layer.lora_A["default"].in_features)
    v = torch.randn(x.shape[-1])
    with torch.no_grad():
        base_out = layer.base_layer(x)
        delta = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        init = {
            n: (v if n == name else torch.zeros(m.lora_A["default"].in_features))
            for n, m in G.routed_modules(model).items()
        }
        with G.Gates(model, init=init):
            gated = layer(x)
    expected = base_out + torch.sigmoid(x @ v).unsqueeze(-1) * delta
    torch.testing.assert_close(gated, expected, rtol=1e-5, atol=1e-6)


def test_gates_carry_a_real_signal(trained, experts, base_dir):
    """Routed by the trained gates (PHATGOOSE, top-1, the product's routing code), task-A
    inputs go to expert A more often than task-B inputs do; and the gated expert fits its
    own held-out data better than with its gates at zero (σ = 1/2 everywhere) and about as
    well as the ungated expert."""
    from recycle.basemodels import load_base, resolve_base
    from recycle.methods import build_routed_model

    base, _ = load_base(resolve_base(base_dir))
    gates = {task: trained[task][2].gates for task in trained}
    for task, other in (("letters", "digits"), ("digits", "letters")):
        model, tok, res = trained[task]
        assert res.loss_end < res.loss_start
        own = encode(tok, synthetic(task, 32, 999))
        foreign = encode(tok, synthetic(other, 32, 999))
        share = {}
        with build_routed_model(base, experts, "phatgoose", top_k=1, gates=gates) as handle:
            for which, batch in (("own", own), ("foreign", foreign)):
                with handle.record() as rec, torch.no_grad():
                    base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                stats = rec.stats(batch["attention_mask"])
                share[which] = sum(s["load"][task] for s in stats.values()) / len(stats)
        with G.Gates(model, init=res.gates):
            gated = G.mean_loss(model, [own])
        with G.Gates(model):
            zero = G.mean_loss(model, [own])
        full = G.mean_loss(model, [own])
        assert share["own"] > share["foreign"], (task, share)
        assert gated < zero, (task, gated, zero)
        assert gated < full + 0.05, (task, gated, full)


def test_save_and_load_roundtrip(tmp_path, trained):
    _, _, res = trained["letters"]
    path = tmp_path / "g" / "x.safetensors"
    G.save_gates(path, res.gates, {"steps": res.steps, "settings_hash": "abc", "settings": {"a": 1}})
    back = G.load_gates(path)
    assert back.keys() == res.gates.keys()
    assert all(torch.equal(back[k], res.gates[k]) for k in back)
    meta = G.gates_metadata(path)
    assert meta["steps"] == res.steps and meta["settings"] == {"a": 1} and meta["settings_hash"] == "abc"
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no temp left
    with pytest.raises(G.RecycleError):
        G.load_gates(tmp_path / "missing.safetensors")
    json.dumps(meta)


# ---- Ray plumbing and the CLI (a local Ray, shared by this module) --------------------


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    from recycle import cluster

    with cluster.connect(None, num_cpus=2) as where:
        assert where == "local"
        yield


def _flaky(job):
    """Dies (a worker crash) on its first attempt, then succeeds; or raises a user error."""
    import os
    from pathlib import Path

    marker = Path(job["dir"]) / f"{job['id']}.{len(list(Path(job['dir']).glob(job['id'] + '.*')))}"
    marker.touch()
    if job["kind"] == "crash" and len(list(Path(job["dir"]).glob(job["id"] + ".*"))) == 1:
        os._exit(1)
    if job["kind"] == "error":
        raise ValueError("bad data in\nrow 3")
    return job["id"]


def test_run_tasks_retries_crashes_not_errors(local_ray, tmp_path, monkeypatch):
    import os

    from recycle import cluster

    # workers import this test module by name (run_tasks passes the driver's PYTHONPATH)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    jobs = [{"id": i, "kind": k, "dir": str(tmp_path)} for i, k in (("a", "crash"), ("b", "error"), ("c", "ok"))]
    results, errors, done = {}, {}, []
    cluster.run_tasks(
        _flaky,
        jobs,
        cluster.Resources(num_cpus=1, max_retries=2),
        on_result=lambda j, r: results.__setitem__(j["id"], r),
        on_error=lambda j, e: errors.__setitem__(j["id"], e),
        progress=lambda j: done.append(j["id"]),
    )
    assert results == {"a": "a", "c": "c"}, errors
    assert errors == {"b": "ValueError: bad data in row 3"}
    assert sorted(done) == ["a", "b", "c"]
    attempts = {i: len(list(tmp_path.glob(f"{i}.*"))) for i in "abc"}
    assert attempts == {"a": 2, "b": 1, "c": 1}


def test_default_gpus(local_ray):
    from recycle import cluster

    assert cluster.default_gpus(None) == 0  # a CPU cluster: never wait on a GPU
    assert cluster.default_gpus(0.25) == 0.25
    with pytest.raises(G.RecycleError):
        cluster.check_fits(1, 1)


@pytest.fixture
def registry_with_experts(tmp_path, make_adapter):
    """A registry with tasks ``letters`` and ``digits`` and three experts on tiny-llama."""
    from recycle.experts import add_expert
    from recycle.registry import Registry

    reg = Registry()
    write_task(reg, tmp_path, "letters", "abcdefghij")
    write_task(reg, tmp_path, "digits", "0123456789")
    for i, task in enumerate(["letters", "digits", "letters"]):
        folder = make_adapter(tmp_path / f"exp{i}", seed=i)
        add_expert(reg, folder, task=task, base="tiny-llama")
    return reg


def _cli(*args):
    from typer.testing import CliRunner

    from recycle.cli import app

    return CliRunner().invoke(app, list(args))


def test_train_gates_cli(local_ray, registry_with_experts):
    reg = registry_with_experts
    res = _cli("train-gates", "--all", "--steps", "4", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    assert "exp0: loss" in res.stderr and "→" in res.stderr
    rows = list(reg.db.query("select * from gates order by expert_id"))
    assert len(rows) == 3 and all(r["steps"] == 4 for r in rows)
    for r, e in zip(rows, reg.experts()):
        assert r["adapter_sha256"] == e.sha256
        gates = G.load_gates(r["path"])
        assert set(gates) == {f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")}
        meta = G.gates_metadata(r["path"])
        assert meta["settings_hash"] == r["settings_hash"] and meta["adapter_sha256"] == e.sha256
        assert meta["steps"] == 4 and meta["loss_start"] == pytest.approx(r["loss_start"])
    gates_dir = reg.artifacts_dir / "gates"
    assert not list(gates_dir.rglob("*.tmp"))

    # same settings: skipped; --force: retrained (still one row each)
    res = _cli("train-gates", "exp0", "exp1", "--steps", "4", "--batch-size", "4")
    assert res.exit_code == 0 and res.stdout.count("skipped") == 2, res.output
    res = _cli("train-gates", "--task", "digits", "--steps", "4", "--batch-size", "4", "--force")
    assert res.exit_code == 0 and "trained" in res.stdout, res.output
    assert reg.db["gates"].count == 3
    # other settings: a second set of gates
    res = _cli("train-gates", "exp0", "--steps", "3", "--batch-size", "4", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["experts"][0]["status"] == "trained" and out["experts"][0]["steps"] == 3
    listed = json.loads(_cli("gates", "list", "--json").stdout)
    assert [r["expert"] for r in listed] == ["exp0", "exp0", "exp1", "exp2"]
    assert listed[0]["steps"] == 3  # newest first
    shown = _cli("gates", "show", "exp1")
    assert shown.exit_code == 0 and "model.layers.3.self_attn.v_proj" in shown.stdout
    shown = json.loads(_cli("gates", "show", "exp0", "--json", "--settings", listed[1]["settings_hash"][:8]).stdout)
    assert shown["steps"] == 4 and len(shown["norms"]) == 8
    bad = _cli("gates", "show", "nope")
    assert bad.exit_code == 2 and "no expert named" in bad.stderr


def test_train_gates_failures_are_reported_and_others_go_on(local_ray, registry_with_experts):
    reg = registry_with_experts
    e0, e1, e2 = (reg.expert(f"exp{i}") for i in range(3))
    # adapter weights changed since registration: refused
    w = Path(e0.path) / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes() + b" ")
    # config gone: refused before any work (a user error, reported in one line)
    (Path(e1.path) / "adapter_config.json").unlink()
    res = _cli("train-gates", "--all", "--steps", "2", "--batch-size", "2")
    assert res.exit_code == 1, res.output
    assert "changed on disk since it was registered" in res.stderr
    assert "2 of 3 failed" in res.stderr
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("  exp1:")][0]
    assert "is missing" in line
    assert [r["expert_id"] for r in reg.db.query("select expert_id from gates")] == [e2.id]
    assert not [p for p in (reg.artifacts_dir / "gates").rglob("*") if p.is_file() and "exp2" not in str(p)]


def test_interrupt_records_nothing_partial(local_ray, registry_with_experts, monkeypatch):
    from recycle.registry import Registry

    reg = registry_with_experts
    calls = []
    real = Registry.record_gates

    def record(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(Registry, "record_gates", record)
    res = _cli("train-gates", "--all", "--steps", "2", "--batch-size", "2")
    assert res.exit_code == 130, res.output
    assert "Interrupted" in res.stderr
    rows = list(reg.db.query("select path from gates"))
    assert len(rows) == 1
    files = sorted(str(p) for p in (reg.artifacts_dir / "gates").rglob("*") if p.is_file())
    assert files == [rows[0]["path"]]


def test_one_worker_trains_expert_after_expert_as_fresh_processes_do(registry_with_experts, tmp_path):
    """GateWorker (one base model load, PEFT attached and unloaded per expert, the encoded
    examples reused) writes the very gates a fresh load per expert (run_gate_job) writes."""
    from recycle.tasks import load_examples

    reg = registry_with_experts
    settings = G.GateSettings(steps=3, batch_size=4, max_length=48)
    jobs = []
    for e in reg.experts():
        examples = load_examples(reg, e.task, "train")
        for where in ("fresh", "pooled"):
            jobs.append(G.GateJob(e.name, e.base_model, e.path, e.sha256, examples,
                                  {k: v for k, v in settings.to_dict().items() if k != "algorithm"},
                                  str(tmp_path / where / f"{e.name}.safetensors"), examples_key=e.task))
    worker = G.GateWorker()
    for job in jobs:
        out = G.run_gate_job(job) if "fresh" in job.out_path else worker.run(job)
        assert out["job_seconds"] >= out["seconds"] > 0
    assert len(worker._encoded) == 2  # letters and digits, each tokenised once
    for e in reg.experts():
        fresh = G.load_gates(tmp_path / "fresh" / f"{e.name}.safetensors")
        pooled = G.load_gates(tmp_path / "pooled" / f"{e.name}.safetensors")
        assert fresh.keys() == pooled.keys()
        assert all(torch.equal(fresh[k], pooled[k]) for k in fresh)
    # the base model is left as it was loaded: no LoRA layer, no PEFT config behind
    model = worker._base[1]
    assert not any("lora" in n for n, _ in model.named_modules())
    assert not hasattr(model, "peft_config")
