"""train-expert on the tiny random Llama: a loadable PEFT adapter, registered with its task."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recycle.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def experts_rows() -> list[dict]:
    conn = sqlite3.connect(os.environ["RECYCLE_DB"])
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("select * from experts order by name")]
    finally:
        conn.close()


def add_toy_task(folder: Path, name: str, word: str) -> None:
    rows = [{"text": f"{word} {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(40)]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.toml").write_text(f"""
name = "{name}"
template = "Text: {{text}}\\nGood or bad? Answer:"
choices = [" bad", " good"]
label_field = "label"
[source]
builder = "json"
data_files = "{name}.jsonl"
""")
    result = cli("add-task", folder / f"{name}.toml")
    assert result.exit_code == 0, result.output


@pytest.fixture
def toy(tmp_path, tiny_base):
    add_toy_task(tmp_path, "toy", "item")
    return tmp_path


def test_train_expert_writes_a_loadable_registered_adapter(toy, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = cli("train-expert", "--task", "toy", "--base", "tiny-llama", "--steps", "3", "--batch-size", "4",
                 "--layers", "top2", "--rank", "4", "--name", "toy-expert")
    assert result.exit_code == 0, result.output
    (row,) = experts_rows()
    assert (row["name"], row["task"], row["rank"]) == ("toy-expert", "toy", 4)
    assert row["dataset"].startswith("json:") and row["dataset"].endswith("toy.jsonl")
    folder = Path(row["path"])
    assert folder.parent.name == "experts" and folder.parent.parent.name == "registry.artifacts"
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left

    training = json.loads((folder / "training.json").read_text())
    assert len(training["losses"]) == 3 and training["settings"]["layers_to_transform"] == [2, 3]
    assert training["tasks"] == ["toy"] and training["base"]["name"] == "tiny-llama"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-llama" and cfg["layers_to_transform"] == [2, 3]
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(".layers.2." in m or ".layers.3." in m for m in json.loads(row["target_modules"]))

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), folder)
    assert any("lora_A" in n for n, _ in model.named_parameters())

    again = cli("train-expert", "--task", "toy", "--base", "tiny-llama", "--steps", "1", "--name", "toy-expert")
    assert again.exit_code == 2 and "--replace" in again.stderr


def test_train_expert_as_a_ray_task(toy):
    """--cpus-per-task: the same training as a Ray task (one thread), registered by the driver."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    result = cli("train-expert", "--task", "toy", "--base", "tiny-llama", "--steps", "2", "--batch-size", "4",
                 "--layers", "top2", "--rank", "4", "--name", "remote", "--cpus-per-task", "1", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "added" and out["name"] == "remote"
    training = json.loads((Path(out["path"]) / "training.json").read_text())
    assert training["settings"]["threads"] == 1 and len(training["losses"]) == 2
    bad = cli("train-expert", "--task", "nope", "--base", "tiny-llama", "--cpus-per-task", "1")
    assert bad.exit_code == 2 and "no task named 'nope'" in bad.stderr


def test_multitask_trains_on_the_union(toy):
    add_toy_task(toy, "toy2", "thing")
    result = cli("train-expert", "--multitask", "toy,toy2", "--base", "tiny-llama", "--steps", "2",
                 "--batch-size", "4", "--targets", "q_proj,v_proj", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["name"] == "multitask" and out["task"] == "toy,toy2" and out["status"] == "added"
    training = json.loads((Path(out["path"]) / "training.json").read_text())
    assert training["multitask"] and training["n_train_examples"] == 64  # 32 + 32 train examples
    assert training["settings"]["targets"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nope"], "no task named 'nope'"),
        (["--task", "toy", "--layers", "7"], "layer 7 does not exist"),
        (["--task", "toy", "--layers", "x-y"], "use topK, A-B"),
        (["--task", "toy", "--targets", "bogus"], "no module named 'bogus'"),
        (["--task", "toy", "--multitask", "toy"], "exactly one of --task or --multitask"),
        (["--task", "toy", "--steps", "0"], "--steps must be at least 1"),
        (["--task", "toy", "--gate-steps", "0"], "--gate-steps must be at least 1, not 0"),
        (["--task", "toy", "--gate-steps", "2", "--gate-lr", "-1"], "--gate-lr must be positive, not -1"),
        (["--task", "toy", "--gate-steps", "2", "--gate-lr", "inf"], "--gate-lr must be a finite number, not inf"),
        (["--task", "toy", "--lr", "inf"], "--lr must be a finite number, not inf"),
    ],
)
def test_bad_training_options_are_one_line_errors(toy, args, message):
    result = cli("train-expert", "--base", "tiny-llama", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert experts_rows() == []


def test_train_expert_with_gate_steps_records_the_gates_train_gates_would_train(toy):
    """--gate-steps trains the expert's gates right after it (in this process here): the
    gates row is the one `train-gates NAME --steps N --batch-size B --max-length L --seed S`
    looks for, so that command then finds them done; a multitask expert is refused."""
    import json as _json

    result = cli("train-expert", "--task", "toy", "--base", "tiny-llama", "--steps", "3", "--batch-size", "4",
                 "--max-length", "48", "--layers", "top2", "--rank", "4", "--name", "toy-g", "--gate-steps", "2",
                 "--json")
    assert result.exit_code == 0, result.output
    assert _json.loads(result.stdout)["gates"] == "trained"
    again = cli("train-gates", "toy-g", "--steps", "2", "--batch-size", "4", "--max-length", "48", "--json")
    assert again.exit_code == 0, again.output
    (row,) = _json.loads(again.stdout)["experts"]
    assert row["status"] == "skipped" and row["steps"] == 2 and Path(row["path"]).is_file()
    refused = cli("train-expert", "--multitask", "toy", "--base", "tiny-llama", "--steps", "2", "--gate-steps", "2")
    assert refused.exit_code == 2 and "single-task experts only" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_answer_loss_is_the_lm_loss_on_answer_tokens(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recycle.data import collate, encode_lm
    from recycle.losses import answer_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    batch = collate([encode_lm(tok, "Q: a?\nA:", " yes", 64), encode_lm(tok, "Q: longer one?\nA:", " no no", 64)], 0)
    with torch.no_grad():
        ours = answer_loss(model, batch)
        reference = model(**batch).loss
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_top_rows_gives_the_same_training_bit_for_bit(tiny_base):
    """answer_loss(top_rows=True), as train-expert and gate training call it: the top
    layer's frozen MLP products run on the answer-predicting tokens only, and three
    optimiser steps of a LoRA on the top layers (MLP included), then of gates on it, end
    with exactly the same losses, weights and gates as the full pass."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recycle import gates as G
    from recycle.data import collate, encode_lm
    from recycle.losses import answer_loss
    from recycle.scoring import _Rows

    tok = AutoTokenizer.from_pretrained(tiny_base)
    pairs = [("Q: a?\nA:", " yes"), ("Q: a much longer question here?\nA:", " no no"), ("Q: c?\nA:", " maybe")]
    batch = collate([encode_lm(tok, p, a, 64) for p, a in pairs], 0)
    n_answer = int((batch["labels"][:, 1:] != -100).sum())

    def train(top_rows):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_base)
        top = base.config.num_hidden_layers - 1
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "down_proj"],
                                                layers_to_transform=[top - 1, top], init_lora_weights=False))
        down = model.get_base_model().model.layers[top].mlp.down_proj
        rows_seen = []
        hook = down.base_layer.register_forward_pre_hook(lambda m, a: rows_seen.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
        losses = []

        def three_steps(params, lr):
            opt = torch.optim.AdamW(params, lr=lr)
            for _ in range(3):
                loss = answer_loss(model, batch, top_rows=top_rows)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())

        three_steps([p for p in model.parameters() if p.requires_grad], 1e-2)
        hook.remove()
        assert not isinstance(down.base_layer, _Rows)  # put back
        weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
        for p in model.parameters():
            p.requires_grad_(False)
        with G.Gates(model) as gates:
            three_steps(gates.parameters(), 0.05)
            return losses, weights, gates.state_dict(), rows_seen

    full, fast = train(False), train(True)
    assert full[3] == [batch["input_ids"].numel()] * 3 and fast[3] == [n_answer] * 3  # the top products ran on fewer rows
    assert fast[0] == full[0]
    assert all(torch.equal(fast[1][k], full[1][k]) for k in full[1]) and len(full[1]) == 12
    assert all(torch.equal(fast[2][k], full[2][k]) for k in full[2]) and len(full[2]) == 6
    top_gates = [v for k, v in full[2].items() if k.endswith("layers.3.mlp.down_proj")]
    assert top_gates and all(v.abs().sum() > 0 for v in top_gates)  # the top MLP's gates learnt


def test_schedule_and_layer_parsing():
    from recycle.schedule import lr_at
    from recycle.training import parse_layers

    assert lr_at(0, 10, 2, 1.0) == 0.5 and lr_at(1, 10, 2, 1.0) == 1.0
    assert lr_at(2, 10, 2, 1.0) == 1.0 and lr_at(9, 10, 2, 1.0) == pytest.approx(0.125)
    assert parse_layers("top3", 30) == [27, 28, 29]
    assert parse_layers("0-2,5", 30) == [0, 1, 2, 5]
    assert parse_layers(None, 30) is None


@pytest.mark.parametrize("gate_steps, replayed", [(2, 2), (5, 3), (3, 0)])
def test_gates_trained_with_their_expert_equal_train_gates(toy, gate_steps, replayed):
    """Gates trained in the expert's own task, the layers below the adapted ones replayed
    from the expert's training where it saw the same batches, are exactly the gates
    `train-gates` trains from the registered adapter (5 steps: 3 replayed, then 2 batches
    the expert never saw; batches of another size: nothing replayed)."""
    import torch

    from recycle import gates
    from recycle.registry import Registry
    from recycle.training import TrainSettings, plan_expert, run_expert_job

    registry = Registry(os.environ["RECYCLE_DB"])
    job = plan_expert(registry, ["toy"], "tiny-llama",
                      TrainSettings(steps=3, batch_size=4, max_length=48, layers="top2", rank=4))
    settings = gates.GateSettings(steps=gate_steps, batch_size=4 if replayed else 2, max_length=48, lr=0.05)
    job.gates, job.threads = {k: v for k, v in settings.to_dict().items() if k != "algorithm"}, 1
    summary = run_expert_job(job)
    here = summary["gates"]
    assert here["replayed"] == replayed and here["steps"] == gate_steps

    out = Path(job.out_dir).parent / "separate.safetensors"
    separate = gates.run_gate_job(gates.GateJob(
        expert=job.name, base="tiny-llama", adapter_path=job.out_dir, adapter_sha256="x", examples=job.examples,
        settings=job.gates, out_path=str(out), threads=1))
    loaded = gates.load_gates(out)
    assert set(loaded) == set(here["gates"]) and all(".layers.2." in k or ".layers.3." in k for k in loaded)
    assert all(torch.equal(loaded[k], here["gates"][k]) for k in loaded)
    assert any(loaded[k].abs().sum() > 0 for k in loaded)  # they trained
    assert (here["loss_start"], here["loss_end"]) == (separate["loss_start"], separate["loss_end"])
    assert registry.expert_or_none(job.name) is None  # the worker touched no registry


def test_gates_failing_in_the_experts_task_leave_the_expert_and_no_gates(toy, monkeypatch, capsys):
    """A gate training that fails inside the expert's task (here: it diverges) costs the
    expert nothing: the adapter is written and registered, the failure is reported in one
    line, and no gates row or file is left, so the gates step trains them later."""
    from recycle import gates
    from recycle.console import Reporter
    from recycle.errors import RecycleError
    from recycle.registry import Registry
    from recycle.training import TrainSettings, _record_gates, plan_expert, register_trained, run_expert_job

    def diverge(*args, **kwargs):
        raise RecycleError("gate training diverged at step 0 (loss nan)")

    monkeypatch.setattr(gates, "train_on_examples", diverge)
    registry = Registry(os.environ["RECYCLE_DB"])
    job = plan_expert(registry, ["toy"], "tiny-llama", TrainSettings(steps=2, batch_size=4, max_length=48, layers="top2", rank=4))
    settings = gates.GateSettings(steps=2, batch_size=4, max_length=48)
    job.gates, job.threads = {k: v for k, v in settings.to_dict().items() if k != "algorithm"}, 1
    summary = run_expert_job(job)
    assert summary["gates"] == {"error": "gate training diverged at step 0 (loss nan)"}
    row = register_trained(registry, job, summary)
    assert (Path(job.out_dir) / "adapter_model.safetensors").is_file() and registry.expert(job.name).sha256 == row["sha256"]
    capsys.readouterr()
    assert _record_gates(registry, row, settings, summary["gates"], Reporter()) == summary["gates"]["error"]
    said = capsys.readouterr()
    assert f"{job.name}: gates not trained: gate training diverged at step 0 (loss nan)" in said.out + said.err
    assert registry.gates_row(row["id"], settings.hash, row["sha256"]) is None
    assert not list((registry.artifacts_dir / "gates").glob("**/*.safetensors"))


def test_an_interrupt_while_gates_train_leaves_the_registered_adapter_as_it_was(toy, monkeypatch):
    """The gates train from the written folder before it is renamed into place: a Ctrl-C
    (or a killed worker) meanwhile leaves the registered expert's folder untouched, even
    under --replace, and no new adapter nor temporary folder behind."""
    from recycle import gates
    from recycle.registry import Registry
    from recycle.training import TrainSettings, plan_expert, register_trained, run_expert_job

    registry = Registry(os.environ["RECYCLE_DB"])
    settings = TrainSettings(steps=2, batch_size=4, max_length=48, layers="top2", rank=4)
    first = plan_expert(registry, ["toy"], "tiny-llama", settings, name="toy-x")
    row = register_trained(registry, first, run_expert_job(first))
    before = sorted(p.name for p in Path(first.out_dir).parent.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gates, "train_on_examples", interrupted)
    again = plan_expert(registry, ["toy"], "tiny-llama", TrainSettings(steps=3, batch_size=4, max_length=48,
                                                                        layers="top2", rank=4, seed=1),
                        name="toy-x", replace=True)
    again.gates = {k: v for k, v in gates.GateSettings(steps=2).to_dict().items() if k != "algorithm"}
    with pytest.raises(KeyboardInterrupt):
        run_expert_job(again)
    from recycle.adapters import sha256_file

    assert sha256_file(Path(first.out_dir) / "adapter_model.safetensors") == row["sha256"]
    assert registry.expert("toy-x").sha256 == row["sha256"]
    assert sorted(p.name for p in Path(first.out_dir).parent.iterdir()) == before


def test_gates_with_an_every_layer_expert_say_why_nothing_is_reused(toy, capsys):
    """An expert on every layer (the default --layers) leaves no layer below it for its
    gates to skip, long inputs or short: nothing is reused and the report says why instead
    of '0 of N steps reused'."""
    from recycle import gates
    from recycle.console import Reporter
    from recycle.registry import Registry
    from recycle.training import TrainSettings, _record_gates, plan_expert, register_trained, run_expert_job

    registry = Registry(os.environ["RECYCLE_DB"])
    job = plan_expert(registry, ["toy"], "tiny-llama", TrainSettings(steps=2, batch_size=4, max_length=48, rank=4))
    settings = gates.GateSettings(steps=2, batch_size=4, max_length=48)
    job.gates, job.threads = {k: v for k, v in settings.to_dict().items() if k != "algorithm"}, 1
    summary = run_expert_job(job)
    assert summary["gates"]["replayed"] == 0 and "covers layer 0" in summary["gates"]["no_reuse"]
    row = register_trained(registry, job, summary)
    capsys.readouterr()
    assert _record_gates(registry, row, settings, summary["gates"], Reporter()) == "trained"
    said = capsys.readouterr()
    assert "nothing reused: the adapter covers layer 0" in said.out + said.err


def test_experts_are_submitted_longest_first(toy, monkeypatch):
    """A long job (the multitask reference) goes to the cluster first, so it does not run
    alone at the end while the other workers idle; outcomes keep the caller's order."""
    from recycle import cluster
    from recycle.registry import Registry
    from recycle.training import TrainSettings, plan_expert, train_experts

    registry = Registry(os.environ["RECYCLE_DB"])
    jobs = [plan_expert(registry, ["toy"], "tiny-llama", TrainSettings(steps=s, batch_size=4, max_length=48), name=n)
            for n, s in (("short", 2), ("long", 30), ("mid", 5))]
    submitted = []
    monkeypatch.setattr(cluster, "run", lambda fn, js, *a, **k: submitted.extend(j.name for j in js))
    out = train_experts(registry, jobs)
    assert submitted == ["long", "mid", "short"] and [o["name"] for o in out] == ["short", "long", "mid"]
