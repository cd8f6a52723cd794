"""Shared test set-up: every test gets its own registry; the model cache is per session;
the CLI helpers and the two-task ``world`` (``registered``) that several test files use.

Nothing here touches the network: base models are tiny ones built from a config, and
adapters are written by plain PEFT ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recycle.cli import app

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["NO_COLOR"] = "1"
# Every process this test run starts (Ray's included) inherits this marker; at the end no
# process may still carry it.
os.environ["RECYCLE_TEST_SESSION"] = uuid.uuid4().hex
os.environ["COLUMNS"] = "200"
os.environ["TERM"] = "dumb"
# A run started in the background by a non-interactive shell (`cmd &`, nohup) inherits
# SIGINT ignored, and so would every process it starts: the tests that interrupt a command
# with SIGINT (Ctrl-C) need it delivered. A handled signal is reset to the default in a
# child, so handling it here gives the children Python's KeyboardInterrupt again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """One model/asset cache for the whole session (RECYCLE_CACHE), so tiny models are
    built once. A developer may point RECYCLE_TEST_CACHE at a warm cache to go faster."""
    warm = os.environ.get("RECYCLE_TEST_CACHE")
    root = Path(warm) if warm else tmp_path_factory.mktemp("recycle-cache")
    os.environ["RECYCLE_CACHE"] = str(root)
    return root


@pytest.fixture(autouse=True)
def _isolated_registry(tmp_path, monkeypatch, cache_root):
    monkeypatch.setenv("RECYCLE_DB", str(tmp_path / "registry.db"))
    monkeypatch.setenv("RECYCLE_CACHE", str(cache_root))
    yield


@pytest.fixture(scope="session")
def tiny_base(cache_root) -> Path:
    """The tiny random Llama (alias ``tiny-llama``), built once per session."""
    from recycle.basemodels import resolve_base

    return resolve_base("tiny-llama").path


@pytest.fixture(scope="session")
def make_adapter(tiny_base):
    """``make_adapter(folder, r=4, targets=("q_proj", "v_proj"), seed=0, base=tiny_base, **lora_kw)``
    writes a real PEFT LoRA adapter with random non-zero weights and returns its folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def make(folder, r=4, targets=("q_proj", "v_proj"), seed=0, base=None, **lora_kw):
        base = Path(base or tiny_base)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base)
        cfg = LoraConfig(r=r, lora_alpha=lora_kw.pop("lora_alpha", 2 * r), target_modules=list(targets),
                         init_lora_weights=False, **lora_kw)
        peft_model = get_peft_model(model, cfg)
        peft_model.save_pretrained(folder)
        return Path(folder)

    return make


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_running():
    """Fail the run if a process it started (a Ray node, worker, dashboard, server) is still
    alive at the end: found by the session's marker in the environment, not by name."""
    yield
    import psutil

    from tests.raycluster import marked

    me = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    deadline = time.time() + 30
    left = []
    while time.time() < deadline:
        left = [p for p in marked("RECYCLE_TEST_SESSION", os.environ["RECYCLE_TEST_SESSION"]) if p.pid not in me]
        if not left:
            return
        time.sleep(1)
    described = []
    for p in left:
        try:
            listening = [f"{c.laddr.ip}:{c.laddr.port}" for c in p.net_connections() if c.status == "LISTEN"]
            described.append(f"{p.pid} {' '.join(p.cmdline())[:120]} listening on {listening}")
            p.kill()
        except psutil.Error:
            pass
    pytest.fail("processes of this test run outlived it:\n" + "\n".join(described))


# ---- the CLI on a two-task world (compose, moepp, cosmo, eval, serving, the method contract) ----

runner = CliRunner()


def cli(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def ok(*args):
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return r


def one_line_error(r, code=2):
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


# ---- the registry file, and a few adapters for the add-expert and registry tests ----


def db_path() -> Path:
    return Path(os.environ["RECYCLE_DB"])


def rows(table="experts"):
    if not db_path().exists():
        return []
    conn = sqlite3.connect(db_path())
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"select * from {table} order by id")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def dump():
    """Every row of every table: to show a failed command changed nothing."""
    if not db_path().exists():
        return {}
    conn = sqlite3.connect(db_path())
    try:
        names = [r[0] for r in conn.execute("select name from sqlite_master where type='table'")]
        return {n: list(conn.execute(f"select * from [{n}]")) for n in names}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def library(tmp_path_factory, make_adapter):
    """A few real PEFT adapters, written once for the module."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(root / "a", r=4, seed=1),
        "b": make_adapter(root / "b", r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=2),
        "c": make_adapter(root / "c", r=4, targets=("gate_proj", "up_proj", "down_proj"), seed=3,
                          use_rslora=True),
        "patterned": make_adapter(root / "patterned", r=4, seed=4, rank_pattern={"v_proj": 2}),
    }


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


TASKS = {
    "t_alpha": ("Alpha: {text}\nAnswer:", [" a", " b"]),
    "t_beta": ("Beta: {text}\nPick one:", [" c", " d e"]),
}


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for a module (as STYLE.md asks); commands use it as it is."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_adapter):
    """Two user tasks over local JSONL, one adapter per task (plain PEFT)."""
    root = tmp_path_factory.mktemp("world")
    specs = {}
    for i, (name, (template, choices)) in enumerate(TASKS.items()):
        data = root / f"{name}.jsonl"
        with data.open("w") as f:
            for j in range(60):
                f.write(json.dumps({"text": f"{name} item {j} {'x' * (j % 7)}", "label": j % 2}) + "\n")
        spec = root / f"{name}.toml"
        spec.write_text(
            f'name = "{name}"\ntemplate = {json.dumps(template)}\nchoices = {json.dumps(choices)}\n'
            f'label_field = "label"\n\n[source]\nbuilder = "json"\ndata_files = "{data.name}"\n'
        )
        specs[name] = spec
    adapters = {
        "ea": make_adapter(root / "ea", r=4, seed=11, targets=("q_proj", "v_proj", "up_proj")),
        "eb": make_adapter(root / "eb", r=8, seed=12, targets=("q_proj", "v_proj", "down_proj")),
    }
    return {"root": root, "specs": specs, "adapters": adapters}


@pytest.fixture
def registered(world):
    for spec in world["specs"].values():
        ok("add-task", spec)
    ok("add-expert", world["adapters"]["ea"], "--task", "t_alpha", "--base", "tiny-llama")
    ok("add-expert", world["adapters"]["eb"], "--task", "t_beta", "--base", "tiny-llama")
    return world


def train_real_gates(names, steps=3):
    """Real gate training (recycle.gates) on each expert's own train split, recorded as the
    train-gates driver records it."""
    import json as _json

    from recycle.gates import GateJob, GateSettings, gates_path, run_gate_job
    from recycle.registry import Registry
    from recycle.tasks import load_examples

    reg = Registry()
    settings = GateSettings(steps=steps, batch_size=4, max_length=64)
    for n in names:
        e = reg.expert(n)
        out = gates_path(reg.artifacts_dir, n, settings.hash, e.sha256)
        job = GateJob(n, e.base_model, e.path, e.sha256, load_examples(reg, e.task, "train"),
                      {k: v for k, v in settings.to_dict().items() if k != "algorithm"}, str(out))
        result = run_gate_job(job)
        reg.record_gates(e, {"path": result["path"], "settings_hash": settings.hash,
                             "settings": _json.dumps(settings.to_dict(), sort_keys=True),
                             **{k: result[k] for k in ("steps", "loss_start", "loss_end", "seconds")}})


def write_task(registry, root, task, alphabet, n=40):
    """A generation task of random strings over ``alphabet``, registered in ``registry``."""
    import random

    from recycle.tasks import add_task, parse_spec

    rng = random.Random(task)
    f = root / f"{task}.jsonl"
    f.write_text("".join(
        json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(6)),
                    "target": "".join(rng.choice(alphabet) for _ in range(8))}) + "\n"
        for _ in range(n)
    ))
    add_task(registry, parse_spec({"name": task, "template": task + ": {text} =", "target_field": "target",
                                   "source": {"builder": "json", "data_files": str(f)}}))


# ---- a tiny in-memory Llama and PEFT adapters on it (routing, methods, MoE++) ----

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    """A 2-layer random Llama (64 wide, 128 tokens) built in memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def write_adapter(base, folder, seed, **lora):
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    """a, b, c: same rank and targets (Arrow needs that); d: rsLoRA, rank/alpha patterns and
    only some modules; e: another rank on a subset."""
    root = tmp_path_factory.mktemp("adapters")
    out = {name: write_adapter(llama, root / name, i, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
           for i, name in enumerate("abc")}  # fmt: skip
    out["d"] = write_adapter(
        llama, root / "d", 10, r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
    )  # fmt: skip
    out["e"] = write_adapter(
        llama, root / "e", 11, r=6, lora_alpha=3, target_modules=["q_proj", "v_proj", "up_proj"],
        alpha_pattern={"v_proj": 12}, rank_pattern={"up_proj": 3},
    )  # fmt: skip
    return out


def random_gates(model, adapters, names, seed=0):
    import torch

    from recycle.routing import load_expert

    g = torch.Generator().manual_seed(seed)
    gates = {}
    for n in names:
        e = load_expert(adapters[n], n)
        gates[n] = {p: torch.randn(model.get_submodule(p).in_features, generator=g) for p in e.modules}
    return gates


def inputs(batch=2, seq=7, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).logits
