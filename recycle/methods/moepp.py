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

Training (:func:`train_router`, ``recycle train-router``): only those parameters, on a
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

Dispatch: a token's LoRA products are computed only for its LoRA picks (sparse dispatch;
these layers never take the dense path), so a token routed to zero and copy computes no
LoRA product at that module.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from recycle.console import Reporter
from recycle.errors import RecycleError
from recycle.methods.method import Method, setting
from recycle.methods.phatgoose import vectors_for
from recycle.routing import GateRouter, Route, install_routed
from recycle.settings import RouterTrainSettings, Settings  # noqa: F401  (re-exported)

MAX_FREE = 64  # computation-free experts per module (zero + copy + constant), refused beyond when stored
MARGIN = 1.0  # a computation-free expert's logit starts this far below the token's k-th LoRA logit


@dataclass(frozen=True)
class MoeppSettings(Settings):
    top_k: int = setting(2, "picks per token (LoRA and computation-free experts together)", minimum=1)
    zero: int = setting(1, "zero experts per module", minimum=0)
    copy: int = setting(1, "copy experts per module", minimum=0)
    constant: int = setting(2, "constant experts per module", minimum=0)
    residual: bool = setting(True, "gating residual from the previous layer's logits (--no-residual: off)")
    tau: float = setting(0.75, "balance-loss weight of the computation-free experts (LoRA experts: 1)",
                         positive=True)

    def __post_init__(self):
        super().__post_init__()
        if self.n_free > MAX_FREE:  # each is a router row, a constant vector per module: bounded when stored
            raise RecycleError(f"--zero, --copy and --constant give {self.n_free} computation-free experts per "
                               f"module; at most {MAX_FREE}")

    @property
    def n_free(self) -> int:
        return self.zero + self.copy + self.constant


def free_names(s: MoeppSettings) -> tuple[str, ...]:
    def named(kind, n):
        return [f"@{kind}"] if n == 1 else [f"@{kind}{i}" for i in range(n)]

    return tuple(named("zero", s.zero) + named("copy", s.copy) + [f"@constant{i}" for i in range(s.constant)])


class MoeppRouter(GateRouter):
    """PHATGOOSE scores for the LoRA experts plus learned rows for the computation-free ones,
    the gating residual, and the computation-free experts' outputs (see module docstring)."""

    name = "moepp"
    wants_delta = True
    keeps_logits = True

    def __init__(self, layer, vectors: dict, settings: MoeppSettings):
        super().__init__(layer, vectors, settings.top_k, "softmax", 1.0)
        self.s = settings
        self.n_free = settings.n_free
        self.free_names = free_names(settings)
        self.n_lora = layer.n_experts
        d, dt, dev = layer.in_features, self.proj.dtype, self.proj.device
        z, c = settings.n_free, settings.constant
        self.free_w = nn.Parameter(torch.zeros(z, d, dtype=dt, device=dev))
        self.free_b = nn.Parameter(torch.zeros(z, dtype=dt, device=dev))
        self.const_v = nn.Parameter(torch.zeros(c, layer.out_features, dtype=dt, device=dev))
        self.const_w = nn.Parameter(torch.zeros(c, 2, d, dtype=dt, device=dev))
        self.residual = None  # nn.Parameter [E, E_prev], set by link_residuals()
        self._zero = list(range(self.n_lora, self.n_lora + settings.zero))
        self._copy = list(range(self.n_lora + settings.zero, self.n_lora + settings.zero + settings.copy))
        self._const = list(range(self.n_lora + settings.zero + settings.copy, self.n_lora + z))
        self.plain = False  # route as PHATGOOSE top-k over the LoRA experts alone (the distillation teacher)

    @property
    def n_routes(self) -> int:
        return self.n_lora + self.n_free

    def forward(self, x: torch.Tensor, layer) -> Route:
        if self.plain:
            return super().forward(x, layer)
        x = x.reshape(-1, x.shape[-1])
        raw, rstd = self.scores(x)
        xd = x.to(raw.dtype)
        d = xd.shape[-1]
        mean = xd.mean(-1, keepdim=True)
        free = (xd @ self.free_w.T - mean * self.free_w.sum(-1)) * (rstd / math.sqrt(d)) + self.free_b
        pre = torch.cat([raw * rstd, free], -1)
        prev = layer.context.logits.get(layer.kind)
        if self.residual is not None and prev is not None and prev.shape == (x.shape[0], self.residual.shape[1]):
            pre = pre + prev.to(pre.dtype) @ self.residual.T
        k_lora = min(self.top_k, self.n_lora)
        anchor = torch.topk(pre[:, : self.n_lora], k_lora, dim=-1).values[:, -1:].detach()
        logits = torch.cat([pre[:, : self.n_lora], pre[:, self.n_lora:] + (anchor - MARGIN)], -1)
        top, idx = torch.topk(logits, min(self.top_k, self.n_routes), dim=-1)
        dropped = torch.zeros_like(idx, dtype=torch.bool)
        for z in self._zero + (self._copy if layer.kind not in layer.context.deltas else []):
            dropped |= idx == z  # zero (and copy without a previous delta): weight 0, others renormalised
        if bool(dropped.any()):  # the softmax over the kept picks that are not dropped (0 if none is left)
            weight = torch.softmax(top.masked_fill(dropped, float("-inf")), -1).nan_to_num(0.0)
        else:
            weight = torch.softmax(top, -1)
        route = Route(idx, weight, logits)
        if self._const:
            is_const = sum(idx == c for c in self._const).bool()
            if bool(is_const.any()):
                # the LoRA products are computed with the weights of the token's other picks
                # renormalised to 1 (its D); finish() scales them back and adds the constants
                route.dispatch = torch.softmax(top.masked_fill(dropped | is_const, float("-inf")), -1).nan_to_num(0.0)
                route.aux["is_const"] = is_const
        if torch.is_grad_enabled():  # training: the τ-weighted balance loss of this module
            layer.context.losses.append(self.balance_loss(logits, idx))
        return route

    def balance_loss(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``E Σ_i η_i f_i P_i`` (1 when routing is uniform and every η is 1)."""
        e = logits.shape[-1]
        probs = torch.softmax(logits.float(), -1).mean(0)
        f = torch.bincount(idx.reshape(-1), minlength=e).float() / idx.numel()
        eta = torch.ones(e, device=logits.device)
        eta[self.n_lora:] = self.s.tau
        return e * (eta * f.detach() * probs).sum()

    def finish(self, delta: torch.Tensor, x: torch.Tensor, route: Route, layer) -> torch.Tensor:
        """The LoRA mixture ``delta`` plus what the copy and constant picks return."""
        idx = route.idx
        prev = layer.context.deltas.get(layer.kind)
        has_prev = prev is not None and prev.shape == delta.shape
        if route.dispatch is None:  # no constant picked: delta is Σ g_e Δ_e; add the copies
            if self._copy and has_prev:
                w = route.weight.to(delta.dtype)
                delta = delta + sum((w * (idx == c)).sum(-1, keepdim=True) for c in self._copy) * prev
            return delta
        # delta is D's LoRA part (weights renormalised over the non-constant picks)
        dw, w = route.dispatch.to(delta.dtype), route.weight.to(delta.dtype)
        D = delta
        if self._copy and has_prev:
            D = D + sum((dw * (idx == c)).sum(-1, keepdim=True) for c in self._copy) * prev
        mass = (w * ~route.aux["is_const"]).sum(-1, keepdim=True)  # weight of the token's LoRA and copy picks
        const_w = torch.stack([(w * (idx == c)).sum(-1) for c in self._const], -1)  # [T, C]
        xd = x.to(self.const_w.dtype)
        xh = F.layer_norm(xd, (xd.shape[-1],)) / math.sqrt(xd.shape[-1])
        alpha = torch.softmax(torch.einsum("td,cjd->tcj", xh, self.const_w), -1).to(delta.dtype)  # [T, C, 2]
        out = (mass + (const_w * alpha[..., 0]).sum(-1, keepdim=True)) * D
        return out + (const_w * alpha[..., 1]) @ self.const_v.to(delta.dtype)

    def extra_repr(self) -> str:
        s = self.s
        return (f"moepp, top_k={s.top_k}, lora={self.n_lora}, zero={s.zero}, copy={s.copy}, constant={s.constant}, "
                f"residual={self.residual is not None}")


def link_residuals(handle, settings: MoeppSettings) -> None:
    """Give every routed layer that has a previous layer of the same kind its gating
    residual ``W_r`` [E_j, E_{j-1}] (zeros)."""
    if not settings.residual:
        return
    import re

    by_kind: dict[str, list] = {}
    for layer in handle.routed:
        found = re.findall(r"\.(\d+)\.", layer.path)
        by_kind.setdefault(layer.kind, []).append((int(found[-1]) if found else 0, layer))
    for layers in by_kind.values():
        layers.sort(key=lambda t: t[0])
        for (_, prev), (_, layer) in zip(layers, layers[1:]):
            r = layer.router
            r.residual = nn.Parameter(torch.zeros(r.n_routes, prev.router.n_routes, dtype=r.proj.dtype,
                                                  device=r.proj.device))


@contextmanager
def plain_routing(handle):
    """Inside the block the composition routes as PHATGOOSE top-k over its LoRA experts (no
    computation-free expert, no gating residual): what it is before training, whatever its
    parameters hold."""
    routers = [layer.router for layer in handle.routed if isinstance(layer.router, MoeppRouter)]
    for r in routers:
        r.plain = True
    try:
        yield
    finally:
        for r in routers:
            r.plain = False


class Moepp(Method):
    name = "moepp"
    summary = ("MoE++: PHATGOOSE routing plus zero/copy/constant experts and gating residuals, "
               "trained post hoc (train-router)")
    Settings = MoeppSettings
    needs = "gates"
    token_routed = True
    in_default_eval = False
    trains = "train-router"

    def artifacts(self, plan, model, tokenizer):
        return {"gates": {m["name"]: m["gates"] for m in plan.members}}

    def build(self, model, experts, settings, gates=None):
        vectors = vectors_for(gates, [e.name for e in experts], "gates")
        handle = install_routed(model, experts, lambda layer: MoeppRouter(layer, vectors, settings), self.name)
        link_residuals(handle, settings)
        return handle


METHOD = Moepp()


# ---- training ------------------------------------------------------------------------


@dataclass
class RouterJob:
    """What a worker needs to train a composition's router: plain data."""

    plan: dict
    examples: list  # [[prompt, answer], ...]
    settings: dict
    out_path: str
    metadata: dict
    threads: int = 1
    device: str = "cpu"


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
        list(dict.fromkeys(m["task"] for m in plan.members if m.get("task")))
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
    experts alone (:func:`plain_routing`), i.e. what it computes before training."""
    keep = batch["attention_mask"].bool()
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    with torch.no_grad(), plain_routing(handle):
        teacher = torch.log_softmax(model(**kw).logits[keep].float(), -1)
    student = torch.log_softmax(model(**kw).logits[keep].float(), -1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def run_router_job(job: RouterJob) -> dict:
    """Train a composition's router parameters (worker side) and write them; returns a
    plain summary."""
    from recycle.basemodels import load_base, resolve_base
    from recycle.data import Example, lm_batches
    from recycle.files import save_tensors
    from recycle.methods import Plan, get
    from recycle.schedule import lr_at, set_lr
    from recycle.training import answer_loss

    torch.set_num_threads(max(1, int(job.threads)))
    s = RouterTrainSettings(**job.settings)
    torch.manual_seed(s.seed)
    plan = Plan(**job.plan)
    model, tok = load_base(resolve_base(plan.base))
    device = job.device if job.device != "cuda" or torch.cuda.is_available() else "cpu"
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
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
        examples = [Example(p_, None, a, None, p_) for p_, a in job.examples]
        batches = lm_batches(examples, tok, s.batch_size, s.max_length, s.seed)
        warm = int(round(s.warmup * s.steps))
        losses, balance = [], []
        for step in range(s.steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            set_lr(opt, lr_at(step, s.steps, warm, s.lr, decay=False))
            lm = distill_loss(model, handle, batch) if s.objective == "distill" else answer_loss(model, batch)
            aux = torch.stack(handle.context.losses).mean() if handle.context.losses else lm.new_zeros(())
            loss = lm + s.beta * aux
            if not torch.isfinite(loss):
                raise RecycleError(f"router training diverged at step {step} (loss {loss.item()}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(lm))
            balance.append(float(aux))
        tail = max(1, s.steps // 10)
        summary = {"steps": s.steps, "loss_start": losses[0], "loss_end": sum(losses[-tail:]) / tail,
                   "balance_start": balance[0], "balance_end": sum(balance[-tail:]) / tail,
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

    from recycle import cluster
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
    plan = comp.plan(registry, composition=name, data_seed=settings.seed)
    plan.state = {}  # train from the zero-initialised router
    rows, source = calibration(registry, plan, calibration_source, settings.examples, settings.seed)
    key = hashlib.sha256(json.dumps({"composition": plan.settings_hash, "settings": settings.to_dict(),
                                     "calibration": source, "n": len(rows)}, sort_keys=True).encode()).hexdigest()
    old = (row.get("state") or {}).get("router")
    if old and old.get("key") == key and not force and Path(old["path"]).is_file() \
            and sha256_file(old["path"]) == old["sha256"]:
        report.say(f"skip {name}: router trained with these settings ({key[:12]}); --force retrains")
        return {**old, "status": "skipped"}
    registry.check_writable()
    out = registry.artifacts_dir / "compositions" / name / f"router-{key[:16]}.safetensors"
    meta = {"composition": name, "method": row["method"], "key": key, "settings": settings.to_dict(),
            "calibration": source}
    job = RouterJob(plan.to_dict(), rows, settings.to_dict(), str(out), meta, threads=max(1, math.ceil(cpus)))
    result: dict = {}
    errors: list[str] = []
    with cluster.connect(address) as where:
        g = cluster.default_gpus(gpus)
        cluster.check_fits(cpus, g)
        job.device = "cuda" if g > 0 else "cpu"
        report.say(f"training the router of {name} on Ray ({where}): {len(rows)} calibration examples, "
                   f"{settings.steps} steps, {cpus:g} CPU, {g:g} GPU")
        try:
            with report.bar("router", 1):
                cluster.run_tasks(run_router_job, [job], cluster.Resources(num_cpus=cpus, num_gpus=g),
                                  on_result=lambda j, r: result.update(r), on_error=lambda j, e: errors.append(e),
                                  progress=lambda j: report.advance())
        finally:
            remove_temps(out)
    if errors:
        raise RecycleError(f"router training for {name} failed: {errors[0]}", exit_code=1)
    state = {"path": str(out), "sha256": sha256_file(out), "key": key, "settings": settings.to_dict(),
             "calibration": source, **{k: result[k] for k in ("steps", "loss_start", "loss_end", "balance_start",
                                                               "balance_end", "examples", "seconds")}}
    registry.set_composition_state(name, "router", state, expect_settings=row["settings"])
    what = "distillation KL" if settings.objective == "distill" else "LM loss"
    report.ok(f"{name}: {what} {result['loss_start']:.4f} → {result['loss_end']:.4f}, balance "
              f"{result['balance_start']:.3f} → {result['balance_end']:.3f}, {result['seconds']:.0f} s")
    return {**state, "status": "trained"}
