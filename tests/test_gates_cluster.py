"""``train-gates --address`` against a real two-node Ray cluster on loopback, with token
auth on, and a worker node killed mid-run.

The fixture starts its own head and worker node (own temp dirs, own ports, own token) and
stops exactly the processes it started: never ``ray stop``, which would stop every Ray
on the machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

from tests.raycluster import _kill_tree, _raylet, loopback  # noqa: E402
from tests.conftest import write_task  # noqa: E402


@pytest.fixture(scope="module")
def loopback_cluster():
    with loopback() as cluster:
        yield cluster


def test_train_gates_survives_a_killed_worker_node(loopback_cluster, tmp_path, make_adapter):
    from recycle.experts import add_expert
    from recycle.registry import Registry

    reg = Registry()
    write_task(reg, tmp_path, "letters", "abcdefghij")
    names = []
    for i in range(4):
        add_expert(reg, make_adapter(tmp_path / f"exp{i}", seed=i), task="letters", base="tiny-llama")
        names.append(f"exp{i}")

    env = dict(loopback_cluster["env"])
    env["RECYCLE_DB"] = str(reg.path)
    cmd = [sys.executable, "-m", "recycle", "train-gates", "--all", "--steps", "30", "--batch-size", "4",
           "--address", loopback_cluster["address"]]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait until the worker node runs one of our tasks, then kill that node's raylet
        # and everything under it
        killed = None
        deadline = time.time() + 180
        while killed is None and time.time() < deadline and proc.poll() is None:
            raylet = _raylet(loopback_cluster["worker_nm"])
            assert raylet is not None, "the worker node's raylet is not running"
            for child in raylet.children(recursive=True):
                try:
                    title = " ".join(child.cmdline())
                except psutil.NoSuchProcess:
                    continue
                if "GateWorker" in title:
                    killed = title
                    _kill_tree(raylet)
                    break
            time.sleep(0.2)
        assert killed, "no gate task ran on the worker node"
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(err)
    assert proc.returncode == 0, err + out
    rows = {r["expert_id"]: r for r in reg.db.query("select * from gates")}
    experts = reg.experts()
    assert sorted(e.name for e in experts if e.id in rows) == names
    for e in experts:
        assert Path(rows[e.id]["path"]).is_file()
        assert rows[e.id]["steps"] == 30
    assert not list((reg.artifacts_dir / "gates").rglob("*.tmp"))
