"""``train-gates`` (one Ray task per expert) and ``gates list|show``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

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

gates_app = typer.Typer(no_args_is_help=True, help="Trained PHATGOOSE gates.")
app.add_typer(gates_app, name="gates")


def _select(registry, names: list[str], all_: bool, task: str | None) -> list[dict]:
    given = sum([bool(names), all_, task is not None])
    if given != 1:
        raise RecycleError("name the experts, or give --all, or --task T (exactly one of these)")
    if names:
        return [registry.expert(n) for n in dict.fromkeys(names)]
    experts = registry.experts(task=task)
    if not experts:
        where = f" for task {task}" if task else ""
        raise RecycleError(f"no experts registered{where} in {registry.path}")
    return experts


def _adapter_problem(expert: dict) -> str | None:
    """Why this expert's adapter cannot be used as registered, or None."""
    from recycle.adapters import sha256_file

    weights = Path(expert["path"]) / "adapter_model.safetensors"
    if not weights.is_file():
        return f"adapter weights {weights} are missing (moved? see: recycle experts verify)"
    if sha256_file(weights) != expert["sha256"]:
        return (
            f"adapter {weights} changed on disk since it was registered; "
            f"re-register it with: recycle add-expert {expert['path']} --replace"
        )
    return None


@app.command("train-gates")
def train_gates_cmd(
    names: Annotated[Optional[list[str]], typer.Argument(help="Experts to train gates for.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every registered expert.")] = False,
    task: Annotated[Optional[str], typer.Option("--task", help="Every expert of this task.")] = None,
    steps: Annotated[int, typer.Option(help="Training steps per expert.")] = 100,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 5e-3,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per example (prompt cut from the left).")] = 256,
    warmup: Annotated[float, typer.Option(help="Fraction of steps of linear warm-up.")] = 0.06,
    seed: Annotated[int, typer.Option(help="Seed of the batch order.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if gates exist for these settings.")] = False,
    address: AddressOption = None,
    gpus_per_expert: Annotated[
        Optional[float],
        typer.Option(help="GPUs per task, fractions allowed (default: 1 if the cluster has GPUs, else 0).", show_default=False),
    ] = None,
    cpus_per_expert: Annotated[float, typer.Option(help="CPUs per task (also its torch threads).")] = 1.0,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Train PHATGOOSE gates: one sigmoid gate per LoRA module of each expert, on the
    expert's own task's train split, everything else frozen (SPEC section 1).

    One Ray task per expert; results are recorded as they arrive. Experts whose gates
    exist for the same settings and adapter are skipped unless --force.

    Examples:

      recycle train-gates --all --steps 100

      recycle train-gates sentiment trec --address auto --gpus-per-expert 0.5
    """
    from recycle import gates as G
    from recycle.data import load_examples

    registry = open_registry(db)
    settings = G.GateSettings(
        steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, warmup=warmup, seed=seed
    )
    if cpus_per_expert <= 0:
        raise RecycleError(f"--cpus-per-expert must be positive, not {cpus_per_expert}")
    experts = _select(registry, names or [], all_, task)

    outcomes: dict[str, dict] = {}  # expert name -> {status, reason, ...}
    jobs: list[G.GateJob] = []
    by_name: dict[str, dict] = {}
    examples_cache: dict[str, list] = {}
    for e in experts:
        name = e["name"]
        problem = _adapter_problem(e)
        if problem:
            outcomes[name] = {"status": "failed", "reason": problem}
            continue
        row = G.find_gates_row(registry, e["id"], settings.hash, e["sha256"])
        if row and not force and Path(row["path"]).is_file():
            outcomes[name] = {"status": "skipped", "reason": "gates exist for these settings", **_nums(row)}
            continue
        if not e.get("task"):
            outcomes[name] = {
                "status": "failed",
                "reason": f"expert {name} has no task: re-register it with --task",
            }
            continue
        try:
            if e["task"] not in examples_cache:
                examples_cache[e["task"]] = load_examples(registry, e["task"], "train")
        except RecycleError as err:
            outcomes[name] = {"status": "failed", "reason": str(err)}
            continue
        out = G.gates_path(registry.artifacts_dir, name, settings.hash, e["sha256"])
        jobs.append(
            G.GateJob(
                expert=name,
                base=e["base_model"],
                adapter_path=e["path"],
                adapter_sha256=e["sha256"],
                examples=examples_cache[e["task"]],
                settings={k: v for k, v in settings.to_dict().items() if k != "algorithm"},
                out_path=str(out),
                threads=max(1, math.ceil(cpus_per_expert)),
            )
        )
        by_name[name] = e

    for name, o in outcomes.items():
        if o["status"] == "skipped":
            info(f"skip {name}: gates exist for settings {settings.hash[:12]} (use --force to retrain)")
        else:
            info(f"[red]✗[/red] {name}: {o['reason']}")

    if jobs:
        _run(registry, jobs, by_name, settings, outcomes, address, gpus_per_expert, cpus_per_expert)

    rows = [{"expert": e["name"], **outcomes.get(e["name"], {"status": "?"})} for e in experts]
    failed = [r for r in rows if r["status"] == "failed"]
    if json_:
        print_json({"settings_hash": settings.hash, "settings": settings.to_dict(), "experts": rows})
    else:
        _summary(rows)
    if failed:
        err_console.print(f"{len(failed)} of {len(rows)} failed:", highlight=False)
        for r in failed:
            err_console.print(f"  {r['expert']}: {r['reason']}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _nums(row: dict) -> dict:
    return {k: row.get(k) for k in ("steps", "loss_start", "loss_end", "seconds", "path")}


def _run(registry, jobs, by_name, settings, outcomes, address, gpus_per_expert, cpus_per_expert):
    from recycle import cluster
    from recycle import gates as G

    with cluster.connect(address) as where:
        gpus = cluster.default_gpus(gpus_per_expert)
        cluster.check_fits(cpus_per_expert, gpus)
        resources = cluster.Resources(num_cpus=cpus_per_expert, num_gpus=gpus)
        for job in jobs:
            job.device = "cuda" if gpus > 0 else "cpu"
        info(
            f"training gates for {len(jobs)} expert(s) on Ray ({where}): "
            f"{cpus_per_expert:g} CPU, {gpus:g} GPU each, settings {settings.hash[:12]}"
        )
        with progress() as bar:
            tid = bar.add_task("gates", total=len(jobs))

            def on_result(job, result):
                try:
                    G.record_gates_row(registry, by_name[job.expert], settings, result)
                except RecycleError as e:
                    outcomes[job.expert] = {"status": "failed", "reason": str(e)}
                    bar.console.print(f"[red]✗[/red] {job.expert}: {e}", highlight=False)
                    return
                outcomes[job.expert] = {"status": "trained", "reason": "", **_nums(result)}
                bar.console.print(
                    f"[green]✓[/green] {job.expert}: loss {result['loss_start']:.4f} → "
                    f"{result['loss_end']:.4f}, {result['seconds']:.1f} s",
                    highlight=False,
                )

            def on_error(job, reason):
                outcomes[job.expert] = {"status": "failed", "reason": reason}
                bar.console.print(f"[red]✗[/red] {job.expert}: {reason}", highlight=False)

            def on_interrupt(unfinished):
                # Rows are written whole or not at all; remove any gates file that has no
                # row (a cancelled task's, or one whose recording was interrupted).
                for job in jobs:
                    _remove_unrecorded(registry, job)

            try:
                cluster.run_tasks(
                    G.run_gate_job,
                    jobs,
                    resources,
                    on_result=on_result,
                    on_error=on_error,
                    progress=lambda job: bar.advance(tid),
                    on_interrupt=on_interrupt,
                )
            finally:
                for job in jobs:
                    _remove_temps(job)


def _remove_temps(job) -> None:
    out = Path(job.out_path)
    if out.parent.is_dir():
        for tmp in out.parent.glob(f".{out.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _remove_unrecorded(registry, job) -> None:
    out = Path(job.out_path)
    recorded = registry.db.execute("select count(*) from gates where path = ?", [str(out)]).fetchone()[0]
    if not recorded:
        out.unlink(missing_ok=True)
    _remove_temps(job)


def _fmt(x, spec=".4f") -> str:
    return "" if x is None else format(x, spec)


def _summary(rows: list[dict]) -> None:
    table = Table(title="gates")
    for col in ("expert", "status", "loss start", "loss end", "seconds", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["expert"],
            r["status"],
            _fmt(r.get("loss_start")),
            _fmt(r.get("loss_end")),
            _fmt(r.get("seconds"), ".1f"),
            r.get("reason") or "",
        )
    console.print(table)


@gates_app.command("list")
def list_cmd(json_: JsonOption = False, db: DbOption = None):
    """List trained gates (for the experts' current adapters), newest first per expert."""
    from recycle.gates import gates_rows

    rows = gates_rows(open_registry(db))
    if json_:
        print_json(rows)
        return
    if not rows:
        info("no gates yet: run recycle train-gates")
        return
    table = Table()
    for col in ("expert", "task", "settings", "steps", "loss start", "loss end", "seconds", "created"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["expert"], r["task"] or "", r["settings_hash"][:12], str(r["steps"]),
            _fmt(r["loss_start"]), _fmt(r["loss_end"]), _fmt(r["seconds"], ".1f"), r["created"],
        )
    console.print(table)


@gates_app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="Expert name.", show_default=False)],
    settings: Annotated[Optional[str], typer.Option(help="Settings hash (or prefix); default: newest.")] = None,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Show an expert's gates: settings, losses and each routed module's gate norm."""
    from recycle.gates import gate_norms, latest_gates_row, load_gates

    row = latest_gates_row(open_registry(db), name, settings)
    gates = load_gates(row["path"])
    norms = gate_norms(gates)
    if json_:
        print_json({**row, "norms": norms})
        return
    console.print(
        f"{row['expert']}: settings {row['settings_hash'][:12]} {row['settings']}\n"
        f"steps {row['steps']}, loss {_fmt(row['loss_start'])} → {_fmt(row['loss_end'])}, "
        f"{_fmt(row['seconds'], '.1f')} s\n{row['path']}",
        highlight=False,
    )
    table = Table()
    table.add_column("module")
    table.add_column("dim", justify="right")
    table.add_column("norm", justify="right")
    for module, norm in norms.items():
        table.add_row(module, str(gates[module].numel()), f"{norm:.4f}")
    console.print(table)
