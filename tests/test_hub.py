"""Adapters from the Hugging Face Hub without the network: a local HF cache layout (offline)
and a hub mirror served over loopback (online), adapters written by plain PEFT, a tiny base."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tests.conftest import cli, one_line_error, rows

REPO = Path(__file__).resolve().parent.parent


def commit_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def put_in_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs=("main",)) -> Path:
    """``folder``'s files as the snapshot ``commit`` of ``repo_id`` in an HF cache layout."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy(f, snap / f.name)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_offline_from_the_cache(hub_cache, make_adapter, tmp_path, tiny_base):
    a = make_adapter(tmp_path / "a", seed=1)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-llama"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    c1 = commit_of("a1")
    snap = put_in_cache(hub_cache, "org/lora-a", a, c1, refs=("main", "v1"))
    r = cli("add-expert", "org/lora-a", "--task", "t")
    assert r.exit_code == 0, r.output
    (row,) = rows()
    assert row["name"] == "lora-a" and row["path"] == str(snap)
    assert json.loads(row["meta"])["hub"] == {"repo": "org/lora-a", "revision": "main", "commit": c1}
    shown = json.loads(cli("experts", "show", "lora-a", "--json").stdout)
    assert shown["source"] == f"hub org/lora-a revision main (commit {c1})"
    # the same repository at the same commit again (by a tag): nothing to do
    again = cli("add-expert", "org/lora-a", "--revision", "v1")
    assert again.exit_code == 0 and "already registered" in again.stderr and len(rows()) == 1
    assert cli("experts", "verify").exit_code == 0
    # missing offline: one line, at once
    err = one_line_error(cli("add-expert", "org/nowhere"))
    assert "not in the local Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    err = one_line_error(cli("add-expert", "org/lora-a", "--revision", "no-such-tag"))
    assert "not in the local Hugging Face cache" in err
    # a repository holding only a pickle
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(a / "adapter_config.json", pickled / "adapter_config.json")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    put_in_cache(hub_cache, "org/pickled", pickled, commit_of("p"))
    assert "never a pickled adapter_model.bin" in one_line_error(cli("add-expert", "org/pickled"))
    # a collection: one line each, a failure does not lose the others
    b = make_adapter(tmp_path / "b", seed=2)
    (b / "adapter_config.json").write_text(json.dumps({**json.loads((b / "adapter_config.json").read_text()),
                                                       "base_model_name_or_path": "tiny-llama"}))
    put_in_cache(hub_cache, "org/lora-b", b, commit_of("b1"))
    listing = tmp_path / "collection.txt"
    listing.write_text("# the team's adapters\norg/lora-a v1\norg/lora-b\norg/nowhere main\n")
    r = cli("add-expert", "--from-file", listing)
    assert r.exit_code == 2 and "1 added, 1 unchanged; 1 failed" in r.stderr and "org/nowhere" in r.stderr
    assert sorted(x["name"] for x in rows()) == ["lora-a", "lora-b"]
    # a cache entry changed under the registry is found by verify
    (snap / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 99}))
    v = cli("experts", "verify", "--json")
    assert v.exit_code == 1 and {x["name"]: x["status"] for x in json.loads(v.stdout)}["lora-a"] == "modified"


def test_a_base_named_by_hub_id_resolves_through_the_cache(hub_cache, make_adapter, tmp_path, tiny_base):
    put_in_cache(hub_cache, "org/tiny-base", tiny_base, commit_of("base"))
    a = make_adapter(tmp_path / "a", seed=3)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/tiny-base"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli("add-expert", a).exit_code == 0
    assert rows()[0]["name"] == "a"
    # shapes are checked against that base: a module it does not have is refused
    bad = make_adapter(tmp_path / "bad", seed=4, targets=("q_proj",))
    cfg2 = json.loads((bad / "adapter_config.json").read_text())
    cfg2["base_model_name_or_path"] = "org/tiny-base"
    (bad / "adapter_config.json").write_text(json.dumps(cfg2))
    from safetensors.torch import load_file, save_file

    t = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k.replace("layers.0.", "layers.99."): v for k, v in t.items()}, str(bad / "adapter_model.safetensors"))
    assert "absent from the base model" in one_line_error(cli("add-expert", bad))
    cfg["base_model_name_or_path"] = "org/absent-base"
    other = shutil.copytree(a, tmp_path / "other")
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    assert "base model org/absent-base is not in the local Hugging Face cache" in one_line_error(cli("add-expert", other))


class Mirror(BaseHTTPRequestHandler):
    """The few hub endpoints ``huggingface_hub.snapshot_download`` uses, over loopback."""

    repos: dict = {}

    def log_message(self, *args):
        pass

    def _send(self, status, body=b"", headers=None, head=False):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, value, status=200, headers=None):
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _find(self, repo, rev):
        r = self.repos.get(repo)
        if r is None:
            return None, "RepoNotFound"
        commit = r["refs"].get(rev, rev if rev in r["commits"] else None)
        if commit is None:
            return None, "RevisionNotFound"
        return (r, commit), None

    def handle_req(self, head=False):
        path = unquote(urlparse(self.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, rev = "/".join(parts[2:4]), parts[5]
            found, error = self._find(repo, rev)
            if error:
                return self._json({"error": error}, 404, {"X-Error-Code": error})
            r, commit = found
            files = r["commits"][commit]
            if parts[4] == "revision":
                return self._json({"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]})
            return self._json([{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                               for f, b in files.items()])
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            found, error = self._find(repo, rev)
            if error or name not in found[0]["commits"][found[1]]:
                return self._send(404, b"", {"X-Error-Code": error or "EntryNotFound"}, head)
            body = found[0]["commits"][found[1]][name]
            return self._send(200, body, {"X-Repo-Commit": found[1], "ETag": f'"{hashlib.sha256(body).hexdigest()}"'},
                              head)
        return self._json({"error": "not found"}, 404)

    def do_GET(self):
        self.handle_req()

    def do_HEAD(self):
        self.handle_req(head=True)


def test_online_through_a_hub_mirror_on_loopback(tmp_path, make_adapter):
    a = make_adapter(tmp_path / "a", seed=5)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-llama"
    files = {"adapter_config.json": json.dumps(cfg).encode(),
             "adapter_model.safetensors": (a / "adapter_model.safetensors").read_bytes(),
             "adapter_model.bin": b"\x80\x04pickle never fetched"}
    c1 = commit_of("m1")
    Mirror.repos = {"org/remote": {"refs": {"main": c1}, "commits": {c1: files}},
                    "org/binonly": {"refs": {"main": commit_of("b")},
                                    "commits": {commit_of("b"): {"adapter_config.json": files["adapter_config.json"],
                                                                 "adapter_model.bin": files["adapter_model.bin"]}}}}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
               HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_XET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "recycle", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    try:
        r = run("add-expert", "org/remote")
        assert r.returncode == 0, r.stderr
        (row,) = rows()
        assert json.loads(row["meta"])["hub"]["commit"] == c1 and Path(row["path"]).name == c1
        assert not list((tmp_path / "cache").rglob("*.bin"))  # the pickle was never fetched
        r = run("add-expert", "org/remote", "--revision", "nope")
        assert r.returncode == 2 and "has no revision 'nope'" in r.stderr, r.stderr
        r = run("add-expert", "org/missing")
        assert r.returncode == 2 and "no adapter repository org/missing" in r.stderr, r.stderr
        r = run("add-expert", "org/binonly")
        assert r.returncode == 2 and "never a pickled adapter_model.bin" in r.stderr, r.stderr
        # the registered expert keeps working offline, from the cache
        env["HF_HUB_OFFLINE"] = "1"
        r = run("experts", "verify")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.shutdown()


def _hub_adapter(make_adapter, folder: Path, seed: int) -> Path:
    a = make_adapter(folder, seed=seed)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-llama"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return a


@pytest.mark.parametrize("revision", ["../../..", "/tmp", "refs/../../x", "a\\b", "-x", ".hidden", "a b", "x.lock"])
def test_a_revision_is_a_ref_or_commit_never_a_path(hub_cache, make_adapter, tmp_path, revision):
    put_in_cache(hub_cache, "org/lora-a", _hub_adapter(make_adapter, tmp_path / "a", 1), commit_of("a1"))
    err = one_line_error(cli("add-expert", "org/lora-a", "--revision", revision))
    assert "is not a branch, tag or commit name" in err
    assert rows() == []


def test_a_tampered_cache_cannot_point_outside_itself(hub_cache, make_adapter, tmp_path):
    """refs/main holding a path, a snapshot folder linked elsewhere and a weights file linked
    outside the cache are each refused; the untampered entry is then accepted."""
    a = _hub_adapter(make_adapter, tmp_path / "a", 1)
    root = hub_cache / "models--org--lora-a"
    c1 = commit_of("a1")
    put_in_cache(hub_cache, "org/lora-a", a, c1)
    shutil.copytree(a, tmp_path / "somewhere" / "x")
    # refs/main names a folder outside the cache
    (root / "refs" / "main").write_text(os.path.relpath(tmp_path / "somewhere" / "x", root / "snapshots"))
    err = one_line_error(cli("add-expert", "org/lora-a"))
    assert "points outside the cache" in err
    # refs/main looks like a commit, but that snapshot folder is a link to elsewhere
    c2 = commit_of("a2")
    (root / "snapshots" / c2).symlink_to(tmp_path / "somewhere" / "x", target_is_directory=True)
    (root / "refs" / "main").write_text(c2)
    assert "points outside the cache" in one_line_error(cli("add-expert", "org/lora-a"))
    # the snapshot is in place, but its weights are a link out of the cache
    (root / "refs" / "main").write_text(c1)
    w = root / "snapshots" / c1 / "adapter_model.safetensors"
    w.unlink()
    w.symlink_to(tmp_path / "somewhere" / "x" / "adapter_model.safetensors")
    err = one_line_error(cli("add-expert", "org/lora-a"))
    assert "points outside the cache" in err and "adapter_model.safetensors" in err
    assert rows() == []
    # a link into the cache's own blobs (how huggingface_hub lays a snapshot out) is fine
    (root / "blobs").mkdir()
    shutil.copy(a / "adapter_model.safetensors", root / "blobs" / "w")
    w.unlink()
    w.symlink_to(Path("..") / ".." / "blobs" / "w")
    r = cli("add-expert", "org/lora-a")
    assert r.exit_code == 0, r.output
    assert json.loads(rows()[0]["meta"])["hub"]["commit"] == c1
    assert cli("experts", "verify").exit_code == 0
    # linked out of the cache after it was registered (same bytes): verify says so
    w.unlink()
    w.symlink_to(tmp_path / "somewhere" / "x" / "adapter_model.safetensors")
    v = cli("experts", "verify", "--json")
    assert v.exit_code == 1
    (entry,) = json.loads(v.stdout)
    assert entry["status"] == "modified" and "points outside the cache" in entry["detail"]
