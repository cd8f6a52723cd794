"""``train-router`` (MoE++) and ``train-cosmo-gate`` (COSMO): train what a stored composition learns
on top of its experts."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from recycle.cli.common import AddressOption, DbOption, JsonOption, info, open_registry, print_json
from recycle.cli.root import app
from recycle.settings import GateTrainSettings, Resources, RouterTrainSettings, options


@app.command("train-router")
@options("resources", Resources, names={"cpus": "cpus", "gpus": "gpus"})
@options("settings", RouterTrainSettings)
def train_router_cmd(
    name: Annotated[str, typer.Argument(help="A stored MoE++ composition (recycle compose NAME --method moepp).")],
    settings: RouterTrainSettings = None,
    calibration: Annotated[Optional[str], typer.Option(
        help="Comma-separated tasks, or a JSONL file of {prompt, answer} (default: the members' own tasks' "
             "train splits).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if trained with these settings.")] = False,
    address: AddressOption = None,
    resources: Resources = None,
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
    from recycle.methods.moepp import train_router

    out = train_router(open_registry(db, create=False), name, settings, calibration_source=calibration, force=force,
                       address=address, gpus=resources.gpus, cpus=resources.cpus)
    if json_:
        print_json(out)
    else:
        info(f"{name}: router {out['status']} ({out['path']})")


@app.command("train-gate", hidden=True)  # its first name, kept as an alias
@app.command("train-cosmo-gate")
@options("resources", Resources, names={"cpus": "cpus", "gpus": "gpus"})
@options("settings", GateTrainSettings)
def train_gate_cmd(
    name: Annotated[str, typer.Argument(help="A stored COSMO composition (recycle compose NAME --method cosmo).")],
    settings: GateTrainSettings = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if trained with these settings.")] = False,
    address: AddressOption = None,
    resources: Resources = None,
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
    from recycle.methods.cosmo import train_gate

    out = train_gate(open_registry(db, create=False), name, settings, force=force, address=address,
                     gpus=resources.gpus, cpus=resources.cpus)
    if json_:
        print_json(out)
    else:
        info(f"{name}: gate {out['status']} ({out['path']})")
