"""``eval`` (zero-shot and generalised zero-shot, on Ray), ``eval runs``, ``eval show``, ``report``."""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from recycle import evaluation as E
from recycle.cli import app
from recycle.cli.common import (
    AddressOption,
    DbOption,
    JsonOption,
    console,
    err_console,
    info,
    open_registry,
    print_json,
    progress,
)
from recycle.errors import RecycleError

eval_app = typer.Typer(
    no_args_is_help=False,
    invoke_without_command=True,
    help="Evaluate methods or compositions on held-out / held-in tasks (rank classification).",
)
app.add_typer(eval_app, name="eval")


@eval_app.callback()
def eval_cmd(
    ctx: typer.Context,
    methods: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated: " + ",".join(E.DEFAULT_METHODS) + " (default: all of them)."),
    ] = None,
    compositions: Annotated[Optional[str], typer.Option(help="Comma-separated stored compositions.")] = None,
    tasks: Annotated[str, typer.Option(help="held-out, held-in, all, or comma-separated task names.")] = "held-out",
    n: Annotated[Optional[int], typer.Option("-n", help="Test examples per task (seeded sample; default all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the example sample.")] = 0,
    top_k: Annotated[int, typer.Option(help="Experts per token for token-routed methods.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 16,
    address: AddressOption = None,
    gpus_per_task: Annotated[
        Optional[float],
        typer.Option(help="GPUs per task, fractions allowed (default: 1 if the cluster has GPUs, else 0).", show_default=False),
    ] = None,
    cpus_per_task: Annotated[float, typer.Option(help="CPUs per task (also its torch threads).")] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="Recompute results stored for the same settings.")] = False,
    json_: JsonOption = False,
    csv_: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
    db: DbOption = None,
):
    """Evaluate zero-shot (held-out tasks) and generalised zero-shot (a mix) with rank
    classification, one Ray task per (method or composition, task).

    Examples:

      recycle eval --methods base,uniform,arrow,phatgoose --tasks held-out -n 200

      recycle eval --compositions pg --tasks all --json

      recycle eval runs ; recycle eval show 3 ; recycle report 3 --plot routing.png
    """
    if ctx.invoked_subcommand is not None:
        return
    if n is not None and n < 1:
        raise RecycleError(f"-n must be at least 1, not {n}")
    if cpus_per_task <= 0:
        raise RecycleError(f"--cpus-per-task must be positive, not {cpus_per_task}")
    registry = open_registry(db)
    method_list = _split(methods) if methods else ([] if compositions else list(E.DEFAULT_METHODS))
    comp_list = _split(compositions) if compositions else []
    for m in method_list:
        if m not in E.DEFAULT_METHODS and not m.startswith("single "):
            raise RecycleError(f"unknown method {m!r}; choose from {', '.join(E.DEFAULT_METHODS)}")
    threads = max(1, math.ceil(cpus_per_task))
    jobs, skipped = E.plan_eval(registry, methods=method_list, compositions=comp_list, tasks=tasks, n=n,
                                seed=seed, top_k=top_k, batch_size=batch_size, threads=threads)
    settings = {"methods": method_list, "compositions": comp_list, "tasks": tasks, "n": n, "seed": seed,
                "top_k": top_k}
    t0 = time.time()
    run_id = E.start_run(registry, settings)
    todo = []
    for job in jobs:
        old = None if force else E.stored_result(registry, job.key)
        if old is not None:
            E.record_result(registry, run_id, job, old, reused_from=old["id"])
        else:
            todo.append(job)
    if len(jobs) - len(todo):
        info(f"reusing {len(jobs) - len(todo)} stored result(s) for the same settings (--force recomputes)")
    for s in skipped:
        info(f"skip {s['label']} on {s['task']}: {s['reason']}")
    failures: list[str] = []
    status = "done"
    try:
        if todo:
            _run(registry, run_id, todo, failures, address, gpus_per_task, cpus_per_task)
    except KeyboardInterrupt:
        E.finish_run(registry, run_id, "interrupted", time.time() - t0)
        raise
    if failures:
        status = "failed"
    E.finish_run(registry, run_id, status, time.time() - t0)
    rows = E.run_rows(registry, run_id)
    _output(registry, run_id, rows, json_, csv_)
    if failures:
        err_console.print(f"{len(failures)} job(s) failed:", highlight=False)
        for f in failures:
            err_console.print(f"  {f}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _run(registry, run_id, jobs, failures, address, gpus_per_task, cpus_per_task):
    from recycle import cluster

    with cluster.connect(address) as where:
        gpus = cluster.default_gpus(gpus_per_task)
        cluster.check_fits(cpus_per_task, gpus)
        resources = cluster.Resources(num_cpus=cpus_per_task, num_gpus=gpus)
        info(f"evaluating {len(jobs)} (method, task) job(s) on Ray ({where}): {cpus_per_task:g} CPU, {gpus:g} GPU each")
        with progress() as bar:
            tid = bar.add_task("eval", total=len(jobs))

            def on_result(job, result):
                E.record_result(registry, run_id, job, result)
                bar.console.print(
                    f"✓ {job.label} on {job.task}: {result['accuracy']:.3f} "
                    f"[{result['ci_low']:.3f}, {result['ci_high']:.3f}] n={result['n']}, {result['seconds']:.1f} s",
                    highlight=False,
                )

            def on_error(job, reason):
                failures.append(f"{job.label} on {job.task}: {reason}")
                bar.console.print(f"✗ {job.label} on {job.task}: {reason}", highlight=False)

            cluster.run_tasks(E.run_eval_job, jobs, resources, on_result=on_result, on_error=on_error,
                              progress=lambda job: bar.advance(tid))


def _output(registry, run_id: int, rows: list[dict], json_: bool, csv_: bool) -> None:
    summary = E.summarise(rows)
    if json_:
        print_json({"run": run_id, "summary": summary,
                    "results": [{k: v for k, v in r.items() if k not in ("predictions",)} for r in rows]})
        return
    head, body = E.table(summary)
    if csv_:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(head)
        w.writerows(body)
        sys.stdout.write(buf.getvalue())
        return
    table = Table(*head, title=f"evaluation run {run_id} (accuracy; n per task: "
                  + ", ".join(sorted({str(r['n']) for r in rows})) + ")")
    for line in body:
        table.add_row(*line)
    console.print(table)
    info(f"registry: {registry.path}; details: recycle eval show {run_id}; routing plot: recycle report {run_id} --plot routing.png")


@eval_app.command("runs")
def runs_cmd(json_: JsonOption = False, db: DbOption = None):
    """List evaluation runs. Example: recycle eval runs"""
    registry = open_registry(db)
    rows = list(registry.db.query(
        "select r.id, r.created, r.status, r.seconds, r.settings, count(e.id) as results "
        "from eval_runs r left join eval_results e on e.run_id = r.id group by r.id order by r.id"))
    if json_:
        print_json(rows)
        return
    table = Table("run", "created", "status", "results", "seconds", "settings")
    for r in rows:
        table.add_row(str(r["id"]), r["created"], r["status"], str(r["results"]), E.fmt(r["seconds"]), r["settings"])
    console.print(table)


@eval_app.command("show")
def show_cmd(run: int, json_: JsonOption = False, csv_: Annotated[bool, typer.Option("--csv")] = False,
             db: DbOption = None):
    """Show one run's results table. Example: recycle eval show 3 --json"""
    registry = open_registry(db)
    E.get_run(registry, run)
    _output(registry, run, E.run_rows(registry, run), json_, csv_)


@app.command("report")
def report_cmd(
    run: int,
    plot: Annotated[Optional[Path], typer.Option(help="Write routing heatmaps (PNG) here.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Which routed method or composition (default phatgoose).")] = None,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Routing report of a run: per-task expert usage and per-layer expert usage.

    Example: recycle report 3 --plot routing.png
    """
    registry = open_registry(db)
    E.get_run(registry, run)
    mats = E.routing_matrices(E.run_rows(registry, run), method)
    if mats is None:
        raise RecycleError(f"run {run} has no routed method results (routing is recorded for routed methods)")
    if json_:
        print_json(mats)
    else:
        table = Table("task", *mats["experts"], title=f"{mats['label']}: share of tokens per expert (mean over modules)")
        for t, row in zip(mats["tasks"], mats["task_expert"]):
            table.add_row(t, *[f"{v:.2f}" for v in row])
        console.print(table)
    if plot:
        E.plot_routing(mats, plot)
        info(f"wrote {plot}")
