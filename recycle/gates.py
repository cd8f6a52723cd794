"""PHATGOOSE gate training (SPEC section 1): one sigmoid gate per routed module.

For every module ``y = W x`` that carries the expert's LoRA, a gate vector
``v ∈ R^{d_in}`` starts at zero and the expert's output becomes
``y = W x + σ(vᵀx) · Δ(x)``. It is applied, as in the reference code, to the LoRA
input: a forward pre-hook on ``lora_A`` scales ``x`` by ``σ(vᵀx)`` (``Δ`` is linear, so
``Δ(σ·x) = σ·Δ(x)``). LoRA dropout is off (the model stays in eval mode). Everything
but the gates is frozen. AdamW, weight decay 0, linear warm-up over ``warmup`` of the
steps then constant, LM loss on the target tokens of the expert's own training data.

Gates are stored as safetensors, one float32 tensor per routed module named by its
path in the base model (``model.layers.3.self_attn.q_proj``), with the settings, their
hash, the adapter's sha256 and the losses in the file's metadata. Files are written to a
temporary name and renamed, so a retried or killed task never leaves a half file.

Workers run :func:`run_gate_job` on plain data (:class:`GateJob`) and never touch the
registry; the registry helpers at the end (``*_gates_row*``) are for the driver only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from recycle.errors import RecycleError

ALGORITHM = "phatgoose-gates/1"
ADAPTER_NAME = "default"


# ---- settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class GateSettings:
    """What decides a gate file's content (with the adapter and the data)."""

    steps: int = 100
    lr: float = 5e-3
    batch_size: int = 8
    max_length: int = 256
    warmup: float = 0.06
    seed: int = 0
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.steps < 1:
            raise RecycleError(f"--steps must be at least 1, not {self.steps}")
        if not self.lr > 0:
            raise RecycleError(f"--lr must be positive, not {self.lr}")
        if self.batch_size < 1:
            raise RecycleError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.max_length < 2:
            raise RecycleError(f"--max-length must be at least 2, not {self.max_length}")
        if not 0 <= self.warmup < 1:
            raise RecycleError(f"--warmup must be in [0, 1), not {self.warmup}")

    def to_dict(self) -> dict:
        return {"algorithm": ALGORITHM, **asdict(self)}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps))


def lr_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps`` (step 0 already > 0), then constant."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


# ---- the gated model ---------------------------------------------------------------


def load_expert(base: str, adapter_path: str | os.PathLike, dtype=None):
    """The base model with the adapter loaded frozen (eval mode), and its tokenizer."""
    from peft import PeftModel

    from recycle.basemodels import load_base, resolve_base

    model, tok = load_base(resolve_base(base), dtype=dtype)
    try:
        model = PeftModel.from_pretrained(
            model, str(adapter_path), adapter_name=ADAPTER_NAME, is_trainable=False
        )
    except (OSError, ValueError, KeyError) as e:
        raise RecycleError(f"cannot load adapter {adapter_path}: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, tok


def routed_modules(model) -> dict[str, torch.nn.Module]:
    """``{base-model module path: PEFT LoRA layer}`` for every Linear carrying the adapter."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
            continue
        lora_a = module.lora_A[ADAPTER_NAME]
        if not isinstance(lora_a, torch.nn.Linear):
            raise RecycleError(f"module {name} is not a Linear layer: only Linear LoRA is routed")
        if ADAPTER_NAME in getattr(module, "lora_variant", {}):
            raise RecycleError(f"module {name} uses a LoRA variant (e.g. DoRA): not supported")
        found[name] = module
    if not found:
        raise RecycleError("the adapter adapts no Linear module: nothing to gate")
    return found


class Gates:
    """Zero-initialised gate vectors attached to a PEFT model by forward pre-hooks.

    ``capture`` (a list, or None) collects ``(module path, x)`` (the module's input) per
    forward, for scoring inputs against the gates.
    """

    def __init__(self, model, init: dict[str, torch.Tensor] | None = None):
        self.modules = routed_modules(model)
        self.vectors: dict[str, torch.nn.Parameter] = {}
        self.capture: list[tuple[str, torch.Tensor]] | None = None
        self._handles = []
        for name, layer in self.modules.items():
            lora_a = layer.lora_A[ADAPTER_NAME]
            v = torch.zeros(lora_a.in_features, dtype=torch.float32, device=lora_a.weight.device)
            if init is not None:
                if name not in init:
                    raise RecycleError(f"gates have no vector for module {name}")
                if tuple(init[name].shape) != tuple(v.shape):
                    raise RecycleError(
                        f"gate for {name} has shape {tuple(init[name].shape)}, the module takes {tuple(v.shape)}"
                    )
                v = init[name].detach().to(v).clone()
            self.vectors[name] = torch.nn.Parameter(v)
            self._handles.append(lora_a.register_forward_pre_hook(self._hook(name)))
        if init is not None and set(init) - set(self.modules):
            extra = sorted(set(init) - set(self.modules))[0]
            raise RecycleError(f"gates name module {extra}, which the adapter does not adapt")

    def _hook(self, name: str):
        def pre_hook(module, args):
            v = self.vectors[name]
            x = args[0]
            logit = x @ v.to(x.dtype)
            if self.capture is not None:
                self.capture.append((name, x.detach()))
            return (x * torch.sigmoid(logit).unsqueeze(-1),) + tuple(args[1:])

        return pre_hook

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.vectors.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous().clone() for k, v in self.vectors.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def lm_loss(model, batch: dict) -> torch.Tensor:
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    )
    return out.loss


@torch.no_grad()
def mean_loss(model, batches: Iterable[dict]) -> float:
    losses = [lm_loss(model, b).item() for b in batches]
    return sum(losses) / len(losses)


def _layer_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(t.float(), t.shape[-1:])


@torch.no_grad()
def gate_scores(model, gates: Gates, batch: dict, *, standardised: bool = True) -> torch.Tensor:
    """Per example: the gate score averaged over real (non-pad) tokens and routed modules.

    ``standardised`` (the routing score of SPEC section 1): ``LN(x)·LN(v)/sqrt(d)``;
    otherwise the raw gate logit ``vᵀx``.
    """
    gates.capture = []
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        captured = gates.capture
    finally:
        gates.capture = None
    mask = batch["attention_mask"].float()
    per_module = []
    for name, x in captured:
        v = gates.vectors[name].detach()
        if standardised:
            s = _layer_norm(x) @ _layer_norm(v) / x.shape[-1] ** 0.5
        else:
            s = x.float() @ v.float()
        per_module.append((s * mask).sum(-1) / mask.sum(-1))
    return torch.stack(per_module).mean(0)


@dataclass
class TrainResult:
    gates: dict[str, torch.Tensor]
    steps: int
    loss_start: float
    loss_end: float
    seconds: float
    losses: list[float] = field(default_factory=list)


def train_gates(
    model,
    batches: Iterator[dict],
    settings: GateSettings,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train zero-initialised gates on a frozen PEFT model; the model is left unhooked.

    ``loss_start`` is the first step's loss (gates at zero); ``loss_end`` the mean of the
    last tenth of the steps (at least one).
    """
    torch.manual_seed(settings.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # dropout off; the gates are the only thing that learns
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with Gates(model) as gates:
        opt = torch.optim.AdamW(
            gates.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        warm = settings.warmup_steps
        losses: list[float] = []
        for step in range(settings.steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            for group in opt.param_groups:
                group["lr"] = settings.lr * lr_factor(step, warm)
            loss = lm_loss(model, batch)
            if not torch.isfinite(loss):
                raise RecycleError(f"gate training diverged at step {step} (loss {loss.item()})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
        tail = max(1, settings.steps // 10)
        return TrainResult(
            gates=gates.state_dict(),
            steps=settings.steps,
            loss_start=losses[0],
            loss_end=sum(losses[-tail:]) / tail,
            seconds=time.perf_counter() - t0,
            losses=losses,
        )


# ---- files -------------------------------------------------------------------------


def save_gates(path: str | os.PathLike, gates: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write gates atomically (temporary file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    try:
        save_file({k: v.contiguous() for k, v in gates.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_gates(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{module path: gate vector}`` from a gates file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise RecycleError(f"cannot read gates {path}: {e}") from None


def gates_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored with a gates file (JSON values decoded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def gates_path(artifacts_dir: Path, expert_name: str, settings_hash: str, adapter_sha: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in expert_name)
    return Path(artifacts_dir) / "gates" / safe / f"{settings_hash[:16]}-{adapter_sha[:12]}.safetensors"


# ---- the worker's job --------------------------------------------------------------


@dataclass
class GateJob:
    """Everything a worker needs, as plain data: no registry, no open files."""

    expert: str
    base: str  # name for resolve_base
    adapter_path: str
    adapter_sha256: str
    examples: list  # recycle.data.Example items of the expert's train split
    settings: dict  # GateSettings fields
    out_path: str
    threads: int = 1
    device: str = "cpu"  # "cuda" when the task was given a GPU


def run_gate_job(job: GateJob) -> dict:
    """Train one expert's gates and write them; returns a plain summary (what a Ray task
    returns to the driver)."""
    from recycle.data import lm_batches

    torch.set_num_threads(max(1, int(job.threads)))
    settings = GateSettings(**job.settings)
    if not job.examples:
        raise RecycleError(f"expert {job.expert}: its task has no training examples")
    model, tok = load_expert(job.base, job.adapter_path)
    device = job.device if job.device != "cuda" or torch.cuda.is_available() else "cpu"
    model.to(device)
    batches = lm_batches(
        job.examples, tok, settings.batch_size, settings.max_length, settings.seed
    )
    result = train_gates(model, iter(batches), settings)
    meta = {
        "format": ALGORITHM,
        "expert": job.expert,
        "settings": settings.to_dict(),
        "settings_hash": settings.hash,
        "adapter_sha256": job.adapter_sha256,
        "steps": result.steps,
        "loss_start": result.loss_start,
        "loss_end": result.loss_end,
        "seconds": result.seconds,
    }
    save_gates(job.out_path, result.gates, meta)
    return {
        "expert": job.expert,
        "path": job.out_path,
        "steps": result.steps,
        "loss_start": result.loss_start,
        "loss_end": result.loss_end,
        "seconds": result.seconds,
        "modules": len(result.gates),
        "device": device,
        "node": os.uname().nodename,
        "pid": os.getpid(),
    }


def gate_norms(gates: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.float().norm()) for k, v in gates.items()}


# ---- driver side: the registry's gates rows ------------------------------------------


def find_gates_row(registry, expert_id: int, settings_hash: str, adapter_sha: str) -> dict | None:
    rows = list(
        registry.db.query(
            "select * from gates where expert_id = ? and settings_hash = ? and adapter_sha256 = ?",
            [expert_id, settings_hash, adapter_sha],
        )
    )
    return rows[0] if rows else None


def record_gates_row(registry, expert: dict, settings: GateSettings, result: dict) -> dict:
    """Record a worker's result (one transaction); replaces a row for the same expert,
    settings and adapter content. Refused if the expert changed meanwhile."""
    from recycle.registry import encode_json, now

    with registry.transaction() as db:
        rows = list(db.query("select id, sha256 from experts where id = ?", [expert["id"]]))
        if not rows or rows[0]["sha256"] != expert["sha256"]:
            raise RecycleError(f"expert {expert['name']} was removed or replaced during training")
        db.execute(
            "delete from gates where expert_id = ? and settings_hash = ? and adapter_sha256 = ?",
            [expert["id"], settings.hash, expert["sha256"]],
        )
        row = {
            "expert_id": expert["id"],
            "path": result["path"],
            "settings_hash": settings.hash,
            "settings": encode_json(settings.to_dict()),
            "adapter_sha256": expert["sha256"],
            "steps": result["steps"],
            "loss_start": result["loss_start"],
            "loss_end": result["loss_end"],
            "seconds": result["seconds"],
            "created": now(),
        }
        row["id"] = db["gates"].insert(row).last_pk
    return row


def gates_rows(registry, expert: str | None = None) -> list[dict]:
    """Every gates row with its expert's name and task, newest first; only gates whose
    adapter content is the expert's current one."""
    sql = (
        "select g.*, e.name as expert, e.task as task from gates g "
        "join experts e on e.id = g.expert_id where g.adapter_sha256 = e.sha256"
    )
    params: list = []
    if expert is not None:
        sql += " and e.name = ?"
        params.append(expert)
    sql += " order by e.name, g.created desc, g.id desc"
    out = []
    for r in registry.db.query(sql, params):
        r = dict(r)
        r["settings"] = json.loads(r["settings"])
        out.append(r)
    return out


def latest_gates_row(registry, expert: str, settings_hash: str | None = None) -> dict:
    """The newest gates of an expert (optionally for one settings hash or its prefix)."""
    registry.expert(expert)  # a clear error for an unknown name
    rows = [
        r for r in gates_rows(registry, expert)
        if settings_hash is None or r["settings_hash"].startswith(settings_hash)
    ]
    if not rows:
        which = f" with settings {settings_hash}" if settings_hash else ""
        raise RecycleError(f"expert {expert} has no gates{which}; run: recycle train-gates {expert}")
    return rows[0]

