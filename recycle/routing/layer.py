"""The routed LoRA layer: one base ``nn.Linear`` plus the experts that adapt it.

``y = W x + Σ_{k ∈ chosen(x)} p_k · s_k B_k A_k x``, where a router picks the experts and
weights per token. Only the chosen experts' products are computed (sparse dispatch): the
(token, expert) assignments are sorted by expert and the inputs gathered into a zero-padded
``[N, G, d_in]`` block (G = the largest group), then two batched matmuls against the stacked,
rank-padded factors; the results are gathered back in (token, choice) order, summed over
the k choices and added to the base output (``index_add_`` is avoided: it runs row by row
on CPU). When the padded work would
cost more than a python loop over the non-empty experts (very uneven groups, e.g. per-example
routing; see ``loop_step_macs``) each non-empty expert group runs its own two matmuls
instead. Cost per token is ``k`` LoRA products, not ``N`` (measured on CPU: the batched path
has the lowest fixed overhead; see benchmarks/routing.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
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
    ``state_dict``), cast to the base layer's dtype and device: ``lora_AT`` ``[N, d_in, r_max]``
    and ``lora_BT`` ``[N, r_max, d_out]`` (transposed, zero-padded to the largest rank) and
    ``lora_scaling`` ``[N]``.
    """

    #: cost model for choosing the dispatch: a python-loop step per non-empty expert costs
    #: about as much as this many multiply-adds of padded work (measured on CPU, 2 threads)
    loop_step_macs: float = 5e5

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
        r_max = max(self.ranks, default=0)
        AT = torch.zeros(len(experts), base_layer.in_features, r_max, dtype=w.dtype, device=w.device)
        BT = torch.zeros(len(experts), r_max, base_layer.out_features, dtype=w.dtype, device=w.device)
        for j, (_, name, m) in enumerate(experts):
            if m.A.shape[1] != base_layer.in_features or m.B.shape[0] != base_layer.out_features:
                raise RecycleError(
                    f"expert {name} at {path}: A {tuple(m.A.shape)} B {tuple(m.B.shape)} do not fit "
                    f"Linear({base_layer.in_features}, {base_layer.out_features})"
                )
            AT[j, :, : m.rank] = m.A.T.to(w.device, w.dtype)
            BT[j, : m.rank, :] = m.B.T.to(w.device, w.dtype)
        self.register_buffer("lora_AT", AT, persistent=False)
        self.register_buffer("lora_BT", BT, persistent=False)
        self.register_buffer("lora_scaling", torch.tensor(self.scalings, dtype=w.dtype, device=w.device), persistent=False)
        self._same_scaling = self.scalings[0] if len(set(self.scalings)) == 1 else None
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
    def n_experts(self) -> int:
        return len(self.expert_names)

    def factors(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(A_j, B_j)`` per local expert; B is unscaled (the scaling is in ``self.scalings``)."""
        for j, r in enumerate(self.ranks):
            yield self.lora_AT[j, :, :r].T, self.lora_BT[j, :r, :].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        idx, weight = self.router.route(self, x)
        if self.recorder is not None:
            self.recorder.add(self, x.shape[:-1], idx, weight)
        x2d = x.reshape(-1, x.shape[-1]).to(self.lora_AT.dtype)
        self.add_sparse_delta(result.view(-1, result.shape[-1]), x2d, idx, weight)
        return result

    def sparse_delta(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``Σ_k weight[t,k] · s B A x[t]`` over the chosen experts ``idx[t,k]`` only (-1 skipped)."""
        return self.add_sparse_delta(x.new_zeros(x.shape[0], self.out_features), x, idx, weight)

    def add_sparse_delta(self, out, x, idx, weight):
        """Add the routed delta to ``out`` [tokens, d_out] in place (returns ``out``)."""
        t, k = idx.shape
        experts = idx.reshape(-1)
        if self._same_scaling is not None:
            weight = weight.reshape(-1).to(x.dtype) * self._same_scaling
        else:
            weight = (weight.to(x.dtype) * self.lora_scaling[idx.clamp_min(0)]).reshape(-1)
        if getattr(self.router, "may_skip", False):  # -1 (no expert): expert 0 with weight 0
            weight = weight * (experts >= 0)
            experts = experts.clamp_min(0)
        n_assigned = experts.numel()
        if n_assigned == 0:
            return out
        order = torch.argsort(experts, stable=True)
        experts_sorted = experts[order]
        counts = torch.bincount(experts, minlength=self.n_experts)
        group = int(counts.max())
        r_max = self.lora_AT.shape[-1]
        padded_macs = self.n_experts * group * (r_max + 1) * (self.in_features + self.out_features)
        # at least n_assigned / group experts are non-empty
        if padded_macs * group <= self.loop_step_macs * n_assigned or padded_macs <= self.loop_step_macs * int(
            torch.count_nonzero(counts)
        ):
            ys = self._padded_bmm(x, k, order, experts_sorted, weight, counts, group)
        else:
            ys_sorted = self._grouped_loop(x.index_select(0, order // k), weight[order], counts.tolist())
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n_assigned, device=x.device))
            ys = ys_sorted.index_select(0, inverse)
        # ys is in (token, choice) order: sum the k choices (index_add_ is slow on CPU)
        ys = ys.view(t, k, -1).sum(1) if k > 1 else ys
        return out.add_(ys.to(out.dtype))

    def _padded_bmm(self, x, k, order, experts_sorted, weight, counts, group):
        # Slot e*G + i holds the i-th assignment routed to expert e; unused slots read token 0
        # with weight 0, so they contribute exact zeros.
        n, n_assigned = self.n_experts, order.numel()
        offsets = torch.cumsum(counts, 0) - counts
        arange = torch.arange(n_assigned, device=x.device)
        slot_sorted = experts_sorted * group + arange - offsets[experts_sorted]
        slot_tokens = order.new_zeros(n * group).index_copy_(0, slot_sorted, order // k)
        slot_weight = weight.new_zeros(n * group).index_copy_(0, slot_sorted, weight[order])
        buf = x.index_select(0, slot_tokens).view(n, group, self.in_features)
        z = torch.bmm(buf, self.lora_AT).mul_(slot_weight.view(n, group, 1))
        y = torch.bmm(z, self.lora_BT).view(n * group, self.out_features)
        slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)  # per assignment
        return y.index_select(0, slot)

    def _grouped_loop(self, xs, weight, counts):
        """Two matmuls per non-empty expert on its block of the expert-sorted inputs."""
        ys = xs.new_empty(xs.shape[0], self.out_features)
        start = 0
        for j, count in enumerate(counts):
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
