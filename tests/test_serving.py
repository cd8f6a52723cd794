"""Inference at scale: batch prediction on Ray (resume after an interrupt, a worker node
killed mid-run on the loopback 2-node cluster) and the HTTP endpoint on Ray Serve, queried
by a real HTTP client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
requests = pytest.importorskip("requests")

from tests.raycluster import _kill_tree, _raylet, loopback  # noqa: E402
from tests.conftest import ok  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def write_inputs(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            task = "t_alpha" if i % 2 else "t_beta"
            prompt = f"Alpha: item {i}\nAnswer:" if i % 2 else f"Beta: item {i}\nPick one:"
            choices = [" a", " b"] if i % 2 else [" c", " d e"]
            f.write(json.dumps({"id": i, "prompt": prompt, "choices": choices, "task": task}) + "\n")
    return path


def env_for(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def ours(root: str) -> list:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(root in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_batch_prediction_resumes_after_an_interrupt(registered, tmp_path):
    ok("compose", "u", "--method", "uniform", "--all")
    inp = write_inputs(tmp_path / "in.jsonl", 120)
    single = tmp_path / "single.jsonl"
    ok("predict", "u", "--input", inp, "--output", single)
    expected = [json.loads(x) for x in single.read_text().splitlines()]
    out = tmp_path / "out.jsonl"
    ray_tmp = tempfile.mkdtemp(prefix="rbp", dir="/tmp")
    env = env_for(RECYCLE_RAY_TMPDIR=ray_tmp)
    cmd = [sys.executable, "-m", "recycle", "predict", "u", "--input", str(inp), "--output", str(out),
           "--workers", "1", "--shard-size", "2", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / ".out.jsonl.shards"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list(state.glob("shard-*.jsonl"))) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    written = len(list(state.glob("shard-*.jsonl")))
    assert proc.returncode == 130, err
    assert 5 <= written < 60 and not out.exists()  # interrupted: shards kept, no partial output
    # a shard swapped for another shard's content of the same length, and one not UTF-8:
    # both refused at once, before any work, never taken as answers
    p0, p1, p2 = (state / f"shard-{i:06d}.jsonl" for i in range(3))
    a, b = p0.read_bytes(), p1.read_bytes()
    if len(a) != len(b):  # make them the same length; the header still names other inputs
        b = b.replace(b"}\n", b" " * (len(a) - len(b)) + b"}\n", 1) if len(a) > len(b) else b
        a = a.replace(b"}\n", b" " * (len(b) - len(a)) + b"}\n", 1) if len(b) > len(a) else a
    p0.write_bytes(b)
    p1.write_bytes(a)
    p2.write_bytes(b"\xff" + p2.read_bytes()[1:])
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "3 shard file(s)" in r.stderr and "shard-000000.jsonl: answers other inputs (shard 1's)" in r.stderr
    assert "shard-000002.jsonl: not UTF-8" in r.stderr and not out.exists()
    for p in (p0, p1, p2):
        p.unlink()
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {written - 3} of 60 shards already written" in r.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["id"] for g in got] == list(range(120))
    assert [g["answer"] for g in got] == [e["answer"] for e in expected]
    assert not state.exists()
    # more workers than the cluster can run: refused with the limit named, not 100000 actors queued
    many = [c if c != "1" or cmd[i - 1] != "--workers" else "100000" for i, c in enumerate(cmd)]
    many[many.index("--output") + 1] = str(tmp_path / "many.jsonl")
    r = subprocess.run(many, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--workers 100000: this cluster runs at most" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    deadline = time.time() + 30
    while ours(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    assert not ours(ray_tmp), "a Ray process of this test outlived it"


def test_batch_prediction_survives_a_killed_worker_node(registered, tmp_path):
    ok("compose", "u", "--method", "uniform", "--all")
    inp = write_inputs(tmp_path / "in.jsonl", 400)
    out = tmp_path / "out.jsonl"
    with loopback() as cluster:
        env = env_for(**{k: v for k, v in cluster["env"].items() if k.startswith("RAY")})
        env["RECYCLE_DB"] = os.environ["RECYCLE_DB"]
        cmd = [sys.executable, "-m", "recycle", "predict", "u", "--input", str(inp), "--output", str(out),
               "--workers", "2", "--shard-size", "2", "--batch-size", "2", "--address", cluster["address"]]
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        state = tmp_path / ".out.jsonl.shards"
        killed = None
        try:
            deadline = time.time() + 240
            while killed is None and time.time() < deadline and proc.poll() is None:
                raylet = _raylet(cluster["worker_nm"])
                assert raylet is not None, "the worker node's raylet is not running"
                running = any("PredictorActor" in " ".join(c.cmdline()) for c in raylet.children(recursive=True)
                              if c.is_running())
                if running and len(list(state.glob("shard-*.jsonl"))) >= 4:
                    killed = raylet.pid
                    _kill_tree(raylet)
                time.sleep(0.05)
            assert killed, "no prediction ran on the worker node"
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "a prediction worker died" in err
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["id"] for g in got] == list(range(400))
    assert all(g["answer"] in ([" a", " b"] if g["id"] % 2 else [" c", " d e"]) for g in got)


def test_serving_over_http(registered, tmp_path):
    ok("compose", "u", "--method", "uniform", "--all")
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rsv", dir="/tmp")
    env = env_for(RECYCLE_RAY_TMPDIR=ray_tmp)
    proc = subprocess.Popen([sys.executable, "-m", "recycle", "serve", "u", "--port", str(port), "--max-length", "64"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        health = requests.get(f"{url}/healthz", timeout=10).json()
        assert health == {"status": "ok", "compositions": ["u"]}
        comps = requests.get(f"{url}/v1/compositions", timeout=10).json()["compositions"]
        assert comps[0]["name"] == "u" and comps[0]["method"] == "uniform" and sorted(comps[0]["members"]) == ["ea", "eb"]
        results = {}

        def ask(i):
            body = {"composition": "u", "prompt": f"Alpha: item {i}\nAnswer:", "choices": [" a", " b"]}
            results[i] = requests.post(f"{url}/v1/score", json=body, timeout=120)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, r in results.items():
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["answer"] in (" a", " b") and set(body["scores"]) == {" a", " b"}
        # the same answers as predict
        direct = json.loads(ok("predict", "u", "--prompt", "Alpha: item 3\nAnswer:", "--choices", " a, b").stdout)
        assert results[3].json()["answer"] == direct["answer"]
        assert results[3].json()["scores"] == pytest.approx(direct["scores"], abs=1e-5)
        explained = requests.post(f"{url}/v1/score", json={"composition": "u", "prompt": "Beta: x\nPick one:",
                                                           "choices": [" c", " d e"], "explain": True}, timeout=60)
        assert explained.status_code == 200 and "experts" in explained.json()
        gen = requests.post(f"{url}/v1/generate", json={"composition": "u", "prompt": "Hello", "max_new_tokens": 3},
                            timeout=60)
        assert gen.status_code == 200 and isinstance(gen.json()["text"], str)

        def error(r, status, words):
            assert r.status_code == status, (r.status_code, r.text)
            body = r.json()
            assert set(body) == {"error"} and "\n" not in body["error"] and words in body["error"], body
            assert "Traceback" not in r.text

        error(requests.post(f"{url}/v1/score", data="{not json", timeout=10), 400, "not JSON")
        error(requests.post(f"{url}/v1/score", json={"composition": "nope", "prompt": "x", "choices": ["a", "b"]},
                            timeout=10), 404, "no composition 'nope'")
        error(requests.post(f"{url}/v1/score", json={"composition": "u", "prompt": "x"}, timeout=10), 400, "choices")
        error(requests.post(f"{url}/v1/score", json={"composition": "u", "prompt": "x", "choices": ["a"]}, timeout=10),
              400, "at least two")
        error(requests.post(f"{url}/v1/score", json={"composition": "u", "prompt": "x " * 200,
                                                     "choices": ["a", "b"]}, timeout=10), 400, "at most 64")
        error(requests.post(f"{url}/v1/generate", json={"composition": "u", "prompt": "x", "max_new_tokens": 0},
                            timeout=10), 400, "max_new_tokens")
        error(requests.get(f"{url}/v1/score", timeout=10), 405, "takes POST")
        error(requests.get(f"{url}/nowhere", timeout=10), 404, "no endpoint")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    deadline = time.time() + 60
    while ours(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    assert not ours(ray_tmp), "a Ray process of this test outlived the server"


def _start_server(tmp_path, *args):
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rsv", dir="/tmp")
    proc = subprocess.Popen([sys.executable, "-m", "recycle", "serve", *args, "--port", str(port)],
                            env=env_for(RECYCLE_RAY_TMPDIR=ray_tmp), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url, ray_tmp
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("the server did not come up")


def test_ctrl_c_answers_the_requests_in_flight_then_exits(registered, tmp_path):
    """Requests held in the batch queue (a long --batch-wait-ms) when SIGINT arrives are all
    answered before the server exits; a request after that finds nothing listening."""
    ok("compose", "u", "--method", "uniform", "--all")
    proc, url, ray_tmp = _start_server(tmp_path, "u", "--batch-wait-ms", "6000", "--max-batch-size", "64")
    results = {}

    def ask(i):
        body = {"composition": "u", "prompt": f"Alpha: item {i}\nAnswer:", "choices": [" a", " b"]}
        try:
            results[i] = requests.post(f"{url}/v1/score", json=body, timeout=120)
        except requests.RequestException as e:
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)  # the requests are in the replica's batch queue for 6 s
        proc.send_signal(signal.SIGINT)
        for t in threads:
            t.join(timeout=120)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "answering those in flight" in err
    for i in range(8):
        r = results[i]
        assert not isinstance(r, Exception) and r.status_code == 200, r
        assert r.json()["answer"] in (" a", " b")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
    deadline = time.time() + 60
    while ours(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    assert not ours(ray_tmp), "a Ray process of this test outlived the server"


def test_oversized_and_malformed_requests_are_400_with_the_limit_named(registered, tmp_path):
    ok("compose", "u", "--method", "uniform", "--all")
    proc, url, ray_tmp = _start_server(tmp_path, "u", "--max-length", "64")

    def error(r, status, words):
        assert r.status_code == status, (r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error"} and "\n" not in body["error"] and words in body["error"], body

    def score(**fields):
        return requests.post(f"{url}/v1/score", json={"composition": "u", "prompt": "x", "choices": [" a", " b"],
                                                      **fields}, timeout=60)

    try:
        limit = 64 * 16
        error(score(choices=[" a", " b" * 1000]), 400, f"2003 characters; at most {limit} are taken (--max-length 64")
        error(score(choices=[" a", " b" * 600_000]), 400, "the body is")  # 1.2 M characters: refused unread
        error(score(prompt="x" * 20_000_000), 400, "the body is")  # refused unread, never tokenised
        error(score(choices=[f" c{i}" for i in range(2_000)]), 400, "2000 answer choices; at most 64")
        error(score(choices=[" a", " b", " a"]), 400, "the answer choice ' a' is given twice")
        error(score(choices=[" a", " b" * 40]), 400, "the prompt and its choices are")
        deep = '{"composition": "u", "prompt": "x", "choices": ' + "[" * 30_000 + "]" * 30_000 + "}"
        error(requests.post(f"{url}/v1/score", data=deep, timeout=60), 400, "nests deeper than 8 levels")
        error(requests.post(f"{url}/v1/score", data='{"composition": "u", "prompt": "x", "choices": [[[[[[[[[["a"]]]]]]]]]]}',
                            timeout=60), 400, "nests deeper than 8 levels")
        assert score().status_code == 200  # the server is still answering
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    deadline = time.time() + 60
    while ours(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    assert not ours(ray_tmp), "a Ray process of this test outlived the server"


def test_serve_refuses_an_address_it_cannot_listen_on_before_ray_starts(registered):
    """A port in use, a host that is not this machine's, a host that does not resolve: one
    short line each, exit 2, and no Ray started (the error used to be a 940-character
    RayTaskError line after Ray and Serve had started)."""
    from tests.conftest import cli, one_line_error

    ok("compose", "u", "--method", "uniform", "--all")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        for args, words in ((["--port", str(port)], f"port {port} on 127.0.0.1 is in use"),
                            (["--host", "192.0.2.123"], "not an address of this machine"),
                            (["--host", "no-such-host.invalid"], "is not an address or host name")):
            t0 = time.time()
            err = one_line_error(cli("serve", "u", *args))
            assert words in err and len(err) < 200, err
            assert time.time() - t0 < 30 and not __import__("ray").is_initialized()
    finally:
        taken.close()
