"""``compose ...`` (stored compositions) and ``predict``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from recycle import compose as comp
from recycle.cli import app
from recycle.cli.common import DbOption, JsonOption, console, info, open_registry, print_json
from recycle.errors import RecycleError


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


@compose_app.command("create")
def create_cmd(
    name: Annotated[str, typer.Argument(help="Name of the composition.")],
    method: Annotated[str, typer.Option(help=f"One of {', '.join(comp.METHODS)}, or 'single NAME'.")],
    experts: Annotated[Optional[str], typer.Option(help="Comma-separated expert names.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every single-task expert in the registry.")] = False,
    top_k: Annotated[int, typer.Option(help="Experts per token (token-routed methods).")] = 2,
    weighting: Annotated[str, typer.Option(help="softmax (competitive) or sigmoid (SPEC 4).")] = "softmax",
    temperature: Annotated[float, typer.Option(help="Router temperature.")] = 1.0,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a composition of this name.")] = False,
    db: DbOption = None,
):
    """Store a composition (the default subcommand: recycle compose NAME ...).

    Example: recycle compose pg --method phatgoose --all --top-k 2
    """
    if bool(experts) == all_ and not method.startswith("single "):
        raise RecycleError("give either --experts A,B,... or --all")
    names = [e.strip() for e in experts.split(",") if e.strip()] if experts else None
    row = comp.create(open_registry(db), name, method, names, top_k=top_k, weighting=weighting,
                      temperature=temperature, replace=replace)
    info(f"composition {row['name']}: {row['method']} over {len(row['members'])} experts {row['settings']}")


@compose_app.command("list")
def list_cmd(json_: JsonOption = False, db: DbOption = None):
    """List stored compositions. Example: recycle compose list --json"""
    rows = comp.list_all(open_registry(db))
    if json_:
        print_json(rows)
        return
    table = Table("name", "method", "experts", "settings", "created")
    for r in rows:
        table.add_row(r["name"], r["method"], str(len(r["members"])), json.dumps(r["settings"]), r["created"])
    console.print(table)


@compose_app.command("show")
def show_cmd(name: str, json_: JsonOption = False, db: DbOption = None):
    """Show one composition and its members. Example: recycle compose show pg"""
    row = comp.get(open_registry(db), name)
    if json_:
        print_json(row)
        return
    console.print(f"{row['name']}: {row['method']} {json.dumps(row['settings'])} (base {row['base_model']})")
    table = Table("member", "sha256")
    for m in row["members"]:
        table.add_row(m["name"], m["sha256"][:12])
    console.print(table)


@compose_app.command("remove")
def remove_cmd(name: str, db: DbOption = None):
    """Remove a stored composition. Example: recycle compose remove pg"""
    comp.remove(open_registry(db), name)
    info(f"removed composition {name}")


def _read_inputs(prompt, input_file, choices) -> list[dict]:
    if bool(prompt) == bool(input_file):
        raise RecycleError("give exactly one of --prompt or --input")
    shared = [c for c in choices.split(",")] if choices else None
    if prompt:
        items = [{"prompt": prompt}]
    else:
        items = []
        try:
            lines = Path(input_file).read_text().splitlines()
        except OSError as e:
            raise RecycleError(f"cannot read {input_file}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecycleError(f"{input_file}:{n}: not JSON ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise RecycleError(f"{input_file}:{n}: each line needs a \"prompt\" string")
            items.append(item)
        if not items:
            raise RecycleError(f"{input_file}: no examples")
    for item in items:
        if shared and not item.get("choices"):
            item["choices"] = shared
    kinds = {bool(item.get("choices")) for item in items}
    if len(kinds) > 1:
        raise RecycleError("either every example has choices (rank classification) or none (generation)")
    return items


@app.command("predict")
def predict_cmd(
    name: Annotated[str, typer.Argument(help="A stored composition, or a method over all experts.")],
    prompt: Annotated[Optional[str], typer.Option(help="One prompt.")] = None,
    input_file: Annotated[
        Optional[Path], typer.Option("--input", help='JSONL: {"prompt": ..., "choices": [...], "task": ...}')
    ] = None,
    choices: Annotated[Optional[str], typer.Option(help="Comma-separated answer choices for every prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length when there are no choices.")] = 32,
    explain: Annotated[bool, typer.Option("--explain", help="Add the experts used per routed module.")] = False,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 16,
    output: Annotated[Optional[Path], typer.Option(help="Write JSONL here instead of stdout.")] = None,
    db: DbOption = None,
):
    """Run a composition: rank classification over choices, or generation. JSONL out.

    Example: recycle predict pg --prompt "Review: great!\\nSentiment:" --choices " positive, negative"
    """
    from recycle.basemodels import load_base, resolve_base
    from recycle.data import Example
    from recycle.scoring import generate, predict, score_choices

    items = _read_inputs(prompt, input_file, choices)
    if output is not None and not output.absolute().parent.is_dir():
        raise RecycleError(f"cannot write {output}: its folder does not exist")
    registry = open_registry(db)
    names = [r["name"] for r in registry.db.query("select name from compositions")]
    if name in names:
        plan = comp.plan(registry, composition=name)
    elif name in comp.METHODS or name.startswith("single "):
        plan = comp.plan(registry, method=name)
    else:
        raise RecycleError(f"no composition named {name!r} (and it is not a method name)")
    model, tok = load_base(resolve_base(plan.base))
    handle = comp.install(plan, model, tok)
    results = []
    try:
        if items[0].get("choices"):
            examples = [Example(it["prompt"], list(it["choices"]), it["choices"][0], None,
                                it.get("text") or it["prompt"]) for it in items]
            on_rows, chosen = comp.per_example_hook(handle, plan, examples, tasks=[it.get("task") for it in items])
            explained = []
            if explain:
                scores = []
                for i, ex in enumerate(examples):
                    with handle.record() as rec:
                        hook = (lambda rows, i=i: on_rows([i] * len(rows))) if on_rows else None
                        scores += score_choices(model, tok, [ex], batch_size=1, on_rows=hook)
                    explained.append(rec.explain(0))
            else:
                scores = score_choices(model, tok, examples, batch_size=batch_size, on_rows=on_rows)
            for i, (it, ex, s, p) in enumerate(zip(items, examples, scores, predict(scores))):
                out = {**{k: v for k, v in it.items() if k != "choices"}, "answer": ex.choices[p],
                       "scores": dict(zip(ex.choices, s))}
                if chosen:
                    out["expert"] = chosen[i]
                if explain:
                    out["experts"] = explained[i]
                results.append(out)
        else:
            if plan.method in ("retrieval", "oracle"):
                raise RecycleError(f"predict: generation with {plan.method} is not supported; give --choices")
            texts = generate(model, tok, [it["prompt"] for it in items], max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
            results = [{**it, "answer": t} for it, t in zip(items, texts)]
    finally:
        handle.remove()
    lines = "".join(json.dumps(r) + "\n" for r in results)
    if output:
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text(lines)
        tmp.replace(output)
        info(f"wrote {len(results)} predictions to {output}")
    else:
        sys.stdout.write(lines)
