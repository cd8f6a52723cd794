"""PHATGOOSE gate training (SPEC section 1): one sigmoid gate per routed module.

For every module ``y = W x`` that carries the expert's LoRA, a gate vector
``v ∈ R^{d_in}`` starts at zero and the expert's output becomes
``y = W x + σ(vᵀx) · Δ(x)``. It is applied, as in the reference code, to the LoRA
input: a forward pre-hook on ``lora_A`` scales ``x`` by ``σ(vᵀx)`` (``Δ`` is linear, so
``Δ(σ·x) = σ·Δ(x)``). LoRA dropout is off (the model stays in eval mode). Everything
but the gates is frozen. AdamW, weight decay 0, linear warm-up over ``warmup`` of the
steps then constant, LM loss on the target tokens of the expert's own training data
(:func:`recycle.losses.answer_loss`, the experts' own loss: the LM head runs only where
an answer token is predicted).

Gates are stored as safetensors, one float32 tensor per routed module named by its
path in the base model (``model.layers.3.self_attn.q_proj``), with the settings, their
hash, the adapter's sha256 and the losses in the file's metadata. Files are written to a
temporary name and renamed, so a retried or killed task never leaves a half file.

Workers run :func:`run_gate_job` on plain data (:class:`GateJob`) and never touch the
registry; :func:`train` is the driver (a pool of :class:`GateWorker` actors, each loading
the base model once and training one expert after another; results recorded by the driver
as they arrive).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from recycle import cluster
from recycle.console import Reporter
from recycle.errors import RecycleError
from recycle.files import load_tensors, remove_temps, save_tensors, tensor_metadata
from recycle.losses import answer_loss
from recycle.records import Expert
from recycle.schedule import optimise
from recycle.settings import GATES_ALGORITHM as ALGORITHM
from recycle.settings import GateSettings  # noqa: F401  (re-exported)

ADAPTER_NAME = "default"


# ---- the gated model ---------------------------------------------------------------


def load_peft_model(base: str, adapter_path: str | os.PathLike, dtype=None):
    """The base model with the adapter loaded through PEFT (``PeftModel``), frozen, in eval
    mode, and its tokenizer (not a routed :class:`~recycle.routing.LoraExpert`)."""
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
    import torch
    from peft.tuners.lora import LoraLayer

    from recycle.scoring import inner_model

    base = inner_model(model)
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
    """Zero-initialised gate vectors attached to a PEFT model by forward pre-hooks."""

    def __init__(self, model, init: dict[str, torch.Tensor] | None = None):
        import torch

        self.modules = routed_modules(model)
        self.vectors: dict[str, torch.nn.Parameter] = {}
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
        import torch

        def pre_hook(module, args):
            v = self.vectors[name]
            x = args[0]
            # the gate's score and sigmoid in float32 (v is float32), whatever the base computes in
            gate = torch.sigmoid(x.float() @ v)
            return (x * gate.to(x.dtype).unsqueeze(-1),) + tuple(args[1:])

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


def mean_loss(model, batches: Iterable[dict]) -> float:
    import torch

    with torch.no_grad():
        losses = [answer_loss(model, b).item() for b in batches]
    return sum(losses) / len(losses)


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
    trunk=None,
) -> TrainResult:
    """Train zero-initialised gates on a frozen PEFT model; the model is left unhooked.

    ``loss_start`` is the first step's loss (gates at zero); ``loss_end`` the mean of the
    last tenth of the steps (at least one). ``trunk`` (a :class:`recycle.scoring.TrunkCache`
    recorded while the expert trained on the same batches) replaces the layers below the
    first adapted one where it holds the batch: the same tensors, so the same gates.
    """
    import torch

    torch.manual_seed(settings.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # dropout off; the gates are the only thing that learns
    t0 = time.perf_counter()

    def loss_fn(step, batch):
        with trunk.replay(model, batch) if trunk is not None else nullcontext():
            return answer_loss(model, batch, top_rows=True)

    with Gates(model) as gates:
        losses = optimise(gates.parameters(), loss_fn, batches, settings.steps, lr=settings.lr,
                          warmup_steps=settings.warmup_steps, decay=False, weight_decay=settings.weight_decay,
                          device=next(model.parameters()).device, what="gate training", lower=None, on_step=on_step)
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
    return save_tensors(path, {k: v.float() for k, v in gates.items()}, metadata)


def load_gates(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{module path: gate vector}`` from a gates file."""
    return load_tensors(path, "gates")


def gates_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored with a gates file (JSON values decoded)."""
    return tensor_metadata(path)


def gates_path(artifacts_dir: Path, expert_name: str, settings_hash: str, adapter_sha: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in expert_name)
    return Path(artifacts_dir) / "gates" / safe / f"{settings_hash[:16]}-{adapter_sha[:12]}.safetensors"


# ---- the worker's job --------------------------------------------------------------


@dataclass
class GateJob(cluster.Job):
    """Everything a worker needs, as plain data: no registry, no open files."""

    expert: str
    base: str  # name for resolve_base
    adapter_path: str
    adapter_sha256: str
    examples: list  # recycle.data.Example items of the expert's train split
    settings: dict  # GateSettings fields
    out_path: str
    examples_key: str = ""  # names the examples (their task): workers tokenise them once per key


def run_gate_job(job: GateJob) -> dict:
    """Train one expert's gates and write them, loading the base model for it alone; returns
    a plain summary (what a Ray task returns to the driver). :class:`GateWorker` does the
    same for many experts on one loaded base model."""
    import torch

    torch.set_num_threads(max(1, int(job.threads)))
    return GateWorker(job.device, job.threads).run(job)


class GateWorker:
    """Trains gates for one expert after another on one loaded base model (a Ray actor in
    :func:`train`: one model load per worker, not per expert).

    Per expert the adapter is attached with PEFT (``PeftModel.from_pretrained`` on the loaded
    base), its gates trained and written, and the adapter taken off again (``unload()``: the
    original Linear modules are put back, unmerged), so each expert's gates are those a fresh
    process would train (tests/test_gates.py checks it bit for bit). The base model and the
    tokenised training examples (per task and ``max_length``) are kept between experts.
    """

    def __init__(self, device: str = "cpu", threads: int = 1):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self._requested, self.device = device, None  # checked by the first job: its failure is that job's one line
        self._base: tuple | None = None  # (base name, model, tokenizer)
        self._encoded: dict = {}  # (examples_key, count, max_length) -> the examples encoded

    def _model(self, base: str, dtype: str):
        if self._base is None or self._base[0] != (base, dtype):
            from recycle.basemodels import load_base, resolve_base

            self._base = None  # the previous model freed before the next is loaded
            model, tok = load_base(resolve_base(base), dtype=dtype)
            self._base, self._encoded = ((base, dtype), model.to(self.device), tok), {}
        return self._base[1], self._base[2]

    @cluster.measured  # each expert's own peak memory and times, as a task's
    def run(self, job: GateJob) -> dict:
        from peft import PeftModel

        t0 = time.perf_counter()
        settings = GateSettings(**job.settings)
        if not job.examples:
            raise RecycleError(f"expert {job.expert}: its task has no training examples")
        if self.device is None:  # before loading: a GPU torch cannot see stops the job at once
            self.device = cluster.device(self._requested)
        model, tok = self._model(job.base, settings.dtype)
        try:
            peft_model = PeftModel.from_pretrained(model, str(job.adapter_path), adapter_name=ADAPTER_NAME,
                                                   is_trainable=False)
        except (OSError, ValueError, KeyError) as e:
            raise RecycleError(f"cannot load adapter {job.adapter_path}: {e}") from None
        try:
            for p in peft_model.parameters():
                p.requires_grad_(False)
            peft_model.eval()
            result = train_on_examples(peft_model, tok, job.examples, settings, encoded=self._encoding(job, tok, settings))
        finally:
            peft_model.unload()  # the base model's own modules back, nothing merged
        save_gates(job.out_path, result.gates, file_metadata(job.expert, settings, job.adapter_sha256, result))
        return {
            "expert": job.expert,
            "path": job.out_path,
            **_result_numbers(result),
            "job_seconds": time.perf_counter() - t0,
            "modules": len(result.gates),
            "device": self.device,
            "dtype": settings.dtype,
            "node": os.uname().nodename,
            "pid": os.getpid(),
        }

    def _encoding(self, job: GateJob, tok, settings: GateSettings) -> list | None:
        """The examples tokenised as :func:`recycle.data.lm_batches` does, once per task."""
        from recycle.data import encode_lm

        if not job.examples_key:
            return None
        key = (job.examples_key, len(job.examples), settings.max_length)
        if key not in self._encoded:
            self._encoded[key] = [encode_lm(tok, e.prompt, e.answer, settings.max_length) for e in job.examples]
        return self._encoded[key]


def train_on_examples(model, tok, examples: list, settings: GateSettings, trunk=None, encoded=None) -> TrainResult:
    """Gates for ``model`` (a frozen PEFT model) on an expert's training examples, in the
    batches :func:`recycle.data.lm_batches` draws for these settings (``encoded``: the
    examples already tokenised for them)."""
    from recycle.data import lm_batches

    batches = lm_batches(examples, tok, settings.batch_size, settings.max_length, settings.seed, encoded=encoded)
    return train_gates(model, iter(batches), settings, trunk=trunk)


def _result_numbers(result: TrainResult) -> dict:
    return {"steps": result.steps, "loss_start": result.loss_start, "loss_end": result.loss_end,
            "seconds": result.seconds}


def file_metadata(expert: str, settings: GateSettings, adapter_sha256: str, result) -> dict:
    """What a gates file says of itself (``result``: a TrainResult or its numbers)."""
    numbers = _result_numbers(result) if isinstance(result, TrainResult) else result
    return {
        "format": ALGORITHM,
        "expert": expert,
        "settings": settings.to_dict(),
        "settings_hash": settings.hash,
        "adapter_sha256": adapter_sha256,
        **{k: numbers[k] for k in ("steps", "loss_start", "loss_end", "seconds")},
    }


def _row(path, settings: GateSettings, numbers: dict) -> dict:
    memory = numbers.get("memory")
    return {"path": str(path), "settings_hash": settings.hash, "settings": json.dumps(settings.to_dict(), sort_keys=True),
            "dtype": settings.dtype, "memory": json.dumps(memory) if memory else None,
            **{k: numbers[k] for k in ("steps", "loss_start", "loss_end", "seconds")}}


def record_trained(registry, expert: Expert, settings: GateSettings, trained: dict) -> dict:
    """Write and record gates a worker trained right after their expert (``trained``:
    ``gates`` tensors and the numbers of :func:`run_gate_job`'s summary) for the registered
    ``expert`` row; returns the gates row. The file is written first (atomically) and
    removed again if the row cannot be written."""
    path = gates_path(registry.artifacts_dir, expert.name, settings.hash, expert.sha256)
    save_gates(path, trained["gates"], file_metadata(expert.name, settings, expert.sha256, trained))
    try:
        return registry.record_gates(expert, _row(path, settings, trained))
    except BaseException:
        if not registry.gates_recorded(str(path)):
            path.unlink(missing_ok=True)
        raise


def gate_norms(gates: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.float().norm()) for k, v in gates.items()}


# ---- the driver ----------------------------------------------------------------------


def select_experts(registry, names: list[str] | None = None, all_: bool = False, task: str | None = None) -> list[Expert]:
    given = sum([bool(names), all_, task is not None])
    if given != 1:
        raise RecycleError("name the experts, or give --all, or --task T (exactly one of these)")
    if names:
        return [registry.expert(n) for n in dict.fromkeys(names)]
    experts = registry.experts(task=task)
    if not experts:
        where = f" for task {task}" if task else ""
        raise RecycleError(f"no experts registered{where} in {registry.path}")
    return experts


def _numbers(row: dict) -> dict:
    return {k: row.get(k) for k in ("steps", "loss_start", "loss_end", "seconds", "path", "memory")}


def train(
    registry,
    experts: list[Expert],
    settings: GateSettings,
    *,
    force: bool = False,
    address: str | None = None,
    gpus_per_expert: float | None = None,
    cpus_per_expert: float = 1.0,
    report: Reporter | None = None,
) -> list[dict]:
    """Train PHATGOOSE gates for ``experts`` (registry rows) on a pool of Ray workers, each
    loading the base model once (:class:`GateWorker`); returns one
    outcome per expert: ``{expert, status: trained | skipped | failed, reason, steps, ...}``.
    Experts whose gates exist for the same settings and adapter content are skipped unless
    ``force``. An interrupt (KeyboardInterrupt) leaves no gates file without its row."""
    from recycle.experts import file_problem
    from recycle.tasks import load_examples

    report = report or Reporter()
    if cpus_per_expert <= 0:
        raise RecycleError(f"--cpus-per-expert must be positive, not {cpus_per_expert}")
    settings = settings.with_dtype(cluster.resolve_dtype(settings.dtype, gpus_per_expert))  # in the hash unless float32
    outcomes: dict[str, dict] = {}
    jobs: list[GateJob] = []
    by_name: dict[str, Expert] = {}
    examples_cache: dict[str, list] = {}
    for e in experts:
        name = e.name
        problem = file_problem(registry, e)
        if problem:
            outcomes[name] = {"status": "failed", "reason": problem}
            continue
        row = registry.gates_row(e.id, settings.hash, e.sha256)
        if row and not force and Path(row["path"]).is_file():
            outcomes[name] = {"status": "skipped", "reason": "gates exist for these settings", **_numbers(row)}
            continue
        if not e.task:
            outcomes[name] = {"status": "failed", "reason": f"expert {name} has no task: re-register it with --task"}
            continue
        try:
            if e.task not in examples_cache:
                examples_cache[e.task] = load_examples(registry, e.task, "train")
        except RecycleError as err:
            outcomes[name] = {"status": "failed", "reason": str(err)}
            continue
        jobs.append(GateJob(
            expert=name, base=e.base_model, adapter_path=e.path, adapter_sha256=e.sha256,
            examples=examples_cache[e.task], settings=asdict(settings),
            out_path=str(gates_path(registry.artifacts_dir, name, settings.hash, e.sha256)),
            examples_key=f"{e.task}",
        ))
        by_name[name] = e
    for name, o in outcomes.items():
        if o["status"] == "skipped":
            report.say(f"skip {name}: gates exist for settings {settings.hash[:12]} (use --force to retrain)")
        else:
            report.fail(f"{name}: {o['reason']}")
    if jobs:
        registry.check_writable()

        def on_result(job, result):
            registry.record_gates(by_name[job.expert], _row(result["path"], settings, result))
            outcomes[job.expert] = {"status": "trained", "reason": "", **_numbers(result),
                                    "job_seconds": result.get("job_seconds")}
            report.ok(f"{job.expert}: loss {result['loss_start']:.4f} → {result['loss_end']:.4f}, "
                      f"{result['seconds']:.1f} s")

        def on_error(job, reason):
            outcomes[job.expert] = {"status": "failed", "reason": reason}
            report.fail(f"{job.expert}: {reason}")

        def on_interrupt(unfinished):
            # rows are written whole or not at all: remove any gates file without a row
            for job in jobs:
                if not registry.gates_recorded(job.out_path):
                    Path(job.out_path).unlink(missing_ok=True)

        try:
            # a pool of workers, each loading the base model once and training expert after expert
            cluster.run(GateWorker, jobs, cluster.Resources(cpus_per_expert, gpus_per_expert), "gates", on_result,
                        on_error=on_error, address=address, report=report, workers=None,
                        what=f"training gates (settings {settings.hash[:12]}) for {len(jobs)} expert(s)")
        except KeyboardInterrupt:
            on_interrupt(jobs)
            raise
        finally:
            for job in jobs:
                remove_temps(job.out_path)
    return [{"expert": e.name, **outcomes.get(e.name, {"status": "?"})} for e in experts]
