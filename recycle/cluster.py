"""Ray plumbing shared by every command that spreads work over a cluster.

- :func:`connect` joins a cluster (``--address``, or ``RAY_ADDRESS`` as under
  ``ray job submit``) or starts a quiet local one for the command's lifetime.
- :func:`default_gpus` picks GPUs per task: 1 where the cluster has GPUs, else 0, so a
  CPU cluster never waits forever on a GPU request.
- :func:`run` is the one driver of every command that runs jobs: connect (or start),
  resolve and check the resources, say where it runs, then one task per job
  (:func:`run_tasks`), or a pool of actors each built once, under a progress bar, handing
  each result to the driver as it arrives (``ray.wait``); worker crashes are retried,
  errors raised by a job are not; Ctrl-C cancels what is left.
- :func:`device` is what a worker puts its model on.

Workers get plain data and paths; only the driver writes the registry.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from recycle.errors import RecycleError

# Passed to every worker (if set in the driver), so workers see the same cache and
# offline settings as the command that submitted them.
WORKER_ENV_VARS = (
    "RECYCLE_CACHE",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TRANSFORMERS_VERBOSITY",
    "XDG_CACHE_HOME",
    "RECYCLE_ALLOW_CPU_FALLBACK",
)
DEFAULT_MAX_RETRIES = 3


def _quiet_env() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # no "usage stats" banner, no metrics exporter chatter
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def worker_env() -> dict[str, str]:
    """Environment variables the workers get: caches, offline flags, and the path to this
    package (so a local or loopback cluster can import it without an install)."""
    env = {k: os.environ[k] for k in WORKER_ENV_VARS if os.environ.get(k)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    pkg_root = str(Path(__file__).resolve().parent.parent)
    paths = [pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


@contextmanager
def connect(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[str]:
    """Be connected to Ray inside the block; yields ``"local"`` or the address joined.

    ``address`` None: join ``RAY_ADDRESS`` if it is set, else start a local Ray with
    ``num_cpus`` (default: all cores) and no dashboard, shut down at the end. ``"auto"``
    or ``host:port`` / ``ray://…`` joins an existing cluster (left running). When Ray is
    already initialised in this process (a test, a notebook), it is used as it is.
    """
    _quiet_env()
    import ray

    if ray.is_initialized():
        yield "existing"
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(
        log_to_driver=False,
        logging_level=logging.ERROR,
        configure_logging=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if address in (None, "local"):
                temp = {"_temp_dir": os.environ["RECYCLE_RAY_TMPDIR"]} if os.environ.get("RECYCLE_RAY_TMPDIR") else {}
                private_token()
                with _loopback_node():
                    ray.init(
                        address="local",
                        num_cpus=num_cpus or os.cpu_count() or 1,
                        include_dashboard=False,
                        _node_ip_address="127.0.0.1",
                        **temp,
                        **common,
                    )
                where = "local"
            else:
                ray.init(address=address, **common)
                where = address
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RecycleError(f"cannot connect to Ray at {address or 'a local cluster'}: {_one_line(e)}") from None
        except Exception as e:  # e.g. ray.exceptions.AuthenticationError
            if type(e).__module__.startswith("ray"):
                raise RecycleError(
                    f"cannot connect to Ray at {address}: {_one_line(e)} "
                    "(a cluster with token auth needs RAY_AUTH_MODE=token and its token)"
                ) from None
            raise
    try:
        yield where
    finally:
        ray.shutdown()


@contextmanager
def _loopback_node() -> Iterator[None]:
    """While a local Ray starts: keep its node address 127.0.0.1, so that its servers (GCS,
    raylet, object manager, workers, dashboard and runtime-env agents) listen on loopback only.

    Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` into the machine's own address
    (``services.resolve_ip_for_localhost`` asks ``get_node_ip_address``, which asks the
    network), and its servers then listen on every interface. It keeps loopback only where
    ``ray_constants.ENABLE_RAY_CLUSTER`` is off (macOS and Windows, where Ray clusters are
    single-machine); that constant is read from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when
    ray is imported, so it is turned off here, for the start only. A Ray without it starts
    as before (everywhere, behind the token); tests/test_cluster.py checks where every
    socket listens."""
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray that moved it: start as Ray does
        yield
        return
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved is None:
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def private_token() -> None:
    """The token of a local Ray, readable by its owner only.

    A new local Ray turns token authentication on (unless ``RAY_AUTH_MODE=disabled``) and
    writes a missing ``~/.ray/auth_token`` with the default umask: world-readable (644).
    Here a missing token file is created first, with mode 0600 from the start (a temporary
    file opened 0600, then linked into place; one written meanwhile by another process is
    kept), and an existing one of ours that others may read is narrowed to 0600.
    ``RAY_AUTH_TOKEN`` in the environment needs no file; ``RAY_AUTH_TOKEN_PATH`` names the
    file instead of ``~/.ray/auth_token``."""
    import secrets

    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    try:
        if path.exists():
            st = path.stat()
            if path.is_file() and st.st_uid == os.getuid() and st.st_mode & 0o077:
                os.chmod(path, 0o600)
            return
        if named:
            return  # a path the user chose: Ray reports it missing
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # what Ray's own generator writes: 256 random bits
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass  # a home folder we cannot write: Ray says what it needs


def default_gpus(requested: float | None) -> float:
    """GPUs per task: ``requested`` if given (fractions allowed), else 1 when the
    cluster has any GPU and 0 when it has none."""
    if requested is not None:
        if requested < 0:
            raise RecycleError(f"GPUs per task must be >= 0, not {requested}")
        return requested
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def check_fits(num_cpus: float, num_gpus: float) -> None:
    """Refuse a per-task request no node of the cluster could ever satisfy."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for n in nodes:
        res = n.get("Resources", {})
        if res.get("CPU", 0) >= num_cpus and res.get("GPU", 0) >= num_gpus:
            return
    raise RecycleError(f"no node of the cluster has {num_cpus:g} CPU(s) and {num_gpus:g} GPU(s) for one task; "
                       "ask for fewer CPUs / GPUs per task")


def capacity(num_cpus: float, num_gpus: float) -> int:
    """How many tasks (actors) of ``num_cpus`` and ``num_gpus`` each the cluster's live nodes
    can run at once, in all."""
    import ray

    total = 0
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        fits = [res.get("CPU", 0) / num_cpus] if num_cpus > 0 else []
        if num_gpus > 0:
            fits.append(res.get("GPU", 0) / num_gpus)
        total += int(min(fits)) if fits else 0
    return total


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def describe_error(e: BaseException) -> str:
    """One line for a failed task: the task's own exception (not Ray's traceback), or
    what happened to the worker."""
    import ray.exceptions as rex

    if isinstance(e, rex.RayTaskError):
        cause = getattr(e, "cause", None)
        if cause is not None and not isinstance(cause, rex.RayTaskError):
            if isinstance(cause, RecycleError):
                return str(cause)
            return f"{type(cause).__name__}: {_one_line(cause)}"
        return f"task failed: {_one_line(e)[:300]}"
    if isinstance(e, rex.WorkerCrashedError):
        return "the worker process died (retries exhausted)"
    if isinstance(e, rex.NodeDiedError):
        return "the node running the task died (retries exhausted)"
    if isinstance(e, rex.OutOfMemoryError):
        return "out of memory: the task was killed (retries exhausted)"
    if isinstance(e, rex.TaskCancelledError):
        return "cancelled"
    return f"{type(e).__name__}: {_one_line(e)}"[:500]


def device(requested: str) -> str:
    """The torch device a worker uses: ``requested`` (``"cuda"`` when its task was given a
    GPU). A task given a GPU that torch cannot see stops with one line, never computing on
    the CPU unnoticed; ``RECYCLE_ALLOW_CPU_FALLBACK=1`` (passed to the workers) lets it
    compute on the CPU instead (a cluster that declares GPUs it has not, as in the tests)."""
    import torch

    if requested != "cuda" or torch.cuda.is_available():
        return requested
    if os.environ.get("RECYCLE_ALLOW_CPU_FALLBACK") == "1":
        return "cpu"
    raise RecycleError(f"this task was given a GPU (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) "
                       f"but torch {torch.__version__} sees no CUDA device; install a CUDA build of torch, or set "
                       "RECYCLE_ALLOW_CPU_FALLBACK=1 to compute on the CPU")


def resolve_dtype(dtype: str, gpus: float | None = None) -> str:
    """``--dtype`` made concrete before anything is keyed (every dtype but ``auto`` is
    returned as it is). ``auto``: bfloat16 where each task gets a GPU (``gpus`` > 0; None:
    the connected cluster has GPUs, or, not connected, this machine's torch sees a GPU
    that computes in bfloat16); on a CPU, bfloat16 where the CPU has bfloat16 instructions
    (:func:`cpu_has_bf16`: AVX512-BF16 or AMX), else float32. Measured on such a CPU (AMD
    EPYC, AVX512-BF16; benchmarks/results/precision-quality.md, with the float32 head of
    :func:`recycle.basemodels.float32_head`): every method's held-out accuracy within 0.5
    points of float32 (paired), about 0.6x the time; without those instructions bfloat16
    is emulated and slower. A cluster resolves it on the machine that keys the work."""
    if dtype != "auto":
        return dtype
    if gpus is None:
        import ray

        if ray.is_initialized():
            gpus = ray.cluster_resources().get("GPU", 0)
        else:
            import torch

            gpus = 1 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 0
    if gpus > 0:
        return "bfloat16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def cpu_has_bf16() -> bool:
    """Whether this machine's CPU computes bfloat16 natively (Linux ``/proc/cpuinfo`` flags
    ``avx512_bf16`` or ``amx_bf16``; ``RECYCLE_CPU_BF16=0/1`` overrides)."""
    forced = os.environ.get("RECYCLE_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16`` (a resolved ``--dtype``)."""
    import torch

    if name == "auto":
        name = resolve_dtype(name)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def reset_peak_memory() -> str:
    """Start a task's memory high-water marks: the process's peak RSS (Linux: ``5`` written
    to ``/proc/self/clear_refs``; Ray reuses worker processes, so without it a task would
    report an earlier task's peak) and torch's CUDA peak where CUDA is in use. Returns the
    RSS scope then measured: ``task``, or ``process`` where the reset is refused."""
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "task"
    except OSError:
        return "process"


def peak_memory(scope: str = "task") -> dict:
    """``{peak_rss_mib, rss_scope, cuda_peak_mib}`` of this process since
    :func:`reset_peak_memory` (``cuda_peak_mib`` only where CUDA was used)."""
    out: dict = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out = {"peak_rss_mib": round(int(line.split()[1]) / 1024, 1), "rss_scope": scope}
    except OSError:
        pass
    if not out:  # not Linux: the process's lifetime peak
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
        out = {"peak_rss_mib": round(kb / 1024, 1), "rss_scope": "process"}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def measured(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``fn`` as a task that adds to a dict result, as ``memory``, its peak memory
    (:func:`peak_memory`), the GPUs Ray gave it (``cuda_visible_devices``, None without)
    and when it ran (``started``, ``ended``: Unix seconds)."""
    import time

    @functools.wraps(fn)
    def task(*args):  # a task's job, or an actor's (self, job)
        scope, started = reset_peak_memory(), time.time()
        result = fn(*args)
        if isinstance(result, dict):
            result = {**result, "memory": {**peak_memory(scope), "started": started, "ended": time.time(),
                                           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}}
        return result

    return task


@dataclass(kw_only=True)
class Job:
    """What :func:`run` sets on a job from the resources it got: torch threads, device;
    ``dtype`` (a resolved ``--dtype``) is set by the command's driver."""

    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class Resources:
    """What one task (or one pool worker) asks of the cluster."""

    num_cpus: float = 1
    num_gpus: float | None = 0  # None: 1 where the cluster has a GPU, else 0
    max_retries: int = DEFAULT_MAX_RETRIES


def run_tasks(fn: Callable[[Any], Any], jobs: Sequence[Any], resources: Resources,
              on_result: Callable[[Any, Any], None], on_error: Callable[[Any, str], None],
              progress: Callable[[Any], None] | None = None, on_interrupt: Callable[[list], None] | None = None) -> None:
    """:func:`run`'s tasks, on a connected Ray: ``fn(job)`` as one task per job, then
    ``on_result(job, result)`` or ``on_error(job, one_line_reason)``, then ``progress(job)``.

    System failures (a worker or node dying) are retried up to ``max_retries``; an exception
    raised by ``fn`` is final. On Ctrl-C the pending tasks are cancelled (their workers
    killed), ``on_interrupt(unfinished_jobs)`` is called (the pending ones and the one being
    handled), and KeyboardInterrupt propagates.
    """
    import ray

    remote = ray.remote(measured(fn)).options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, retry_exceptions=False,
                                    max_retries=resources.max_retries, runtime_env={"env_vars": worker_env()})
    pending: dict = {}
    current = None  # the job whose result is being handled
    try:
        for job in jobs:
            pending[remote.remote(job)] = job
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            current = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - reported, the others go on
                on_error(current, describe_error(e))
            else:
                on_result(current, result)
            if progress is not None:
                progress(current)
            current = None
    except KeyboardInterrupt:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        if on_interrupt is not None:
            on_interrupt(([current] if current is not None else []) + list(pending.values()))
        raise


def run(fn: Callable[[Any], Any] | type, jobs: Sequence[Any], resources: Resources, label: str,
        on_result: Callable[[Any, Any], None], *, on_error: Callable[[Any, str], None],
        on_interrupt: Callable[[list], None] | None = None, what: str | None = None, address: str | None = None,
        report=None, weight: Callable[[Any], int] = lambda job: 1, workers: int | None = 1, init: tuple = (),
        on_retry: Callable[[Any], None] = lambda job: None) -> None:
    """The one driver of every command that runs jobs: run ``jobs`` on Ray and hand each
    result to ``on_result(job, result)`` in this process as it arrives.

    Connects for the block (:func:`connect`), resolves ``resources.num_gpus`` (None:
    :func:`default_gpus`), refuses a request no node can meet, sets ``threads`` and
    ``device`` on each :class:`Job`, says ``what`` runs where, and shows the progress bar
    ``label`` (a job counts ``weight(job)``). A job that raises, or whose result
    ``on_result`` refuses with a RecycleError, goes to ``on_error(job, one_line_reason)``.

    ``fn`` a function: one task per job (:func:`run_tasks`; ``on_interrupt`` there). ``fn``
    a class: a pool of ``workers`` actors, each built once as ``fn(*init, device=...,
    threads=...)``, running ``actor.run(job)`` (``workers=None``: as many actors as the cluster
    runs at once, at most one per job), two jobs in flight each; a job whose actor
    dies goes back to the queue (``on_retry(job)``) and a replacement starts where the
    cluster has room. Ctrl-C cancels what is left.
    """
    from recycle.console import Reporter

    report = report or Reporter()
    if not jobs:
        return

    def handle(job, result):
        try:
            on_result(job, result)
        except RecycleError as e:
            on_error(job, str(e))

    with connect(address) as where:
        res = replace(resources, num_gpus=default_gpus(resources.num_gpus))
        check_fits(res.num_cpus, res.num_gpus)
        threads, kind = max(1, math.ceil(res.num_cpus)), "cuda" if res.num_gpus else "cpu"
        for job in jobs:
            if isinstance(job, Job):
                job.threads, job.device = threads, kind
        pool = isinstance(fn, type)
        if pool and workers is None:  # as many as the cluster runs at once, at most one per job
            workers = max(1, min(len(jobs), capacity(res.num_cpus, res.num_gpus)))
        if pool and workers > (room := capacity(res.num_cpus, res.num_gpus)):  # more only queue and slow it down
            raise RecycleError(f"--workers {workers}: this cluster runs at most {room} worker(s) of {res.num_cpus:g} "
                               f"CPU and {res.num_gpus:g} GPU each; lower --workers (or --cpus-per-worker)")
        report.say(f"{what or label} on Ray ({where}){f' on {min(workers, len(jobs))} worker(s)' if pool else ''}: "
                   f"{res.num_cpus:g} CPU, {res.num_gpus:g} GPU each")
        with report.bar(label, sum(weight(j) for j in jobs)):
            progress = lambda job: report.advance(weight(job))  # noqa: E731
            if not pool:
                return run_tasks(fn, jobs, res, handle, on_error, progress=progress, on_interrupt=on_interrupt)
            import ray

            actor = ray.remote(fn).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=0,
                                           runtime_env={"env_vars": worker_env()})
            _run_pool(lambda: actor.remote(*init, device=kind, threads=threads), jobs, res, workers, label, handle,
                      on_error, progress, on_retry)


def _run_pool(start: Callable, jobs: Sequence[Any], res: Resources, workers: int, label: str,
              on_result, on_error, progress, on_retry) -> None:
    """:func:`run` on a pool of actors (see there); ``start()`` starts one."""
    import ray

    queue = list(range(len(jobs)))
    pending: dict = {}  # run ref -> (actor, job index)
    starting: dict = {}  # readiness ref -> replacement actor not yet placed
    load = {start(): 0 for _ in range(min(workers, len(jobs)))}

    def submit(actor):
        while queue and load[actor] < 2:
            i = queue.pop(0)
            pending[actor.run.remote(jobs[i])] = (actor, i)
            load[actor] += 1

    try:
        for a in list(load):
            submit(a)
        while pending or (queue and starting):
            ref = ray.wait(list(pending) + list(starting), num_returns=1)[0][0]
            if ref in starting:  # a replacement is up (or failed to start)
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    continue
                load[actor] = 0
                submit(actor)
                continue
            actor, i = pending.pop(ref)
            load[actor] = load.get(actor, 1) - 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError:
                queue.insert(0, i)
                on_retry(jobs[i])
                if actor in load:  # the actor is gone: drop it; its other jobs come back too
                    del load[actor]
                    for r2, (a2, j) in list(pending.items()):
                        if a2 is actor:
                            pending.pop(r2)
                            queue.insert(0, j)
                    free = ray.available_resources()
                    if free.get("CPU", 0) >= res.num_cpus and free.get("GPU", 0) >= res.num_gpus:
                        replacement = start()
                        starting[replacement.__ray_ready__.remote()] = replacement
                if not load and not starting:
                    raise RecycleError(f"every {label} worker died; run the command again to resume",
                                       exit_code=1) from None
                for a in list(load):
                    submit(a)
                continue
            except ray.exceptions.RayTaskError as e:
                on_error(jobs[i], describe_error(e))
            else:
                on_result(jobs[i], result)
            progress(jobs[i])
            submit(actor)
    finally:
        for a in list(load) + list(starting.values()):
            ray.kill(a)
