"""``train-gates`` (one Ray task per expert) and ``gates list|show``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from recycle.cli.common import AddressOption, DbOption, JsonOption, console, info, open_registry, print_json
from recycle.cli.root import app
from recycle.errors import RecycleError
from recycle.settings import GateSettings, Resources, options

gates_app = typer.Typer(no_args_is_help=True, help="Trained PHATGOOSE gates.")
app.add_typer(gates_app, name="gates")


@app.command("train-gates")
@options("resources", Resources, names={"cpus": "cpus_per_expert", "gpus": "gpus_per_expert"})
@options("settings", GateSettings)
def train_gates_cmd(
    names: Annotated[Optional[list[str]], typer.Argument(help="Experts to train gates for.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every registered expert.")] = False,
    task: Annotated[Optional[str], typer.Option("--task", help="Every expert of this task.")] = None,
    settings: GateSettings = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if gates exist for these settings.")] = False,
    address: AddressOption = None,
    resources: Resources = None,
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

    registry = open_registry(db)
    experts = G.select_experts(registry, names or [], all_, task)
    rows = G.train(registry, experts, settings, force=force, address=address, gpus_per_expert=resources.gpus,
                   cpus_per_expert=resources.cpus)
    failed = [r for r in rows if r["status"] == "failed"]
    if json_:
        print_json({"settings_hash": settings.hash, "settings": settings.to_dict(), "experts": rows})
    else:
        _summary(rows)
    if failed:
        info(f"{len(failed)} of {len(rows)} failed:")
        for r in failed:
            info(f"  {r['expert']}: {r['reason']}")
        raise typer.Exit(1)


def _fmt(x, spec=".4f") -> str:
    return "" if x is None else format(x, spec)


def _summary(rows: list[dict]) -> None:
    table = Table(title="gates")
    for col in ("expert", "status", "loss start", "loss end", "seconds", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["expert"], r["status"], _fmt(r.get("loss_start")), _fmt(r.get("loss_end")),
                      _fmt(r.get("seconds"), ".1f"), r.get("reason") or "")
    console.print(table, markup=False)


@gates_app.command("list")
def list_cmd(json_: JsonOption = False, db: DbOption = None):
    """List trained gates (for the experts' current adapters), newest first per expert."""
    rows = open_registry(db, create=False).gates_rows()
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
    console.print(table, markup=False)


def _memory(m: dict | None) -> str:
    if not m:
        return "peak memory not recorded"
    cuda = f", CUDA {m['cuda_peak_mib']:.0f} MiB" if m.get("cuda_peak_mib") is not None else ""
    return f"peak worker RSS {m['peak_rss_mib']:.0f} MiB{cuda}"


@gates_app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="Expert name.", show_default=False)],
    settings: Annotated[Optional[str], typer.Option(help="Settings hash (or prefix); default: newest.")] = None,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Show an expert's gates: settings, losses and each routed module's gate norm."""
    from recycle.gates import gate_norms, load_gates

    registry = open_registry(db, create=False)
    registry.expert(name)  # a clear error for an unknown name
    rows = [r for r in registry.gates_rows(name) if settings is None or r["settings_hash"].startswith(settings)]
    if not rows:
        which = f" with settings {settings}" if settings else ""
        raise RecycleError(f"expert {name} has no gates{which}; run: recycle train-gates {name}")
    row = rows[0]
    gates = load_gates(row["path"])
    norms = gate_norms(gates)
    if json_:
        print_json({**row, "norms": norms})
        return
    console.print(
        f"{row['expert']}: settings {row['settings_hash'][:12]} {row['settings']}\n"
        f"steps {row['steps']}, loss {_fmt(row['loss_start'])} → {_fmt(row['loss_end'])}, "
        f"{_fmt(row['seconds'], '.1f')} s, dtype {row.get('dtype') or 'float32'}, {_memory(row.get('memory'))}\n"
        f"{row['path']}",
        highlight=False, markup=False,
    )
    table = Table()
    table.add_column("module")
    table.add_column("dim", justify="right")
    table.add_column("norm", justify="right")
    for module, norm in norms.items():
        table.add_row(module, str(gates[module].numel()), f"{norm:.4f}")
    console.print(table, markup=False)
