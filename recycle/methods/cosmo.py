"""``cosmo``: a COSMO gate (Atzmon & Chechik, 2019; SPEC §3) between a seen side and an
unseen side, with adaptive confidence smoothing, and a fallback toward the base model for
inputs no expert fits.

"Seen" means the input belongs to a task one of the members was trained on; "unseen" that it
does not. Per example, over its answer choices:

- **Task identifier**: a Gaussian classifier over the members with a shared covariance:
  expert e's prototype is the mean, over a sample of e's own training prompts, of the base
  model's last hidden state averaged over the prompt's tokens; the covariance is the pooled
  within-expert scatter (each expert's scatter matrix, a summary of its own data, summed),
  shrunk toward a multiple of the identity (``SHRINK``). ``D_e(x)`` is the Mahalanobis
  distance, the posterior ``softmax(−D_e/2)``. Only summary vectors leave an expert's data.
- **Seen side** ``P_S``: the identified expert's answer distribution (``seen = "top1"``), or
  the top-3 experts' distributions mixed by the renormalised posterior (``"posterior"``).
- **Unseen side** ``P_U``: a token-routed composition over the same members, Arrow top-2 by
  default (``--unseen method:arrow``; PHATGOOSE top-2 with ``method:phatgoose``, the default
  before issue 30 chose Arrow by its folds' H and the 36-expert library's held-out tasks; a
  composition stored with ``unseen = ""`` keeps PHATGOOSE) or any stored composition
  (``--unseen NAME``), mixed with the base model's
  distribution by ``q(x)``, a second logistic regression trained (on the folds' pseudo-unseen
  examples) to tell when routing beats the base model: ``P_U = q P_routed + (1 − q) P_base``
  (``far = False``: ``q = 1``).
- **Gate** (COSMO): ``g(x) = P(seen | x)``, a logistic regression (C = 1) on the top-K
  (K = 5, zero-padded) sorted probabilities of the identifier's posterior, of the seen
  side's answers at temperature 3 and of the routed side's answers, plus ``log(D_min / d)``
  (the distance to the nearest prototype: an out-of-distribution score; an addition to
  COSMO's features); standardised features. ``p_U = σ((θ − g) / T)``.
- **Combination**: adaptive smoothing ``P = p_U [P_U + (1 − p_U)/n] + (1 − p_U) [P_S + p_U/n]``,
  renormalised (n = the number of choices). With both sides over the same n choices the
  smoothing terms add the same amount to every choice: they change the calibration of P,
  not its argmax (the seen and unseen classes of the paper do not overlap; here they do).

The gate is trained by ``recycle train NAME`` (:func:`train_gate`) by leaving experts out:
the members are split into folds (at random, or ``--leave-out families``: whole task families
a fold, so that a pseudo-unseen task has no seen task of its kind, as a far task has none);
in fold f the held-out members' tasks act as unseen, the
identifier, the seen side and the unseen composition are rebuilt from the other members
(a trained unseen composition in its untrained form), and features are computed on the
validation splits of every member's task (never on a task without an expert here). The
logistic regressions are fitted on all folds' examples, and θ, T are chosen on them to
maximise H. The folds' work runs as Ray tasks that share passes (:func:`fold_results`):
the embeddings, the base model's scores and the prototypes once, a routed pass per fold, and
each (example, expert) pair the seen sides need once, whichever folds need it.

Scores of a COSMO composition are ``log P`` per choice; its evaluations also store per
example ``p_seen``, the identified expert, ``q`` and every side's scores (so the ablations of
benchmarks/cosmo.py are computed from one evaluation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from recycle import cluster
from recycle.console import Reporter
from recycle.errors import RecycleError
from recycle.methods.method import Method, Plan, Scored, own_examples, setting
from recycle.settings import GateTrainSettings, Settings  # noqa: F401  (re-exported)

K = 5  # top-K sorted probabilities per feature block (COSMO)
SEEN_TEMPERATURE = 3.0  # the seen side's answers at T = 3 in the gate features (COSMO)
SHRINK = 0.1  # covariance shrinkage toward (trace/d) I
PROTOTYPE_EXAMPLES = 200  # own training prompts per expert for its prototype and scatter
POSTERIOR_TOP = 3  # experts mixed by the seen side in "posterior" mode
THETAS = [i / 100 for i in range(0, 101)]
TEMPERATURES = [0.01, 0.03, 0.1, 0.3, 1.0]


@dataclass(frozen=True)
class CosmoSettings(Settings):
    unseen: str = setting("method:arrow", "the unseen side: method:arrow (Arrow top-2 over the members), "
                          "method:phatgoose (PHATGOOSE top-2; the default before, stored as '') or a stored "
                          "composition's name")
    seen: str = setting("top1", "seen side: top1 (the identified expert) or posterior (top-3 experts mixed)",
                        choices=("top1", "posterior"))
    far: bool = setting(True, "mix the base model into the unseen side where routing does not help (--no-far: off)")
    smoothing: str = setting("adaptive", "adaptive (COSMO), constant or none", choices=("adaptive", "constant", "none"))
    gate: str = setting("soft", "soft (COSMO) or hard (all to the side the gate prefers)", choices=("soft", "hard"))

    def __post_init__(self):
        super().__post_init__()
        if ":" in self.unseen and self.unseen not in ROUTED:
            raise RecycleError(f"--unseen {self.unseen!r}: choose from {', '.join(ROUTED)} or a stored composition")


# the unseen sides built over the members themselves; '' is what compositions stored before
# the default became Arrow (issue 30) hold for PHATGOOSE
ROUTED = {"method:arrow": "arrow", "method:phatgoose": "phatgoose"}
ROUTED_STORED = {"": "phatgoose", **ROUTED}


# ---- the pieces, as pure functions -----------------------------------------------------


def probs(scores: list[float], temperature: float = 1.0) -> torch.Tensor:
    """An answer distribution from rank-classification scores (mean log-probs as logits)."""
    import torch

    return torch.softmax(torch.tensor(scores, dtype=torch.float64) / temperature, -1)


def top_sorted(p: torch.Tensor, k: int = K) -> torch.Tensor:
    """The ``k`` largest values of ``p``, descending, zero-padded to ``k``."""
    import torch

    v = torch.sort(p, descending=True).values[:k]
    return torch.cat([v, v.new_zeros(k - v.numel())])


def member_stats(h: torch.Tensor) -> dict:
    """Sufficient statistics of one expert's prompt vectors ``h`` [n, d]: n, mean, scatter."""
    h = h.double()
    mean = h.mean(0)
    c = h - mean
    return {"n": h.shape[0], "mean": mean, "scatter": c.T @ c}


def identifier(stats: dict[str, dict], names: list[str]) -> dict:
    """The Gaussian classifier over ``names``: prototypes [E, d] and the shrunk shared
    precision matrix [d, d]."""
    import torch

    means = torch.stack([stats[n]["mean"] for n in names])
    dof = max(1, sum(stats[n]["n"] for n in names) - len(names))
    cov = sum(stats[n]["scatter"] for n in names) / dof
    d = cov.shape[0]
    cov = (1 - SHRINK) * cov + SHRINK * (torch.trace(cov) / d) * torch.eye(d, dtype=cov.dtype)
    return {"names": list(names), "means": means, "precision": torch.linalg.inv(cov)}


def identify(ident: dict, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior over the identifier's experts [n, E] and ``D_min / d`` [n] for vectors ``h``."""
    import torch

    means, h = ident["means"], h.double()
    rows = max(1, (1 << 24) // max(1, means.numel()))  # [rows, E, d] differences at a time (128 MiB)
    parts = []
    for i in range(0, h.shape[0], rows):
        diff = h[i:i + rows].unsqueeze(1) - means.unsqueeze(0)  # [rows, E, d]
        parts.append(torch.einsum("ned,df,nef->ne", diff, ident["precision"], diff))
    dist = torch.cat(parts) if parts else h.new_zeros(0, means.shape[0])
    return torch.softmax(-dist / 2, -1), dist.min(-1).values / h.shape[-1]


def features(posterior: torch.Tensor, p_seen_answers: torch.Tensor, p_routed: torch.Tensor, d_min: float) -> torch.Tensor:
    """The gate's features for one example (see the module docstring)."""
    import torch

    return torch.cat([top_sorted(posterior), top_sorted(p_seen_answers), top_sorted(p_routed),
                      torch.tensor([math.log(max(d_min, 1e-12))], dtype=torch.float64)])


def fit_logistic(x: torch.Tensor, y: torch.Tensor, c: float = 1.0) -> dict:
    """L2 logistic regression as scikit-learn fits it (``C Σ log-loss + ½‖w‖²``, bias not
    penalised), on standardised features, by L-BFGS. Returns mean, std, w, b."""
    import torch

    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = c * torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="sum") + 0.5 * w @ w
        loss.backward()
        return loss

    opt.step(closure)
    return {"mean": mean, "std": std, "w": w.detach(), "b": b.detach()}


def predict_logistic(lr: dict, x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.sigmoid(((x.double() - lr["mean"]) / lr["std"]) @ lr["w"] + lr["b"])


def combine(p_seen_side: torch.Tensor, p_unseen_side: torch.Tensor, g: float, theta: float, temperature: float,
            smoothing: str = "adaptive", gate: str = "soft", gamma: float = 0.5) -> tuple[torch.Tensor, float]:
    """COSMO's combination of the two sides' answer distributions for one example; returns
    the distribution and ``p_U``."""
    p_u = 1 / (1 + math.exp(-(theta - g) / temperature))
    if gate == "hard":
        p_u = float(p_u > 0.5)
    n = p_seen_side.numel()
    if smoothing == "adaptive":
        p = p_u * (p_unseen_side + (1 - p_u) / n) + (1 - p_u) * (p_seen_side + p_u / n)
    elif smoothing == "constant":
        p = p_u * (gamma * p_unseen_side + (1 - gamma) / n) + (1 - p_u) * (gamma * p_seen_side + (1 - gamma) / n)
    else:
        p = p_u * p_unseen_side + (1 - p_u) * p_seen_side
    return p / p.sum(), p_u


def _sub_plan(part: dict, keep: list[str] | None = None) -> Plan:
    p = Plan.from_dict(part)
    if keep is not None:
        p.members = [m for m in p.members if m.name in keep]
        p.state = {}  # a trained part is rebuilt untrained over a subset of its members
    return p


class Sides:
    """Every side's scores for a list of examples, computed in turn on one base model."""

    def __init__(self, plan: Plan, model, tokenizer, batch_size: int, max_length: int, trunk=None):
        self.plan, self.model, self.tok = plan, model, tokenizer
        self.kw = {"batch_size": batch_size, "max_length": max_length}
        self.trunk = trunk  # the layers below every member's, shared by the sides' scoring passes

    def embed(self, examples) -> torch.Tensor:
        from recycle.scoring import embed_prompts

        return embed_prompts(self.model, self.tok, examples, **self.kw)

    def member_stats(self) -> dict[str, dict]:
        """Every member's prototype statistics (:func:`member_stats` of its own prompts'
        vectors), each computed once and cached in the artifacts, keyed by what it is made
        of (the base, the member's own example sample, batch size and length): folds,
        compositions and evaluations over the same expert read it back. Members whose
        samples are equal share one file and one object."""
        import torch

        from recycle.data import Example
        from recycle.files import load_tensors, save_tensors
        from recycle.methods.method import cache_path

        out, by_path = {}, {}
        for m in self.plan.members:
            data = self.plan.data[m.name]
            key = {"kind": "cosmo-prototype", "base": self.plan.base, "examples": data, **self.kw}
            path = cache_path(self.plan, "prototypes", key)
            if path not in by_path:
                try:
                    t = load_tensors(path, "prototype") if path.is_file() else None
                except RecycleError:
                    t = None
                if t is None:
                    exs = [Example(p, None, a, None, txt) for p, a, txt in data]
                    s = member_stats(self.embed(exs))
                    t = {"n": torch.tensor(s["n"]), "mean": s["mean"], "scatter": s["scatter"]}
                    save_tensors(path, t)
                by_path[path] = {"n": int(t["n"]), "mean": t["mean"], "scatter": t["scatter"]}
            out[m.name] = by_path[path]
        return out

    def experts(self, examples, assignment: list[str], names: list[str]) -> list:
        """Each example scored by the expert ``assignment[i]`` (one of ``names``)."""
        from recycle.routing import ExampleRouter, install_routed, load_expert
        from recycle.scoring import score_choices

        if not examples:
            return []
        members = {m.name: m for m in self.plan.members}
        used = set(assignment)  # only the experts some example is assigned to are read and installed
        experts = [load_expert(members[n].path, n, members[n].sha256, lazy=True) for n in names if n in used]
        with install_routed(self.model, experts, lambda layer: ExampleRouter("cosmo-seen"), "cosmo-seen") as h:
            def on_rows(rows):
                h.set_examples([assignment[i] for i in rows])

            return score_choices(self.model, self.tok, examples, on_rows=on_rows, trunk=self.trunk, **self.kw)

    def routed(self, examples, tasks, keep: list[str] | None = None, record: bool = False):
        from recycle import methods

        part = _sub_plan(self.plan.data["parts"]["unseen"], keep)
        scorer = methods.get(part.method).scorer(part, self.model, self.tok)
        kw = {"trunk": self.trunk} if self.trunk is not None and methods.get(part.method).shares_trunk else {}
        try:
            return scorer.score(examples, tasks, record=record, **self.kw, **kw)
        finally:
            scorer.close()

    def base(self, examples) -> list:
        from recycle.scoring import score_choices

        return score_choices(self.model, self.tok, examples, trunk=self.trunk, **self.kw)

    def seen(self, examples, posterior: torch.Tensor, names: list[str], modes=("top1",)) -> tuple[dict, list[str]]:
        """The seen side's answer distributions (as log-probs) in each of ``modes`` (top1:
        the identified expert; posterior: the top experts mixed by the posterior), and the
        identified experts."""
        return seen_sides(posterior, names, lambda pick: self.experts(examples, pick, names), modes)


def seen_sides(posterior: torch.Tensor, names: list[str], score, modes=("top1",)) -> tuple[dict, list[str]]:
    """:meth:`Sides.seen` given ``score(pick)``: every example's answer scores under the
    expert ``pick[i]`` (one expert per example)."""
    import torch

    order = torch.argsort(posterior, -1, descending=True)
    top1 = [names[int(i)] for i in order[:, 0]]
    first = [probs(s) for s in score(top1)]
    out = {}
    if "top1" in modes:
        out["top1"] = [p.log().tolist() for p in first]
    if "posterior" in modes:
        n = posterior.shape[0]
        weight = [posterior[i, order[i, 0]].item() for i in range(n)]
        mixed = [w * p for w, p in zip(weight, first)]
        for r in range(1, min(POSTERIOR_TOP, len(names))):
            pick = [names[int(i)] for i in order[:, r]]
            for i, sc in enumerate(score(pick)):
                w = posterior[i, order[i, r]].item()
                mixed[i] = mixed[i] + w * probs(sc)
                weight[i] += w
        out["posterior"] = [(m / w).log().tolist() for m, w in zip(mixed, weight)]
    return out, top1


class CosmoScorer:
    """Scores with a trained COSMO gate (see the module docstring)."""

    def __init__(self, plan: Plan, model, tokenizer):
        from recycle.files import load_tensors, tensor_metadata

        self.plan, self.model, self.tok = plan, model, tokenizer
        self.s = CosmoSettings(**plan.settings)
        path = METHOD.trained_file(plan)
        t = load_tensors(path, "COSMO gate")
        meta = tensor_metadata(path)
        self.ident = {"names": meta["members"], "means": t["means"], "precision": t["precision"]}
        self.gate = {k: t[f"gate.{k}"] for k in ("mean", "std", "w", "b")}
        self.far = {k: t[f"far.{k}"] for k in ("mean", "std", "w", "b")} if "far.w" in t else None
        self.theta, self.temperature = meta["theta"][self.s.seen], meta["temperature"][self.s.seen]

    def close(self) -> None:
        pass

    def score(self, examples, tasks, *, batch_size: int = 16, max_length: int = 256, record: bool = False,
              trunk=None) -> Scored:
        sides = Sides(self.plan, self.model, self.tok, batch_size, max_length, trunk)
        names = self.ident["names"]
        posterior, d_min = identify(self.ident, sides.embed(examples))
        seen, chosen = sides.seen(examples, posterior, names, (self.s.seen,))
        seen_scores = seen[self.s.seen]
        routed = sides.routed(examples, tasks, record=record)
        base = sides.base(examples) if (self.s.far and self.far is not None) else None
        out, p_seen, gs, qs = [], [], [], []
        for i in range(len(examples)):
            ps = probs(seen_scores[i])
            pr = probs(routed.scores[i])
            x = features(posterior[i], probs(seen_scores[i], SEEN_TEMPERATURE), pr, float(d_min[i]))
            g = float(predict_logistic(self.gate, x.unsqueeze(0)))
            q = 1.0
            if base is not None:
                q = float(predict_logistic(self.far, far_features(pr, probs(base[i]), float(d_min[i])).unsqueeze(0)))
                pu = q * pr + (1 - q) * probs(base[i])
            else:
                pu = pr
            p, p_u = combine(ps, pu, g, self.theta, self.temperature, self.s.smoothing, self.s.gate)
            out.append(p.clamp_min(1e-300).log().tolist())
            p_seen.append(1 - p_u)
            gs.append(g)
            qs.append(q)
        extra = {"p_seen": p_seen, "g": gs, "q": qs,
                 "seen_expert": chosen, "d_min": [float(v) for v in d_min],
                 "seen_scores": seen_scores, "routed_scores": routed.scores}
        if base is not None:
            extra["base_scores"] = base
        return Scored(out, None, routed.stats, extra)

    def explain(self, example, task, max_length: int = 256):
        """Both sides of one example: the expert the identifier chose and its answer
        distribution, the routed side's (with the experts it used per module), the base
        model's share of the unseen side, and the gate's p(seen)."""
        from recycle import methods

        part = _sub_plan(self.plan.data["parts"]["unseen"])
        routed_scorer = methods.get(part.method).scorer(part, self.model, self.tok)
        try:
            _, routing = routed_scorer.explain(example, task, max_length=max_length)
        finally:
            routed_scorer.close()
        scored = self.score([example], [task], batch_size=1, max_length=max_length)
        e = scored.extra

        def dist(scores):
            return {c: round(float(p), 6) for c, p in zip(example.choices, probs(scores))}

        return scored.scores[0], {
            "p_seen": e["p_seen"][0],
            "seen": {"expert": e["seen_expert"][0], "answers": dist(e["seen_scores"][0])},
            "unseen": {"answers": dist(e["routed_scores"][0]), "base_share": 1 - e["q"][0], "experts": routing},
        }


def far_features(p_routed: torch.Tensor, p_base: torch.Tensor, d_min: float) -> torch.Tensor:
    """Features of the routed-or-base choice for one example."""
    import torch

    return torch.cat([top_sorted(p_routed), top_sorted(p_base),
                      torch.tensor([math.log(max(d_min, 1e-12))], dtype=torch.float64)])


# ---- training the gate by leaving experts out ------------------------------------------


@dataclass
class FoldJob(cluster.Job):
    plan: dict
    fold: int
    keep: list  # members kept (seen) in this fold
    held: list  # members held out (their tasks act as unseen)
    examples: list  # recycle.data.Example
    tasks: list  # task of each example
    batch_size: int = 16
    max_length: int = 256
    stats: bool = False  # also return every member's prototype statistics


def run_fold_job(job: FoldJob) -> dict:
    """One fold alone: every side's scores and the identifier over the kept members, for
    every validation example of every member task. The definition :func:`fold_results`
    computes for all folds at once without repeating a pass (and is tested against)."""
    import torch

    from recycle.basemodels import load_base, resolve_base

    torch.set_num_threads(max(1, int(job.threads)))
    t0 = time.time()
    plan = Plan.from_dict(job.plan)
    model, tok = load_base(resolve_base(plan.base), dtype=job.dtype)
    device = cluster.device(job.device)
    model.to(device)
    sides = Sides(plan, model, tok, job.batch_size, job.max_length)
    stats = sides.member_stats()
    ident = identifier(stats, job.keep)
    posterior, d_min = identify(ident, sides.embed(job.examples))
    seen, chosen = sides.seen(job.examples, posterior, job.keep, ("top1", "posterior"))
    routed = sides.routed(job.examples, job.tasks, keep=job.keep).scores
    base = sides.base(job.examples)
    out = {"fold": job.fold, "keep": job.keep, "held": job.held, "tasks": job.tasks,
           "labels": [ex.label for ex in job.examples], "posterior": posterior.tolist(), "d_min": d_min.tolist(),
           "seen": seen, "chosen": chosen, "routed": routed, "base": base,
           "seconds": time.time() - t0}
    if job.stats:
        out["stats"] = {n: {"n": s["n"], "mean": s["mean"], "scatter": s["scatter"]} for n, s in stats.items()}
    return out


@dataclass
class SideJob(cluster.Job):
    """One pass of the folds' work (:func:`fold_results`): ``shared`` (the prompts'
    embeddings, the base model's scores, every member's prototype statistics: the same in
    every fold), ``routed`` (fold ``fold``'s routed side over ``keep``) or ``experts`` (each
    example scored by the expert ``assignment[i]``: the seen sides' (example, expert) pairs
    of all folds, each once)."""

    plan: dict
    kind: str
    examples: list  # recycle.data.Example
    tasks: list | None = None
    keep: list | None = None
    fold: int = -1
    assignment: list | None = None
    batch_size: int = 16
    max_length: int = 256


def run_side_job(job: SideJob) -> dict:
    import torch

    from recycle.basemodels import load_base, resolve_base

    torch.set_num_threads(max(1, int(job.threads)))
    t0 = time.time()
    plan = Plan.from_dict(job.plan)
    model, tok = load_base(resolve_base(plan.base), dtype=job.dtype)
    model.to(cluster.device(job.device))
    sides = Sides(plan, model, tok, job.batch_size, job.max_length)
    out: dict = {"kind": job.kind, "fold": job.fold}
    if job.kind == "shared":
        stats = sides.member_stats()
        out["stats"] = {n: {"n": v["n"], "mean": v["mean"], "scatter": v["scatter"]} for n, v in stats.items()}
        out["h"] = sides.embed(job.examples)
        out["base"] = sides.base(job.examples)
    elif job.kind == "routed":
        out["routed"] = sides.routed(job.examples, job.tasks, keep=job.keep).scores
    else:
        names = [m.name for m in plan.members]
        out["scores"] = sides.experts(job.examples, job.assignment, names)
    out["seconds"] = time.time() - t0
    return out


def fold_results(plan: Plan, examples: list, tasks: list, splits: list[list[str]], settings: GateTrainSettings,
                 *, cpus: float = 1.0, gpus: float | None = None, address: str | None = None,
                 report: Reporter | None = None) -> list[dict]:
    """What :func:`run_fold_job` returns for each fold (``splits[f]``: the members it holds
    out), computed without repeating a pass: the embeddings, base scores and prototype
    statistics once (the same in every fold), one routed pass per fold, and every (example,
    expert) pair the folds' seen sides need scored once, however many folds need it (an
    example's identified expert is the same in every fold that keeps it). Two waves of Ray
    tasks: the shared pass beside the routed ones, then the pairs."""
    import torch

    report = report or Reporter()
    names = [m.name for m in plan.members]
    pd = plan.to_dict()
    kw = {"batch_size": settings.batch_size, "dtype": settings.dtype}
    keeps = [[n for n in names if n not in held] for held in splits]
    done: dict = {}
    errors: list[str] = []
    memory: list[dict] = []

    def got(job, r):
        done[(r["kind"], r["fold"])] = r
        memory.append(r.get("memory") or {})
        report.ok(f"{job.kind}{'' if job.fold < 0 else f' fold {job.fold}'}: {r['seconds']:.0f} s")

    def wave(jobs, what):
        cluster.run(METHOD.train_job, jobs, cluster.Resources(cpus, gpus), "folds", got,
                    on_error=lambda j, e: (errors.append(e), report.fail(f"{j.kind} {j.fold}: {e}")),
                    address=address, report=report, what=what)
        if errors:
            raise RecycleError(f"COSMO gate training failed: {errors[0]}", exit_code=1)

    first = [SideJob(pd, "shared", examples, **kw)]
    first += [SideJob(pd, "routed", examples, tasks, keep=k, fold=f, **kw) for f, k in enumerate(keeps)]
    wave(first, f"COSMO folds: the shared pass and {len(keeps)} routed passes over {len(examples)} examples")
    shared = done[("shared", -1)]
    stats, h = shared["stats"], shared["h"]
    posts = [identify(identifier(stats, k), h) for k in keeps]
    # every (example, expert) pair a fold's seen side asks for, each scored once
    pairs: set = set()
    for (post, _), keep in zip(posts, keeps):
        order = torch.argsort(post, -1, descending=True)[:, :min(POSTERIOR_TOP, len(keep))]
        pairs.update((i, keep[int(j)]) for i, row in enumerate(order.tolist()) for j in row)
    pairs_sorted = sorted(pairs, key=lambda p: (p[1], p[0]))  # by expert: each job installs few
    chunks = max(1, min(len(keeps), len(pairs_sorted) // 64))
    step = -(-len(pairs_sorted) // chunks)
    parts = [pairs_sorted[i:i + step] for i in range(0, len(pairs_sorted), step)]
    wave([SideJob(pd, "experts", [examples[i] for i, _ in part], assignment=[e for _, e in part], fold=c, **kw)
          for c, part in enumerate(parts)],
         f"COSMO folds: {len(pairs_sorted)} (example, expert) pairs of the seen sides "
         f"({len(pairs_sorted) / max(1, len(examples)):.1f} an example, against "
         f"{len(keeps) * min(POSTERIOR_TOP, len(names))} fold by fold)")
    score = {}
    for c, part in enumerate(parts):
        score.update(zip(part, done[("experts", c)]["scores"]))
    peak = max(memory, key=lambda m: m.get("peak_rss_mib", 0)) if memory else {}
    out = []
    for f, ((post, d_min), keep) in enumerate(zip(posts, keeps)):
        seen, chosen = seen_sides(post, keep, lambda pick: [score[(i, e)] for i, e in enumerate(pick)],
                                  ("top1", "posterior"))
        out.append({"fold": f, "keep": keep, "held": splits[f], "tasks": tasks,
                    "labels": [ex.label for ex in examples], "posterior": post.tolist(), "d_min": d_min.tolist(),
                    "seen": seen, "chosen": chosen, "routed": done[("routed", f)]["routed"],
                    "base": shared["base"], "seconds": done[("routed", f)]["seconds"], "memory": peak})
    out[0]["stats"] = stats
    return out


def fold_split(names: list[str], folds: int, seed: int, groups: dict[str, str] | None = None) -> list[list[str]]:
    """The members held out in each fold: ``names`` shuffled (``seed``) and dealt into
    ``folds``; with ``groups`` (member -> its task's family), whole groups, shuffled, then
    placed largest first into the fold holding the fewest members (at most one fold a group)."""
    import random

    if groups is None:
        order = list(names)
        random.Random(seed).shuffle(order)
        folds = min(folds, len(order))
        return [order[i::folds] for i in range(folds)]
    by: dict[str, list[str]] = {}
    for n in names:
        by.setdefault(groups[n], []).append(n)
    if len(by) < 2:
        raise RecycleError(f"leaving families out needs members of at least 2 task families, not {len(by)}")
    order = sorted(by)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(by[g]))  # stable: equal sizes keep the shuffled order
    out: list[list[str]] = [[] for _ in range(min(folds, len(order)))]
    for g in order:
        min(out, key=len).extend(by[g])
    return out


def search_threshold(rows: list[dict], seen_side: list, unseen_side: list, g: torch.Tensor) -> tuple:
    """θ and T (over ``THETAS`` × ``TEMPERATURES``) that maximise H over the fold examples
    ``rows``, where a group is a task in a fold; returns ``(θ, T, {S, U, H})``. Vectorised:
    over the same choices, the combination's argmax is that of ``p_U P_U + (1 − p_U) P_S``
    (the smoothing terms add the same to every choice)."""
    import torch

    width = max(p.numel() for p in seen_side)

    def padded(ps):
        out = torch.full((len(ps), width), -1.0, dtype=torch.float64)
        for i, p in enumerate(ps):
            out[i, : p.numel()] = p
        return out

    ps, pu = padded(seen_side), padded(unseen_side)
    labels = torch.tensor([r["label"] for r in rows])
    keys = sorted({(r["fold"], r["task"]) for r in rows})
    group = torch.tensor([keys.index((r["fold"], r["task"])) for r in rows])
    seen = torch.tensor([next(r["seen"] for r in rows if (r["fold"], r["task"]) == k) for k in keys])
    counts = torch.bincount(group, minlength=len(keys)).double()
    best = None
    for temp in TEMPERATURES:
        for theta in THETAS:
            p_u = torch.sigmoid((theta - g.double()) / temp).unsqueeze(1)
            mixed = torch.where(ps >= 0, p_u * pu + (1 - p_u) * ps, torch.full_like(ps, -1.0))
            right = (mixed.argmax(1) == labels).double()
            acc = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, group, right) / counts
            s_acc, u_acc = acc[seen], acc[~seen]
            S = float(s_acc.mean()) if s_acc.numel() else float("nan")
            U = float(u_acc.mean()) if u_acc.numel() else float("nan")
            H = 2 * S * U / (S + U) if S + U > 0 else 0.0
            if best is None or H > best[2]["H"] + 1e-12:
                best = (theta, temp, {"S": S, "U": U, "H": H})
    return best


def fit_gate(results: list[dict], member_task: dict[str, str]) -> dict:
    """Fit the gate (and the far regression) on the folds and choose θ, T per seen mode to
    maximise H; returns the fitted pieces and the fold metrics."""
    import torch

    from recycle.stats import auc, expected_calibration_error

    rows = []  # one per (fold, example)
    for r in results:
        kept_tasks = {member_task[n] for n in r["keep"]}
        for i, task in enumerate(r["tasks"]):
            rows.append({"fold": r["fold"], "task": task, "seen": task in kept_tasks, "label": r["labels"][i],
                         "posterior": torch.tensor(r["posterior"][i], dtype=torch.float64), "d_min": r["d_min"][i],
                         "seen_scores": {m: r["seen"][m][i] for m in r["seen"]}, "routed": r["routed"][i],
                         "base": r["base"][i]})
    y = torch.tensor([float(x["seen"]) for x in rows], dtype=torch.float64)
    out = {"theta": {}, "temperature": {}, "metrics": {}}
    # the far regression: where routing and the base model disagree on the pseudo-unseen examples
    far_x, far_y = [], []
    for x in rows:
        if x["seen"]:
            continue
        pr, pb = probs(x["routed"]), probs(x["base"])
        r_ok, b_ok = int(pr.argmax()) == x["label"], int(pb.argmax()) == x["label"]
        if r_ok != b_ok:
            far_x.append(far_features(pr, pb, x["d_min"]))
            far_y.append(float(r_ok))
    far = None
    if len(far_y) >= 20 and 0 < sum(far_y) < len(far_y):
        far = fit_logistic(torch.stack(far_x), torch.tensor(far_y, dtype=torch.float64))
    out["far"] = far
    out["metrics"]["far_examples"] = len(far_y)
    for mode in ("top1", "posterior"):
        x = torch.stack([features(r["posterior"], probs(r["seen_scores"][mode], SEEN_TEMPERATURE), probs(r["routed"]),
                                  r["d_min"]) for r in rows])
        lr = fit_logistic(x, y)
        g = predict_logistic(lr, x)
        pu_side = []
        for r in rows:
            pr = probs(r["routed"])
            if far is not None:
                q = float(predict_logistic(far, far_features(pr, probs(r["base"]), r["d_min"]).unsqueeze(0)))
                pr = q * pr + (1 - q) * probs(r["base"])
            pu_side.append(pr)
        theta, temp, h = search_threshold(rows, [probs(r["seen_scores"][mode]) for r in rows], pu_side, g)
        out["theta"][mode], out["temperature"][mode] = theta, temp
        out[f"gate_{mode}"] = lr
        ece = expected_calibration_error(g.tolist(), [bool(v) for v in y.tolist()])
        out["metrics"][mode] = {"S": h["S"], "U": h["U"], "H": h["H"], "auc": auc(g.tolist(), [bool(v) for v in y]),
                                "ece": ece["ece"], "theta": theta, "temperature": temp}
    return out


def gate_key(plan: Plan, settings: dict) -> str:
    """What a gate is trained for: the composition's content without its trained state (its
    method, settings, members and unseen side, whose own content includes its members'
    gates) and the gate's training settings."""
    import dataclasses
    import hashlib
    import json

    bare = dataclasses.replace(plan, state={})
    return hashlib.sha256(json.dumps({"composition": bare.content_key, "settings": settings},
                                     sort_keys=True).encode()).hexdigest()


def train_gate(
    registry,
    name: str,
    settings: GateTrainSettings,
    *,
    force: bool = False,
    address: str | None = None,
    gpus: float | None = None,
    cpus: float = 1.0,
    report: Reporter | None = None,
) -> dict:
    """Train the COSMO gate of stored composition ``name`` by leaving experts out (one Ray
    task per fold) and record it with the composition. Found done (and skipped) for the same
    composition and settings."""
    from recycle import compose as comp
    from recycle.adapters import sha256_file
    from recycle.data import Example
    from recycle.files import save_tensors
    from recycle.methods import get
    from recycle.tasks import load_examples

    report = report or Reporter()
    if cpus <= 0:
        raise RecycleError(f"--cpus must be positive, not {cpus}")
    row = registry.composition(name)
    if get(row["method"]).trains != "train-cosmo-gate":
        raise RecycleError(f"composition {name} is {row['method']}: it has no COSMO gate to train")
    settings = settings.with_dtype(cluster.resolve_dtype(settings.dtype, gpus))  # part of the key unless float32
    plan = comp.plan(registry, composition=name, data_seed=settings.seed)
    plan.state = {}
    key = gate_key(plan, settings.to_dict())
    old = None if force else METHOD.found_done(row, key)
    if old:
        report.say(f"skip {name}: gate trained with these settings ({key[:12]}); --force retrains")
        return {**old, "status": "skipped"}
    registry.check_writable()
    names = [m.name for m in plan.members]
    member_task = {m.name: m.task for m in plan.members}
    examples, tasks = [], []
    for task in dict.fromkeys(member_task.values()):
        for ex in load_examples(registry, task, "validation", n=settings.examples, seed=settings.seed):
            if ex.choices:
                examples.append(Example(ex.prompt, ex.choices, ex.answer, ex.label, ex.text))
                tasks.append(task)
    if not examples:
        raise RecycleError(f"{name}: the members' tasks have no validation examples with answer choices")
    groups = None
    if settings.leave_out == "families":
        from recycle.results import task_families

        family = task_families(registry, list(dict.fromkeys(member_task.values())))
        groups = {n: family.get(t) or f"task {t}" for n, t in member_task.items()}  # no family: its own
    splits = fold_split(names, settings.folds, settings.seed, groups)
    t0 = time.time()
    results = fold_results(plan, examples, tasks, splits, settings, cpus=cpus, gpus=gpus, address=address,
                           report=report)
    report.ok(f"{name}: {len(splits)} folds over {len(examples)} validation examples of {len(set(tasks))} member "
              f"tasks: {time.time() - t0:.0f} s")
    fitted = fit_gate(results, member_task)
    stats = results[0]["stats"]
    ident = identifier(stats, names)
    tensors = {"means": ident["means"], "precision": ident["precision"]}
    mode = CosmoSettings(**plan.settings).seen
    for k, v in fitted[f"gate_{mode}"].items():
        tensors[f"gate.{k}"] = v
    if fitted["far"] is not None:
        tensors.update({f"far.{k}": v for k, v in fitted["far"].items()})
    meta = {"composition": name, "key": key, "members": names, "settings": settings.to_dict(),
            "theta": fitted["theta"], "temperature": fitted["temperature"], "metrics": fitted["metrics"],
            "folds": [r["held"] for r in results]}
    out = METHOD.state_path(registry, name, key)
    save_tensors(out, tensors, meta)
    state = {"path": str(out), "sha256": sha256_file(out), "key": key, "settings": settings.to_dict(),
             "folds": meta["folds"], "metrics": fitted["metrics"], "theta": fitted["theta"],
             "temperature": fitted["temperature"], "dtype": settings.dtype,
             "memory": max((r.get("memory") or {} for r in results), key=lambda m: m.get("peak_rss_mib", 0))}
    METHOD.record_state(registry, row, state)
    m = fitted["metrics"][mode]
    report.ok(f"{name}: gate on {len(results)} folds: AUC {m['auc']:.3f}, ECE {m['ece']:.3f}, fold S {m['S']:.3f} "
              f"U {m['U']:.3f} H {m['H']:.3f} (θ {m['theta']:.2f}, T {m['temperature']:g})")
    return {**state, "status": "trained"}


# ---- the method ----------------------------------------------------------------------------


class Cosmo(Method):
    name = "cosmo"
    summary = "COSMO: a seen/unseen gate between the identified expert and a routed composition (recycle train)"
    Settings = CosmoSettings
    needs = "task"
    in_default_eval = False
    shares_trunk = True  # its seen, routed and base sides score the same examples: one trunk for all
    TrainSettings = GateTrainSettings
    state_key, state_what = "gate", "COSMO gate"
    trains = "train-cosmo-gate"
    train_job = staticmethod(run_side_job)

    def plan_members(self, registry, experts):
        members = super().plan_members(registry, experts)
        if len(members) < 2:
            raise RecycleError("cosmo needs at least two members (folds leave experts out)")
        return members

    def check_stored(self, registry, name, settings, members, base):
        """``--unseen`` names another stored composition, not a COSMO one, over the same base
        and the same members (what :meth:`gather` needs when the composition is used)."""
        unseen = settings.unseen
        if unseen in ROUTED_STORED:
            return
        if unseen == name:
            raise RecycleError(f"--unseen {unseen}: a composition cannot be its own unseen side")
        other = registry.composition_or_none(unseen)
        if other is None:
            known = [c["name"] for c in registry.compositions() if c["method"] != self.name]
            raise RecycleError(f"--unseen {unseen!r}: no stored composition of that name (store one first, e.g. "
                               f"recycle compose pg --method phatgoose --all; stored: {', '.join(known) or 'none'})")
        if other["method"] == self.name:
            raise RecycleError(f"--unseen {unseen}: a COSMO composition cannot be the unseen side of another")
        if other.get("base_model") != base:
            raise RecycleError(f"--unseen {unseen}: it is over base model {other.get('base_model')}, not {base}")
        if sorted((m["name"], m["sha256"]) for m in other["members"]) != sorted((m.name, m.sha256) for m in members):
            raise RecycleError(f"--unseen {unseen}: its members differ from this composition's")

    def gather(self, registry, plan, seed=0):
        from recycle import compose

        own_examples(registry, plan, PROTOTYPE_EXAMPLES, seed)
        s = self.settings(plan.settings)
        if s.unseen in ROUTED_STORED:
            part = compose.plan(registry, method=ROUTED_STORED[s.unseen], experts=[m.name for m in plan.members],
                                data_seed=seed)
        else:
            part = compose.plan(registry, composition=s.unseen, data_seed=seed)
            if part.method == self.name:
                raise RecycleError("--unseen: a COSMO composition cannot be the unseen side of another")
            if sorted(part.member_hashes.items()) != sorted(plan.member_hashes.items()):
                raise RecycleError(f"--unseen {s.unseen}: its members differ from this composition's")
        plan.data["parts"] = {"unseen": part.to_dict()}

    def scorer(self, plan, model, tokenizer):
        gate = plan.state.get("gate")
        if not gate:
            raise RecycleError(f"composition {plan.label} has no gate yet: train it with recycle train {plan.label}")
        if gate_key(plan, gate["settings"]) != gate["key"]:  # e.g. its unseen side was stored anew since
            raise RecycleError(f"composition {plan.label}: its gate was trained for another unseen side or other "
                               f"members' gates; retrain it with recycle train {plan.label}")
        return CosmoScorer(plan, model, tokenizer)

    def train(self, registry, name, settings, **kw):
        return train_gate(registry, name, settings, **kw)


METHOD = Cosmo()
