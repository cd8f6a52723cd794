"""``train-expert``: a PEFT LoRA trained on a task's train split, loss on the answer only.

The loop reads top to bottom: load the base, wrap it with ``get_peft_model``, draw
endless shuffled batches (:func:`recycle.data.lm_batches`), AdamW with linear warm-up
then linear decay. Only the positions that predict answer tokens go through the LM head,
and when only the top layers carry LoRA nothing below them keeps activations for the
backward pass (no parameter there needs a gradient), so a top-K expert trains at roughly
the cost of K layers' backward.

The adapter is written to a temporary folder under the registry's artifact folder,
renamed into ``experts/<name>`` and registered through :func:`recycle.experts.add_expert`.
:func:`train_expert` trains in this process; :func:`train_experts` trains several as Ray
tasks (``--address``, CPUs and GPUs per task), as pipelines do; a worker
(:func:`run_expert_job`) gets plain data and never touches the registry.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recycle import cluster
from recycle.errors import RecycleError
from recycle.losses import answer_loss
from recycle.names import check_name
from recycle.schedule import optimise
from recycle.settings import TrainSettings  # noqa: F401  (re-exported)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


@dataclass
class ExpertJob(cluster.Job):
    """Everything a worker needs to train one expert, as plain data (no registry)."""

    name: str
    tasks: list
    base: str
    settings: dict  # TrainSettings fields
    examples: list  # recycle.data.Example of the tasks' train splits
    out_dir: str  # the adapter folder to write (atomically)
    multitask: bool = False
    threads: int | None = field(default=None, kw_only=True)  # torch threads (None: every core)
    progress: bool = False
    gates: dict | None = None  # GateSettings fields: train the expert's gates in the same task


def _first_layer(layers: list[int] | None) -> int:
    """The lowest adapted layer (0 when every layer is)."""
    return min(layers) if layers else 0


def run_expert_job(job: ExpertJob) -> dict:
    """Train one LoRA expert and write its PEFT folder (plus training.json) to
    ``job.out_dir``; returns the training summary (what a Ray task returns)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from rich.progress import TextColumn

    from recycle.basemodels import load_base, resolve_base
    from recycle.console import progress
    from recycle.data import lm_batches
    from recycle.files import replace_dir

    settings = TrainSettings(**job.settings)
    ref = resolve_base(job.base)
    torch.set_num_threads(job.threads or _cores())
    torch.manual_seed(settings.seed)
    model, tokenizer = load_base(ref, dtype=settings.dtype)  # LoRA weights float32 (PEFT's autocast_adapter_dtype)
    device = cluster.device(job.device)
    model.to(device)
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
    warmup_steps = int(round(settings.warmup * settings.steps))
    batches = lm_batches(job.examples, tokenizer, settings.batch_size, settings.max_length, settings.seed)
    trunk, record_steps = _gate_trunk(job, settings, layers)
    no_reuse = _why_no_reuse(job, settings, layers)

    def loss_fn(step, batch):
        with trunk.record(model, batch) if step < record_steps else nullcontext():
            return answer_loss(model, batch, top_rows=True)

    losses: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    with progress(TextColumn("loss {task.fields[loss]:.4f}"), enabled=job.progress) as bar:
        task = bar.add_task(f"training {job.name}", total=settings.steps, loss=float("nan"))

        def shown(step, loss):
            losses.append(round(loss, 5))
            bar.update(task, advance=1, loss=sum(losses[-10:]) / len(losses[-10:]))

        optimise(params, loss_fn, batches, settings.steps, lr=settings.lr, warmup_steps=warmup_steps,
                 weight_decay=settings.weight_decay, device=device, what=f"training {job.name}", on_step=shown)
    summary = {
        "tasks": job.tasks,
        "multitask": job.multitask,
        "base": {"name": ref.name, "kind": ref.kind, "config_hash": ref.config_hash},
        "settings": {**asdict(settings), "targets": targets, "layers_to_transform": layers,
                     "warmup_steps": warmup_steps, "schedule": "linear warm-up, linear decay",
                     "threads": torch.get_num_threads()},
        "n_train_examples": len(job.examples),
        "n_trainable_params": sum(p.numel() for p in params),
        "losses": losses,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_seconds": round(time.perf_counter() - started, 2),
        "train_cpu_seconds": round(time.process_time() - cpu_started, 2),  # all threads
        "node": os.uname().nodename,
    }

    def build(tmp: Path) -> None:
        nonlocal model, params
        # saved while the config still names the local folder: PEFT then checks the
        # vocabulary there instead of asking the hub
        model.save_pretrained(str(tmp), save_embedding_layers=False)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = ref.name  # the base as the user named it
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        if job.gates is not None:
            # from the written folder, before it is renamed into place: an interrupt
            # meanwhile leaves a temporary folder (removed), never a new adapter at the
            # registered path that the registry does not know
            model = params = None
            summary["gates"] = _train_gates_here(job, device, trunk, tmp)
            if no_reuse and "error" not in summary["gates"]:
                summary["gates"]["no_reuse"] = no_reuse

    replace_dir(build, job.out_dir)
    return summary


def _why_no_reuse(job: ExpertJob, settings: TrainSettings, layers: list[int] | None) -> str | None:
    """Why the gates trained with an expert cannot skip any layer (None where they can):
    an adapter on every layer (the default ``--layers``) leaves none below it, whatever the
    data; other batch settings draw other batches."""
    if job.gates is None:
        return None
    if _first_layer(layers) == 0:
        return "the adapter covers layer 0, so there are no layers below it to skip (--layers topN leaves some)"
    from recycle.gates import GateSettings

    gs = GateSettings(**job.gates)
    if (gs.batch_size, gs.max_length, gs.seed) != (settings.batch_size, settings.max_length, settings.seed):
        return "the gates' batch size, length or seed differ from the expert's, so their batches differ"
    return None


def _gate_trunk(job: ExpertJob, settings: TrainSettings, layers: list[int] | None):
    """A :class:`recycle.scoring.TrunkCache` to fill while training, and for how many steps:
    the gates train on the same task's batches, drawn the same way, so where the batch
    settings agree their first steps see exactly the batches the expert saw first, and
    the layers below the adapted ones need not run again for them."""
    from recycle.gates import GateSettings
    from recycle.scoring import TrunkCache

    if job.gates is None or _first_layer(layers) == 0:
        return None, 0
    gs = GateSettings(**job.gates)
    if (gs.batch_size, gs.max_length, gs.seed) != (settings.batch_size, settings.max_length, settings.seed):
        return None, 0
    return TrunkCache(_first_layer(layers)), min(gs.steps, settings.steps)


def _train_gates_here(job: ExpertJob, device: str, trunk, folder: Path) -> dict:
    """PHATGOOSE gates for the adapter just written to ``folder``, as ``recycle
    train-gates`` trains them (the adapter loaded from its folder, the expert's training
    examples), in this task: ``{gates, steps, loss_start, loss_end, seconds, replayed}``
    or ``{error}``."""
    from recycle import gates

    settings = gates.GateSettings(**job.gates)
    try:
        model, tok = gates.load_peft_model(job.base, folder, dtype=settings.dtype)
        model.to(device)
        result = gates.train_on_examples(model, tok, job.examples, settings, trunk=trunk)
    except RecycleError as e:
        return {"error": str(e)}
    return {"gates": result.gates, "steps": result.steps, "loss_start": result.loss_start,
            "loss_end": result.loss_end, "seconds": result.seconds, "replayed": trunk.hits if trunk else 0}


def plan_expert(registry, tasks: list[str], base: str, settings: TrainSettings, *, name: str | None = None,
                multitask: bool = False, replace: bool = False) -> ExpertJob:
    """Check a training request against the registry and gather what a worker needs."""
    from recycle.basemodels import resolve_base
    from recycle.tasks import load_examples

    if not tasks:
        raise RecycleError("no task to train on")
    if len(tasks) > 1 and not multitask:
        raise RecycleError("several tasks need --multitask")
    name = check_name("expert", name if name is not None else ("multitask" if multitask else tasks[0]))
    if registry.expert_or_none(name) is not None and not replace:
        raise RecycleError(f"expert {name!r} already exists; use --name or --replace")
    registry.check_writable()
    for t in tasks:
        registry.task(t)
    examples = [ex for t in tasks for ex in load_examples(registry, t, "train")]
    if not examples:
        raise RecycleError(f"task {tasks[0]} has no training examples")
    resolve_base(base)  # an unknown base is refused before any work
    parse_layers(settings.layers, None)
    return ExpertJob(name, list(tasks), base, asdict(settings), examples,
                     str(registry.artifacts_dir / "experts" / name), multitask=multitask)


def register_trained(registry, job: ExpertJob, summary: dict, *, replace: bool = False, meta: dict | None = None) -> dict:
    """Register a trained expert's folder (removed again if that fails)."""
    from recycle.experts import add_expert

    rows = [registry.task(t) for t in job.tasks]
    dataset = "; ".join(r["dataset"] or r["source"] for r in rows)
    try:
        row = add_expert(
            registry, job.out_dir, name=job.name, task=",".join(job.tasks), dataset=dataset, base=job.base,
            meta={"trained_by": "recycle train-expert", "steps": job.settings["steps"], **(meta or {})},
            replace=replace,
        )
    except BaseException:
        existing = registry.expert_or_none(job.name)
        if existing is None or existing.path != job.out_dir:
            shutil.rmtree(job.out_dir, ignore_errors=True)
        raise
    return {**row, "training": {k: summary[k] for k in ("final_loss", "train_seconds", "n_train_examples")}}


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
    gates=None,
    report=None,
) -> dict:
    """Train, save and register one LoRA expert in this process; returns the expert row
    (with ``status`` and a ``training`` summary).

    ``gates`` (:class:`recycle.gates.GateSettings`, single-task experts only): its
    PHATGOOSE gates are trained right after it, as :func:`train_experts` does, and the
    row gets ``gates``: ``"trained"`` or why not."""
    if gates is not None and multitask:
        raise RecycleError("gates are trained for single-task experts only (a multitask expert is not routed)")
    settings = settings or TrainSettings()
    settings = settings.with_dtype(cluster.resolve_dtype(settings.dtype, 0))  # this process: the CPU
    gates = gates.with_dtype(settings.dtype) if gates is not None else None  # as the expert: its trunk is replayed
    job = plan_expert(registry, tasks, base, settings, name=name, multitask=multitask, replace=replace)
    job.progress = progress
    if gates is not None:
        job.gates = asdict(gates)
    summary = run_expert_job(job)
    row = register_trained(registry, job, summary, replace=replace, meta=meta)
    if gates is not None:
        from recycle.console import Reporter

        row["gates"] = _record_gates(registry, row, gates, summary["gates"], report or Reporter())
    return row


def train_experts(
    registry,
    jobs: list[ExpertJob],
    *,
    address: str | None = None,
    cpus_per_task: float = 1.0,
    gpus_per_task: float | None = None,
    replace: bool = False,
    report=None,
    gates=None,
) -> list[dict]:
    """Train several experts as Ray tasks (one each, in parallel where the cluster has
    room), registering each as it arrives; returns one outcome per job (``status``: the
    expert row's status, or ``failed`` with ``reason``).

    ``gates`` (:class:`recycle.gates.GateSettings`): each single-task expert's PHATGOOSE
    gates are trained in the same task right after it, as ``recycle train-gates`` would
    train them, and recorded with it (``gates`` in the outcome: ``trained`` or the reason
    they were not; ``train-gates`` then finds them done, or trains what failed). The task
    keeps what enters the first adapted layer for the batches the gates train on first,
    so those steps skip the layers below it.
    """
    from recycle.console import Reporter
    from recycle.files import remove_temps

    report = report or Reporter()
    if cpus_per_task <= 0:
        raise RecycleError(f"--cpus-per-task must be positive, not {cpus_per_task}")
    outcomes: dict[str, dict] = {}
    for job in jobs:
        dtype = cluster.resolve_dtype(job.settings.get("dtype", "float32"), gpus_per_task)
        job.settings = {**job.settings, "dtype": dtype}
        if gates is not None and not job.multitask:
            job.gates = asdict(gates.with_dtype(dtype))  # as the expert: its trunk is replayed

    def on_result(job, summary):
        row = register_trained(registry, job, summary, replace=replace)
        outcomes[job.name] = {"name": job.name, "status": row["status"], **row["training"],
                              "dtype": job.settings["dtype"], "memory": summary.get("memory")}
        report.ok(f"{job.name}: final loss {summary['final_loss']:.3f}, {summary['train_seconds']:.0f} s "
                  f"({summary['settings']['threads']} thread(s))")
        if "gates" in summary:
            outcomes[job.name]["gates"] = _record_gates(registry, row, gates.with_dtype(job.settings["dtype"]),
                                                        {**summary["gates"], "memory": summary.get("memory")}, report)

    def on_error(job, reason):
        outcomes[job.name] = {"name": job.name, "status": "failed", "reason": reason}
        report.fail(f"{job.name}: {reason}")

    # the longest first (steps, and gate steps where gates follow): a long multitask job submitted last ran
    # alone for half an hour at the end of the library benchmark's expert step while the other worker idled
    order = sorted(jobs, key=lambda j: -(int(j.settings.get("steps", 0)) + int((j.gates or {}).get("steps", 0))))
    try:
        cluster.run(run_expert_job, order, cluster.Resources(cpus_per_task, gpus_per_task), "experts", on_result,
                    on_error=on_error, what=f"training {len(jobs)} expert(s)", address=address, report=report)
    finally:
        for job in jobs:
            remove_temps(job.out_dir)
    return [outcomes.get(j.name, {"name": j.name, "status": "failed", "reason": "not run"}) for j in jobs]


def _record_gates(registry, row: dict, settings, trained: dict, report) -> str:
    from recycle.gates import record_trained
    from recycle.records import Expert

    if "error" in trained:
        report.fail(f"{row['name']}: gates not trained: {trained['error']}")
        return trained["error"]
    try:
        record_trained(registry, Expert.from_dict(row), settings, trained)
    except RecycleError as e:
        report.fail(f"{row['name']}: gates not recorded: {e}")
        return str(e)
    reuse = (f"nothing reused: {trained['no_reuse']}" if trained.get("no_reuse") else
             f"{trained['replayed']} of {trained['steps']} steps reused the expert's lower-layer pass")
    report.ok(f"{row['name']} gates: loss {trained['loss_start']:.4f} → {trained['loss_end']:.4f}, "
              f"{trained['seconds']:.1f} s ({reuse})")
    return "trained"
