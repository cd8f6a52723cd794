"""Routers: who handles each token at one routed module.

A router is a ``torch.nn.Module`` owned by one :class:`~recycle.routing.RoutedLoraLinear`
(``layer.router``). It is built from the layer (its experts, factors, device and dtype) and
called as ``router(x, layer) -> Route`` with ``x`` the module input as the model passed it
(``[..., d_in]``; the route's tokens are ``x`` flattened). What a router derives from its experts (standardised gate vectors,
singular vectors) is a non-persistent buffer; what it learns is a parameter, saved and
loaded with the composition (:meth:`RoutedModel.router_state`).

Token routers score every expert present at the module, keep the top-k and weight them
(``weighting="softmax"``: softmax over the kept scores / temperature, which equals the
softmax over all renormalised over the kept; ``"sigmoid"``: ``sigmoid(score / temperature)``
per kept expert, non-competitive, not renormalised, SPEC §4; ``"uniform"``: 1/k each).
Example routers (retrieval, oracle, single) give every token of an example the one expert
chosen for that example, with weight 1.

Computation-free experts (MoE++) have indices past the LoRA experts (``n_free`` of them,
named ``free_names``); the layer computes LoRA products only for LoRA indices and hands the
mixture to :meth:`Router.finish`, where such a router adds what its free experts return.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recycle.errors import RecycleError
from recycle.routing.context import Route

WEIGHTINGS = ("softmax", "sigmoid", "uniform")


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
    if scores.dtype in (torch.bfloat16, torch.float16):  # top-k, softmax and sigmoid in float32 (or wider) always
        scores = scores.float()
    k = min(top_k, scores.shape[-1])
    top, idx = _top_k(scores, k)
    if weighting == "uniform":
        return idx, torch.full_like(top, 1.0 / k)
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


def check_token_settings(top_k: int, weighting: str, temperature: float) -> None:
    if top_k < 1:
        raise RecycleError(f"top_k must be at least 1, got {top_k}")
    if weighting not in WEIGHTINGS:
        raise RecycleError(f"unknown weighting {weighting!r} (choose from {', '.join(WEIGHTINGS)})")
    if not temperature > 0:
        raise RecycleError(f"temperature must be positive, got {temperature}")


class Router(nn.Module):
    """Base class: the interface :class:`RoutedLoraLinear` calls."""

    name = "router"
    n_free = 0  # computation-free experts after the LoRA ones
    free_names: tuple[str, ...] = ()
    may_skip = False  # may return -1 (no expert)
    wants_delta = False  # the layer materialises the mixture and calls finish()
    keeps_logits = False  # the layer stores route.logits in the context for the next layer

    def forward(self, x: torch.Tensor, layer) -> Route:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, delta: torch.Tensor, x: torch.Tensor, route: Route, layer) -> torch.Tensor:
        """The mixture delta [T, d_out] after the computation-free experts (none here)."""
        return delta

    def extra_repr(self) -> str:
        return self.name


class TokenRouter(Router):
    """Scores every expert at the module for every token, keeps the top-k (see module
    docstring). Subclasses implement ``scores(x) -> (raw [T, N], scale [T, 1] or None)``."""

    def __init__(self, top_k: int = 2, weighting: str = "softmax", temperature: float = 1.0):
        super().__init__()
        check_token_settings(top_k, weighting, temperature)
        self.top_k, self.weighting, self.temperature = top_k, weighting, temperature

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor, layer) -> Route:
        raw, scale = self.scores(x.reshape(-1, x.shape[-1]))
        idx, weight = select_top_k(raw, self.top_k, self.weighting, self.temperature, scale=scale)
        return Route(idx, weight, raw, scale)

    def extra_repr(self) -> str:
        return f"{self.name}, top_k={self.top_k}, weighting={self.weighting}, temperature={self.temperature:g}"


class GateRouter(TokenRouter):
    """PHATGOOSE routing (SPEC §1): ``score_i = LN(x) · LN(v_i) / sqrt(d)``, top-k, weighting.

    ``vectors`` maps expert name -> {module path -> v_i [d_in]}; LN is LayerNorm without
    affine parameters. Every expert present at the layer needs a vector there.
    """

    name = "phatgoose"

    def __init__(self, layer, vectors: dict, top_k: int = 2, weighting: str = "softmax", temperature: float = 1.0):
        super().__init__(top_k, weighting, temperature)
        missing = [n for n in layer.expert_names if layer.path not in vectors.get(n, {})]
        if missing:
            raise RecycleError(f"{self.name}: no router vector at {layer.path} for {', '.join(missing)}")
        v = torch.stack([vectors[n][layer.path].float().reshape(-1) for n in layer.expert_names])
        if v.shape[1] != layer.in_features:
            raise RecycleError(f"{self.name}: vectors at {layer.path} have size {v.shape[1]}, need {layer.in_features}")
        keys = F.layer_norm(v, (v.shape[1],)) / math.sqrt(v.shape[1])
        dev, dt = layer.weight.device, torch.promote_types(layer.weight.dtype, torch.float32)  # scores in >= fp32
        # [d, N + 1]: the keys and a column of 1/d, so one matmul gives x·k_i and mean(x)
        proj = torch.cat([keys, torch.full((1, v.shape[1]), 1.0 / v.shape[1])]).T.contiguous()
        self.register_buffer("proj", proj.to(dev, dt), persistent=False)

    def scores(self, x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x · k_i, 1 / std(x))``: since the keys have zero mean (they are LayerNormed),
        ``LN(x) · k = (x − mean(x)) · k / std(x) = x · k / std(x)``, so LN(x) is never
        materialised; ``var(x) = mean(x²) − mean(x)²`` with ``F.layer_norm``'s eps, in float32
        or wider. That difference loses precision when |mean(x)| ≫ std(x) (relative error
        ~1e-7·mean²/var): a batch with a token where mean² > 1000·var, or any batch off the
        CPU, or one that needs gradients, is centred first (exact)."""
        x = x.to(self.proj.dtype)
        n = self.proj.shape[1] - 1
        # the check costs a device sync on an accelerator, where centring is cheap: always centre
        if x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            raw = x @ self.proj
            mean = raw[:, n:]
            var = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).sub_(mean.square())
            if not bool((mean.square() > 1000 * var).any()):
                return raw[:, :n], var.clamp_min_(0).add_(eps).rsqrt_()
        xc = x - x.mean(-1, keepdim=True)
        raw = xc @ self.proj
        return raw[:, :n], xc.square().mean(-1, keepdim=True).add(eps).rsqrt()

    def standardised_scores(self, x: torch.Tensor) -> torch.Tensor:
        """``LN(x) · k_i`` for every expert i at the layer: ``[tokens, N]``."""
        raw, scale = self.scores(x)
        return raw * scale


class AvgActivationRouter(GateRouter):
    """Average-activation routing: router vector = mean module input over the expert's own
    data (:func:`recycle.routing.compute_prototypes`), then routed exactly as PHATGOOSE."""

    name = "avg-activation"


class ArrowRouter(TokenRouter):
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

    def __init__(self, layer, top_k: int = 2, weighting: str = "softmax", temperature: float = 1.0,
                 seed: int | None = 0, iters: int = 15):
        super().__init__(top_k, weighting, temperature)
        keys = self.top_right_singular(layer, seed, iters).to(layer.weight.device, layer.weight.dtype)
        self.register_buffer("keys", keys, persistent=False)  # [N, d_in]

    @classmethod
    def top_right_singular(cls, layer, seed, iters: int, eps: float = 1e-8) -> torch.Tensor:
        """Every local expert's router vector ``[N, d_in]``: :meth:`_top_right_singular`'s power
        iteration (the same start vector(s), steps and ``eps``), for all experts of one rank at
        once and in the r-dimensional row space of A: after the first step every iterate is
        ``v_k = Aᵀ c_k``, so with ``G = A Aᵀ`` (r x r), ``A v_k = G c_k``, ``c_{k+1} = C G c_k /
        (‖Aᵀ C G c_k‖ + eps)`` and ``‖Aᵀ y‖ = sqrt(yᵀ G y)``. A is read three times (``G``,
        ``A v_0``, the final ``Aᵀ c``) instead of twice per step, which over a thousand
        adapters is the difference between seconds and minutes; the r-space steps run in
        float64. The same vectors to float rounding (``tests/test_methods.py``)."""
        A_rows = layer.A_rows.float()
        BT_rows = layer.BT_rows.float()
        n, d_in = len(layer.ranks), A_rows.shape[1]
        if seed is not None:
            gen = torch.Generator(device=A_rows.device.type)
            gen.manual_seed(int(seed))
            v0 = torch.randn(d_in, dtype=torch.float32, device=A_rows.device, generator=gen).expand(n, d_in)
        else:  # the global RNG, one draw per expert in order, as one expert at a time draws
            v0 = torch.stack([torch.randn(d_in, dtype=torch.float32, device=A_rows.device) for _ in range(n)]) \
                if n else A_rows.new_zeros(0, d_in)
        v0 = v0 / (v0.norm(dim=1, keepdim=True) + eps)
        out = A_rows.new_zeros(n, d_in)
        ranks = torch.tensor(layer.ranks, dtype=torch.long)
        starts = layer.row_start.to("cpu", torch.long)
        scalings = torch.tensor(layer.scalings, dtype=torch.float32)
        for r in sorted(set(layer.ranks)):
            idx = torch.nonzero(ranks == r).flatten()
            rows = (starts[idx].unsqueeze(1) + torch.arange(r)).flatten().to(A_rows.device)
            dev_idx = idx.to(A_rows.device)
            A = A_rows.index_select(0, rows).view(len(idx), r, d_in)  # [m, r, d_in]
            BT = BT_rows.index_select(0, rows).view(len(idx), r, -1) / scalings[idx].view(-1, 1, 1).to(A.device)
            C = (BT @ BT.transpose(1, 2)).double()  # B^T B: [m, r, r]
            G = (A @ A.transpose(1, 2)).double()  # A A^T: [m, r, r]
            Av = (A @ v0.index_select(0, dev_idx).unsqueeze(2)).double()  # A v_0: [m, r, 1]
            for _ in range(iters):
                y = C @ Av  # w = A^T y
                norm = (y.transpose(1, 2) @ G @ y).clamp_min(0).sqrt()  # ‖A^T y‖: [m, 1, 1]
                c = y / (norm + eps)  # v = A^T c
                Av = G @ c
            out[dev_idx] = (A.transpose(1, 2) @ c.float()).squeeze(2)
        return out

    @staticmethod
    def _top_right_singular(A: torch.Tensor, B: torch.Tensor, seed, iters, eps: float = 1e-8) -> torch.Tensor:
        A32, B32 = A.float(), B.float()
        C = B32.T @ B32
        gen = None
        if seed is not None:
            gen = torch.Generator(device=A32.device.type)
            gen.manual_seed(int(seed))
        v = torch.randn(A32.size(1), dtype=A32.dtype, device=A32.device, generator=gen)
        v = v / (v.norm() + eps)
        for _ in range(iters):
            w = A32.T @ (C @ (A32 @ v))
            v = w / (w.norm() + eps)
        return v

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.abs(x.to(self.keys.dtype) @ self.keys.T), None


def right_singular_vectors(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``Vᵀ`` [r, d_in] of ``B A`` (A: [r, d_in], B: [d_out, r]), exactly, in float64:
    ``B = Q R`` so ``B A = Q (R A)`` and the right-singular vectors of ``R A`` are those of
    ``B A``. Directions with a zero singular value (a rank-deficient delta) are dropped."""
    _, R = torch.linalg.qr(B.double())
    _, S, Vh = torch.linalg.svd(R @ A.double(), full_matrices=False)
    return Vh[S > S.max() * 1e-9] if S.numel() and S.max() > 0 else Vh[:0]


def layer_right_singular_vectors(layer) -> list[torch.Tensor]:
    """:func:`right_singular_vectors` of every local expert of a routed layer, in order,
    computed for all experts of one rank at once (batched QR and SVD over ``[n, r, d]``
    stacks: one expert at a time is 10⁴-10⁵ small LAPACK calls over a thousand adapters)."""
    n = len(layer.ranks)
    out: list[torch.Tensor | None] = [None] * n
    ranks = torch.tensor(layer.ranks, dtype=torch.long)
    starts = layer.row_start.to("cpu", torch.long)
    scalings = torch.tensor(layer.scalings, dtype=torch.float64)
    for r in sorted(set(layer.ranks)):
        idx = torch.nonzero(ranks == r).flatten()
        rows = (starts[idx].unsqueeze(1) + torch.arange(r)).flatten().to(layer.A_rows.device)
        A = layer.A_rows.index_select(0, rows).double().view(len(idx), r, -1)  # [m, r, d_in]
        B = (layer.BT_rows.index_select(0, rows).double().view(len(idx), r, -1)
             / scalings[idx].view(-1, 1, 1).to(A.device)).transpose(1, 2)  # [m, d_out, r]
        # B A = Q_B R_B (Q_A R_A)^T = Q_B K Q_A^T with K = R_B R_A^T (r x r): the SVD of K gives
        # the right-singular vectors W^T Q_A^T (a batched SVD of the wide [r, d_in] R_B A
        # directly is many times slower on CPU)
        RB = torch.linalg.qr(B, mode="r").R  # [m, r, r]
        QA, RA = torch.linalg.qr(A.transpose(1, 2))  # [m, d_in, r], [m, r, r]
        _, S, Wh = torch.linalg.svd(RB @ RA.transpose(1, 2))
        Vh = Wh @ QA.transpose(1, 2)  # [m, r, d_in]
        keep = S > S.max(1, keepdim=True).values * 1e-9  # nothing of a zero delta (max 0)
        full = bool(keep.all())
        for k, j in enumerate(idx.tolist()):
            out[j] = Vh[k] if full else Vh[k][keep[k]]
    return out


def spectr_factors(layer, max_cond: float = 1e4) -> list[tuple] | None:
    """SpectR's scores through the layer's stored ``A`` rows: per rank group ``(experts, rows,
    M [m, r, r])`` with ``‖V_iᵀ x‖ = ‖M_i A_i x‖``. With ``Aᵀ = Q_A R_A`` and ``B A = Q_B K
    Q_Aᵀ`` (``K = R_B R_Aᵀ = U S Wᵀ``, as :func:`layer_right_singular_vectors`), ``V_iᵀ = Wᵀ
    Q_Aᵀ = Wᵀ R_A⁻ᵀ A``, so ``M = Wᵀ R_A⁻ᵀ`` (rows of zero singular values zeroed): r×r numbers
    per expert instead of a ``[Σ r_i, d_in]`` copy of the keys. None where some ``A_i`` is
    too ill-conditioned (``cond(R_A) > max_cond``) for float32 products through ``R_A⁻ᵀ``."""
    n = len(layer.ranks)
    ranks = torch.tensor(layer.ranks, dtype=torch.long)
    starts = layer.row_start.to("cpu", torch.long)
    scalings = torch.tensor(layer.scalings, dtype=torch.float64)
    dt = torch.promote_types(layer.weight.dtype, torch.float32)
    groups = []
    for r in sorted(set(layer.ranks)):
        idx = torch.nonzero(ranks == r).flatten()
        rows = (starts[idx].unsqueeze(1) + torch.arange(r)).flatten()
        dev_rows = rows.to(layer.A_rows.device)
        A = layer.A_rows.index_select(0, dev_rows).double().view(len(idx), r, -1)  # [m, r, d_in]
        B = (layer.BT_rows.index_select(0, dev_rows).double().view(len(idx), r, -1)
             / scalings[idx].view(-1, 1, 1).to(A.device)).transpose(1, 2)  # [m, d_out, r]
        RB = torch.linalg.qr(B, mode="r").R
        RA = torch.linalg.qr(A.transpose(1, 2), mode="r").R  # [m, r, r]
        if not bool((torch.linalg.cond(RA) <= max_cond).all()):
            return None
        _, S, Wh = torch.linalg.svd(RB @ RA.transpose(1, 2))
        keep = S > S.max(1, keepdim=True).values * 1e-9
        Mt = torch.linalg.solve_triangular(RA, Wh.transpose(1, 2), upper=True)  # R_A⁻¹ W = Mᵀ
        M = Mt.transpose(1, 2) * keep.unsqueeze(-1)
        groups.append((idx.to(layer.A_rows.device), dev_rows, M.to(dt).contiguous()))
    if sum(len(g[0]) for g in groups) != n:  # pragma: no cover - every expert has a rank
        return None
    return groups


class SpectrRouter(TokenRouter):
    """``score_i = ‖V_iᵀ x‖`` for every expert at the layer (SpectR: see :mod:`recycle.methods.spectr`).

    Computed as ``‖M_i A_i x‖`` (:func:`spectr_factors`): one matmul with the layer's own
    stacked ``A`` rows gives every ``A_i x``, then a batched r×r product per expert; nothing
    the size of the experts is stored beside them (at N = 1,000, ``[Σ r_i, d_in]`` keys were
    a second copy of every ``A``). Where an ``A_i`` is ill-conditioned the router keeps the
    right-singular vectors themselves, stacked side by side into one ``[d_in, Σ_i r_i]``
    matrix, whose products' squares are summed per expert (``owner``)."""

    name = "spectr"

    def __init__(self, layer, top_k: int = 2, weighting: str = "uniform", temperature: float = 1.0):
        super().__init__(top_k, weighting, temperature)
        self.n = len(layer.ranks)
        self.__dict__["_layer"] = layer  # not a submodule: the layer owns this router
        self.groups = spectr_factors(layer)
        self.uniform = self.groups is not None and len(self.groups) == 1  # one rank: rows in expert order
        if self.groups is None:
            vs = layer_right_singular_vectors(layer)
            dt = torch.promote_types(layer.weight.dtype, torch.float32)
            owner = torch.repeat_interleave(torch.arange(len(vs)), torch.tensor([v.shape[0] for v in vs]))
            self.register_buffer("keys", torch.cat(vs).T.contiguous().to(layer.weight.device, dt), persistent=False)
            self.register_buffer("owner", owner.to(layer.weight.device), persistent=False)

    def _rows(self) -> torch.Tensor:
        layer = self._layer
        if layer.A_rows.dtype in (torch.float32, torch.float64):
            return layer.A_rows
        if layer.A_rows.device.type == "cpu":
            return layer._float32_rows()[0]  # the float32 copy the CPU's CSR kernel keeps anyway
        return layer.A_rows.float()  # elsewhere a transient upcast, not a kept copy of A and B

    def scores(self, x: torch.Tensor):
        if self.groups is None:
            z = x.to(self.keys.dtype) @ self.keys  # [T, Σ r_i]
            sq = z.new_zeros(x.shape[0], self.n).index_add_(1, self.owner, z.square_())
            return sq.sqrt_(), None
        A = self._rows()
        z = x.to(A.dtype) @ A.T  # [T, Σ r_i]: every A_i x
        t = x.shape[0]
        if self.uniform:
            _, _, M = self.groups[0]
            y = torch.bmm(z.view(t, self.n, -1).transpose(0, 1), M.transpose(1, 2).to(z.dtype))  # [n, T, r]
            return y.square_().sum(-1).T.sqrt_(), None
        sq = z.new_zeros(t, self.n)
        for idx, rows, M in self.groups:
            zr = z.index_select(1, rows).view(t, len(idx), -1).transpose(0, 1)  # [m, T, r]
            y = torch.bmm(zr, M.transpose(1, 2).to(z.dtype))
            sq.index_copy_(1, idx, y.square_().sum(-1).T)
        return sq.sqrt_(), None


class ExampleRouter(Router):
    """One expert per example, weight 1, for every token of that example (k = 1).

    Used by ``retrieval`` (expert chosen from the example's text), ``oracle`` (the expert of
    the example's task) and ``single`` (``fixed``: the same global expert index for
    everything). The per-example assignment (one global expert index per example, the
    number of experts meaning "none") is read from the routing context, set by
    ``RoutedModel.set_examples`` before the forward pass; the batch is the first dimension of
    the module input (a batch that is a multiple of the assignment, as in beam search,
    repeats each example's expert). An example whose expert does not adapt a module gets no
    delta there.
    """

    may_skip = True  # may return -1 (expert absent at a module)

    def __init__(self, name: str, fixed: int | None = None):
        super().__init__()
        self.name, self.fixed = name, fixed

    def forward(self, x: torch.Tensor, layer) -> Route:
        lead = x.shape[:-1]
        tokens = math.prod(lead)
        local = layer.local_index.to(x.device)
        if self.fixed is not None:
            idx = local[self.fixed].expand(tokens, 1)
        else:
            ids = layer.context.assignment
            if ids is None:
                raise RecycleError(f"{self.name} routing needs an expert per example: call set_examples() first")
            ids = ids.to(x.device)
            batch = lead[0] if len(lead) > 1 else tokens
            if batch % ids.numel():
                raise RecycleError(f"{self.name}: batch of {batch} does not match {ids.numel()} assigned examples")
            ids = ids.repeat_interleave(batch // ids.numel())
            idx = local[ids].repeat_interleave(tokens // batch).unsqueeze(1)
        return Route(idx, (idx >= 0).to(x.dtype))
