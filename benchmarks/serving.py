"""Inference at scale: batch prediction on Ray workers, and the HTTP endpoint under load.

SmolLM2-135M, the demo's four experts, a PHATGOOSE top-2 composition over them (the demo's
registry: ``recycle demo`` first). Prompts: the demo's held-out tasks' test examples.

1. Batch prediction of ``--examples`` prompts: one process (``recycle predict`` as before,
   every core's threads), one process with one thread, and ``recycle predict --workers 1``
   and ``--workers 2`` (Ray actors with one thread each), each timed end to end including
   Ray start and model loading; examples per second and the ratios. The workers' scaling is
   2 workers against 1 with the same resources each (a worker per core here, as on a
   cluster a worker per node); against one process that already uses every core of this
   machine, 2 workers can gain no more than that process's own thread scaling.
2. Serving (``recycle serve``, one replica with every core): for 1, 8 and 32 concurrent
   clients, each sending its share of ``--requests`` score requests back to back, with
   dynamic batching on and off: requests per second and the p50 / p95 latency. Beside it
   the model's own ceiling for batching: 32 requests scored one at a time, as one padded
   batch, and sorted by length in forward passes of 8 (what the server does), in one
   process without HTTP.

    RECYCLE_DB=<demo registry> python benchmarks/serving.py

Results: benchmarks/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from moepp import RESULTS, cpu_name  # noqa: E402

TASKS = ["vader_amazon", "vader_nyt", "rt_sentiment"]


def items_of(registry, n: int) -> list[dict]:
    from recycle.tasks import load_examples

    out = []
    per = -(-n // len(TASKS))
    for t in TASKS:
        out += [{"prompt": ex.prompt, "choices": ex.choices} for ex in load_examples(registry, t, "test", n=per, seed=2)]
    return out[:n]


def batch_prediction(registry, plan, items, workers_threads: int, tmp: Path) -> dict:
    import torch

    from recycle.console import QUIET
    from recycle.predict import Predictor
    from recycle.batch import predict_batch

    out = {}
    cores = os.cpu_count() or 1

    def one_process(threads: int) -> float:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        p = Predictor(plan)
        p.score(items, batch_size=16)
        p.close()
        return time.perf_counter() - t0

    out["1 process, all threads"] = one_process(cores)
    out["1 process, 1 thread"] = one_process(1)
    torch.set_num_threads(cores)
    for workers in (1, workers_threads):
        t0 = time.perf_counter()
        predict_batch(plan, items, tmp / f"batch{workers}.jsonl", options={"batch_size": 16}, workers=workers,
                      cpus_per_worker=1, report=QUIET)
        out[f"{workers} Ray worker{'s' if workers > 1 else ''}, 1 thread each"] = time.perf_counter() - t0
    return {k: {"seconds": v, "examples_per_second": len(items) / v} for k, v in out.items()}


def batching_ceiling(plan, items, n: int = 32, forward: int = 8, reps: int = 3) -> dict:
    """Seconds to score ``n`` requests (drawn at random from ``items``) one at a time, as one
    padded batch, and sorted by length in forward passes of ``forward`` (what the server
    does with a batch), in one process with every core's threads (min of ``reps``, after a
    warm-up): what dynamic batching can gain on this machine before any HTTP or scheduling
    cost."""
    import random

    import torch

    from recycle.predict import Predictor

    torch.set_num_threads(os.cpu_count() or 1)
    p = Predictor(plan)
    batch = random.Random(0).sample(items, min(n, len(items)))
    times = {"one at a time": [], "one batch": [], f"passes of {forward}": []}
    try:
        p.score(batch[:4], batch_size=4)
        for _ in range(reps):
            t0 = time.perf_counter()
            for it in batch:
                p.score([it], batch_size=1)
            times["one at a time"].append(time.perf_counter() - t0)
            for label, size in (("one batch", n), (f"passes of {forward}", forward)):
                t0 = time.perf_counter()
                p.score(batch, batch_size=size)
                times[label].append(time.perf_counter() - t0)
    finally:
        p.close()
    best = {k: min(v) for k, v in times.items()}
    return {"requests": n, "forward_batch_size": forward, "seconds": best,
            "gain": {k: best["one at a time"] / v for k, v in best.items() if k != "one at a time"}}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def load(url: str, bodies: list[dict], clients: int) -> dict:
    import requests

    latencies: list[float] = []
    errors = []
    lock = threading.Lock()
    shares = [bodies[i::clients] for i in range(clients)]

    def client(mine):
        s = requests.Session()
        for body in mine:
            t0 = time.perf_counter()
            r = s.post(f"{url}/v1/score", json=body, timeout=600)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if r.status_code != 200:
                    errors.append(r.text)

    threads = [threading.Thread(target=client, args=(m,)) for m in shares]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"serving errors: {errors[0]}")
    lat = sorted(latencies)
    return {"requests": len(lat), "seconds": wall, "requests_per_second": len(lat) / wall,
            "p50_ms": 1e3 * statistics.median(lat), "p95_ms": 1e3 * lat[min(len(lat) - 1, int(0.95 * len(lat)))]}


def serving(plan, items, requests_n: int, clients: list[int]) -> dict:
    import ray
    import requests
    from ray import serve

    from recycle.serving import make_app

    cores = os.cpu_count() or 1
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bodies = [{"composition": "pg", **it} for it in (items * (requests_n // len(items) + 1))[:requests_n]]
    out = {}
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for batching in (True, False):
            serve.run(make_app({"pg": plan.to_dict()}, cpus=float(cores), batching=batching, max_batch_size=32,
                               batch_wait_ms=10), name="recycle", route_prefix="/")
            while requests.get(f"{url}/healthz", timeout=30).status_code != 200:
                time.sleep(0.5)
            load(url, bodies[:16], 4)  # warm up
            for c in clients:
                out[f"{'batching' if batching else 'no batching'}, {c} clients"] = load(url, bodies, c)
            serve.delete("recycle")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--composition", default="pg", help="a stored PHATGOOSE composition (made if missing)")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--out", default=str(RESULTS / "serving"))
    args = ap.parse_args()
    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        ap.error(f"--clients {args.clients!r} is not a comma-separated list of integers")
    out = Path(args.out)
    if not out.parent.is_dir():
        ap.error(f"--out {out}: its folder does not exist")

    import tempfile

    from recycle import compose
    from recycle.files import write_json, write_text
    from recycle.registry import Registry

    registry = Registry(create=False)
    if registry.composition_or_none(args.composition) is None:
        compose.create(registry, args.composition, "phatgoose", None, {"top_k": 2})
    plan = compose.plan(registry, composition=args.composition)
    items = items_of(registry, args.examples)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        batch = batch_prediction(registry, plan, items, 2, Path(tmp))
    ceiling = batching_ceiling(plan, items)
    served = serving(plan, items, args.requests, clients)
    command = "python benchmarks/serving.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    data = {"command": command.strip(), "cpu": cpu_name(), "seconds": time.time() - t0, "examples": len(items),
            "batch": batch, "batching_ceiling": ceiling, "serving": served}
    write_json(out.with_suffix(".json"), data)
    one = batch["1 process, all threads"]["examples_per_second"]
    one1 = batch["1 process, 1 thread"]["examples_per_second"]
    w1 = batch["1 Ray worker, 1 thread each"]["examples_per_second"]
    lines = [f"Command: `{data['command']}` ({data['seconds']:.0f} s on {data['cpu']})", "",
             f"Batch prediction, {len(items)} prompts (PHATGOOSE over the demo's 4 experts, rank classification, "
             "Ray start and model loading included):", "",
             "| how | seconds | examples / s | vs 1 process (all threads) | vs 1 process (1 thread) | vs 1 Ray worker |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, v in batch.items():
        lines.append(f"| {k} | {v['seconds']:.1f} | {v['examples_per_second']:.1f} | "
                     f"{v['examples_per_second'] / one:.2f} | {v['examples_per_second'] / one1:.2f} | "
                     f"{v['examples_per_second'] / w1:.2f} |")
    sec, gain, fw = ceiling["seconds"], ceiling["gain"], ceiling["forward_batch_size"]
    lines += ["", f"Batching ceiling (no HTTP, one process, {os.cpu_count()} threads): {ceiling['requests']} random "
              f"requests one at a time {sec['one at a time']:.2f} s; as one padded batch {sec['one batch']:.2f} s "
              f"({gain['one batch']:.2f}x); sorted by length in passes of {fw} (what the server does) "
              f"{sec[f'passes of {fw}']:.2f} s ({gain[f'passes of {fw}']:.2f}x).", ""]
    lines += [f"Serving, {args.requests} score requests per row, one replica with {os.cpu_count()} threads:", "",
              "| batching | clients | requests / s | p50 ms | p95 ms |", "|---|---:|---:|---:|---:|"]
    for k, v in served.items():
        mode, c = k.split(", ")
        lines.append(f"| {mode} | {c.split()[0]} | {v['requests_per_second']:.1f} | {v['p50_ms']:.0f} | "
                     f"{v['p95_ms']:.0f} |")
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
