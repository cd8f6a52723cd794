"""The routed LoRA layer: one base ``nn.Linear`` plus the experts that adapt it.

``y = W x + Σ_{k ∈ chosen(x)} p_k · s_k B_k A_k x``, where a router picks the experts and
weights per token. Two dispatches give the same result (tests/test_routing.py):

- grouped (sparse): only the chosen experts' products are computed. The (token, choice)
  assignments are sorted by expert, the inputs gathered in that order, and two grouped
  matmuls (``torch.nn.functional.grouped_mm``: one GEMM per expert over its block of rows, in
  one call) apply the stacked, rank-padded factors; the weighted results are added back to
  their tokens with ``index_add_``. Where ``grouped_mm`` cannot run (float64, sizes not 16-byte
  aligned, a device without it) a python loop over the non-empty experts does the same two
  matmuls per expert. Cost per token: ``k`` LoRA products, plus sorting and gathers.
- dense, for few experts (``N · r_max <= dense_max_columns``, 256 by default: N <= 32 at
  r = 8): ``x [A_1^T ... A_N^T]`` in one matmul, each expert's block multiplied by its routing
  weight (zero for experts not chosen), then one matmul with the stacked ``s_j B_j`` added
  into the output. It computes all N products, but in ~6 tensor operations, which on CPU is
  as fast or faster than grouping up to that size (benchmarks/routing.py); set
  ``dense_max_columns = 0`` to always dispatch sparsely.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from recycle.errors import RecycleError
from recycle.routing.experts import ExpertModule


class RoutedLoraLinear(nn.Module):
    """A base ``nn.Linear`` with N LoRA experts and a router.

    Args:
        base_layer: the original linear layer; kept as is (its weights are never touched).
        path: the module's path in the model (for messages and statistics).
        experts: ``(global index, name, ExpertModule)`` for each expert adapting this module.
        n_total: number of experts in the whole composition (for global -> local indices).
        router: an object with ``prepare(layer)`` and ``route(layer, x)`` (see ``routers``).

    Expert factors are non-persistent buffers (they follow ``.to()`` but stay out of the
    ``state_dict``), cast to the base layer's dtype and device: ``lora_A``, either ``[d_in, N * r_max]``
    (every ``A_j^T`` side by side, read by the dense path) or ``[N, d_in, r_max]`` (stacked,
    read by grouped dispatch; ``lora_A_cat`` and ``lora_AT`` give either view), and ``lora_BT``
    ``[N, r_max, d_out]`` (``s_j B_j^T``: the scaling folded in), zero-padded to the largest rank
    rounded up to 16 bytes.
    """

    #: dispatch: while the stacked rank N * r_max is at most this, the dense path (T·N·r·(d_in +
    #: d_out) multiply-adds in ~6 operations) runs instead of grouping (T·k·r·(d_in + d_out)
    #: multiply-adds, but sorting, gathers and a scatter-add); read when a layer is built, to
    #: set its ``dense``. 0: always sparse dispatch.
    dense_max_columns: int = 256

    def __init__(
        self,
        base_layer: nn.Linear,
        path: str,
        experts: list[tuple[int, str, ExpertModule]],
        n_total: int,
        router,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.expert_names = [name for _, name, _ in experts]
        self.scalings = [m.scaling for _, _, m in experts]
        self.router = router
        self.recorder = None  # set by RoutedModel.record()
        w = base_layer.weight
        local = torch.full((n_total + 1,), -1, dtype=torch.long)  # global id n_total = "no expert"
        for j, (g, _, _) in enumerate(experts):
            local[g] = j
        self.register_buffer("local_index", local.to(w.device), persistent=False)
        self.ranks = [m.rank for _, _, m in experts]
        # pad the rank so rows of A^T x and B^T are 16-byte aligned, as grouped_mm needs
        size, wide = w.element_size(), torch.promote_types(w.dtype, torch.float32)
        r_max = -(-max(self.ranks, default=0) // max(1, 16 // size)) * max(1, 16 // size)
        A = torch.zeros(len(experts), base_layer.in_features, r_max, dtype=w.dtype, device=w.device)
        BT = torch.zeros(len(experts), r_max, base_layer.out_features, dtype=w.dtype, device=w.device)
        for j, (_, name, m) in enumerate(experts):
            if m.A.shape[1] != base_layer.in_features or m.B.shape[0] != base_layer.out_features:
                raise RecycleError(
                    f"expert {name} at {path}: A {tuple(m.A.shape)} B {tuple(m.B.shape)} do not fit "
                    f"Linear({base_layer.in_features}, {base_layer.out_features})"
                )
            A[j, :, : m.rank] = m.A.T.to(w.device, w.dtype)
            BT[j, : m.rank, :] = (m.scaling * m.B.T.to(wide)).to(w.device, w.dtype)  # s_j folded in
        #: the dispatch: dense (True) or grouped; stored as one layout of A, the one it reads:
        #: [d_in, N * r_max] (dense) or [N, d_in, r_max] (grouped)
        self.dense = len(experts) * r_max <= self.dense_max_columns
        A = A.permute(1, 0, 2).reshape(base_layer.in_features, -1) if self.dense else A
        self.register_buffer("lora_A", A, persistent=False)
        self.register_buffer("lora_BT", BT, persistent=False)
        self._use_grouped_mm = (
            hasattr(F, "grouped_mm")
            and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (base_layer.in_features * size) % 16 == 0
            and (base_layer.out_features * size) % 16 == 0
        )
        router.prepare(self)

    # The wrapped layer answers like a Linear (some models read .weight, e.g. T5's wo).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def lora_AT(self) -> torch.Tensor:
        """``A_j^T`` stacked, ``[N, d_in, r_max]``."""
        if self.lora_A.dim() == 2:
            return self.lora_A.view(self.in_features, self.n_experts, -1).permute(1, 0, 2)
        return self.lora_A

    @property
    def lora_A_cat(self) -> torch.Tensor:
        """``A_j^T`` side by side, ``[d_in, N * r_max]``: one matmul gives every expert's A x."""
        if self.lora_A.dim() == 2:
            return self.lora_A
        return self.lora_A.permute(1, 0, 2).reshape(self.in_features, -1)

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    def factors(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(A_j, B_j)`` per local expert; B is unscaled (the scaling is in ``self.scalings``)."""
        for j, r in enumerate(self.ranks):
            yield self.lora_AT[j, :, :r].T, self.lora_BT[j, :r, :].T / self.scalings[j]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        idx, weight = self.router.route(self, x)
        if self.recorder is not None:
            self.recorder.add(self, x.shape[:-1], idx, weight)
        x2d = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        self.add_sparse_delta(result.view(-1, result.shape[-1]), x2d, idx, weight)
        return result

    def sparse_delta(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``Σ_k weight[t,k] · s B A x[t]`` over the chosen experts ``idx[t,k]`` only (-1 skipped)."""
        return self.add_sparse_delta(x.new_zeros(x.shape[0], self.out_features), x, idx, weight)

    def add_sparse_delta(self, out, x, idx, weight):
        """Add the routed delta to ``out`` [tokens, d_out] in place (returns ``out``)."""
        t, k = idx.shape
        if t * k == 0:
            return out
        weight = weight.to(x.dtype)
        may_skip = getattr(self.router, "may_skip", False)  # idx -1: no expert
        if self.dense:
            return self._add_dense(out, x, idx, weight, may_skip)
        experts, weight = idx.reshape(-1), weight.reshape(-1)
        if may_skip:  # -1: expert 0 with weight 0
            weight = weight * (experts >= 0)
            experts = experts.clamp_min(0)
        order = torch.argsort(experts, stable=True)  # assignments grouped by expert
        counts = torch.bincount(experts, minlength=self.n_experts)
        tokens = order // k if k > 1 else order
        xs = x.index_select(0, tokens)
        ys = self._grouped(xs, weight.index_select(0, order), counts)
        return out.index_add_(0, tokens, ys.to(out.dtype))

    def _add_dense(self, out, x, idx, weight, may_skip):
        """Every expert's ``A x`` in one matmul, scaled by the routing weights (zero for the
        experts not chosen), then one matmul with the stacked ``s B``, added to ``out``."""
        t, n = x.shape[0], self.n_experts
        if may_skip:  # -1 lands in an extra column, dropped
            p = x.new_zeros(t, n + 1).scatter_add_(1, torch.where(idx >= 0, idx, n), weight)[:, :n]
        else:
            p = x.new_zeros(t, n).scatter_add_(1, idx, weight)
        z = torch.mm(x, self.lora_A_cat).view(t, n, -1).mul_(p.unsqueeze(-1)).view(t, -1)
        b = self.lora_BT.view(-1, self.out_features)
        if out.dtype == z.dtype:
            return out.addmm_(z, b)
        return out.add_((z @ b).to(out.dtype))

    def _grouped(self, xs, weight, counts):
        """``weight[i] · (xs[i] A_e^T) B_e^T`` for rows ``xs`` sorted by expert, ``counts[e]``
        rows for expert ``e``: two grouped matmuls, or a loop over the non-empty experts where
        ``grouped_mm`` cannot take the device, dtype or shapes."""
        if self._use_grouped_mm:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            try:
                z = F.grouped_mm(xs, self.lora_AT, offs=offs).mul_(weight[:, None])
                return F.grouped_mm(z, self.lora_BT, offs=offs)
            except RuntimeError:  # unsupported here (e.g. an old GPU): use the loop from now on
                self._use_grouped_mm = False
        ys = xs.new_empty(xs.shape[0], self.out_features)
        start = 0
        for j, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            end, r = start + count, self.ranks[j]
            z = (xs[start:end] @ self.lora_AT[j, :, :r]).mul_(weight[start:end, None])
            torch.mm(z, self.lora_BT[j, :r, :], out=ys[start:end])
            start = end
        return ys

    def dense_delta(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Reference: every expert computed for every token, masked by the routing weights."""
        t = x.shape[0]
        p = x.new_zeros(t, self.n_experts + 1)  # last column swallows idx == -1
        p.scatter_add_(1, torch.where(idx >= 0, idx, self.n_experts), weight.to(x.dtype))
        out = x.new_zeros(t, self.out_features)
        for j, (A, B) in enumerate(self.factors()):
            out += p[:, j : j + 1] * (self.scalings[j] * (x @ A.T @ B.T))
        return out

    def extra_repr(self) -> str:
        return f"path={self.path!r}, experts={self.n_experts}, router={getattr(self.router, 'name', '?')}"
