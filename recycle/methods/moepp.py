"""``moepp``: MoE++ (Jin et al., 2024; SPEC §2) over recycled LoRA experts: computation-free
experts and gating residuals added to PHATGOOSE routing, trained post hoc.

The pool of a routed module is its LoRA experts plus ``zero``, ``copy`` and ``constant``
experts that compute no LoRA product; the base path ``W x`` is always kept. For a token
with picks P (top-k of the logits below) and weights g (softmax over the kept logits):

- LoRA expert i: ``g_i Δ_i(x)``;
- zero: returns 0 and, as in the released code, its weight is set to 0 and the other picks'
  renormalised to sum 1 ("one LoRA product instead of two");
- copy: ``g Δ_prev``, the previous routed layer's mixture delta for this token at the module
  of the same kind (``model.layers.*.self_attn.q_proj``), reused; where there is none (the
  first layer of a kind) it acts as zero;
- constant c: ``g_c (α1 D + α2 v_c)``, ``[α1, α2] = softmax(W_c LN(x) / sqrt(d))``, with
  ``v_c ∈ R^{d_out}`` learned and ``D`` the token's mixture of its other (LoRA and copy)
  picks renormalised to weight 1 (0 if it has none). So ``α1`` hands the slot to the other
  picks and ``α2`` replaces part of the delta by ``v_c``: the delta-space reading of the
  paper's ``α1 x + α2 v``, ``x`` being what flows through.

Logits: the LoRA experts' rows are their PHATGOOSE scores ``LN(x)·LN(v_i)/sqrt(d)`` (frozen
gates); each computation-free expert has a learned row and bias, ``u_c = LN(x)·w_c/sqrt(d) +
b_c``; the gating residual adds ``W_r ℓ^{j-1}`` (E×E, no bias) from the previous layer of the
same kind, whose logits are taken after its own residual (as in the released code). A
computation-free expert's logit is an offset from the token's k-th best LoRA logit:
``ℓ_c = ℓ_(k) − 1 + u_c``. With every new parameter zero-initialised (rows, biases, W_r,
``v_c``, ``W_c``), no computation-free expert reaches the top-k and the composition is
exactly PHATGOOSE top-k routing over the same experts (tests/test_moepp.py); one takes a slot
once its learned advantage ``u_c`` exceeds 1.

Training (:func:`train_router`, ``recycle train NAME``): only those parameters, on a
calibration mix, with the LM loss on the answer tokens plus ``beta`` times the τ-weighted
balance loss of the paper, ``E Σ_i η_i f_i P_i`` per routed module (f_i: share of the
token's k slots given to expert i, P_i: mean routing probability, η = 1 for LoRA experts and
τ for computation-free ones; the training code of MoE++ is not released, so this follows the
paper's text). A lower τ makes the cheap experts cheaper to the loss: more tokens go to them.
``objective="distill"`` replaces the LM loss by KL(teacher ‖ model) of the next-token
distributions on every real token, the teacher being the same composition routed as plain
PHATGOOSE top-k (:func:`plain_routing`): no labels are used and the router is asked to save
LoRA products where they do not change the PHATGOOSE answer, not to fit the calibration
answers (which, with the LM loss, taught our benchmark's sentiment tasks a label prior:
benchmarks/results/moepp.md).

The defaults, ``residual=False`` and ``tau=0.5``, were chosen on the 36-expert library's
held-in validation splits (README, issue 30): without the gating residual the router scored
0.638 against 0.568 with it (PHATGOOSE 0.614); τ 0.5 then scored level with τ 0.75 (0.636,
−0.2 [−1.1, +0.7]) at 1.20 LoRA products per token against 1.38 (PHATGOOSE: 2), and the rule
was the fewest products among the variants level with the best. With the residual, fitting
the calibration answers re-routes the LoRA experts too and learns the calibration tasks'
label prior (benchmarks/results/moepp.md).

Dispatch: a token's LoRA products are computed only for its LoRA picks (sparse dispatch;
these layers never take the dense path), so a token routed to zero and copy computes no
LoRA product at that module.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from recycle import cluster
from recycle.console import Reporter
from recycle.errors import RecycleError
from recycle.methods.method import Method, setting
from recycle.methods.phatgoose import vectors_for
from recycle.settings import RouterTrainOptions, RouterTrainSettings, Settings  # noqa: F401  (re-exported)

MAX_FREE = 64  # computation-free experts per module (zero + copy + constant), refused beyond when stored


@dataclass(frozen=True)
class MoeppSettings(Settings):
    top_k: int = setting(2, "picks per token (LoRA and computation-free experts together)", minimum=1)
    zero: int = setting(1, "zero experts per module", minimum=0)
    copy: int = setting(1, "copy experts per module", minimum=0)
    constant: int = setting(2, "constant experts per module", minimum=0)
    residual: bool = setting(False, "gating residual from the previous layer's logits, as in the paper (--residual: "
                             "on; off by default, chosen on the 36-expert library's held-in validation splits)")
    tau: float = setting(0.5, "balance-loss weight of the computation-free experts (LoRA experts: 1; lower: "
                         "more tokens to them; 0.5 chosen on the library's held-in validation splits)", positive=True)

    def __post_init__(self):
        super().__post_init__()
        if self.n_free > MAX_FREE:  # each is a router row, a constant vector per module: bounded when stored
            raise RecycleError(f"--zero, --copy and --constant give {self.n_free} computation-free experts per "
                               f"module; at most {MAX_FREE}")

    @property
    def n_free(self) -> int:
        return self.zero + self.copy + self.constant


# ---- training ------------------------------------------------------------------------


@dataclass
class RouterJob(cluster.Job):
    """What a worker needs to train a composition's router: plain data."""

    plan: dict
    examples: list  # [[prompt, answer], ...]
    settings: dict
    out_path: str
    metadata: dict


def calibration(registry, plan, source: str | None, n: int, seed: int) -> tuple[list, dict]:
    """The calibration examples ``[[prompt, answer], ...]`` and what identifies them: by
    default ``n`` spread evenly over the members' own tasks' train splits; else the train
    splits of the named tasks (comma-separated), or a JSONL file of ``{"prompt", "answer"}``
    (or ``{"prompt", "choices", "label"}``) lines."""
    import hashlib
    import json

    from recycle.tasks import load_examples

    if source and Path(source).suffix == ".jsonl" or (source and Path(source).is_file()):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RecycleError(f"cannot read calibration file {path}: {e}") from None
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecycleError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
                raise RecycleError(f"{path}:{i}: needs a \"prompt\" string and an \"answer\" (or choices and label)")
            answer = item.get("answer")
            if answer is None and isinstance(item.get("choices"), list) and isinstance(item.get("label"), int) \
                    and 0 <= item["label"] < len(item["choices"]):
                answer = item["choices"][item["label"]]
            if not isinstance(answer, str) or not answer:
                raise RecycleError(f"{path}:{i}: needs a non-empty \"answer\" string (or choices and a label)")
            rows.append([item["prompt"], answer])
        if not rows:
            raise RecycleError(f"calibration file {path} has no examples")
        import random

        rows = random.Random(seed).sample(rows, min(n, len(rows)))
        return rows, {"file": str(path.resolve()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    tasks = [t.strip() for t in source.split(",") if t.strip()] if source else \
        list(dict.fromkeys(m.task for m in plan.members if m.task))
    if not tasks:
        raise RecycleError("no calibration data: the members have no registered tasks; give --calibration TASKS or FILE")
    per = max(1, -(-n // len(tasks)))
    rows = []
    for t in tasks:
        rows += [[ex.prompt, ex.answer] for ex in load_examples(registry, t, "train", n=per, seed=seed)]
    rows = rows[:n] if len(rows) > n else rows
    specs = {t: registry.task(t)["spec_sha256"] for t in tasks}
    return rows, {"tasks": specs}


def distill_loss(model, handle, batch: dict) -> torch.Tensor:
    """Mean KL(teacher ‖ model) of the next-token distributions over every real token of
    the batch; the teacher is the same composition routed as PHATGOOSE top-k over its LoRA
    experts alone (:func:`~recycle.routing.moepp.plain_routing`), i.e. what it computes before training."""
    import torch
    import torch.nn.functional as F

    from recycle.routing.moepp import plain_routing

    keep = batch["attention_mask"].bool()
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    with torch.no_grad(), plain_routing(handle):
        teacher = torch.log_softmax(model(**kw).logits[keep].float(), -1)
    student = torch.log_softmax(model(**kw).logits[keep].float(), -1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def run_router_job(job: RouterJob) -> dict:
    """Train a composition's router parameters (worker side) and write them; returns a
    plain summary."""
    import torch

    from recycle.basemodels import load_base, resolve_base
    from recycle.data import Example, lm_batches
    from recycle.files import save_tensors
    from recycle.losses import answer_loss
    from recycle.methods import Plan, get
    from recycle.schedule import optimise

    torch.set_num_threads(max(1, int(job.threads)))
    s = RouterTrainSettings(**job.settings)
    torch.manual_seed(s.seed)
    plan = Plan.from_dict(job.plan)
    model, tok = load_base(resolve_base(plan.base), dtype=s.dtype)
    device = cluster.device(job.device)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    handle = get(plan.method).install(plan, model, tok)
    t0 = time.perf_counter()
    try:
        params = handle.router_parameters()
        if not params:
            raise RecycleError(f"composition {plan.label} has nothing to train")
        for p in params:
            p.requires_grad_(True)
        examples = [Example(p_, None, a, None, p_) for p_, a in job.examples]
        batches = lm_batches(examples, tok, s.batch_size, s.max_length, s.seed)
        losses, balance = [], []

        def loss_fn(step, batch):
            lm = distill_loss(model, handle, batch) if s.objective == "distill" else answer_loss(model, batch)
            aux = torch.stack(handle.context.losses).mean() if handle.context.losses else lm.new_zeros(())
            losses.append(float(lm))
            balance.append(float(aux))
            return lm + s.beta * aux

        optimise(params, loss_fn, batches, s.steps, lr=s.lr, warmup_steps=int(round(s.warmup * s.steps)),
                 decay=False, device=device, what="router training")
        # the first and the last tenth of the steps, each a mean over as many batches: one batch's
        # loss against a mean of several compared two different mixes of tasks, not the router's change
        tail = max(1, s.steps // 10)
        summary = {"steps": s.steps, "loss_start": sum(losses[:tail]) / tail, "loss_end": sum(losses[-tail:]) / tail,
                   "balance_start": sum(balance[:tail]) / tail, "balance_end": sum(balance[-tail:]) / tail,
                   "examples": len(examples), "seconds": time.perf_counter() - t0}
        save_tensors(job.out_path, handle.router_state(), {**job.metadata, **summary})
    finally:
        handle.remove()
    return {**summary, "path": job.out_path, "node": os.uname().nodename}


def train_router(
    registry,
    name: str,
    settings: RouterTrainSettings,
    *,
    calibration_source: str | None = None,
    force: bool = False,
    address: str | None = None,
    gpus: float | None = None,
    cpus: float = 1.0,
    report: Reporter | None = None,
) -> dict:
    """Train the router parameters of stored composition ``name`` as one Ray task; record
    them with the composition (atomically written beside it). Found done (and skipped) when
    parameters exist for the same composition, settings and calibration data."""
    import hashlib
    import json

    from recycle import compose as comp
    from recycle.adapters import sha256_file
    from recycle.files import remove_temps

    report = report or Reporter()
    if cpus <= 0:
        raise RecycleError(f"--cpus must be positive, not {cpus}")
    row = registry.composition(name)
    from recycle.methods import get

    if get(row["method"]).trains != "train-router":
        raise RecycleError(f"composition {name} is {row['method']}: it has no router to train")
    settings = settings.with_dtype(cluster.resolve_dtype(settings.dtype, gpus))  # part of the key unless float32
    plan = comp.plan(registry, composition=name, data_seed=settings.seed)
    plan.state = {}  # train from the zero-initialised router
    rows, source = calibration(registry, plan, calibration_source, settings.examples, settings.seed)
    key = hashlib.sha256(json.dumps({"composition": plan.content_key, "settings": settings.to_dict(),
                                     "calibration": source, "n": len(rows)}, sort_keys=True).encode()).hexdigest()
    old = None if force else METHOD.found_done(row, key)
    if old:
        report.say(f"skip {name}: router trained with these settings ({key[:12]}); --force retrains")
        return {**old, "status": "skipped"}
    registry.check_writable()
    out = METHOD.state_path(registry, name, key)
    meta = {"composition": name, "method": row["method"], "key": key, "settings": settings.to_dict(),
            "calibration": source}
    job = RouterJob(plan.to_dict(), rows, settings.to_dict(), str(out), meta)
    result: dict = {}
    errors: list[str] = []
    try:
        cluster.run(METHOD.train_job, [job], cluster.Resources(cpus, gpus), "router", lambda j, r: result.update(r),
                    on_error=lambda j, e: errors.append(e), address=address, report=report,
                    what=f"training the router of {name} ({len(rows)} calibration examples, {settings.steps} steps)")
    finally:
        remove_temps(out)
    if errors:
        raise RecycleError(f"router training for {name} failed: {errors[0]}", exit_code=1)
    state = {"path": str(out), "sha256": sha256_file(out), "key": key, "settings": settings.to_dict(),
             "calibration": source, "dtype": settings.dtype, "memory": result.get("memory"),
             **{k: result[k] for k in ("steps", "loss_start", "loss_end", "balance_start", "balance_end", "examples",
                                       "seconds")}}
    METHOD.record_state(registry, row, state)
    what = "distillation KL" if settings.objective == "distill" else "LM loss"
    report.ok(f"{name}: {what} {result['loss_start']:.4f} → {result['loss_end']:.4f}, balance "
              f"{result['balance_start']:.3f} → {result['balance_end']:.3f}, {result['seconds']:.0f} s")
    return {**state, "status": "trained"}


# ---- the method ------------------------------------------------------------------------


class Moepp(Method):
    name = "moepp"
    summary = ("MoE++: PHATGOOSE routing plus zero/copy/constant experts and gating residuals, "
               "trained post hoc (recycle train)")
    Settings = MoeppSettings
    needs = "gates"
    token_routed = True
    in_default_eval = False
    TrainSettings = RouterTrainOptions
    state_key, state_what = "router", "router parameters"
    trains = "train-router"
    train_job = staticmethod(run_router_job)

    def artifacts(self, plan, model, tokenizer):
        return {"gates": {m.name: m.gates for m in plan.members}}

    def build(self, model, experts, settings, gates=None):
        from recycle.routing import install_routed
        from recycle.routing.moepp import MoeppRouter, link_residuals

        vectors = vectors_for(gates, [e.name for e in experts], "gates")
        handle = install_routed(model, experts, lambda layer: MoeppRouter(layer, vectors, settings), self.name)
        link_residuals(handle, settings)
        return handle

    def load_state(self, plan, handle):
        from recycle.files import load_tensors

        path = self.trained_file(plan)
        if path:
            handle.load_router_state(load_tensors(path, "router parameters"))

    def train(self, registry, name, settings, **kw):
        return train_router(registry, name, settings.settings(), calibration_source=settings.calibration or None, **kw)


METHOD = Moepp()
