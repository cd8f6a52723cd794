"""Batch prediction on a Ray cluster (``recycle predict NAME --input F --output F --workers N``).

:func:`predict_batch` uses Ray actors and ``ray.wait`` rather than Ray Data's ``map_batches``: each
actor loads the composition once (a :class:`~recycle.predict.Predictor`), the input is cut
into shards of examples of similar length (the input ordered by length, so that a shard's
batches carry little padding) that the driver hands out (two in flight per actor) and
writes back, each shard atomically, into a folder beside the output; the output file is
written, in input order, only when every shard is there. So a run that is interrupted (or whose driver dies) resumes
from the shards already written, and a shard whose actor dies (its node killed) goes back to
the queue for the actors left, with a replacement actor started where the cluster has room.
Ray Data would give the actor pool, but resuming a killed run and keeping the input order
are then extra machinery (and it needs its own dependencies).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from recycle.console import Reporter
from recycle.errors import RecycleError


class PredictorActor:
    """A Ray actor holding one loaded composition."""

    def __init__(self, plan: dict, dtype: str = "float32", device: str = "cpu", threads: int = 1):
        from recycle.methods import Plan
        from recycle.predict import Predictor

        self.predictor = Predictor(Plan.from_dict(plan), device=device, threads=threads, dtype=dtype)

    def run(self, job: tuple[int, list[dict], str, dict]) -> tuple[int, list[dict], float]:
        shard, items, kind, options = job
        t0 = time.perf_counter()
        if kind == "score":
            out = self.predictor.score(items, batch_size=options["batch_size"], explain=options.get("explain", False))
        else:
            out = self.predictor.generate(items, max_new_tokens=options["max_new_tokens"],
                                          batch_size=options["batch_size"])
        return shard, out, time.perf_counter() - t0


@dataclass
class BatchResult:
    output: str
    examples: int
    shards: int
    resumed: int  # shards found written by an earlier, interrupted run
    retried: int  # shards sent again after their actor died
    seconds: float
    examples_per_second: float


def _length(item: dict) -> int:
    """A request's size for ordering shards: its prompt and longest choice, in characters."""
    return len(item.get("prompt", "")) + max((len(c) for c in item.get("choices") or ()), default=0)


def _state_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.shards")


def predict_batch(
    plan,
    items: list[dict],
    output: str | Path,
    *,
    kind: str = "score",
    options: dict | None = None,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    shard_size: int | None = None,
    address: str | None = None,
    report: Reporter | None = None,
) -> BatchResult:
    """Predict ``items`` (checked requests) with ``plan`` on ``workers`` Ray actors and write
    JSONL to ``output`` in input order (see the module docstring)."""
    from recycle import cluster
    from recycle import shards as shards_mod
    from recycle.files import write_text

    report = report or Reporter()
    options = dict(options or {})
    dtype = cluster.resolve_dtype(options.pop("dtype", "float32"), gpus_per_worker)
    if dtype != "float32":  # in the key below: float32 shards written before dtypes existed stay valid
        options["dtype"] = dtype
    output = Path(output)
    if workers < 1:
        raise RecycleError(f"--workers must be at least 1, not {workers}")
    if cpus_per_worker <= 0:
        raise RecycleError(f"--cpus-per-worker must be positive, not {cpus_per_worker}")
    shard_size = shard_size or max(8, options.get("batch_size", 16) * 2)
    # shards of similar lengths (input positions in each); the output goes back in input order
    by_length = sorted(range(len(items)), key=lambda i: _length(items[i]))
    index = [by_length[i:i + shard_size] for i in range(0, len(items), shard_size)]
    shards = [[items[j] for j in idx] for idx in index]
    key = hashlib.sha256(json.dumps({"items": items, "plan": plan.content_key, "kind": kind, "options": options,
                                     "shard_size": shard_size, "shards": "by-length"},
                                    sort_keys=True).encode()).hexdigest()
    state = _state_dir(output)
    manifest = state / "manifest.json"
    if state.is_dir():
        try:
            old = json.loads(manifest.read_text()).get("key")
        except (OSError, ValueError):
            old = None
        if old != key:
            import shutil

            report.say(f"{state} holds shards of another run (other input or settings): starting over")
            shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    write_text(manifest, json.dumps({"key": key, "shards": len(shards), "examples": len(items)}) + "\n")

    done = shards_mod.done_shards(state, shards)  # a damaged shard: refused before any work
    todo = [i for i in range(len(shards)) if i not in done]
    resumed = len(shards) - len(todo)
    if resumed:
        report.say(f"resuming: {resumed} of {len(shards)} shards already written")
    t0 = time.time()
    retried = 0
    if todo:
        def on_result(job, result):
            nonlocal new_done
            i, out, _ = result
            write_text(shards_mod.shard_path(state, i), shards_mod.shard_text(i, shards[i], out))
            new_done += len(shards[i])

        def on_error(job, reason):
            raise RecycleError(f"shard {job[0]} failed: {reason}", exit_code=1)

        def on_retry(job):
            nonlocal retried
            retried += 1
            report.fail(f"a prediction worker died; shard {job[0]} goes to another")

        new_done = 0
        cluster.run(PredictorActor, [(i, shards[i], kind, options) for i in todo],
                    cluster.Resources(cpus_per_worker, gpus_per_worker), "predict", on_result, on_error=on_error,
                    what=f"predicting {len(items)} example(s) in {len(shards)} shard(s)", address=address,
                    report=report, weight=lambda job: len(job[1]), workers=workers, init=(plan.to_dict(), dtype),
                    on_retry=on_retry)
        elapsed = time.time() - t0
        report.say(f"{new_done} example(s) in {elapsed:.1f} s: {new_done / max(elapsed, 1e-9):.1f} examples/s")
    lines = shards_mod.assemble(state, index, shards, len(items))
    with open_output(output) as f:
        f.writelines(lines)
    import shutil

    shutil.rmtree(state, ignore_errors=True)
    elapsed = time.time() - t0
    computed = sum(len(shards[i]) for i in todo)
    return BatchResult(str(output), len(items), len(shards), resumed, retried, elapsed,
                       computed / max(elapsed, 1e-9))


class open_output:
    """The output file, written through a temporary name and renamed when complete."""

    def __init__(self, path: Path):
        from recycle.files import atomic_path

        self._ctx = atomic_path(path, make_parents=False)

    def __enter__(self):
        self._tmp = self._ctx.__enter__()
        self._f = open(self._tmp, "w", encoding="utf-8")
        return self._f

    def __exit__(self, *exc):
        self._f.close()
        return self._ctx.__exit__(*exc)
