"""``add-expert``, ``experts ...`` and ``db path``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from recycle.adapters import find_adapter_folders
from recycle.cli.common import DbOption, JsonOption, console, info, open_registry, print_json, progress
from recycle.cli.root import app
from recycle.console import print_table
from recycle.errors import RecycleError
from recycle.experts import BaseCache, add_expert, add_from_hub, describe, parse_meta, remove_expert, verify_experts

experts_app = typer.Typer(no_args_is_help=True, help="Inspect and manage registered experts.")
db_app = typer.Typer(no_args_is_help=True, help="The registry database.")
app.add_typer(experts_app, name="experts")
app.add_typer(db_app, name="db")


@app.command("add-expert")
def add_expert_cmd(
    paths: Annotated[Optional[list[str]], typer.Argument(
        help="PEFT LoRA adapter folders, or hub ids (org/name).", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="Expert name (default: the folder or repository name).")] = None,
    task: Annotated[Optional[str], typer.Option(help="The task the expert was trained on.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="The data set it was trained on.")] = None,
    base: Annotated[
        Optional[str],
        typer.Option(help="Base model: alias (smollm2-135m, tiny-llama), local folder or hub id."),
    ] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub ids: the branch, tag or commit (default main).")] = None,
    from_file: Annotated[Optional[Path], typer.Option(
        "--from-file", help="A collection: one 'org/name [revision]' per line.")] = None,
    meta: Annotated[Optional[list[str]], typer.Option(help="Free-form KEY=VALUE, repeatable.")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite an expert of the same name.")] = False,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Add every adapter folder found under PATHS.")
    ] = False,
    db: DbOption = None,
):
    """Register PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors), from
    folders or from the Hugging Face Hub.

    Each adapter is validated (files, config, safetensors header, ranks, shapes, base model)
    and recorded with its sha256. Adding the same content again is a no-op. A hub id is
    fetched into the user's HF cache (safetensors only, never a pickle), works offline from
    that cache (HF_HUB_OFFLINE=1), and is recorded with the commit it resolved to.

    Examples:

      recycle add-expert ./adapters/rt --task rt_sentiment --base smollm2-135m

      recycle add-expert some-org/sentiment-lora --revision v1.0

      recycle add-expert --from-file collection.txt --base smollm2-135m
    """
    from recycle import hub

    sources: list[tuple[str, object]] = []  # ("folder", Path) or ("hub", (id, revision))
    for p in paths or []:
        path = Path(p).expanduser()
        if path.exists():
            if recursive and path.is_dir() and not (path / "adapter_config.json").is_file():
                found = find_adapter_folders(path)
                if not found:
                    raise RecycleError(f"{path}: no adapter folders found under it")
                sources += [("folder", f) for f in found]
            else:
                sources.append(("folder", path))
        elif hub.is_hub_id(p):
            sources.append(("hub", (p, revision)))
        else:
            raise RecycleError(f"{p}: no such folder, and not a hub id (org/name)")
    if from_file is not None:
        sources += [("hub", item) for item in hub.read_list(from_file)]
    if not sources:
        raise RecycleError("give adapter folders, hub ids, or --from-file LIST")
    if revision and not any(kind == "hub" for kind, _ in sources):
        raise RecycleError("--revision goes with hub ids")
    if name and len(sources) > 1:
        raise RecycleError("--name can only be given when adding a single adapter")
    meta_d = parse_meta(meta)
    registry = open_registry(db)
    cache = BaseCache()
    group = cache.ref(base) if base else None

    def add(kind, src, **kw):
        common = dict(task=task, dataset=dataset, base=base, meta=meta_d, replace=replace, cache=cache, **kw)
        if kind == "hub":
            return add_from_hub(registry, src[0], src[1], **common)
        return add_expert(registry, src, **common)

    if len(sources) == 1:
        _say(add(*sources[0], name=name))
        return

    results, failures = [], []
    with progress() as bar:
        job = bar.add_task("adding experts", total=len(sources))
        for kind, src in sources:
            try:
                row = add(kind, src, group_base=group)
                if group is None:  # the first adapter sets the base the others must share
                    group = cache.ref(row["base_model"])
                results.append(row)
            except RecycleError as e:
                failures.append((src, str(e)))
            bar.advance(job)
    counts = {s: sum(r["status"] == s for r in results) for s in ("added", "unchanged", "replaced")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    info(f"{summary or 'nothing added'}; {len(failures)} failed")
    for src, msg in failures:
        info(f"  failed: {msg}")
    if failures:
        raise typer.Exit(2)


def _say(row: dict) -> None:
    if row["status"] == "unchanged":
        info(f"{row['name']}: already registered with the same content (sha256 {row['sha256'][:12]}); nothing to do")
    else:
        info(f"{row['name']}: {row['status']} (base {row['base_model']}, rank {row['rank']}, "
             f"{len(row['target_modules'])} modules, sha256 {row['sha256'][:12]})")


@experts_app.command("list")
def list_cmd(
    base: Annotated[Optional[str], typer.Option(help="Only experts on this base model.")] = None,
    task: Annotated[Optional[str], typer.Option(help="Only experts for this task.")] = None,
    limit: Annotated[int, typer.Option(help="Table rows at most (0: all); --json lists every expert.", min=0)] = 100,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """List registered experts (a large library: the first --limit, then a summary by task
    and rank). Example: recycle experts list --task rt_sentiment --json"""
    rows = open_registry(db, create=False).experts(base=base, task=task)
    if json_:
        print_json([describe(r) for r in rows])
        return
    shown = rows if not limit else rows[:limit]
    print_table(["name", "task", "base", "rank", "alpha", "modules", "params", "sha256"],
                [[r.name, r.task or "", r.base_model, str(r.rank), f"{r.alpha:g}",
                  str(len(r.target_modules or [])), f"{r.n_params:,}", r.sha256[:12]] for r in shown])
    if not rows:
        info("no experts registered")
    elif len(shown) < len(rows):
        info(f"{len(shown)} of {len(rows)} experts shown (--limit 0 for all, --task T to filter, --json for every "
             f"record); {summary(rows)}")


def summary(rows: list) -> str:
    """``N experts: by task ...; by rank ...`` in one line (the most frequent first, ten at most)."""
    from collections import Counter

    def top(counter: Counter) -> str:
        items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        text = ", ".join(f"{k} {n}" for k, n in items[:10])
        return text + (f", … {len(items) - 10} more" if len(items) > 10 else "")

    return (f"{len(rows)} experts: by task {top(Counter(r.task or '(none)' for r in rows))}; "
            f"by rank {top(Counter(str(r.rank) for r in rows))}")


@experts_app.command("show")
def show_cmd(name: str, json_: JsonOption = False, db: DbOption = None):
    """Show one expert's record. Example: recycle experts show rt_sentiment"""
    row = describe(open_registry(db, create=False).expert(name))
    if json_:
        print_json(row)
        return
    table = Table("field", "value", show_header=False)
    for k, v in row.items():
        if isinstance(v, list):
            v = ", ".join(v) if len(v) <= 8 else f"{', '.join(v[:8])} … ({len(v)} in all)"
        table.add_row(k, "" if v is None else str(v))
    console.print(table, markup=False)


@experts_app.command("remove")
def remove_cmd(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    db: DbOption = None,
):
    """Remove an expert from the registry (its adapter files stay on disk).

    Example: recycle experts remove rt_sentiment --yes
    """
    registry = open_registry(db, create=False)
    registry.expert(name)  # fail early on an unknown name
    if not yes and not typer.confirm(f"Remove expert {name!r} from {registry.path}?"):
        raise RecycleError("not removed", exit_code=1)
    out = remove_expert(registry, name)
    extra = "".join(f", {n} {t} rows" for t, n in out["dropped"].items())
    info(f"removed {name}{extra}; files left at {out['expert'].path}")


@experts_app.command("verify")
def verify_cmd(
    search: Annotated[
        Optional[list[Path]], typer.Option(help="Folders to look in for moved adapters.")
    ] = None,
    fix: Annotated[bool, typer.Option("--fix", help="Record the new path of moved adapters.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="A row for every expert, not only those with a problem.")] = False,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Re-hash every adapter: report moved, missing or modified ones (exit 1 if any).

    The table has a row per expert with a problem (--all: every expert), then a count.

    Example: recycle experts verify --search ./adapters --fix
    """
    report = verify_experts(open_registry(db, create=False), search=search, fix=fix)
    if json_:
        print_json(report)
    else:
        rows = report if all_ else [r for r in report if r["status"] != "ok"]
        if rows:
            table = Table("name", "status", "detail")
            for r in rows:
                table.add_row(r["name"], r["status"], r["detail"])
            console.print(table, markup=False)
        ok_count = sum(r["status"] == "ok" for r in report)
        info(f"{ok_count} of {len(report)} experts ok" + ("" if ok_count == len(report) else
                                                           f", {len(report) - ok_count} with a problem"))
    bad = [r for r in report if r["status"] != "ok" and not (fix and r["status"] == "moved")]
    if bad:
        raise typer.Exit(1)


@db_app.command("path")
def db_path_cmd(db: DbOption = None):
    """Print the registry's path. Example: RECYCLE_DB=/data/r.db recycle db path"""
    from recycle.registry import default_db_path

    print(Path(db).expanduser().absolute() if db else default_db_path())
