"""Routers: who handles each token at one routed module.

Every router has the same two-method interface, used by :class:`RoutedLoraLinear`:

- ``prepare(layer)``: called once when the layer is installed; precomputes what the router
  needs at that module (e.g. standardised gate vectors) and stores it on the layer.
- ``route(layer, x) -> (idx, weight)``: ``x`` is the module input as the model passed it
  (``[..., d_in]``); returns ``idx`` ``[tokens, k]`` (long, indices into ``layer.expert_names``,
  ``-1`` = no expert, only from routers with ``may_skip = True``) and ``weight``
  ``[tokens, k]``, tokens being ``x`` flattened.

Token routers score every expert present at the module, keep the top-k and weight them
(``weighting="softmax"``: softmax over the kept scores / temperature; ``"sigmoid"``:
``sigmoid(score / temperature)`` per kept expert, non-competitive, not renormalised, SPEC §4).
Example routers (retrieval, oracle, single) give every token of an example the one expert
chosen for that example, with weight 1.

The merged methods (``uniform``, ``base``) need no router: see :mod:`recycle.routing.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from recycle.errors import RecycleError

WEIGHTINGS = ("softmax", "sigmoid")


def select_top_k(
    scores: torch.Tensor,
    top_k: int,
    weighting: str = "softmax",
    temperature: float = 1.0,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``scores`` [tokens, n] and their mixture weights (see module docstring).

    ``scale`` ([tokens, 1], positive): the true scores are ``scores * scale``; only the kept
    ones are scaled (a positive factor per token does not change which are kept).
    """
    k = min(top_k, scores.shape[-1])
    top, idx = _top_k(scores, k)
    if scale is not None:
        top = top * (scale / temperature if temperature != 1.0 else scale)
    elif temperature != 1.0:
        top = top / temperature
    if weighting == "softmax":
        weight = torch.softmax(top, dim=-1)
    elif weighting == "sigmoid":
        weight = torch.sigmoid(top)
    else:
        raise RecycleError(f"unknown weighting {weighting!r} (choose from {', '.join(WEIGHTINGS)})")
    return idx, weight


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=-1)``; for k <= 2 over many rows, k rounds of ``max`` (the
    same values and indices, highest first; ~2.5x faster than topk on CPU for 1024 x 32)."""
    if k > 2 or scores.shape[0] < 256:
        return torch.topk(scores, k, dim=-1)
    top, idx = scores.max(-1, keepdim=True)
    if k == 1:
        return top, idx
    top2, idx2 = scores.scatter(-1, idx, float("-inf")).max(-1, keepdim=True)
    return torch.cat([top, top2], -1), torch.cat([idx, idx2], -1)


def _check_settings(top_k: int, weighting: str, temperature: float) -> None:
    if top_k < 1:
        raise RecycleError(f"top_k must be at least 1, got {top_k}")
    if weighting not in WEIGHTINGS:
        raise RecycleError(f"unknown weighting {weighting!r} (choose from {', '.join(WEIGHTINGS)})")
    if not temperature > 0:
        raise RecycleError(f"temperature must be positive, got {temperature}")


class GateRouter:
    """PHATGOOSE routing (SPEC §1): ``score_i = LN(x) · LN(v_i) / sqrt(d)``, top-k, weighting.

    ``vectors`` maps expert name -> {module path -> v_i [d_in]}; LN is LayerNorm without
    affine parameters. Every expert present at a routed module needs a vector there.
    """

    name = "phatgoose"

    def __init__(
        self,
        vectors: dict[str, dict[str, torch.Tensor]],
        top_k: int = 2,
        weighting: str = "softmax",
        temperature: float = 1.0,
    ):
        _check_settings(top_k, weighting, temperature)
        self.vectors, self.top_k, self.weighting, self.temperature = vectors, top_k, weighting, temperature

    def prepare(self, layer) -> None:
        missing = [n for n in layer.expert_names if layer.path not in self.vectors.get(n, {})]
        if missing:
            raise RecycleError(f"{self.name}: no router vector at {layer.path} for {', '.join(missing)}")
        v = torch.stack([self.vectors[n][layer.path].float().reshape(-1) for n in layer.expert_names])
        if v.shape[1] != layer.in_features:
            raise RecycleError(f"{self.name}: vectors at {layer.path} have size {v.shape[1]}, need {layer.in_features}")
        keys = F.layer_norm(v, (v.shape[1],)) / math.sqrt(v.shape[1])
        dev, dt = layer.weight.device, torch.promote_types(layer.weight.dtype, torch.float32)  # scores in >= fp32
        # [d, N + 1]: the keys and a column of 1/d, so one matmul gives x·k_i and mean(x)
        proj = torch.cat([keys, torch.full((1, v.shape[1]), 1.0 / v.shape[1])]).T.contiguous()
        layer.register_buffer("router_proj", proj.to(dev, dt), persistent=False)

    def route(self, layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, rstd = self._raw_scores(layer, x)
        return select_top_k(raw, self.top_k, self.weighting, self.temperature, scale=rstd)

    def scores(self, layer, x: torch.Tensor) -> torch.Tensor:
        """``LN(x) · k_i`` for every expert i present at ``layer``: ``[tokens, N]``."""
        raw, rstd = self._raw_scores(layer, x)
        return raw * rstd

    @staticmethod
    def _raw_scores(layer, x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x · k_i, 1 / std(x))``: since the keys have zero mean (they are LayerNormed),
        ``LN(x) · k = (x − mean(x)) · k / std(x) = x · k / std(x)``, so LN(x) is never
        materialised; ``var(x) = mean(x²) − mean(x)²`` with ``F.layer_norm``'s eps, in float32
        or wider. That difference loses precision when |mean(x)| ≫ std(x) (relative error
        ~1e-7·mean²/var): a batch with a token where mean² > 1000·var, or any batch off the
        CPU, is centred first (exact)."""
        x = x.reshape(-1, x.shape[-1]).to(layer.router_proj.dtype)
        n = layer.router_proj.shape[1] - 1
        # the check costs a device sync on an accelerator, where centring is cheap: always centre
        if x.device.type == "cpu":
            raw = x @ layer.router_proj
            mean = raw[:, n:]
            var = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).sub_(mean.square())
            if not bool((mean.square() > 1000 * var).any()):
                return raw[:, :n], var.clamp_min_(0).add_(eps).rsqrt_()
        xc = x - x.mean(-1, keepdim=True)
        raw = xc @ layer.router_proj
        return raw[:, :n], xc.square().mean(-1, keepdim=True).add_(eps).rsqrt_()


class AvgActivationRouter(GateRouter):
    """Average-activation routing: router vector = mean module input over the expert's own
    data (:func:`recycle.routing.compute_prototypes`), then routed exactly as PHATGOOSE."""

    name = "avg-activation"


class ArrowRouter:
    """Arrow (Ostapenko et al., 2024), mirroring PEFT's ``ArrowLoraLinearLayer`` (peft 0.21).

    Router vector of expert i = top right-singular vector of ``B_i A_i``, found as PEFT does:
    ``iters`` steps of power iteration on ``Aᵀ(BᵀB)A`` in float32, from ``randn(d_in)`` drawn
    from a ``torch.Generator`` seeded with ``seed`` (the same start for every expert; PEFT's
    ``rng_seed``; ``seed=None`` uses the global RNG as PEFT does). Score ``|x · v_i|`` (sign
    invariant), on the raw input: no LayerNorm, no rank or norm normalisation, scaling ignored
    by the router. Top-k on the raw scores, then ``softmax(top / T)``. Differences from SPEC
    text: none in the formula; the singular vector is PEFT's approximate power iteration,
    not an exact SVD, so choices match PEFT's given the same seed. Unlike PEFT (which needs
    equal ranks and target modules for all experts, and computes all N experts per token),
    experts here may differ in rank and coverage, and only the top-k are computed. PEFT's
    GenKnowSub (``use_gks``) is not implemented.
    """

    name = "arrow"

    def __init__(
        self,
        top_k: int = 3,
        weighting: str = "softmax",
        temperature: float = 1.0,
        seed: int | None = 0,
        iters: int = 15,
    ):
        _check_settings(top_k, weighting, temperature)
        self.top_k, self.weighting, self.temperature = top_k, weighting, temperature
        self.seed, self.iters = seed, iters

    def _top_right_singular(self, A: torch.Tensor, B: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        A32, B32 = A.float(), B.float()
        C = B32.T @ B32
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=A32.device.type)
            gen.manual_seed(int(self.seed))
        v = torch.randn(A32.size(1), dtype=A32.dtype, device=A32.device, generator=gen)
        v = v / (v.norm() + eps)
        for _ in range(self.iters):
            w = A32.T @ (C @ (A32 @ v))
            v = w / (w.norm() + eps)
        return v

    def prepare(self, layer) -> None:
        protos = [self._top_right_singular(A, B) for A, B in layer.factors()]
        keys = torch.stack(protos).to(layer.weight.device, layer.weight.dtype)
        layer.register_buffer("router_keys", keys, persistent=False)

    def route(self, layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, x.shape[-1]).to(layer.router_keys.dtype)
        scores = torch.abs(x @ layer.router_keys.T)
        return select_top_k(scores, self.top_k, self.weighting, self.temperature)


class ExampleRouter:
    """One expert per example, weight 1, for every token of that example (k = 1).

    Used by ``retrieval`` (expert chosen from the example's text), ``oracle`` (the expert of
    the example's task) and ``single`` (``fixed`` set: the same expert for everything).
    Call :meth:`assign` with one global expert index per example before the forward pass;
    the batch is the first dimension of the module input (a batch that is a multiple of the
    assignment, as in beam search, repeats each example's expert). An example whose expert
    does not adapt a module gets no delta there.
    """

    top_k = 1
    may_skip = True  # may return -1 (expert absent at a module)

    def __init__(self, name: str, fixed: int | None = None):
        self.name, self.fixed = name, fixed
        self.assignment: torch.Tensor | None = None

    def assign(self, expert_ids: Sequence[int] | torch.Tensor | None) -> None:
        self.assignment = None if expert_ids is None else torch.as_tensor(expert_ids, dtype=torch.long).reshape(-1)

    def prepare(self, layer) -> None:
        pass

    def route(self, layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = x.shape[:-1]
        tokens = math.prod(lead)
        local = layer.local_index.to(x.device)
        if self.fixed is not None:
            idx = local[self.fixed].expand(tokens, 1)
        else:
            if self.assignment is None:
                raise RecycleError(f"{self.name} routing needs an expert per example: call set_examples() first")
            ids = self.assignment.to(x.device)
            batch = lead[0] if len(lead) > 1 else tokens
            if batch % ids.numel():
                raise RecycleError(f"{self.name}: batch of {batch} does not match {ids.numel()} assigned examples")
            ids = ids.repeat_interleave(batch // ids.numel())
            idx = local[ids].repeat_interleave(tokens // batch).unsqueeze(1)
        weight = (idx >= 0).to(x.dtype)
        return idx, weight
