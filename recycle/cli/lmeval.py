"""``lm-eval``: a composition on lm-evaluation-harness tasks (an optional dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from recycle.cli.root import app
from recycle.cli.common import AddressOption, DbOption, JsonOption, info, open_registry, split
from recycle.settings import Precision, options


@app.command("lm-eval")
@options("precision", Precision)
def lm_eval_cmd(
    name: Annotated[Optional[str], typer.Argument(help="A stored composition (or give --method).",
                                                  show_default=False)] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval task names (multiple_choice tasks).")] = "",
    method: Annotated[Optional[str], typer.Option(help="Instead of NAME: a method ('phatgoose', 'single EXPERT').",
                                                  show_default=False)] = None,
    experts: Annotated[Optional[str], typer.Option(help="With --method: comma-separated experts (default all).",
                                                   show_default=False)] = None,
    include_path: Annotated[Optional[Path], typer.Option(help="A folder of lm-eval task YAMLs (local tasks).",
                                                         show_default=False)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples (default: the task's).",
                                                       show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many documents per task.",
                                                 show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 16,
    output: Annotated[Optional[Path], typer.Option(help="Write lm-eval's own results JSON here.",
                                                   show_default=False)] = None,
    address: AddressOption = None,
    gpus_per_task: Annotated[Optional[float], typer.Option(
        help="GPUs per task, fractions allowed (default: 1 if the cluster has GPUs, else 0).", show_default=False)] = None,
    cpus_per_task: Annotated[float, typer.Option(help="CPUs per task (also its torch threads).")] = 1.0,
    precision: Precision = None,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Run EleutherAI's lm-evaluation-harness on a composition: one Ray task per (composition,
    task), recycle's routed model behind the harness (token routing, MoE++ and COSMO
    included), results stored as an evaluation run (recycle eval show / export).
    Needs the optional dependency: pip install -e ".[lm-eval]".

    Examples:

      recycle lm-eval pg --tasks arc_easy,sciq --limit 200 --output pg-lm-eval.json

      recycle lm-eval --method 'single sentiment' --tasks my_task --include-path ./my_tasks
    """
    from recycle import lmeval as L
    from recycle.cli.evaluate import _output
    from recycle.files import output_target, write_json

    request = L.LMEvalRequest(tasks=tuple(split(tasks)), composition=name, method=method,
                              experts=tuple(split(experts)), include_path=str(include_path) if include_path else None,
                              num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, cpus_per_task=cpus_per_task,
                              gpus_per_task=gpus_per_task, address=address, dtype=precision.dtype)
    L.require_lm_eval()
    if output:
        output_target(output)  # checked before any work
    registry = open_registry(db)
    outcome = L.lm_evaluate(registry, request)
    if output:
        write_json(output, outcome.results)
        info(f"lm-eval results: {output}")
    rows = registry.run_results(outcome.run_id)
    if rows:
        _output(registry, outcome.run_id, rows, json_, False)
    if outcome.failures:
        info(f"{len(outcome.failures)} task(s) failed:")
        for f in outcome.failures:
            info(f"  {f}")
        raise typer.Exit(1)
