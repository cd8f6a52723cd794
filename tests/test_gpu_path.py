"""The GPU path without a GPU: a loopback Ray node that declares 2 GPUs (``ray start
--num-gpus 2``; Ray schedules declared GPUs whether or not they exist). Commands ask for
GPUs when the cluster has them, fractional requests share a GPU, each task sees its own
CUDA_VISIBLE_DEVICES, and a task given a GPU torch cannot see stops with one line unless
RECYCLE_ALLOW_CPU_FALLBACK=1 (what lets these tests compute on the CPU).

Concurrency is read from the tasks' own recorded start and end times (``memory`` of each
stored result), not from timings.
"""

from __future__ import annotations

import json

import pytest

import os
import subprocess
import sys
from types import SimpleNamespace

from tests.conftest import ok as ok_here

pytest.importorskip("psutil")

from tests.raycluster import loopback  # noqa: E402


@pytest.fixture(scope="module")
def gpu_cluster():
    with loopback(head_cpus=4, head_gpus=2, with_worker=False) as c:
        yield c


@pytest.fixture
def on_cluster(gpu_cluster, monkeypatch):
    """This process joins the cluster as its driver (token auth as the cluster has it);
    workers may compute on the CPU."""
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(k, gpu_cluster["env"][k])
    monkeypatch.setenv("RECYCLE_ALLOW_CPU_FALLBACK", "1")
    return gpu_cluster["address"]


def cli(*args):
    """The command in its own process, as a user runs it: Ray keeps the first auth token a
    process used, so an in-process driver that joined another test's cluster before could
    not join this one."""
    p = subprocess.run([sys.executable, "-m", "recycle", *map(str, args)], env=dict(os.environ),
                       capture_output=True, text=True, timeout=600)
    return SimpleNamespace(exit_code=p.returncode, stdout=p.stdout, stderr=p.stderr)


def ok(*args):
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    return r


@pytest.fixture
def four_experts(registered, make_adapter, tmp_path):
    for i, task in enumerate(["t_alpha", "t_beta"]):
        ok_here("add-expert", make_adapter(tmp_path / f"x{i}", seed=20 + i), "--task", task, "--base", "tiny-llama",
           "--name", f"x{i}")
    return registered


def _gate_memory(gpus: str | None, address: str) -> tuple[list[dict], str]:
    from recycle.registry import Registry

    args = ["train-gates", "--all", "--steps", "8", "--batch-size", "4", "--max-length", "48", "--force",
            "--address", address] + (["--gpus-per-expert", gpus] if gpus else [])
    r = ok(*args)
    return [row["memory"] for row in Registry().gates_rows()], r.stderr


def _overlap(a: dict, b: dict) -> bool:
    return a["started"] < b["ended"] and b["started"] < a["ended"]


def _same_gpu_overlaps(mems: list[dict]) -> int:
    return sum(_overlap(a, b) for i, a in enumerate(mems) for b in mems[i + 1:]
               if a["cuda_visible_devices"] == b["cuda_visible_devices"])


def test_gates_ask_for_a_gpu_each_and_half_a_gpu_shares_one(four_experts, on_cluster):
    mems, err = _gate_memory(None, on_cluster)  # the default where the cluster has GPUs: 1 each
    assert "1 CPU, 1 GPU each" in err
    assert len(mems) == 4 and all(m["cuda_visible_devices"] in ("0", "1") for m in mems)
    assert _same_gpu_overlaps(mems) == 0  # a whole GPU: never two tasks on it at once

    mems, err = _gate_memory("0.5", on_cluster)
    assert "1 CPU, 0.5 GPU each" in err
    assert all(m["cuda_visible_devices"] in ("0", "1") for m in mems)
    assert _same_gpu_overlaps(mems) >= 1  # two tasks on one declared GPU at once

    mems, err = _gate_memory("1", on_cluster)
    assert "1 CPU, 1 GPU each" in err and _same_gpu_overlaps(mems) == 0


def test_eval_and_batch_predict_ask_for_gpus(registered, on_cluster, tmp_path):
    from recycle.gates import GateSettings  # noqa: F401  (the experts need no gates for base/uniform)

    out = json.loads(ok("eval", "--methods", "base,uniform", "--tasks", "all", "-n", "4", "--address", on_cluster,
                        "--json").stdout)
    assert {r["memory"]["cuda_visible_devices"] for r in out["results"]} <= {"0", "1"}
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"Alpha: {i}\nAnswer:", "choices": [" a", " b"]}) + "\n"
                           for i in range(6)))
    r = ok("predict", "uniform", "--input", inp, "--output", outp, "--workers", "2", "--address", on_cluster)
    assert "1 CPU, 1 GPU each" in r.stderr
    assert len(outp.read_text().splitlines()) == 6


def test_a_gpu_torch_cannot_see_stops_the_task_with_one_line(registered, on_cluster, monkeypatch):
    monkeypatch.delenv("RECYCLE_ALLOW_CPU_FALLBACK")
    r = cli("train-gates", "ea", "--steps", "2", "--batch-size", "4", "--address", on_cluster)
    assert r.exit_code != 0
    line = [x for x in r.stderr.splitlines() if x.startswith("✗ ea:")]  # the task's report: one line
    assert len(line) == 1 and "sees no CUDA device" in line[0] and "RECYCLE_ALLOW_CPU_FALLBACK=1" in line[0], r.stderr
    from recycle.registry import Registry

    assert Registry().gates_rows() == []  # nothing computed on the CPU behind its back
