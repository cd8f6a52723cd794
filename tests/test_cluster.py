"""The local Ray a command starts: where its servers listen, and its token file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = ("127.", "::1", "::ffff:127.")


def _token_env(monkeypatch, home: Path) -> Path:
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    return home / ".ray" / "auth_token"


def test_the_token_file_is_owner_only_from_the_start(tmp_path, monkeypatch):
    from recycle.cluster import private_token

    token = _token_env(monkeypatch, tmp_path)
    old_umask = os.umask(0)  # the most permissive umask: the mode must still be 0600
    try:
        private_token()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    text = token.read_text()
    assert len(text) == 64 and int(text, 16) >= 0
    private_token()  # there is one: kept as it is
    assert token.read_text() == text and [p.name for p in token.parent.iterdir()] == ["auth_token"]
    os.chmod(token, 0o644)  # written by an older Ray, world-readable: narrowed, not replaced
    private_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == text
    token.unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token wanted: none written
    private_token()
    assert not token.exists()


PROBE = r"""
import json, os, sys, psutil
from recycle import cluster
with cluster.connect(num_cpus=1) as where:
    import ray
    ray.get(ray.remote(lambda: 1).remote())
    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    for p in psutil.process_iter():  # detached ones carry the session's temp dir
        try:
            if os.environ["RECYCLE_RAY_TMPDIR"] in " ".join(p.cmdline()) and p not in procs:
                procs.append(p)
        except psutil.Error:
            pass
    listening = []
    for p in procs:
        try:
            listening += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections("inet") if c.status == "LISTEN"]
        except psutil.Error:
            pass
    token = os.path.expanduser("~/.ray/auth_token")
    print(json.dumps({"where": where, "node_ip": ray.util.get_node_ip_address(), "listening": listening,
                      "token_mode": oct(os.stat(token).st_mode & 0o777), "auth": os.environ.get("RAY_AUTH_MODE")}))
"""


def test_a_local_ray_listens_on_loopback_with_a_private_token(tmp_path):
    """Every socket of the local Ray a command starts (GCS, raylet, object manager, workers,
    agents) listens on loopback; token auth is on, its token file (written by recycle,
    before Ray) is 0600."""
    temp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                                              "RAY_AUTH_MODE")}
    env.update(HOME=str(tmp_path), RECYCLE_RAY_TMPDIR=temp, PYTHONPATH=str(REPO))
    try:
        r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    finally:
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["where"] == "local" and out["node_ip"] == "127.0.0.1" and out["auth"] == "token"
    assert out["token_mode"] == "0o600"
    names = {name for name, _, _ in out["listening"]}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names)
    outside = [x for x in out["listening"] if not x[1].startswith(LOOPBACK)]
    assert outside == [], outside
