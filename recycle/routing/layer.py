"""The routed LoRA layer: one base ``nn.Linear`` plus the experts that adapt it.

``y = W x + Σ_{k ∈ chosen(x)} p_k · s_k B_k A_k x``, where a router picks the experts and
weights per token. Two dispatches give the same result (tests/test_routing.py):

- sparse: only the chosen experts' products are computed. On CPU without gradients
  (inference, float32/64), as two sparse-dense products (:meth:`RoutedLoraLinear._add_csr`):
  the chosen (token, expert) pairs, ``r`` columns each, are the pattern of a CSR matrix
  ``[T, N r]``; ``torch.sparse.sampled_addmm`` computes ``x [A_1^T ... A_N^T]`` at exactly
  those entries, they are scaled by the routing weights, and the CSR result times the
  stacked ``s_j B_j^T`` is added to the output (MKL's sparse kernels: no gathered copies, no
  padding, no scatter; 1.27x the base model against 1.36x with the blocks below, at 210
  routed modules, N=32, 1024 tokens). Otherwise (gradients, other dtypes, GPUs): the (token, choice) assignments
  are sorted by expert and laid out in blocks of equal size, each block one expert's rows
  (padded with weight-0 rows); one gather of the inputs, two batched matmuls
  (``torch.bmm``: ``A_e x`` for a block's rows as ``[r, d_in] @ [d_in, rows]``, whose wide
  output vectorises well on CPU, then ``@ s_e B_e^T``), and the weighted results added back to
  their tokens with ``index_add_``. A block per used expert, as long as the largest expert's
  rows pad the others to at most twice the assignments; with unbalanced routing the heavy
  experts are split into blocks of the mean size instead (padding again at most doubles the
  rows). On CUDA, where ``torch.nn.functional.grouped_mm`` runs one GEMM per expert over
  ragged blocks without padding or a host sync, that is used instead. Cost per token: ``k``
  LoRA products, plus sorting, gathers and the padding.
- dense, for few experts (``N · r_max <= dense_max_columns``): ``x [A_1^T ... A_N^T]`` in
  one matmul, each expert's block multiplied by its routing weight (zero for experts not
  chosen), then one matmul with the stacked ``s_j B_j`` added into the output. It computes
  all N products, but in ~6 tensor operations, which on CPU is as fast or faster than the
  sparse dispatch up to that size (benchmarks/routing.py); set ``dense_max_columns = 0`` to
  always dispatch sparsely. Layers whose router has computation-free experts (MoE++) always
  dispatch sparsely, so that a token routed to them computes fewer LoRA products.

The router is a module of its own (``layer.router``, see :mod:`recycle.routing.routers`),
built from the layer by :meth:`RoutedLoraLinear.set_router`. The layers of one model share a
:class:`~recycle.routing.context.RoutingContext` (``layer.context``) that carries state from
one routed layer to the next within a forward pass. ``layer.delta(x, route)`` is the mixture
``Δ_mix`` as a tensor; the forward adds it in place without materialising it unless the
router or the context asks for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from recycle.errors import RecycleError
from recycle.routing.context import Route, RoutingContext, module_kind
from recycle.routing.experts import ExpertModule

_CSR_DTYPES = (torch.float32, torch.float64)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
# the pattern is built here, sorted and in range by construction: torch's opt-in check stays off
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


class RoutedLoraLinear(nn.Module):
    """A base ``nn.Linear`` with N LoRA experts and a router.

    Args:
        base_layer: the original linear layer; kept as is (its weights are never touched).
        path: the module's path in the model (for messages and statistics).
        experts: ``(global index, name, ExpertModule)`` for each expert adapting this module.
        n_total: number of experts in the whole composition (for global -> local indices).
        context: the routing context shared by the model's routed layers.

    Expert factors are non-persistent buffers (they follow ``.to()`` but stay out of the
    ``state_dict``), cast to the base layer's dtype and device: ``lora_A``, either ``[d_in, N * r_max]``
    (every ``A_j^T`` side by side, read by the dense path) or ``[N, r_max, d_in]`` (every ``A_j``
    stacked as PEFT stores it, read by the sparse dispatch; ``lora_A_cat`` and ``lora_AT`` give
    either view), and ``lora_BT``
    ``[N, r_max, d_out]`` (``s_j B_j^T``: the scaling folded in), zero-padded to the largest rank
    rounded up to 16 bytes. Call :meth:`set_router` before the first forward.
    """

    #: dispatch: while the stacked rank N * r_max is at most this, the dense path (T·N·r·(d_in +
    #: d_out) multiply-adds in ~6 operations) runs instead of the sparse one (T·k·r·(d_in +
    #: d_out) multiply-adds, plus building the pattern or blocks); read when the router is set,
    #: to set the layer's ``dense``. 0: always sparse dispatch. None: the crossover measured on
    #: CPU (benchmarks/routing.py, a model of SmolLM2's shape): 64 where the sparse dispatch is
    #: the sparse-dense products (CPU, float32/64: at N·r = 64 dense 1.19x the base, products
    #: 1.23x; at 128, 1.35x against 1.24x), 128 where it is padded blocks.
    dense_max_columns: int | None = None
    #: devices where the sparse dispatch uses ``grouped_mm`` (ragged blocks, no host sync)
    #: rather than padded blocks and ``bmm``; on CPU grouped_mm is a loop of small GEMMs whose
    #: r-wide outputs vectorise poorly (2-4x slower than the blocks here).
    grouped_mm_devices: tuple[str, ...] = ("cuda",)
    #: sparse dispatch on CPU: blocks are processed in chunks of about this many bytes of
    #: gathered input or product rows, so that they stay in cache between the steps
    chunk_bytes: int = 4 << 20
    #: sparse dispatch on CPU without gradients: two sparse-dense products (:meth:`_add_csr`)
    #: instead of padded blocks
    csr: bool = True

    def __init__(
        self,
        base_layer: nn.Linear,
        path: str,
        experts: list[tuple[int, str, ExpertModule]],
        n_total: int,
        context: RoutingContext | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.kind = module_kind(path)
        self.expert_names = [name for _, name, _ in experts]
        self.scalings = [m.scaling for _, _, m in experts]
        self.context = context if context is not None else RoutingContext()
        self.router = None
        self.group = None  # siblings reading the same input (recycle.routing.siblings)
        w = base_layer.weight
        local = torch.full((n_total + 1,), -1, dtype=torch.long)  # global id n_total = "no expert"
        for j, (g, _, _) in enumerate(experts):
            local[g] = j
        self.register_buffer("local_index", local.to(w.device), persistent=False)
        self.ranks = [m.rank for _, _, m in experts]
        # pad the rank so rows of A^T x and B^T are 16-byte aligned, as grouped_mm needs
        size, wide = w.element_size(), torch.promote_types(w.dtype, torch.float32)
        r_max = -(-max(self.ranks, default=0) // max(1, 16 // size)) * max(1, 16 // size)
        A = torch.zeros(len(experts), r_max, base_layer.in_features, dtype=w.dtype, device=w.device)
        BT = torch.zeros(len(experts), r_max, base_layer.out_features, dtype=w.dtype, device=w.device)
        for j, (_, name, m) in enumerate(experts):
            if m.A.shape[1] != base_layer.in_features or m.B.shape[0] != base_layer.out_features:
                raise RecycleError(
                    f"expert {name} at {path}: A {tuple(m.A.shape)} B {tuple(m.B.shape)} do not fit "
                    f"Linear({base_layer.in_features}, {base_layer.out_features})"
                )
            A[j, : m.rank, :] = m.A.to(w.device, w.dtype)
            BT[j, : m.rank, :] = (m.scaling * m.B.T.to(wide)).to(w.device, w.dtype)  # s_j folded in
        #: the dispatch: dense (True) or grouped, set with the router; stored as the one layout
        #: of A it reads: [d_in, N * r_max] (dense) or [N, r_max, d_in] (sparse)
        self.dense = False
        self.register_buffer("lora_A", A, persistent=False)
        self.register_buffer("lora_BT", BT, persistent=False)
        self._use_grouped_mm = (
            hasattr(F, "grouped_mm")
            and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (base_layer.in_features * size) % 16 == 0
            and (base_layer.out_features * size) % 16 == 0
        )

    def set_router(self, router: nn.Module) -> None:
        """Own ``router`` (built from this layer) and choose the dispatch: dense for few
        experts, unless the router has computation-free experts (their saving is only real
        in sparse dispatch)."""
        AT = self.lora_AT
        self.router = router
        limit = self.dense_limit(AT.device.type, AT.dtype)
        self.dense = self.n_experts * AT.shape[-1] <= limit and not router.n_free
        self.lora_A = AT.permute(1, 0, 2).reshape(self.in_features, -1) if self.dense else AT.transpose(1, 2).contiguous()

    @classmethod
    def dense_limit(cls, device_type: str, dtype: torch.dtype) -> int:
        """The stacked rank up to which the dense dispatch runs, for factors on this device
        type and dtype: ``dense_max_columns``, or where that is None the measured crossover."""
        if cls.dense_max_columns is not None:
            return cls.dense_max_columns
        return 64 if cls.csr and device_type == "cpu" and dtype in _CSR_DTYPES else 128

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
        return self.lora_A.transpose(1, 2)

    @property
    def lora_A_cat(self) -> torch.Tensor:
        """``A_j^T`` side by side, ``[d_in, N * r_max]``: one matmul gives every expert's A x."""
        if self.lora_A.dim() == 2:
            return self.lora_A
        return self.lora_A.permute(2, 0, 1).reshape(self.in_features, -1)

    @property
    def n_experts(self) -> int:
        """LoRA experts at this module (computation-free experts not counted)."""
        return len(self.expert_names)

    @property
    def route_names(self) -> list[str]:
        """Names of every index a route may hold: the LoRA experts, then the router's
        computation-free experts."""
        return self.expert_names + list(getattr(self.router, "free_names", ()))

    def factors(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(A_j, B_j)`` per local expert; B is unscaled (the scaling is in ``self.scalings``)."""
        for j, r in enumerate(self.ranks):
            yield self.lora_AT[j, :, :r].T, self.lora_BT[j, :r, :].T / self.scalings[j]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        ctx = self.context
        if self.group is not None and not ctx.keep_deltas and not torch.is_grad_enabled():
            return self._forward_shared(x, result)
        route = self.router(x, self)
        if ctx.recorder is not None:
            ctx.recorder.add(self, x.shape[:-1], route)
        x2d = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        out = result.view(-1, result.shape[-1])
        if self.router.wants_delta or ctx.keep_deltas:
            delta = self.delta(x2d, route)
            ctx.deltas[self.kind] = delta
            out = out + delta.to(out.dtype) if torch.is_grad_enabled() else out.add_(delta.to(out.dtype))
        else:
            out = self.add_sparse_delta(out, x2d, route.idx, route.weight)
        if self.router.keeps_logits:
            ctx.logits[self.kind] = route.logits
        return out.view(result.shape)

    def _forward_shared(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The forward with the scores and A products computed once for this layer and its
        siblings (:mod:`recycle.routing.siblings`); the same routing and mixture."""
        from recycle.routing.routers import select_top_k

        x2d = x.reshape(-1, x.shape[-1])
        raw, rstd, z = self.group.take(self, x2d)
        r = self.router
        idx, weight = select_top_k(raw, r.top_k, r.weighting, r.temperature, scale=rstd)
        if self.context.recorder is not None:
            self.context.recorder.add(self, x.shape[:-1], Route(idx, weight, raw, rstd))
        out = result.view(-1, result.shape[-1])
        if z is None:
            self.add_sparse_delta(out, x2d.to(self.lora_A.dtype), idx, weight)
        else:
            self._add_dense(out, x2d, idx, weight.to(z.dtype), False, z=z)
        return result

    def delta(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """``Δ_mix`` [tokens, d_out] for ``x`` [tokens, d_in]: the routed LoRA products, then
        whatever the router's computation-free experts add."""
        weight = route.weight if route.dispatch is None else route.dispatch
        delta = self.sparse_delta(x, route.idx, weight)
        return self.router.finish(delta, x, route, self)

    def sparse_delta(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``Σ_k weight[t,k] · s B A x[t]`` over the chosen LoRA experts ``idx[t,k]`` only
        (-1 and computation-free indices skipped)."""
        return self.add_sparse_delta(x.new_zeros(x.shape[0], self.out_features), x, idx, weight)

    def add_sparse_delta(self, out, x, idx, weight):
        """Add the routed LoRA delta to ``out`` [tokens, d_out] (returns ``out``)."""
        t, k = idx.shape
        if t * k == 0:
            return out
        weight = weight.to(x.dtype)
        n = self.n_experts
        filtered = self.router.may_skip or self.router.n_free  # indices outside 0..N-1 occur
        # in place where no gradient flows through (inference); out of place when training
        inplace = not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad or out.requires_grad)
        if self.dense:
            return self._add_dense(out, x, idx, weight, filtered, inplace)
        if inplace and self.csr and x.device.type == "cpu" and x.dtype in _CSR_DTYPES and out.dtype == x.dtype:
            if self._add_csr(out, x, idx, weight, filtered):
                return out
        experts, weight = idx.reshape(-1), weight.reshape(-1)
        if filtered:  # only the assignments to LoRA experts are computed
            rows = ((experts >= 0) & (experts < n)).nonzero().squeeze(1)
            if rows.numel() == 0:
                return out
            experts, weight = experts.index_select(0, rows), weight.index_select(0, rows)
        else:
            rows = None
        return self._add_products(out, x, experts, weight, inplace, rows=rows, k=k)

    def _add_dense(self, out, x, idx, weight, filtered, inplace=True, z=None):
        """Every expert's ``A x`` in one matmul (or ``z``, computed already), scaled by the
        routing weights (zero for the experts not chosen), then one matmul with the stacked
        ``s B``, added to ``out``."""
        t, n = x.shape[0], self.n_experts
        if filtered:  # -1 and computation-free experts land in an extra column, dropped
            col = torch.where((idx >= 0) & (idx < n), idx, n)
            p = x.new_zeros(t, n + 1).scatter_add_(1, col, weight)[:, :n]
        else:
            p = x.new_zeros(t, n).scatter_add_(1, idx, weight)
        if z is None:
            z = torch.mm(x, self.lora_A_cat).view(t, n, -1)
            z = (z.mul_(p.unsqueeze(-1)) if inplace else z * p.unsqueeze(-1)).view(t, -1)
        else:  # a view into the siblings' shared product: not in place
            z = (z.view(t, n, -1) * p.unsqueeze(-1)).view(t, -1)
        b = self.lora_BT.view(-1, self.out_features)
        if not inplace:
            return out + (z @ b).to(out.dtype)
        if out.dtype == z.dtype:
            return out.addmm_(z, b)
        return out.add_((z @ b).to(out.dtype))

    def _add_csr(self, out, x, idx, weight, filtered) -> bool:
        """The sparse dispatch on CPU without gradients, as two sparse-dense products: the
        chosen ``(token, expert)`` pairs are the nonzeros of a CSR matrix ``[T, N r]`` (``r``
        columns per pair); ``torch.sparse.sampled_addmm`` computes exactly those entries of
        ``x [A_1^T ... A_N^T]`` (every ``A_e x`` that is needed, and no other), they are
        scaled by the routing weights, and ``out += Z @ [s_1 B_1^T; ...; s_N B_N^T]`` (a CSR
        times dense product). No gathered copies of the inputs, no padding, no scatter.
        Returns False (nothing added) where a token picks one expert twice; the blocks then
        add both."""
        t, k = idx.shape
        n, r = self.n_experts, self.lora_BT.shape[1]
        if filtered:  # -1 and computation-free experts: only the LoRA picks, token by token
            keep = (idx >= 0) & (idx < n)
            rows = torch.arange(t, device=x.device).unsqueeze(1)
            key, order = torch.where(keep, rows * n + idx, t * n).reshape(-1).sort()  # dropped ones last
            m = int(keep.sum())
            if m == 0:
                return True
            key, order = key[:m], order[:m]
            if k > 1 and bool((key[1:] == key[:-1]).any()):
                return False
            experts, w = key.remainder(n), weight.reshape(-1).index_select(0, order)
            crow = torch.zeros(t + 1, dtype=torch.long, device=x.device)
            crow[1:] = torch.bincount(key.div(n, rounding_mode="floor"), minlength=t).cumsum(0)
        else:
            experts, order = idx.sort(dim=-1)  # columns ascending within a row
            if k > 1 and bool((experts[:, 1:] == experts[:, :-1]).any()):
                return False
            experts, w = experts.reshape(-1), weight.gather(1, order).reshape(-1)
            crow = torch.arange(0, t * k + 1, k, device=x.device)
        cols = (experts.unsqueeze(1) * r + torch.arange(r, device=x.device)).reshape(-1)
        pattern = torch.sparse_csr_tensor(crow * r, cols, x.new_zeros(cols.numel()), (t, n * r))
        A = self.lora_AT.transpose(1, 2).reshape(n * r, -1)  # [N, r, d_in]: lora_A itself when sparse
        z = torch.sparse.sampled_addmm(pattern, x, A.t(), beta=0.0)
        z.values().view(-1, r).mul_(w.unsqueeze(1))
        out.addmm_(z, self.lora_BT.view(n * r, -1))
        return True

    def _add_products(self, out, x, experts, weight, inplace=True, rows=None, k=1):
        """Add ``weight[i] · s_e B_e A_e x[t]`` (``e = experts[i]``, a LoRA expert) to
        ``out[t]`` for every assignment ``i``, where ``t = rows[i] // k`` (``rows`` None: the
        assignments are all ``k`` choices of every token, ``t = i // k``), by sorted blocks
        (see the module docstring)."""
        n = self.n_experts
        order = torch.argsort(experts, stable=True)  # assignments grouped by expert
        counts = torch.bincount(experts, minlength=n)
        tokens = order if rows is None else rows.index_select(0, order)
        tokens = tokens // k if k > 1 else tokens
        weight = weight.index_select(0, order)
        if self._use_grouped_mm and inplace and x.device.type in self.grouped_mm_devices:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            try:
                z = F.grouped_mm(x.index_select(0, tokens), self.lora_AT, offs=offs).mul_(weight[:, None])
                return out.index_add_(0, tokens, F.grouped_mm(z, self.lora_BT, offs=offs).to(out.dtype))
            except RuntimeError:  # unsupported here (e.g. an old GPU): padded blocks from now on
                self._use_grouped_mm = False
        m = experts.numel()
        size, one_each = self._block_size(counts, m)
        blocks = (counts + (size - 1)).div_(size, rounding_mode="floor")  # per expert
        ends = torch.cumsum(blocks, 0)
        n_blocks = int(ends[-1])
        # slot of each sorted assignment: its expert's first block * size + rank among its rows
        experts = experts.index_select(0, order)
        starts = torch.cumsum(counts, 0).sub_(counts)
        slot = (ends - blocks).index_select(0, experts).mul_(size)
        slot += torch.arange(m, device=x.device) - starts.index_select(0, experts)
        # padding rows read token 0 with weight 0: they add exact zeros to it
        src = torch.zeros(n_blocks * size, dtype=torch.long, device=x.device).index_copy_(0, slot, tokens)
        w = weight.new_zeros(n_blocks * size).index_copy(0, slot, weight).view(n_blocks, 1, size)
        A, BT = self.lora_AT.transpose(1, 2), self.lora_BT  # [N, r, d_in]: lora_A itself when sparse
        if not one_each:  # some experts unused, or split: factors per block
            owner = torch.repeat_interleave(torch.arange(n, device=x.device), blocks, output_size=n_blocks)
            A, BT = A.index_select(0, owner), BT.index_select(0, owner)
        # the blocks in chunks whose gathered inputs and products stay in cache (timed alone on
        # AMD EPYC, 2 cores, AVX-512 yes: B products and scatter for 1536-wide outputs 1.65 ms in chunks of 4-8
        # blocks against 2.7 ms in one pass; the whole model at 210 modules, N=32: ~5% faster)
        step = max(1, self.chunk_bytes // (size * max(x.shape[1], BT.shape[2]) * x.element_size()))
        for first in range(0, n_blocks, step):
            last = min(n_blocks, first + step)
            rows = src[first * size : last * size]
            xb = x.index_select(0, rows).view(last - first, size, -1)
            z = torch.bmm(A[first:last], xb.transpose(1, 2))  # [blocks, r, size]: A_e x for each row
            z = z.mul_(w[first:last]) if inplace else z * w[first:last]
            y = torch.bmm(z.transpose(1, 2), BT[first:last]).view(-1, BT.shape[2])  # [rows, d_out]
            out = out.index_add_(0, rows, y.to(out.dtype)) if inplace else out.index_add(0, rows, y.to(out.dtype))
        return out

    @staticmethod
    def _block_size(counts: torch.Tensor, m: int) -> tuple[int, bool]:
        """Rows per block for ``counts`` assignments per expert (``m`` in all), and whether
        that makes exactly one block per expert: one block per used expert, the size of the
        largest; if that more than doubles the rows (unbalanced routing), blocks of the mean
        size, heavy experts taking several."""
        largest, used = torch.stack([counts.max(), (counts > 0).sum()]).tolist()
        if largest * used <= 2 * m:
            return largest, used == counts.numel()
        return -(-m // used), False

    def dense_delta(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Reference: every expert computed for every token, masked by the routing weights."""
        t = x.shape[0]
        p = x.new_zeros(t, self.n_experts + 1)  # last column swallows idx == -1 and free experts
        col = torch.where((idx >= 0) & (idx < self.n_experts), idx, self.n_experts)
        p.scatter_add_(1, col, weight.to(x.dtype))
        out = x.new_zeros(t, self.out_features)
        for j, (A, B) in enumerate(self.factors()):
            out += p[:, j : j + 1] * (self.scalings[j] * (x @ A.T @ B.T))
        return out

    def extra_repr(self) -> str:
        return f"path={self.path!r}, experts={self.n_experts}, dense={self.dense}"
