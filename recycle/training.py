"""``train-expert``: a PEFT LoRA trained on a task's train split, loss on the answer only.

The loop reads top to bottom: load the base, wrap it with ``get_peft_model``, draw
endless shuffled batches (:func:`recycle.data.lm_batches`), AdamW with linear warm-up
then linear decay. Only the positions that predict answer tokens go through the LM head,
and when only the top layers carry LoRA nothing below them keeps activations for the
backward pass (no parameter there needs a gradient), so a top-K expert trains at roughly
the cost of K layers' backward.

The adapter is written to a temporary folder under the registry's artifact folder,
renamed into ``experts/<name>`` and registered through :func:`recycle.experts.add_expert`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from recycle.errors import RecycleError
from recycle.names import check_name
from recycle.schedule import lr_at, set_lr
from recycle.settings import Settings, setting

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TrainSettings(Settings):
    rank: int = setting(8, "LoRA rank r")
    alpha: float = setting(16.0, "LoRA alpha")
    targets: list[str] | None = setting(None, "module names (default: the q,k,v,o,gate,up,down projections the base has)")
    layers: str | None = setting(None, "layers to adapt: 'top8', '22-29' or '0,3,5' (default all)")
    steps: int = setting(100, "optimiser steps")
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    batch_size: int = setting(8, "examples per step")
    max_length: int = setting(128, "tokens per example (prompt cut from the left)")
    warmup: float = setting(0.06, "warm-up, as a fraction of the steps")
    seed: int = setting(0, "seed for init and data order")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    dropout: float = setting(0.0, "LoRA dropout")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise RecycleError("--rank must be at least 1")
        if self.alpha <= 0:
            raise RecycleError("--alpha must be positive")
        if self.steps < 1:
            raise RecycleError("--steps must be at least 1")
        if not self.lr > 0:
            raise RecycleError("--lr must be positive")
        if self.batch_size < 1:
            raise RecycleError("--batch-size must be at least 1")
        if self.max_length < 8:
            raise RecycleError("--max-length must be at least 8")
        if not 0 <= self.warmup < 1:
            raise RecycleError("--warmup must be a fraction in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise RecycleError("dropout must be in [0, 1)")


def parse_layers(spec: str | None, n_layers: int | None) -> list[int] | None:
    """``top8`` (the last 8), ``22-29``, ``0,3,5`` or a mix of ranges and indices."""
    if spec is None or not str(spec).strip():
        return None
    s = str(spec).strip().lower().replace(" ", "")
    out: list[int] = []
    try:
        if s.startswith("top"):
            k = int(s[3:])
            if k < 1:
                raise ValueError
            if n_layers is None:
                return []
            if k > n_layers:
                raise RecycleError(f"--layers {spec}: the base model has only {n_layers} layers")
            return list(range(n_layers - k, n_layers))
        for part in s.split(","):
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise ValueError
                out += list(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise RecycleError(f"--layers {spec!r}: use topK, A-B or a comma list of layer numbers") from None
    if any(i < 0 for i in out):
        raise RecycleError(f"--layers {spec!r}: layer numbers start at 0")
    if n_layers is not None:
        bad = [i for i in out if i >= n_layers]
        if bad:
            raise RecycleError(f"--layers {spec}: layer {bad[0]} does not exist (the base has {n_layers}: 0-{n_layers - 1})")
    return sorted(set(out))


def answer_loss(model, batch: dict):
    """Mean cross-entropy over the answer tokens, the LM head run only where needed."""
    import torch

    labels = batch["labels"]
    tgt = labels[:, 1:] != -100  # position p predicts labels[p + 1]
    rows, cols = tgt.nonzero(as_tuple=True)
    keep = torch.unique(cols)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=keep, use_cache=False).logits
        if logits.shape[1] != keep.numel():
            raise TypeError("logits_to_keep ignored")
        at = torch.searchsorted(keep, cols)
    except TypeError:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        at = cols
    picked = logits[rows, at].float()
    return torch.nn.functional.cross_entropy(picked, labels[rows, cols + 1])


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _linear_leaf_names(model) -> set[str]:
    import torch

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _targets(model, wanted: list[str] | None) -> list[str]:
    have = _linear_leaf_names(model)
    if wanted:
        missing = [t for t in wanted if t not in have]
        if missing:
            raise RecycleError(
                f"--targets: no module named {missing[0]!r} in the base model "
                f"(linear modules: {', '.join(sorted(have))})"
            )
        return list(wanted)
    found = [t for t in DEFAULT_TARGETS if t in have]
    if not found:
        raise RecycleError(
            f"the base model has none of the default target modules; pass --targets "
            f"(linear modules: {', '.join(sorted(have))})"
        )
    return found


def _n_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def train_expert(
    registry,
    tasks: list[str],
    base: str,
    settings: TrainSettings | None = None,
    *,
    name: str | None = None,
    multitask: bool = False,
    replace: bool = False,
    progress: bool = True,
    meta: dict | None = None,
) -> dict:
    """Train, save and register one LoRA expert; returns the expert row (with ``status``
    and a ``training`` summary)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from recycle.basemodels import load_base, resolve_base
    from recycle.data import lm_batches
    from recycle.experts import add_expert
    from recycle.tasks import get_task, load_examples

    settings = settings or TrainSettings()
    if not tasks:
        raise RecycleError("no task to train on")
    if len(tasks) > 1 and not multitask:
        raise RecycleError("several tasks need --multitask")
    name = check_name("expert", name if name is not None else ("multitask" if multitask else tasks[0]))
    if registry.expert_or_none(name) is not None and not replace:
        raise RecycleError(f"expert {name!r} already exists; use --name or --replace")
    task_rows = [get_task(registry, t) for t in tasks]
    examples = [ex for t in tasks for ex in load_examples(registry, t, "train")]
    if not examples:
        raise RecycleError(f"task {tasks[0]} has no training examples")

    ref = resolve_base(base)  # an alias or a local folder; a hub id loads through transformers
    if torch.get_num_threads() < _cores():
        torch.set_num_threads(_cores())
    torch.manual_seed(settings.seed)
    model, tokenizer = load_base(ref)
    layers = parse_layers(settings.layers, _n_layers(model.config))
    targets = _targets(model, settings.targets)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise RecycleError(f"cannot apply LoRA to base {ref.name}: {' '.join(str(e).split())[:200]}") from None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup_steps = int(round(settings.warmup * settings.steps))
    batches = lm_batches(examples, tokenizer, settings.batch_size, settings.max_length, settings.seed)

    losses: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    bar = _progress(progress)
    with bar:
        job = bar.add_task(f"training {name}", total=settings.steps, loss=float("nan"))
        for step in range(settings.steps):
            set_lr(opt, lr_at(step, settings.steps, warmup_steps, settings.lr))
            loss = answer_loss(model, next(batches))
            if not torch.isfinite(loss):
                raise RecycleError(f"training diverged at step {step + 1} (loss {loss.item()}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 5))
            recent = losses[-10:]
            bar.update(job, advance=1, loss=sum(recent) / len(recent))
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started

    summary = {
        "tasks": tasks,
        "multitask": multitask,
        "base": {"name": ref.name, "kind": ref.kind, "config_hash": ref.config_hash},
        "settings": {**asdict(settings), "targets": targets, "layers_to_transform": layers,
                     "warmup_steps": warmup_steps, "schedule": "linear warm-up, linear decay",
                     "threads": torch.get_num_threads()},
        "n_train_examples": len(examples),
        "n_trainable_params": sum(p.numel() for p in params),
        "losses": losses,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2),  # all threads; wall time on a busy machine overstates cost
    }
    folder = _save(registry, name, model, summary, base_name=ref.name)
    dataset = "; ".join(r["dataset"] or r["source"] for r in task_rows)
    try:
        row = add_expert(
            registry, folder, name=name, task=",".join(tasks), dataset=dataset, base=base,
            meta={"trained_by": "recycle train-expert", "steps": settings.steps, **(meta or {})},
            replace=replace,
        )
    except BaseException:
        if registry.expert_or_none(name) is None or registry.expert(name)["path"] != str(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return {**row, "training": {k: summary[k] for k in ("final_loss", "train_seconds", "n_train_examples")}}


def _progress(enabled: bool):
    from rich.progress import TextColumn

    from recycle.console import progress

    return progress(TextColumn("loss {task.fields[loss]:.4f}"), enabled=enabled)


def _save(registry, name: str, model, summary: dict, base_name: str) -> Path:
    """Write the adapter and training.json to a temp folder, then rename into place.
    The adapter names its base as the user did (alias, folder or hub id)."""
    from recycle.files import replace_dir

    def build(tmp: Path) -> None:
        # saved while the config still names the local folder: PEFT then checks the
        # vocabulary there instead of asking the hub
        model.save_pretrained(str(tmp), save_embedding_layers=False)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_name
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")

    return replace_dir(build, registry.artifacts_dir / "experts" / name)
