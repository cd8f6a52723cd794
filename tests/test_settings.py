"""Settings are the one declaration of every option: the commands' options are generated from
the dataclass fields, every field is reachable, a bad value is refused by the settings' own
checks naming the option typed, and stored settings hashes do not move."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import click
import pytest
import typer
from typer.testing import CliRunner

from recycle import settings as S
from recycle.cli import app
from recycle.errors import RecycleError

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def command(*path) -> click.Command:
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.get_command(click.Context(cmd), name)
    return cmd


def option_defaults(cmd: click.Command) -> dict[str, object]:
    return {opt: p.default for p in cmd.params for opt in p.opts}


# Default settings' hashes as stored before the settings moved to recycle/settings.py: a stored
# gate file, expert, router or COSMO gate keyed by them must still be found.
HASHES = {
    S.GateSettings: "2a36c6220a2d898833b018d4fe3a5d41342886d55dce6e4e6004874eb1fde18d",
    S.TrainSettings: "7b28b3412fbdfb7c32ea91fce6a1545c9284f1584f53f226fd484dbfbaa97f2f",
    S.RouterTrainSettings: "96187490c6b303c25d5af03ca133cda0b84de1704df4f2b78a34575b27eeecb5",
    S.GateTrainSettings: "721b340a67959b1973344fe21adce06284e49eabbed6acdcb81d5b9f06b698fc",
}


@pytest.mark.parametrize("cls", list(HASHES), ids=lambda c: c.__name__)
def test_default_settings_hash_unchanged(cls):
    assert cls().hash == HASHES[cls]


def test_a_non_default_gate_hash_unchanged():
    assert S.GateSettings(steps=40, lr=1e-2).hash == "9318baf5cc8b46db96841fd5636babc8ae5f09984a34231dd8d2815ef128bd6f"


def test_the_modules_that_train_use_the_same_classes():
    from recycle import gates, training
    from recycle.methods import cosmo, moepp

    assert gates.GateSettings is S.GateSettings and training.TrainSettings is S.TrainSettings
    assert moepp.RouterTrainSettings is S.RouterTrainSettings and cosmo.GateTrainSettings is S.GateTrainSettings


def test_settings_import_no_torch_ray_or_transformers():
    code = ("import sys, recycle.settings; "
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# (command path, settings class, option of each field as the command names it)
GROUPS = [
    (("train-gates",), S.GateSettings, {}),
    (("train-expert",), S.TrainSettings, {}),
    (("train-router",), S.RouterTrainSettings, {}),
    (("train-gate",), S.GateTrainSettings, {}),
    (("train-gates",), S.Resources, {"cpus": "--cpus-per-expert", "gpus": "--gpus-per-expert"}),
    (("train-expert",), S.Resources, {"cpus": "--cpus-per-task", "gpus": "--gpus-per-task"}),
    (("train-router",), S.Resources, {"cpus": "--cpus", "gpus": "--gpus"}),
    (("train-gate",), S.Resources, {"cpus": "--cpus", "gpus": "--gpus"}),
    (("predict",), S.Resources, {"cpus": "--cpus-per-worker", "gpus": "--gpus-per-worker"}),
    (("serve",), S.Resources, {"cpus": "--cpus-per-replica", "gpus": "--gpus-per-replica"}),
    (("eval",), S.EvalSettings, {"n": "-n"}),
    (("eval",), S.Resources, {"cpus": "--cpus-per-task", "gpus": "--gpus-per-task"}),
]


@pytest.mark.parametrize("path, cls, flags", GROUPS, ids=lambda x: getattr(x, "__name__", None))
def test_every_field_is_an_option_with_the_fields_default_and_help(path, cls, flags):
    cmd = command(*path)
    defaults = option_defaults(cmd)
    helps = {opt: p.help for p in cmd.params for opt in p.opts}
    optional = path == ("train-expert",) and cls is S.Resources  # given: train as a Ray task
    for f in fields(cls):
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        assert flag in defaults, f"{' '.join(path)} has no {flag}"
        assert defaults[flag] == (None if optional else f.default)
        assert f.metadata["help"][1:].rstrip(".") in helps[flag] or path == ("train-expert",)


def test_gate_group_of_train_expert_is_prefixed_and_complete():
    defaults = option_defaults(command("train-expert"))
    for name in ("steps", "lr", "warmup", "weight_decay"):
        assert defaults["--gate-" + name.replace("_", "-")] is None  # unset: no gates, or the default
    for name in ("batch_size", "max_length", "seed"):  # the expert's own, so the trunk pass is shared
        assert "--gate-" + name.replace("_", "-") not in defaults
    assert "--dropout" in defaults and "--weight-decay" in defaults


def test_existing_option_names_and_defaults_kept():
    assert option_defaults(command("train-gates"))["--max-length"] == 256
    assert option_defaults(command("train-expert"))["--max-length"] == 128
    assert option_defaults(command("train-router"))["--objective"] == "lm"
    assert option_defaults(command("train-gate"))["--folds"] == 4
    assert option_defaults(command("eval"))["--tasks"] == "held-out"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train-gates", "--all", "--cpus-per-expert", "inf"], "--cpus-per-expert must be a finite number, not inf"),
        (["train-gates", "--all", "--gpus-per-expert", "nan"], "--gpus-per-expert must be 0 or more, not nan"),
        (["train-gates", "--all", "--weight-decay", "-1"], "--weight-decay must be 0 or more"),
        (["train-gates", "--all", "--warmup", "1"], "--warmup must be in [0, 1), not 1.0"),
        (["train-expert", "--task", "t", "--cpus-per-task", "inf"], "--cpus-per-task must be a finite number"),
        (["train-expert", "--task", "t", "--cpus-per-task", "nan"], "--cpus-per-task must be positive, not nan"),
        (["train-expert", "--task", "t", "--gpus-per-task", "-1"], "--gpus-per-task must be 0 or more"),
        (["train-expert", "--task", "t", "--dropout", "1"], "--dropout must be in [0, 1), not 1.0"),
        (["train-expert", "--task", "t", "--gate-lr", "0.1"], "--gate-lr needs --gate-steps"),
        (["train-expert", "--task", "t", "--gate-steps", "2", "--gate-warmup", "nan"], "--gate-warmup must be in"),
        (["train-router", "m", "--gpus", "nan"], "--gpus must be 0 or more, not nan"),
        (["train-router", "m", "--cpus", "inf"], "--cpus must be a finite number, not inf"),
        (["train-router", "m", "--objective", "x"], "--objective must be lm or distill, not 'x'"),
        (["train-gate", "c", "--cpus", "0"], "--cpus must be positive, not 0.0"),
        (["train-gate", "c", "--folds", "1"], "--folds must be at least 2, not 1"),
        (["eval", "--cpus-per-task", "inf"], "--cpus-per-task must be a finite number, not inf"),
        (["eval", "--gpus-per-task", "nan"], "--gpus-per-task must be 0 or more, not nan"),
        (["eval", "-n", "-5"], "-n must be at least 1, not -5"),
        (["eval", "--top-k", "0"], "--top-k must be at least 1, not 0"),
        (["serve", "pg", "--batch-wait-ms", "nan"], "--batch-wait-ms must be 0 or more, not nan"),
        (["serve", "pg", "--batch-wait-ms", "inf"], "--batch-wait-ms must be a finite number, not inf"),
        (["serve", "pg", "--cpus-per-replica", "inf"], "--cpus-per-replica must be a finite number"),
        (["serve", "pg", "--port", "70000"], "--port must be from 1 to 65535, not 70000"),
        (["predict", "pg", "--prompt", "x", "--workers", "0"], "--workers must be at least 1, not 0"),
        (["predict", "pg", "--prompt", "x", "--gpus-per-worker", "inf"], "--gpus-per-worker must be a finite"),
        (["tasks", "preview", "t", "-n", "0"], "-n must be at least 1, not 0"),
    ],
)
def test_bad_numbers_refused_where_parsed_naming_the_option(args, message):
    """Refused by the settings' own checks while the options are parsed: before a registry,
    Ray or a model is touched (the names here exist nowhere, and that is not what is said)."""
    assert message in one_line(run(*args))


def test_settings_refuse_bad_values_themselves():
    with pytest.raises(RecycleError, match="--max-length must be at least 2, not 1"):
        S.GateSettings(max_length=1)
    with pytest.raises(RecycleError, match="--lr must be a finite number, not inf"):
        S.TrainSettings(lr=float("inf"))
    with pytest.raises(RecycleError, match="--gpus must be 0 or more"):
        S.Resources(gpus=-0.5)
    with pytest.raises(RecycleError, match=r"\[gates\]: --gate-lr must be float \(a finite number\), not 'x'"):
        S.GateSettings.from_dict({"lr": "x"}, "[gates]", flags={"lr": "--gate-lr"})
