"""``run`` (a pipeline file) and ``demo`` (the built-in demo pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recycle.cli.common import AddressOption, DbOption, info, open_registry
from recycle.cli.root import app
from recycle.settings import Precision, options


@app.command("run")
@options("precision", Precision, optional=True, help={"dtype": "Every step's dtype where its table gives none "
                                                              "(the file's top-level dtype; default float32)."})
def run_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline TOML file (see pipelines/).")],
    precision: Precision = None,
    address: AddressOption = None,
    db: DbOption = None,
):
    """Run a pipeline's steps in order (tasks, experts, gates, compositions, evaluations),
    skipping steps already done, so a crashed or interrupted run resumes; ends by printing
    each evaluation's results table on stdout (progress goes to stderr).

    Examples:

      recycle run pipelines/demo.toml

      ray job submit --working-dir . -- recycle run pipelines/benchmark.toml
    """
    from recycle import pipeline as P

    p = P.load(pipeline, precision)
    print_tables(P.Runner(p, db, address).run(), db)


def print_tables(outs: list[dict], db) -> None:
    """Each evaluation's results table on stdout (progress and paths stay on stderr)."""
    from recycle.cli.evaluate import _output

    registry = open_registry(db, create=False)
    for o in outs:
        rows = registry.run_results(o["run"])
        if rows:
            _output(registry, o["run"], rows, False, False)


@app.command("demo")
@options("precision", Precision)
def demo_cmd(precision: Precision = None, address: AddressOption = None, db: DbOption = None):
    """The whole pipeline on real data in one command: SmolLM2-135M, real catalogue tasks,
    a handful of held-in experts (cached), their gates, and a zero-shot evaluation on
    held-out tasks (pipelines/demo.toml); ends by printing each evaluation's results table
    on stdout and where the files are on stderr.

    Example: recycle demo
    """
    from recycle import pipeline as P

    p = P.load(P.builtin("demo"), precision)
    outs = P.Runner(p, db, address).run()
    for o in outs:
        info(f"results: {o.get('markdown')} and {o.get('json')}")
        if o.get("plot"):
            info(f"routing plot: {o['plot']}")
    print_tables(outs, db)
