"""``compose ...`` (stored compositions) and ``predict``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from typer.core import TyperGroup

from recycle import compose as comp
from recycle import methods
from recycle.cli.common import AddressOption, DbOption, JsonOption, console, info, open_registry, print_json, split
from recycle.cli.root import app
from recycle.console import print_table
from recycle.errors import RecycleError
from recycle.settings import Precision, Resources, bounded, options
from recycle.settings import parse_cli_settings


class DefaultCreateGroup(TyperGroup):
    """``recycle compose NAME ...`` means ``recycle compose create NAME ...``."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["create", *args]
        return super().resolve_command(ctx, args)


compose_app = typer.Typer(
    cls=DefaultCreateGroup,
    no_args_is_help=True,
    help="Store compositions of experts: recycle compose NAME --method phatgoose --all",
)
app.add_typer(compose_app, name="compose")


def _create_help() -> str:
    lines = methods.help_text().splitlines()
    return (
        "Store a composition (the default subcommand: recycle compose NAME ...).\n\n"
        "Give the members with --experts A,B,... or --all, and the method's settings as options "
        "(--name VALUE; flags as --flag / --no-flag). Storing the same composition again changes "
        "nothing; --replace overwrites a different one of the same name.\n\n"
        "Methods and their settings (defaults in brackets):\n\n"
        + "\n\n".join(f"  {line}" for line in lines)
        + "\n\nExamples:\n\n  recycle compose mine --all     (the recommended method, "
        + methods.RECOMMENDED + ")\n\n  recycle compose pg --method phatgoose --all --top-k 2\n\n"
        "  recycle compose one --method 'single vader_tweets'"
    )


@compose_app.command(
    "create", help=_create_help(),
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def create_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name of the composition.")],
    method: Annotated[Optional[str], typer.Option(
        help=f"One of the methods below, or 'single NAME' (default: {methods.RECOMMENDED}, the recommended one).")] = None,
    experts: Annotated[Optional[str], typer.Option(help="Comma-separated expert names.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every single-task expert in the registry.")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a composition of this name.")] = False,
    db: DbOption = None,
):
    method = method if method is not None else methods.RECOMMENDED
    m, carried = methods.parse(method)
    settings = parse_cli_settings(m.Settings, m.name, ctx.args)
    if bool(experts) == all_ and not carried and m.members != "multitask":
        raise RecycleError("give either --experts A,B,... or --all")
    row = comp.create(open_registry(db), name, method, split(experts) or None, settings, replace=replace)
    info(f"composition {row['name']}: {row['method']} over {len(row['members'])} experts {row['settings']} "
         f"({row['status']})")
    if m.TrainSettings is not None and row["status"] != "unchanged":
        info(f"{m.name} trains its {m.state_what} on the members' data: recycle train {row['name']}")


@compose_app.command("list")
def list_cmd(json_: JsonOption = False, db: DbOption = None):
    """List stored compositions. Example: recycle compose list --json"""
    rows = comp.list_all(open_registry(db, create=False))
    if json_:
        print_json(rows)
        return
    print_table(["name", "method", "experts", "settings", "created"],
                [[r["name"], r["method"], str(len(r["members"])), json.dumps(r["settings"]), r["created"]] for r in rows])


@compose_app.command("show")
def show_cmd(name: str, json_: JsonOption = False, db: DbOption = None):
    """Show one composition and its members. Example: recycle compose show pg"""
    row = comp.get(open_registry(db, create=False), name)
    if json_:
        print_json(row)
        return
    console.print(f"{row['name']}: {row['method']} {json.dumps(row['settings'])} (base {row['base_model']})",
                  markup=False, highlight=False)
    for key, part in (row.get("state") or {}).items():
        console.print(f"{key}: {part.get('path')} (sha256 {str(part.get('sha256'))[:12]})", markup=False,
                      highlight=False)
    table = Table("member", "sha256")
    for m in row["members"]:
        table.add_row(m["name"], m["sha256"][:12])
    console.print(table, markup=False)


@compose_app.command("remove")
def remove_cmd(name: str, db: DbOption = None):
    """Remove a stored composition. Example: recycle compose remove pg"""
    comp.remove(open_registry(db, create=False), name)
    info(f"removed composition {name}")


def _read_inputs(prompt, input_file, choices) -> list[dict]:
    from recycle.predict import check_item, read_jsonl

    if bool(prompt) == bool(input_file):
        raise RecycleError("give exactly one of --prompt or --input")
    shared = choices.split(",") if choices is not None else None  # spaces kept: " yes" is not "yes"
    if shared is not None and (len(shared) < 2 or any(not c.strip() for c in shared)):
        raise RecycleError("--choices needs at least two non-empty comma-separated answers")
    if shared is not None:
        check_item({"prompt": "-", "choices": shared}, "--choices")  # the bounds and no answer twice
    items = [check_item({"prompt": prompt}, "--prompt")] if prompt else read_jsonl(input_file)
    for item in items:
        if shared and not item.get("choices"):
            item["choices"] = shared
    kinds = {bool(item.get("choices")) for item in items}
    if len(kinds) > 1:
        raise RecycleError("either every example has choices (rank classification) or none (generation)")
    return items


@app.command("predict")
@options("resources", Resources, names={"cpus": "cpus_per_worker", "gpus": "gpus_per_worker"})
@options("precision", Precision)
def predict_cmd(
    name: Annotated[str, typer.Argument(help="A stored composition, or a method over all experts.")],
    prompt: Annotated[Optional[str], typer.Option(help="One prompt.")] = None,
    input_file: Annotated[
        Optional[Path], typer.Option("--input", help='JSONL: {"prompt": ..., "choices": [...], "task": ...}')
    ] = None,
    choices: Annotated[Optional[str], typer.Option(help="Comma-separated answer choices for every prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length when there are no choices.",
                                                callback=bounded(minimum=1))] = 32,
    explain: Annotated[bool, typer.Option("--explain", help="Add the experts used per routed module.")] = False,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.", callback=bounded(minimum=1))] = 16,
    output: Annotated[Optional[Path], typer.Option(help="Write JSONL here instead of stdout.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Batch prediction on Ray: this many workers, each loading "
                                                        "the composition once (needs --input and --output).",
                                                   show_default=False, callback=bounded(minimum=1))] = None,
    address: AddressOption = None,
    resources: Resources = None,
    precision: Precision = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Examples per shard (default: 2 batches).",
                                                      show_default=False, callback=bounded(minimum=1))] = None,
    db: DbOption = None,
):
    """Run a composition: rank classification over choices, or generation. JSONL out.

    With --workers or --address the input is cut into shards handled by Ray workers that
    each load the composition once; output lines come out in input order; an interrupted
    run resumes from the shards already written (kept beside the output until it is
    complete); a shard whose worker dies is done by another.

    Examples:

      recycle predict pg --prompt "Review: great!\\nSentiment:" --choices " positive, negative"

      recycle predict pg --input prompts.jsonl --output answers.jsonl --workers 8 --address auto
    """
    from recycle.files import write_text
    from recycle.predict import Predictor, resolve

    distributed = workers is not None or address is not None
    if distributed and (input_file is None or output is None):
        raise RecycleError("batch prediction on Ray (--workers/--address) needs --input and --output")
    items = _read_inputs(prompt, input_file, choices)
    if output is not None:
        from recycle.files import output_target

        output_target(output)  # a device, folder, FIFO or unwritable folder: refused before any work
    registry = open_registry(db, create=False)
    if distributed:
        from recycle.batch import predict_batch

        kind = "score" if items[0].get("choices") else "generate"
        options = {"batch_size": batch_size, "explain": explain, "max_new_tokens": max_new_tokens,
                   "dtype": precision.dtype}
        res = predict_batch(resolve(registry, name), items, output, kind=kind, options=options,
                            workers=workers or 1, cpus_per_worker=resources.cpus, gpus_per_worker=resources.gpus,
                            shard_size=shard_size, address=address)
        info(f"wrote {res.examples} predictions to {output} ({res.shards} shards, {res.resumed} resumed, "
             f"{res.retried} retried; {res.examples_per_second:.1f} examples/s)")
        return
    from recycle.cluster import resolve_dtype

    predictor = Predictor(resolve(registry, name), dtype=resolve_dtype(precision.dtype, 0))  # here: the CPU
    try:
        if items[0].get("choices"):
            results = predictor.score(items, batch_size=batch_size, explain=explain)
        else:
            results = predictor.generate(items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    finally:
        predictor.close()
    lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in results)
    if output:
        write_text(output, lines, make_parents=False)
        info(f"wrote {len(results)} predictions to {output}")
    else:
        sys.stdout.write(lines)
