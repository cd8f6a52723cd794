"""A thousand adapters, end to end: what each stage of recycle costs at N = 100 and N = 1,000.

A library of N heterogeneous LoRA adapters for SmolLM2-135M is written by PEFT itself
(``add_adapter`` on one ``PeftModel`` per adapter, then ``save_pretrained``; A and B random,
B not zero), as real libraries are mixed: ranks 4/8/16, ``lora_alpha`` 8/16/32,
``use_rslora`` on a quarter of them, target modules from {q, v} to all seven projections,
the top 8 layers for nine in ten and every layer for the rest. Adapter ``i`` is tagged with
catalogue task ``i mod 15`` (15 tasks of ``recycle/tasks/catalogue``, fixed in ``TASKS``), so gates train on real data. The
library is generated once, deterministically (adapter i is the same in every N), under
``--work`` (default ``~/.cache/recycle-bench/scale``), never in git; each N gets its own
registry there.

Stages (``--stages``, comma-separated, default all; each one is skipped where its result is
already in the JSON for this N unless ``--redo``):

- ``register``: ``recycle add-expert LIB/TASK --recursive --task TASK`` for each of the
  task folders (one registry write each), then the same again (nothing new);
- ``list``: ``recycle experts list`` (and ``--json``); ``verify``: ``recycle experts verify``;
- ``gates``: ``recycle train-gates`` (20 steps) on the first ``--gate-subset`` experts: wall
  time, experts/hour, extrapolated to N; then every other expert gets stand-in gates
  (random vectors of the right shapes, written by this script and labelled so): composing,
  routing and serving cost the same whatever the gate values;
- ``compose``: for PHATGOOSE, Arrow, SpectR, MoE++ (untrained: equal to PHATGOOSE routing)
  over all N, ``recycle compose`` then ``recycle predict NAME --prompt ...`` in a fresh
  process: wall time to the first prediction and the process's peak RSS, against
  ``recycle predict base`` and the adapters' bytes on disk;
- ``forward``: the PHATGOOSE composition at k = 2 on 4 x 256 = 1,024 tokens against the base
  model, in this process (medians of ``--reps``, taking turns);
- ``eval``: ``recycle eval --compositions pg --tasks rt_sentiment -n 200``;
- ``serve``: ``recycle serve pg pg8`` (pg8: PHATGOOSE over 8 of the experts), ``/v1/score``
  from one client, p50 of ``--requests`` for each;
- ``cosmo``: COSMO's prototypes for every member (once per distinct expert data, cached with
  the artifacts), cold then warm.

Peak RSS is the child process's ``ru_maxrss`` (``resource.getrusage(RUSAGE_CHILDREN)`` after
it exits, one child at a time). The machine is shared: say so with the numbers.

    python benchmarks/scale.py --experts 100
    python benchmarks/scale.py --experts 1000 --stages register,list,verify,compose,forward

Results: benchmarks/results/scale.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from moepp import RESULTS, cpu_name  # noqa: E402

# the 15 catalogue tasks the library was written with: fixed, so that adapter i keeps its folder as
# the catalogue grows (a new task would move most adapters and write the library again)
TASKS = ["bbc_topic", "debates_party", "mfd_foundation", "rt_sentiment", "rt_subjectivity", "sms_spam", "trec_coarse",
         "us_timezone", "vader_amazon", "vader_movies", "vader_nyt", "vader_tweets", "word_arousal", "word_potency",
         "word_valence"]
STAGES = ("register", "list", "verify", "gates", "compose", "forward", "eval", "serve", "cosmo")
TARGET_SETS = (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"],
               ["q_proj", "v_proj", "up_proj", "down_proj"],
               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
N_LAYERS, TOP8 = 30, list(range(22, 30))
GATE_STEPS = 20
PROMPT = "Review: a gentle, funny and moving film.\nIs the sentiment positive or negative? Answer:"


def adapter_spec(i: int) -> dict:
    """Adapter ``i``'s settings (deterministic in ``i``)."""
    rng = random.Random(i)
    r = (4, 8, 16)[i % 3]
    return {"task": TASKS[i % len(TASKS)], "r": r, "lora_alpha": rng.choice((8, 16, 32)), "use_rslora": i % 4 == 3,
            "target_modules": TARGET_SETS[rng.randrange(len(TARGET_SETS))],
            "layers": list(range(N_LAYERS)) if i % 10 == 9 else TOP8}


def adapter_dir(lib: Path, i: int) -> Path:
    return lib / adapter_spec(i)["task"] / f"x{i:04d}"


def make_library(lib: Path, n: int) -> None:
    """Write adapters 0..n-1 that are not there yet (PEFT ``save_pretrained``)."""
    missing = [i for i in range(n) if not (adapter_dir(lib, i) / "adapter_model.safetensors").is_file()]
    if not missing:
        return
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from recycle.basemodels import resolve_base

    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(resolve_base("smollm2-135m").path, torch_dtype=torch.float32)
    peft_model = None
    for count, i in enumerate(missing):
        s = adapter_spec(i)
        config = LoraConfig(r=s["r"], lora_alpha=s["lora_alpha"], use_rslora=s["use_rslora"],
                            target_modules=s["target_modules"], layers_to_transform=s["layers"],
                            init_lora_weights=False, task_type="CAUSAL_LM")
        name = f"x{i:04d}"
        if peft_model is None:
            peft_model = get_peft_model(base, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        torch.manual_seed(i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if f".{name}." in pname:
                    # A ~ N(0, 1/d_in) rows, B small and nonzero: deltas of a trained adapter's order
                    p.normal_(0, p.shape[1] ** -0.5 if "lora_A" in pname else 0.01)
        out = adapter_dir(lib, i)
        out.parent.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out.parent / ".tmp"), selected_adapters=[name])
        (out.parent / ".tmp" / name).rename(out)
        peft_model.delete_adapter(name) if len(peft_model.peft_config) > 1 else None
        if count % 100 == 99:
            print(f"  {count + 1}/{len(missing)} adapters written", file=sys.stderr)
    print(f"library: {len(missing)} adapters written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def library_bytes(lib: Path, n: int) -> int:
    return sum((adapter_dir(lib, i) / "adapter_model.safetensors").stat().st_size for i in range(n))


def run(args: list[str], env: dict, *, check: bool = True, quiet: bool = True) -> dict:
    """``python -m recycle ARGS`` in a fresh process: wall seconds, peak RSS (MiB), output."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = r0.ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "recycle", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss = r1.ru_maxrss
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if check and p.returncode != 0:
        raise SystemExit(f"recycle {shlex.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    if not quiet:
        print(p.stderr[-2000:], file=sys.stderr)
    # ru_maxrss of the children is a running maximum: it only tells a child's peak when it grew
    return {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "rss_mib": round(rss / 1024, 1) if rss > before else None,
            "stdout": p.stdout, "stderr": p.stderr, "code": p.returncode}


def rss_child(args: list[str], env: dict) -> dict:
    """Like :func:`run` but the peak RSS measured by a wrapper process of its own (a fresh
    maximum for each command)."""
    code = ("import resource, subprocess, sys, time, json; t0 = time.perf_counter(); "
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(json.dumps({'seconds': time.perf_counter() - t0, 'code': p.returncode, "
            "'rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
            "'cpu_seconds': round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime "
            "+ resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime, 2), "
            "'stdout': p.stdout, 'stderr': p.stderr[-3000:]}))")
    p = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "recycle", *args], env=env,
                       capture_output=True, text=True)
    out = json.loads(p.stdout)
    if out["code"] != 0:
        raise SystemExit(f"recycle {shlex.join(args)} failed:\n{out['stderr']}")
    out["seconds"], out["rss_mib"] = round(out["seconds"], 2), round(out["rss_mib"], 1)
    return out


# ---- stages ------------------------------------------------------------------------------


def stage_register(ctx) -> dict:
    env, lib, n = ctx["env"], ctx["lib_n"], ctx["n"]
    tasks = sorted({adapter_spec(i)["task"] for i in range(n)})
    out = {}
    labels = ("first", "second")
    from recycle.registry import Registry

    if len(Registry(ctx["db"]).experts()) >= n:  # registered before (--redo): only "again" can be timed now
        old = ctx["stored"].get("register", {})
        out = {k: v for k, v in old.items() if k.startswith("first_")}
        out["first_load_average"] = old.get("first_load_average", old.get("load_average"))
        labels = ("second",)
    for label in labels:
        t = cpu = 0.0
        for task in tasks:
            r = run(["add-expert", str(lib / task), "--recursive", "--task", task, "--base", "smollm2-135m"], env)
            t, cpu = t + r["seconds"], cpu + r["cpu_seconds"]
        out[f"{label}_seconds"], out[f"{label}_cpu_seconds"] = round(t, 1), round(cpu, 1)
        out[f"{label}_summary"] = r["stderr"].strip().splitlines()[-1] if r["stderr"].strip() else ""
    return out


def stage_list(ctx) -> dict:
    env = ctx["env"]
    table = run(["experts", "list"], {**env, "COLUMNS": "160"})
    js = run(["experts", "list", "--json"], env)
    return {"table_seconds": table["seconds"], "json_seconds": js["seconds"], "table_cpu_seconds": table["cpu_seconds"],
            "json_cpu_seconds": js["cpu_seconds"],
            "table_lines": len(table["stdout"].splitlines()), "json_experts": len(json.loads(js["stdout"]))}


def stage_verify(ctx) -> dict:
    r = run(["experts", "verify"], {**ctx["env"], "COLUMNS": "160"})
    return {"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "lines": len(r["stdout"].splitlines())}


def stage_gates(ctx) -> dict:
    from recycle.gates import GateSettings, gates_path, save_gates
    from recycle.registry import Registry

    env, n = ctx["env"], ctx["n"]
    subset = min(n, ctx["args"].gate_subset)
    names = [f"x{i:04d}" for i in range(subset)]
    if subset:
        r = run(["train-gates", *names, "--steps", str(GATE_STEPS), "--json", "--cpus-per-expert", "1"], env)
        rows = json.loads(r["stdout"])["experts"]
    else:  # --gate-subset 0: stand-in gates only (gate training timed at another N)
        r, rows = {"seconds": 0.0}, []
    trained = [x for x in rows if x.get("status") == "trained"]
    train_s = sum(x["seconds"] for x in trained)
    job_s = sum(x.get("job_seconds") or x["seconds"] for x in trained)
    out = {"subset": subset, "wall_seconds": r["seconds"], "trained": len(trained),
           "skipped": sum(x.get("status") == "skipped" for x in rows),
           "gate_training_seconds": round(train_s, 1), "job_seconds": round(job_s, 1)}
    if trained:
        workers = min(ctx["workers"], len(trained))
        out["experts_per_hour"] = round(3600 * len(trained) / r["seconds"], 1)
        out["extrapolated_seconds_at_N"] = round(r["seconds"] * n / len(trained), 0)
        # per expert, inside the worker: attaching and unloading the adapter, batches, writing the file
        out["per_expert_overhead_share"] = round((job_s - train_s) / train_s, 3)
        # the rest of the wall time (Ray start, one base model load per worker, the driver), spread over the experts
        out["fixed_share"] = round(max(0.0, r["seconds"] * workers - train_s) / train_s, 3)
    # stand-in gates for the rest (labelled by their settings: seed 424242, steps 1)
    reg = Registry(ctx["db"])
    settings = GateSettings(steps=1, seed=424242)
    import torch

    from recycle.routing import load_expert

    placed = 0
    for e in reg.experts():
        if reg.latest_gates(e) is not None:
            continue
        expert = load_expert(e.path, e.name, lazy=True)  # shapes only
        g = torch.Generator().manual_seed(int(e.name[1:]))
        vecs = {p: torch.randn(m.A.shape[1], generator=g) * 0.05 for p, m in expert.modules.items()}
        path = gates_path(reg.artifacts_dir, e.name, settings.hash, e.sha256)
        numbers = {"steps": 0, "loss_start": 0.0, "loss_end": 0.0, "seconds": 0.0}
        save_gates(path, vecs, {"format": "stand-in", "expert": e.name, "settings_hash": settings.hash})
        reg.record_gates(e, {"path": str(path), "settings_hash": settings.hash,
                             "settings": json.dumps(settings.to_dict(), sort_keys=True), **numbers})
        placed += 1
    out["stand_in_gates"] = placed
    return out


COMPOSE = {"pg": "phatgoose", "arrow": "arrow", "spectr": "spectr", "moe": "moepp"}


def stage_compose(ctx) -> dict:
    env = ctx["env"]
    base = rss_child(["predict", "base", "--prompt", PROMPT, "--choices", " positive, negative"], env)
    # a method not run this time keeps its stored numbers (--methods runs some of them)
    out = {**ctx["stored"].get("compose", {}), "base": {"seconds": base["seconds"], "rss_mib": base["rss_mib"]},
           "adapter_mib": round(library_bytes(ctx["lib_n"], ctx["n"]) / 2**20, 1)}
    note, stage_load = out.pop("note", None), out.pop("load_average", None)
    for method in COMPOSE.values():
        if isinstance(out.get(method), dict) and "load_average" not in out[method]:
            out[method] = {**out[method], "load_average": stage_load, **({"note": note} if note else {})}
    for name, method in COMPOSE.items():
        if ctx["args"].methods and method not in ctx["args"].methods.split(","):
            continue
        # MoE++ as measured: with the gating residual (its E x E matrices per module, the larger case)
        c = run(["compose", name, "--method", method, "--all", "--replace"] + (["--residual"] if method == "moepp" else []),
                env)
        p = rss_child(["predict", name, "--prompt", PROMPT, "--choices", " positive, negative"], env)
        extra = p["rss_mib"] - base["rss_mib"]
        out[method] = {"compose_seconds": c["seconds"], "predict_seconds": p["seconds"], "rss_mib": p["rss_mib"],
                       "predict_cpu_seconds": p.get("cpu_seconds"),
                       "load_average": round(os.getloadavg()[0], 1),
                       "over_base_mib": round(extra, 1), "over_base_per_adapter_mib": round(extra / out["adapter_mib"], 2)}
        print(f"  {method}: compose {c['seconds']} s, first prediction {p['seconds']} s, RSS {p['rss_mib']} MiB",
              file=sys.stderr)
    return out


def stage_forward(ctx) -> dict:
    import torch

    from recycle import compose, methods
    from recycle.basemodels import load_base, resolve_base
    from recycle.methods.method import install
    from recycle.registry import Registry

    threads = ctx["args"].threads or ctx["workers"]
    torch.set_num_threads(threads)
    reg = Registry(ctx["db"])
    plan = compose.plan(reg, composition="pg")
    model, tok = load_base(resolve_base(plan.base))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (4, 256), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    reps = ctx["args"].reps

    def timed() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(**batch)
        return time.perf_counter() - t0

    base_t, routed_t = [], []
    t0 = time.perf_counter()
    handle = install(methods.get(plan.method), plan, model, tok)
    install_s = time.perf_counter() - t0
    routed = len(handle.routed)
    timed()
    for _ in range(reps):
        routed_t.append(timed())
        handle.remove()
        base_t.append(timed())
        handle = install(methods.get(plan.method), plan, model, tok)
        timed()  # untimed: every timed routed forward follows another, as the first one does
    # the share of a routed forward spent scoring: the routers' score matmuls alone
    from recycle.routing.routers import GateRouter

    score_t = []
    layers = handle.routed
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.__setitem__(mod.path, a[0].reshape(-1, a[0].shape[-1])))
             for m in layers]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    for _ in range(reps):
        t0 = time.perf_counter()
        for m in layers:
            if m.group is not None:
                m.group._compute(inputs[m.path], 1e-5) if m.group.layers[0] is m else None
            elif isinstance(m.router, GateRouter):
                m.router.scores(inputs[m.path])
        score_t.append(time.perf_counter() - t0)
    handle.remove()
    b, r, s = statistics.median(base_t), statistics.median(routed_t), statistics.median(score_t)
    return {"tokens": 1024, "top_k": 2, "routed_modules": routed, "install_seconds": round(install_s, 1),
            "base_seconds": round(b, 3), "routed_seconds": round(r, 3), "ratio": round(r / b, 2),
            "scores_seconds": round(s, 3), "scores_share_of_routed": round(s / r, 2), "threads": threads}


def stage_eval(ctx) -> dict:
    r = run(["eval", "--compositions", "pg", "--tasks", "rt_sentiment", "-n", "200", "--cpus-per-task",
             str(ctx["workers"])], ctx["env"])
    return {"seconds": r["seconds"], "table": r["stdout"].strip()}


def stage_serve(ctx) -> dict:
    import socket

    import requests

    env = ctx["env"]
    from recycle.registry import Registry

    eight = [e.name for e in Registry(ctx["db"]).experts()[:8]]
    run(["compose", "pg8", "--method", "phatgoose", "--experts", ",".join(eight), "--replace"], env)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "recycle", "serve", "pg", "pg8", "--port", str(port),
                             "--cpus-per-replica", str(ctx["workers"])], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    out = {}
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"recycle serve exited: {proc.stderr.read()[-2000:]}")
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        out["ready_seconds"] = round(time.perf_counter() - t0, 1)
        body = {"prompt": PROMPT, "choices": [" positive", " negative"]}
        for name in ("pg", "pg8"):
            lat = []
            requests.post(f"{url}/v1/score", json={"composition": name, **body}, timeout=600)
            for _ in range(ctx["args"].requests):
                t1 = time.perf_counter()
                resp = requests.post(f"{url}/v1/score", json={"composition": name, **body}, timeout=600)
                lat.append(time.perf_counter() - t1)
                if resp.status_code != 200:
                    raise SystemExit(f"/v1/score {name}: {resp.status_code} {resp.text}")
            out[name] = {"p50_ms": round(1e3 * statistics.median(lat), 1), "requests": len(lat)}
    finally:
        proc.send_signal(2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def stage_cosmo(ctx) -> dict:
    import torch

    from recycle import compose
    from recycle.basemodels import load_base, resolve_base
    from recycle.methods.cosmo import Sides
    from recycle.registry import Registry

    torch.set_num_threads(ctx["workers"])
    reg = Registry(ctx["db"])
    run(["compose", "cosmo", "--method", "cosmo", "--all", "--unseen", "pg", "--replace"], ctx["env"])
    plan = compose.plan(reg, composition="cosmo")
    model, tok = load_base(resolve_base(plan.base))
    out = {}
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        stats = Sides(plan, model, tok, batch_size=16, max_length=256).member_stats()
        out[f"{label}_seconds"] = round(time.perf_counter() - t0, 1)
    out["members"] = len(stats)
    out["distinct"] = len({id(v) for v in stats.values()})
    return out


# ---- report ------------------------------------------------------------------------------


def fmt(v, unit=""):
    return "n/a" if v is None else f"{v}{unit}"


def markdown(results: dict, command: list[str]) -> str:
    lines = ["# A thousand adapters, end to end", "",
             f"Commands: {'; '.join(f'`{c}`' for c in command)}.", "",
             f"CPU: {results.get('cpu', '?')}. The machine was shared with other engineers' work (a quality "
             "benchmark and test suites on the same 2 cores): every time here was taken under load and is an upper "
             "bound, not a quiet-machine figure.", "",
             "The library: SmolLM2-135M adapters written by PEFT (`add_adapter`, `save_pretrained`): ranks 4/8/16, "
             "`lora_alpha` 8/16/32, `use_rslora` on a quarter, targets from {q, v} to all seven projections, the "
             f"top 8 layers for 9 in 10 and all 30 layers for the rest, each tagged with one of the {len(TASKS)} catalogue "
             "tasks.", "",
             "| stage | target | N = 100 | N = 1,000 |", "|---|---|---|---|"]
    r1, r2 = results.get("100", {}), results.get("1000", {})

    def row(stage, target, f, load=None):
        def cell(r):
            try:
                text = f(r)
            except (KeyError, TypeError, ZeroDivisionError):
                return "not run"
            try:
                return f"{text} (load {load(r)})" if load and load(r) is not None else text
            except (KeyError, TypeError):
                return text
        lines.append(f"| {stage} | {target} | {cell(r1)} | {cell(r2)} |")

    row("library on disk (adapter bytes)", "", lambda r: f"{r['compose']['adapter_mib']} MiB")
    row("register (`add-expert DIR --recursive`, one command per task folder): wall (CPU)", "≤ 120 s",
        lambda r: f"{r['register']['first_seconds']} s ({r['register']['first_cpu_seconds']} CPU-s)",
        lambda r: r["register"].get("first_load_average", r["register"]["load_average"]))
    row("register again (nothing new): wall (CPU)", "≤ 30 s",
        lambda r: f"{r['register']['second_seconds']} s ({r['register']['second_cpu_seconds']} CPU-s)",
        lambda r: r["register"]["load_average"])
    row("`experts list` table / `--json`: wall (CPU)", "≤ 3 s",
        lambda r: f"{r['list']['table_seconds']} ({r['list']['table_cpu_seconds']}) / {r['list']['json_seconds']} "
                  f"({r['list']['json_cpu_seconds']}) s; {r['list']['table_lines']} lines", lambda r: r["list"]["load_average"])
    row("`experts verify`: wall (CPU)", "≤ 90 s",
        lambda r: f"{r['verify']['seconds']} s ({r['verify']['cpu_seconds']} CPU-s); {r['verify']['lines']} lines",
        lambda r: r["verify"]["load_average"])
    row("gates (`train-gates`, 20 steps): subset", "",
        lambda r: f"{r['gates']['trained']} experts in {r['gates']['wall_seconds']} s" if r['gates']['trained']
        else f"stand-in gates only ({r['gates']['stand_in_gates']})", lambda r: r["gates"]["load_average"])
    row("gates: experts/hour; extrapolated to N", "",
        lambda r: f"{r['gates']['experts_per_hour']}/h; {r['gates']['extrapolated_seconds_at_N'] / 3600:.1f} h")
    row("gates: per-expert overhead in the worker / its training time", "≤ 15%",
        lambda r: f"{100 * r['gates']['per_expert_overhead_share']:.1f}%")
    row("gates: all else (Ray start, a model load per worker, driver) / training time", "",
        lambda r: f"{100 * r['gates']['fixed_share']:.0f}% at {r['gates']['trained']} experts")
    for method in COMPOSE.values():
        row(f"{method}: compose + first prediction (fresh process)", "≤ 60 s",
            lambda r, m=method: f"{r['compose'][m]['compose_seconds']} + {r['compose'][m]['predict_seconds']} s"
            + (f" ({r['compose'][m]['predict_cpu_seconds']} CPU-s)" if r['compose'][m].get('predict_cpu_seconds') else ""),
            lambda r, m=method: r["compose"][m].get("load_average"))
        row(f"{method}: peak RSS over the base's (× adapter bytes)", "≤ 1.3×",
            lambda r, m=method: f"{r['compose'][m]['over_base_mib']} MiB ({r['compose'][m]['over_base_per_adapter_mib']}×)")
    row("base model alone: `predict base` (fresh process), peak RSS", "",
        lambda r: f"{r['compose']['base']['rss_mib']} MiB")
    row("routed forward, k = 2, 1,024 tokens / base", "≤ 1.5×",
        lambda r: f"{r['forward']['routed_seconds']} / {r['forward']['base_seconds']} s = {r['forward']['ratio']}× "
                  f"({r['forward'].get('threads', 2)} thread(s))",
        lambda r: r["forward"]["load_average"])
    row("of which scoring (one matmul per module / sibling group)", "not dominant",
        lambda r: f"{r['forward']['scores_seconds']} s ({100 * r['forward']['scores_share_of_routed']:.0f}%)")
    row("`recycle eval` pg on rt_sentiment, n = 200", "", lambda r: f"{r['eval']['seconds']} s",
        lambda r: r["eval"]["load_average"])
    row("`recycle serve`: ready (pg + pg8 loaded)", "", lambda r: f"{r['serve']['ready_seconds']} s")
    row("`/v1/score` p50, one client: pg (all N) / pg8 (8 experts)", "",
        lambda r: f"{r['serve']['pg']['p50_ms']} / {r['serve']['pg8']['p50_ms']} ms", lambda r: r["serve"]["load_average"])
    row("COSMO prototypes for every member: cold / cached", "once per expert data",
        lambda r: f"{r['cosmo']['cold_seconds']} / {r['cosmo']['warm_seconds']} s", lambda r: r["cosmo"]["load_average"])
    notes = results.get("notes", [])
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=100)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--redo", action="store_true", help="rerun stages whose results are stored")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "recycle-bench" / "scale")
    ap.add_argument("--gate-subset", type=int, default=100)
    ap.add_argument("--methods", default="", help="compose stage: only these methods (comma-separated)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="forward stage: torch threads (default: every core)")
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]  # none: only the report from scale.json
    bad = sorted(set(stages) - set(STAGES))
    if bad or args.experts < 8:
        ap.error(f"unknown stages {bad} (choose from {', '.join(STAGES)})" if bad else "--experts must be >= 8")
    n = args.experts
    lib = args.work / "library"
    lib_n = args.work / f"lib-{n}"  # adapters 0..n-1, by task: folders of hard links to the library's files
    make_library(lib, n)
    for i in range(n):
        folder = adapter_dir(lib_n, i)
        if not (folder / "adapter_model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            for f in adapter_dir(lib, i).iterdir():
                if not (folder / f.name).exists():
                    os.link(f, folder / f.name)
    db = args.work / f"n{n}" / "registry.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RECYCLE_DB": str(db), "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
    from recycle.registry import Registry

    if not db.is_file() or len(Registry(db).tasks()) < len(TASKS):
        run(["tasks", "catalogue", "--add"], env)
    ctx = {"args": args, "n": n, "lib_n": lib_n, "db": db, "env": env, "workers": os.cpu_count() or 1}
    out_json = RESULTS / "scale.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results["cpu"] = cpu_name()
    mine = results.setdefault(str(n), {})
    for stage in stages:
        if stage in mine and not args.redo:
            print(f"{stage}: stored, skipped (--redo to rerun)", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        print(f"{stage} (N = {n}) ...", file=sys.stderr)
        ctx["stored"] = mine
        mine[stage] = globals()[f"stage_{stage}"](ctx)
        mine[stage]["load_average"] = round(os.getloadavg()[0], 1)
        print(f"{stage}: {time.perf_counter() - t0:.0f} s: "
              f"{ {k: v for k, v in mine[stage].items() if k not in ('table',)} }", file=sys.stderr)
        command = "python benchmarks/scale.py " + shlex.join(sys.argv[1:])
        RESULTS.mkdir(exist_ok=True)
        # another N may have run meanwhile: keep what it wrote, replace only this N's part
        stored = json.loads(out_json.read_text()) if out_json.is_file() else {}
        ran = stored.setdefault("commands", {}).get(str(n), [])
        ran = [ran] if isinstance(ran, str) else ran
        stored["commands"][str(n)] = ran + [command] * (command not in ran)
        results = {**stored, "cpu": results["cpu"], str(n): mine, "commands": stored["commands"]}
        out_json.write_text(json.dumps(results, indent=1, sort_keys=True))
    stored = json.loads(out_json.read_text()) if out_json.is_file() else results
    ran = [c for cs in stored.get("commands", {}).values() for c in ([cs] if isinstance(cs, str) else cs)]
    (RESULTS / "scale.md").write_text(markdown(stored, list(dict.fromkeys(ran))))
    print((RESULTS / "scale.md").read_text())


if __name__ == "__main__":
    main()
