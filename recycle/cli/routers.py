"""``train NAME``: train what a stored composition's method learns on top of its experts
(MoE++'s router, COSMO's gate), from the method's own ``TrainSettings``. ``train-router``
(MoE++) and ``train-cosmo-gate`` (COSMO; ``train-gate``, its first name), the per-method
names, are hidden aliases calling the same code, their options generated from the same
settings."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperCommand

from recycle.cli.common import AddressOption, DbOption, JsonOption, info, open_registry, print_json
from recycle.cli.root import app
from recycle.settings import GateTrainSettings, Resources, RouterTrainOptions, options

ForceOption = Annotated[bool, typer.Option("--force", help="Retrain even if trained with these settings.")]
RESOURCES = {"cpus": "cpus", "gpus": "gpus"}  # --cpus, --gpus (per task)


class _TrainCommand(TyperCommand):
    """Lists each trained method's settings under the help, read from the methods when asked."""

    def format_epilog(self, ctx, formatter) -> None:
        from recycle import methods

        with formatter.section("Training settings, per method (defaults in brackets)"):
            for m in methods.METHODS.values():
                if m.TrainSettings is not None:
                    opts = ", ".join(f"--{d['name'].replace('_', '-')} ({d['default']})"
                                     for d in m.TrainSettings.describe())
                    formatter.write_text(f"{m.name}: {opts}")
        super().format_epilog(ctx, formatter)


@app.command("train", cls=_TrainCommand, short_help="Train what a stored composition's method learns.",
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@options("resources", Resources, names=RESOURCES)
def train_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A stored composition whose method trains (moepp, cosmo).")],
    force: ForceOption = False,
    address: AddressOption = None,
    resources: Resources = None,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """Train what a stored composition's method learns on top of its experts, as Ray tasks
    (MoE++: its router's new parameters on a calibration mix, one task; COSMO: its
    seen/unseen gate by leaving experts out, one task per fold); the result is written
    beside the composition and used by eval and predict from then on. Found done when
    trained with the same settings. The method's training settings are options
    (--name VALUE), listed below.

    Examples:

      recycle compose m --method moepp --all --tau 0.5 && recycle train m --steps 200

      recycle compose c --method cosmo --all && recycle train c --folds 4 --address auto
    """
    from recycle import compose
    from recycle.settings import parse_cli_settings

    registry = open_registry(db, create=False)
    m = compose.trainer(registry, name)
    values = parse_cli_settings(m.TrainSettings, f"{m.name} training", ctx.args)
    _train(registry, name, values, m.name, json_, force=force, address=address, resources=resources)


def _train(registry, name: str, values: dict, method: str, json_: bool, *, resources: Resources, **kw) -> None:
    from recycle import compose, methods

    out = compose.train(registry, name, values, method=method, gpus=resources.gpus, cpus=resources.cpus, **kw)
    if json_:
        print_json(out)
    else:
        info(f"{name}: {methods.get(method).state_key} {out['status']} ({out['path']})")


@app.command("train-router", hidden=True)  # recycle train NAME, for a MoE++ composition
@options("resources", Resources, names=RESOURCES)
@options("settings", RouterTrainOptions)
def train_router_cmd(
    name: Annotated[str, typer.Argument(help="A stored MoE++ composition (recycle compose NAME --method moepp).")],
    settings: RouterTrainOptions = None,
    force: ForceOption = False,
    address: AddressOption = None,
    resources: Resources = None,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """The per-method name of `recycle train NAME` for a MoE++ composition (same options)."""
    _train(open_registry(db, create=False), name, settings.to_dict(), "moepp", json_, force=force, address=address,
           resources=resources)


@app.command("train-gate", hidden=True)  # its first name
@app.command("train-cosmo-gate", hidden=True)  # recycle train NAME, for a COSMO composition
@options("resources", Resources, names=RESOURCES)
@options("settings", GateTrainSettings)
def train_gate_cmd(
    name: Annotated[str, typer.Argument(help="A stored COSMO composition (recycle compose NAME --method cosmo).")],
    settings: GateTrainSettings = None,
    force: ForceOption = False,
    address: AddressOption = None,
    resources: Resources = None,
    json_: JsonOption = False,
    db: DbOption = None,
):
    """The per-method name of `recycle train NAME` for a COSMO composition (same options)."""
    _train(open_registry(db, create=False), name, settings.to_dict(), "cosmo", json_, force=force, address=address,
           resources=resources)
