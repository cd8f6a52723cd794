"""``train-router`` (MoE++) and ``train-cosmo-gate`` (COSMO): train what a stored composition learns
on top of its experts."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from recycle.cli.common import AddressOption, DbOption, JsonOption, info, open_registry, print_json
from recycle.cli.root import app


@app.command("train-router")
def train_router_cmd(
    name: Annotated[str, typer.Argument(help="A stored MoE++ composition (recycle compose NAME --method moepp).")],
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 200,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 5e-3,
    beta: Annotated[float, typer.Option(help="Weight of the tau-weighted balance loss.")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per example (prompt cut from the left).")] = 128,
    examples: Annotated[int, typer.Option("--examples", help="Calibration examples.")] = 400,
    calibration: Annotated[Optional[str], typer.Option(
        help="Comma-separated tasks, or a JSONL file of {prompt, answer} (default: the members' own tasks' "
             "train splits).", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample and the batch order.")] = 0,
    objective: Annotated[str, typer.Option(
        help="lm: cross-entropy on the calibration answers (the paper's loss); distill: keep the PHATGOOSE "
             "composition's next-token distributions (KL on every token, no labels used).")] = "lm",
    force: Annotated[bool, typer.Option("--force", help="Retrain even if trained with these settings.")] = False,
    address: AddressOption = None,
    gpus: Annotated[Optional[float], typer.Option(help="GPUs for the task (default: 1 if the cluster has GPUs).",
                                                  show_default=False)] = None,
    cpus: Annotated[float, typer.Option(help="CPUs for the task (also its torch threads).")] = 1.0,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Train a MoE++ composition's new parameters (computation-free experts' router rows,
    constant experts, gating residuals; experts and gates stay frozen) on a calibration
    mix, as one Ray task; the parameters are written beside the composition and used by
    eval and predict from then on.

    Examples:

      recycle compose m --method moepp --all --tau 0.5 && recycle train-router m

      recycle train-router m --calibration vader_tweets,trec_coarse --examples 300 --address auto
    """
    from recycle.methods.moepp import RouterTrainSettings, train_router

    settings = RouterTrainSettings(steps=steps, lr=lr, beta=beta, batch_size=batch_size, max_length=max_length,
                                   examples=examples, seed=seed, objective=objective)
    out = train_router(open_registry(db, create=False), name, settings, calibration_source=calibration, force=force,
                       address=address, gpus=gpus, cpus=cpus)
    if json_:
        print_json(out)
    else:
        info(f"{name}: router {out['status']} ({out['path']})")


@app.command("train-gate", hidden=True)  # its first name, kept as an alias
@app.command("train-cosmo-gate")
def train_gate_cmd(
    name: Annotated[str, typer.Argument(help="A stored COSMO composition (recycle compose NAME --method cosmo).")],
    folds: Annotated[int, typer.Option(help="Folds of held-out experts.")] = 4,
    examples: Annotated[int, typer.Option("--examples", help="Validation examples per member task.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the folds and the sample.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 16,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if trained with these settings.")] = False,
    address: AddressOption = None,
    gpus: Annotated[Optional[float], typer.Option(help="GPUs per fold task (default: 1 if the cluster has GPUs).",
                                                  show_default=False)] = None,
    cpus: Annotated[float, typer.Option(help="CPUs per fold task (also its torch threads).")] = 1.0,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Train a COSMO composition's seen/unseen gate by leaving experts out: in each fold some
    members' tasks act as unseen and the seen and unseen sides are rebuilt from the others;
    one Ray task per fold, on the validation splits of the members' tasks only.

    Examples:

      recycle compose c --method cosmo --all && recycle train-cosmo-gate c

      recycle compose c2 --method cosmo --all --unseen m && recycle train-cosmo-gate c2 --folds 4 --examples 100
    """
    from recycle.methods.cosmo import GateTrainSettings, train_gate

    settings = GateTrainSettings(folds=folds, examples=examples, seed=seed, batch_size=batch_size)
    out = train_gate(open_registry(db, create=False), name, settings, force=force, address=address, gpus=gpus,
                     cpus=cpus)
    if json_:
        print_json(out)
    else:
        info(f"{name}: gate {out['status']} ({out['path']})")
