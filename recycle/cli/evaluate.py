"""``eval`` (zero-shot and generalised zero-shot, on Ray), ``eval runs``, ``eval show``, ``report``."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from recycle import evaluation as E
from recycle import methods
from recycle.cli.common import AddressOption, DbOption, JsonOption, console, info, open_registry, print_json, split
from recycle.cli.root import app
from recycle.errors import RecycleError
from recycle.settings import EvalSettings, Resources, options

eval_app = typer.Typer(
    no_args_is_help=False,
    invoke_without_command=True,
    help="Evaluate methods or compositions on held-out / held-in tasks (rank classification).",
)
app.add_typer(eval_app, name="eval")


@eval_app.callback()
@options("resources", Resources, names={"cpus": "cpus_per_task", "gpus": "gpus_per_task"})
@options("settings", EvalSettings, flags={"n": "-n"})
def eval_cmd(
    ctx: typer.Context,
    methods_: Annotated[
        Optional[str],
        typer.Option("--methods", help="Comma-separated: " + ",".join(methods.METHODS)
                     + " ('single NAME' for one expert; default: " + ",".join(methods.DEFAULT_EVAL) + ")."),
    ] = None,
    compositions: Annotated[Optional[str], typer.Option(help="Comma-separated stored compositions.")] = None,
    settings: EvalSettings = None,
    address: AddressOption = None,
    resources: Resources = None,
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

      recycle eval runs ; recycle eval show 3 --compare phatgoose,arrow ; recycle report 3 --plot routing.png
    """
    if ctx.invoked_subcommand is not None:
        return
    for option, value in (("--methods", methods_), ("--compositions", compositions)):
        if value is not None and not split(value):
            raise RecycleError(f"{option} is empty: name at least one, or leave the option out")
    comp_list = split(compositions)
    method_list = split(methods_) if methods_ is not None else ([] if comp_list else list(methods.DEFAULT_EVAL))
    request = E.EvalRequest(methods=tuple(method_list), compositions=tuple(comp_list), **settings.to_dict(),
                            cpus_per_task=resources.cpus, gpus_per_task=resources.gpus, force=force, address=address)
    registry = open_registry(db)
    outcome = E.evaluate(registry, request)
    _output(registry, outcome.run_id, registry.run_results(outcome.run_id), json_, csv_)
    if outcome.failures:
        info(f"{len(outcome.failures)} job(s) failed:")
        for f in outcome.failures:
            info(f"  {f}")
        raise typer.Exit(1)


def _output(registry, run_id: int, rows: list[dict], json_: bool, csv_: bool, metric: str = "accuracy") -> None:
    from recycle.results import near_far, run_split

    summary = near_far(registry, E.summarise(rows, metric))
    if json_:
        per_example = ("predictions", "scores", "labels")
        print_json({"run": run_id, "summary": summary,
                    "results": [{k: v for k, v in r.items() if k not in per_example} for r in rows]})
        return
    head, body = E.table(summary)
    if csv_:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(head)
        w.writerows(body)
        sys.stdout.write(buf.getvalue())
        return
    what = "balanced accuracy" if metric == "balanced" else "accuracy"
    scored = run_split(registry, run_id)
    if scored != "test":
        what += f", {scored} split"
    table = Table(*head, title=f"evaluation run {run_id} ({what}; n per task: "
                  + ", ".join(sorted({str(r['n']) for r in rows})) + ")")
    for line in body:
        table.add_row(*line)
    console.print(table, markup=False)
    for label, g in (summary.get("gates") or {}).items():
        console.print(E.gate_line(label, g), markup=False, highlight=False)
    info(f"registry: {registry.path}; details: recycle eval show {run_id}; routing plot: recycle report {run_id} --plot routing.png")


@eval_app.command("runs")
def runs_cmd(json_: JsonOption = False, db: DbOption = None):
    """List evaluation runs. Example: recycle eval runs"""
    registry = open_registry(db, create=False)
    registry.mark_dead_runs()
    rows = registry.runs()
    if json_:
        print_json(rows)
        return
    table = Table("run", "created", "status", "results", "seconds", "settings")
    for r in rows:
        table.add_row(str(r["id"]), r["created"], r["status"], str(r["results"]), E.fmt(r["seconds"]),
                      str(r["settings"]))
    console.print(table, markup=False)


@eval_app.command("show")
def show_cmd(
    run: int,
    compare: Annotated[Optional[str], typer.Option(help="A,B: paired comparison of two methods on the same examples "
                                                        "(McNemar per task, paired bootstrap over tasks).")] = None,
    examples: Annotated[Optional[str], typer.Option(help="TASK: every example of this task, one row per method "
                                                         "(choices, scores, prediction, label, routing).",
                                                    show_default=False)] = None,
    metric: Annotated[str, typer.Option(help="accuracy, or balanced (per task the mean over its classes of the "
                                             "share of that class answered right: a constant answer scores "
                                             "1 / classes however unbalanced the test split); for the table "
                                             "and for --compare.")] = "accuracy",
    json_: JsonOption = False,
    csv_: Annotated[bool, typer.Option("--csv")] = False,
    db: DbOption = None,
):
    """Show one run's results table, or compare two of its methods, or its examples of a task.

    Examples: recycle eval show 3 --json ; recycle eval show 3 --compare phatgoose,arrow ;
    recycle eval show 3 --compare cosmo,arrow --metric balanced ; recycle eval show 3 --examples rt_sentiment
    """
    if metric not in E.METRICS:
        raise RecycleError(f"--metric {metric!r}: choose from {', '.join(E.METRICS)}")
    registry = open_registry(db, create=False)
    registry.run(run)
    if examples:
        _examples(registry, run, examples, json_, csv_)
        return
    rows = registry.run_results(run)
    if not compare:
        _output(registry, run, rows, json_, csv_, metric)
        if not (json_ or csv_) and rows:
            info(E.memory_line(rows))
        return
    pair = split(compare)
    if len(pair) != 2:
        raise RecycleError(f"--compare takes two methods, A,B (got {compare!r})")
    result = E.compare(rows, *pair, metric=metric)
    if json_:
        print_json(result)
        return
    a, b = pair
    balanced = metric == "balanced"
    table = Table("task", "held", a, b, f"{a} - {b}", f"only {a} right", f"only {b} right",
                  "bootstrap p" if balanced else "McNemar p",
                  title=f"run {run}: {a} vs {b}, paired on the same examples"
                  + (" (balanced accuracy)" if balanced else ""))
    for t in result["tasks"]:
        table.add_row(t["task"], t["held"], E.fmt(t["a"]), E.fmt(t["b"]), f"{t['diff']:+.3f}", str(t["a_only"]),
                      str(t["b_only"]), f"{t['p']:.3g}")
    console.print(table, markup=False)
    for name, p in result["pooled"].items():
        console.print(f"{name} ({p['tasks']} tasks): mean {'balanced ' if balanced else ''}accuracy difference "
                      f"{p['diff']:+.4f}, 95% CI "
                      f"[{p['ci_low']:+.4f}, {p['ci_high']:+.4f}], paired bootstrap p = {p['p']:.3g}",
                      markup=False, highlight=False)


def _examples(registry, run: int, task: str, json_: bool, csv_: bool) -> None:
    from recycle import results as R

    rows = R.example_rows(registry, run, task)
    if json_:
        print_json(rows)
        return
    if csv_:
        sys.stdout.write(R.render(rows, "csv"))
        return
    table = Table("method", "example", "prediction", "label", "right", "scores", "routing",
                  title=f"run {run}, {task}: every example (choices by index: 0, 1, ...)")
    for r in rows:
        def choice(i):
            return f"{i} {r['choices'][i]!r}" if r["choices"] and i is not None else str(i)

        routing = ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 3)}" for k, v in (r["routing"] or {}).items()
                            if k != "expert_share")
        table.add_row(r["method"], "" if r["example_id"] is None else str(r["example_id"]), choice(r["prediction"]),
                      choice(r["label"]), "yes" if r["correct"] else "no", " ".join(f"{s:.3f}" for s in r["scores"]),
                      routing)
    console.print(table, markup=False)


@eval_app.command("export")
def export_cmd(
    run: int,
    format_: Annotated[str, typer.Option("--format", help="jsonl, csv or parquet (parquet needs --output).")] = "jsonl",
    output: Annotated[Optional[Path], typer.Option(help="Write here (default: stdout).", show_default=False)] = None,
    task: Annotated[Optional[str], typer.Option(help="Only this task.", show_default=False)] = None,
    db: DbOption = None,
):
    """Export a run's per-example results: one row per example and method (task, example id,
    prompt id, choices, scores, prediction, label, correct, routing).

    Examples: recycle eval export 3 > run3.jsonl ; recycle eval export 3 --format parquet --output run3.parquet
    """
    from recycle import results as R

    if format_ not in R.FORMATS:
        raise RecycleError(f"--format {format_!r}: choose from {', '.join(R.FORMATS)}")
    if format_ == "parquet" and output is None:
        raise RecycleError("--format parquet writes a file: give --output")
    if output is not None:
        from recycle.files import output_target

        output_target(output)  # checked before any work
    registry = open_registry(db, create=False)
    rows = R.example_rows(registry, run, task)
    if output is None:
        sys.stdout.write(R.render(rows, format_))
        return
    R.write(rows, format_, output)
    info(f"wrote {len(rows)} rows to {output}")


@app.command("report")
def report_cmd(
    run: int,
    plot: Annotated[Optional[Path], typer.Option(help="Write routing heatmaps (PNG) here.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Which routed method or composition (default phatgoose).")] = None,
    top: Annotated[int, typer.Option(help="Experts shown in the table and plot: the most used, the rest summed "
                                          "as 'other' (0: all; --json has all).", min=0)] = 20,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Routing report of a run: per-task expert usage and per-layer expert usage (the --top
    experts by share of tokens; the others in one column).

    Example: recycle report 3 --plot routing.png
    """
    registry = open_registry(db, create=False)
    registry.run(run)
    rows = registry.run_results(run)
    mats = E.routing_matrices(rows, method)
    shown = E.top_experts(mats, top) if mats is not None else None
    gates = E.gate_quality(rows)
    if mats is None and not gates:
        raise RecycleError(f"run {run} has no routed method results (routing is recorded for routed methods)")
    if json_:
        print_json({**(mats or {}), "gates": gates} if gates else mats)
    elif shown:
        table = Table("task", *shown["experts"], title=f"{shown['label']}: share of tokens per expert (mean over modules)")
        for t, row in zip(shown["tasks"], shown["task_expert"]):
            table.add_row(t, *[f"{v:.2f}" for v in row])
        console.print(table, markup=False)
    for label, g in gates.items():
        console.print(E.gate_line(label, g), markup=False, highlight=False)
    if plot:
        E.plot_routing(shown, plot, gates)
        info(f"wrote {plot}")
