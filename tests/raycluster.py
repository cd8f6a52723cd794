"""A real Ray cluster for tests: a head and a worker node on this machine, token auth on.

Each cluster has its own temp dir, ports, token and a marker in the environment of every
process it starts (``RECYCLE_TEST_CLUSTER``); :func:`loopback` stops exactly the processes
that carry it (never ``ray stop``, which would stop every Ray on the machine).

Ray 2.60 turns ``--node-ip-address=127.0.0.1`` into the machine's own address
(``ray._private.services.resolve_ip_for_localhost``) and its servers listen on every
interface, so while the cluster runs it is reachable beyond loopback. ``ray start --head``
also starts a Ray Client server, detached (parent 1) and with no temp dir in its command
line: before the marker, the clean-up matched command lines and left it running. Afterwards
nothing of the cluster is left.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _node_args(temp_dir: Path, cpus: int = 1, gpus: int = 0) -> tuple[list[str], int]:
    """Ports for one node (none left to Ray's fixed defaults, so parallel clusters on this
    machine do not collide); returns the args and the node manager port."""
    nm, om, agent, agent_grpc, metrics, rt_env = _free_ports(6)
    lo = random.Random(str(temp_dir)).randrange(30000, 39000, 100)
    return [
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 99}",
        f"--num-cpus={cpus}",
        f"--num-gpus={gpus}",  # declared: Ray schedules GPUs it is told of, hardware or not
        "--disable-usage-stats",
    ], nm


def marked(name: str, value: str) -> list:
    """Every process (but this one) whose environment has ``name=value``."""
    out = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(name) == value:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            pass
    return out


def _ours(root: Path, marker: str) -> list:
    """Every process of this cluster: its marker in the environment, or our temp root in
    the command line."""
    out = {p.pid: p for p in marked("RECYCLE_TEST_CLUSTER", marker)}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(root) in part for part in (p.info["cmdline"] or [])):
                out.setdefault(p.pid, p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return list(out.values())


def _raylet(node_manager_port: int):
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("raylet") and f"--node_manager_port={node_manager_port}" in cmd:
            return p
    return None


def _kill_tree(proc) -> None:
    try:
        procs = proc.children(recursive=True) + [proc]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass



@contextmanager
def loopback(dashboard: bool = False, *, head_cpus: int = 1, head_gpus: int = 0, with_worker: bool = True):
    """Start a head node (with the dashboard and job server when ``dashboard``; ``head_cpus``
    and ``head_gpus`` declared) and one worker node (unless not ``with_worker``); yields address,
    env (with the token), root, worker_nm, dashboard_url."""
    root = Path(tempfile.mkdtemp(prefix="rgt", dir="/tmp"))  # short: Ray's socket paths
    marker = uuid.uuid4().hex
    env = dict(os.environ)
    env.update(
        RECYCLE_TEST_CLUSTER=marker,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=uuid.uuid4().hex,  # this cluster's own token, not ~/.ray/auth_token
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        # notice a dead node within seconds, not the default ~30 s
        RAY_health_check_period_ms="1000",
        RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="3",
    )
    worker_nm = None
    try:
        for attempt in range(3):  # a port taken between _free_ports and `ray start`: new ports
            gcs_port, client_port, dash_port = _free_ports(3)
            head_args, _ = _node_args(root / f"head{attempt}", head_cpus, head_gpus)
            worker_args, worker_nm = _node_args(root / f"worker{attempt}")
            address = f"127.0.0.1:{gcs_port}"
            dash = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"]
                    if dashboard else ["--include-dashboard=false"])  # fmt: skip
            head = subprocess.run(
                [RAY, "start", "--head", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
                 *dash, *head_args],
                env=env, capture_output=True, text=True, timeout=180,
            )  # fmt: skip
            if head.returncode == 0 and not with_worker:
                worker_nm = None
                break
            if head.returncode == 0:
                worker = subprocess.run(
                    [RAY, "start", f"--address={address}", *worker_args],
                    env=env, capture_output=True, text=True, timeout=180,
                )
                if worker.returncode == 0:
                    break
                head = worker
            for p in _ours(root, marker):
                _kill_tree(p)
            if attempt == 2:
                raise RuntimeError(f"ray start failed 3 times; last output:\n{head.stdout[-2000:]}\n{head.stderr[-2000:]}")
        yield {"address": address, "env": env, "root": root, "worker_nm": worker_nm, "marker": marker,
               "dashboard_url": f"http://127.0.0.1:{dash_port}" if dashboard else None}
    finally:
        for _ in range(3):  # processes may start while others are being killed
            procs = _ours(root, marker)
            raylet = _raylet(worker_nm) if worker_nm else None
            if raylet is not None:
                procs.append(raylet)
            for p in procs:
                _kill_tree(p)
            psutil.wait_procs(procs, timeout=10)
        shutil.rmtree(root, ignore_errors=True)
