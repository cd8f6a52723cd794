"""The routed LoRA layer: one base ``nn.Linear`` plus the experts that adapt it.

``y = W x + Σ_{k ∈ chosen(x)} p_k · s_k B_k A_k x``, where a router picks the experts and
weights per token. The layer stacks the experts' factors once, in the layout the kernels
read, and picks a kernel (:mod:`recycle.routing.kernels`; they give the same result,
tests/test_routing.py): dense for few experts (``N · r_max <= dense_max_columns``: all N
products in one matmul), otherwise sparse, only the chosen experts' products (sparse-dense
products on CPU without gradients, else ``grouped_mm`` on CUDA, else padded blocks). Layers
whose router has computation-free experts (MoE++) always dispatch sparsely, so that a token
routed to them computes fewer LoRA products.

The router is a module of its own (``layer.router``, see :mod:`recycle.routing.routers`),
built from the layer by :meth:`RoutedLoraLinear.set_router`. The layers of one model share a
:class:`~recycle.routing.context.RoutingContext` (``layer.context``) that carries state from
one routed layer to the next within a forward pass. ``layer.delta(x, route)`` is the mixture
``Δ_mix`` as a tensor; the forward adds it in place without materialising it unless the
router or the context asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from recycle.errors import RecycleError
from recycle.routing import kernels
from recycle.routing.context import Route, RoutingContext, module_kind
from recycle.routing.experts import ExpertModule

_CSR_DTYPES = (torch.float32, torch.float64)  # kernels.add_csr's
# On CPU, the CSR kernel runs these in float32: x cast, factors copied to float32 once
_CSR_CAST = (torch.bfloat16, torch.float16)


class RoutedLoraLinear(nn.Module):
    """A base ``nn.Linear`` with N LoRA experts and a router.

    Args:
        base_layer: the original linear layer; kept as is (its weights are never touched).
        path: the module's path in the model (for messages and statistics).
        experts: ``(global index, name, ExpertModule)`` for each expert adapting this module.
        n_total: number of experts in the whole composition (for global -> local indices).
        context: the routing context shared by the model's routed layers.

    Expert factors are non-persistent buffers (they follow ``.to()`` but stay out of the
    ``state_dict``), cast to the base layer's dtype and device, stacked here once, each expert's
    rows after the previous one's (no padding, whatever the ranks): ``A_rows`` ``[R, d_in]``
    (``R = Σ_j r_j``; each ``A_j`` as PEFT stores it), ``BT_rows`` ``[R, d_out]`` (``s_j B_j^T``,
    the scaling folded in), expert ``j`` at rows ``row_start[j] ... + rank_of[j]``, and
    ``lora_A_cat`` ``[d_in, R]`` where the dense kernel may run (else None). The padded
    ``[N, r_max, d]`` layout of the block and ``grouped_mm`` kernels (:attr:`lora_A`,
    :attr:`lora_BT`) is made from these only where those kernels run (gradients, CUDA) and
    kept while the rows are unchanged; bfloat16/float16 factors on CPU keep a float32 copy
    of the rows instead, for the CSR kernel (which takes float32/64 only; the products then
    run in float32 on the activations cast, one rounding when added). Call
    :meth:`set_router` first.
    """

    #: dispatch: while the stacked rank N * r_max is at most this, the dense path (T·N·r·(d_in +
    #: d_out) multiply-adds in ~6 operations) runs instead of the sparse one (T·k·r·(d_in +
    #: d_out) multiply-adds, plus building the pattern or blocks); read when the layer is built.
    #: 0: always sparse. None: the crossover measured on CPU (benchmarks/routing.py, a model of
    #: SmolLM2's shape): 64 where the sparse dispatch is the sparse-dense products (CPU,
    #: float32/64: at N·r = 64 dense 1.19x the base, products 1.23x; at 128, 1.35x against
    #: 1.24x), 128 where it is padded blocks.
    dense_max_columns: int | None = None
    #: devices where the sparse dispatch uses ``grouped_mm`` (ragged blocks, no host sync)
    #: rather than padded blocks and ``bmm``; on CPU grouped_mm is a loop of small GEMMs whose
    #: r-wide outputs vectorise poorly (2-4x slower than the blocks here).
    grouped_mm_devices: tuple[str, ...] = ("cuda",)
    #: sparse dispatch on CPU: blocks in chunks of about this many bytes (kernels.add_blocks)
    chunk_bytes: int = 4 << 20
    #: sparse dispatch on CPU without gradients: two sparse-dense products (kernels.add_csr)
    #: instead of padded blocks
    csr: bool = True

    def __init__(self, base_layer: nn.Linear, path: str, experts: list[tuple[int, str, ExpertModule]], n_total: int,
                 context: RoutingContext | None = None):
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
        starts = [0]
        for r in self.ranks:
            starts.append(starts[-1] + r)
        A = torch.empty(starts[-1], base_layer.in_features, dtype=w.dtype, device=w.device)
        BT = torch.empty(starts[-1], base_layer.out_features, dtype=w.dtype, device=w.device)
        for _, name, m in experts:
            if m.A.shape[1] != base_layer.in_features or m.B.shape[0] != base_layer.out_features:
                raise RecycleError(
                    f"expert {name} at {path}: A {tuple(m.A.shape)} B {tuple(m.B.shape)} do not fit "
                    f"Linear({base_layer.in_features}, {base_layer.out_features})"
                )
        self.dense = False  # the dispatch, dense or sparse: set with the router
        self.register_buffer("A_rows", A, persistent=False)
        self.register_buffer("BT_rows", BT, persistent=False)
        ranks = torch.tensor(self.ranks, dtype=torch.long)
        self.register_buffer("row_start", torch.tensor(starts[:-1], dtype=torch.long).to(w.device), persistent=False)
        self.register_buffer("rank_of", ranks.to(w.device), persistent=False)
        self.register_buffer("row_owner", torch.repeat_interleave(torch.arange(len(experts)), ranks).to(w.device),
                             persistent=False)
        #: the rank every expert here has, or 0 where they differ (the kernels' simpler path)
        self.common_rank = self.ranks[0] if self.ranks and len(set(self.ranks)) == 1 else 0
        self.register_buffer("lora_A_cat", None, persistent=False)
        self._starts = starts
        if not any(m.A.is_meta for _, _, m in experts):
            for j, (_, name, m) in enumerate(experts):
                self.fill(j, m, name)
            self.finish()
        self._padded_cache: tuple | None = None
        self._float32_cache: tuple | None = None
        size = w.element_size()
        self._use_grouped_mm = hasattr(F, "grouped_mm") and w.dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and (base_layer.in_features * size) % 16 == 0 and (base_layer.out_features * size) % 16 == 0

    def fill(self, j: int, m: ExpertModule, name: str = "") -> None:
        """Copy local expert ``j``'s factors into its rows (``s_j B_j^T`` with the scaling
        folded in); :meth:`finish` once every expert is in."""
        w = self.base_layer.weight
        rows = slice(self._starts[j], self._starts[j + 1])
        if tuple(m.A.shape) != (rows.stop - rows.start, self.in_features) or m.B.shape[0] != self.out_features:
            raise RecycleError(f"expert {name or j} at {self.path}: its factors no longer have the shapes "
                               "its file announced")
        wide = torch.promote_types(w.dtype, torch.float32)
        self.A_rows[rows] = m.A.to(w.device, w.dtype)
        self.BT_rows[rows] = (m.scaling * m.B.T.to(wide)).to(w.device, w.dtype)

    def finish(self) -> None:
        """After the last :meth:`fill`: the dense kernel's ``A_cat``, where it may run."""
        w = self.base_layer.weight
        narrow = self.A_rows.shape[0] <= self.dense_limit(w.device.type, w.dtype)
        self.lora_A_cat = self.A_rows.T.contiguous() if narrow else None

    def set_router(self, router: nn.Module) -> None:
        """Own ``router`` (built from this layer) and choose the dispatch: dense for few
        experts, unless the router has computation-free experts (their saving is only real
        in sparse dispatch). The factors stay as they are."""
        self.router = router
        self.dense = self.lora_A_cat is not None and not router.n_free

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
        for j, (start, r) in enumerate(zip(self.row_start.tolist(), self.ranks)):
            yield self.A_rows[start:start + r], self.BT_rows[start:start + r].T / self.scalings[j]

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [N, r_max, d_in], BT [N, r_max, d_out])``: the rows zero-padded to one rank,
        rounded up to 16 bytes (rows of ``A^T x`` and ``B^T`` aligned, as ``grouped_mm`` needs),
        for the block and grouped kernels; made on first use, kept while the rows are the same."""
        A, BT = self.A_rows, self.BT_rows
        key = (A.data_ptr(), A.dtype, A.device, BT.data_ptr())
        if self._padded_cache is None or self._padded_cache[0] != key:
            n, size = len(self.ranks), A.element_size()
            r_max = -(-max(self.ranks, default=0) // max(1, 16 // size)) * max(1, 16 // size)
            slot = self.row_owner * r_max + (torch.arange(A.shape[0], device=A.device)
                                             - self.row_start.index_select(0, self.row_owner))
            pa = A.new_zeros(n * r_max, A.shape[1]).index_copy_(0, slot, A).view(n, r_max, -1)
            pb = BT.new_zeros(n * r_max, BT.shape[1]).index_copy_(0, slot, BT).view(n, r_max, -1)
            self._padded_cache = (key, pa, pb)
        return self._padded_cache[1], self._padded_cache[2]

    def _float32_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_rows, BT_rows)`` in float32, for the CSR kernel on bfloat16/float16 factors
        (it takes float32/64 only); made on first use, kept while the rows are the same. A
        copy, not a cast per call: a fresh float32 tensor each forward costs its page faults,
        and the padded blocks it replaces copy the factors too."""
        A, BT = self.A_rows, self.BT_rows
        key = (A.data_ptr(), A._version, A.dtype, BT.data_ptr(), BT._version)
        if self._float32_cache is None or self._float32_cache[0] != key:
            self._float32_cache = (key, A.float(), BT.float())
        return self._float32_cache[1], self._float32_cache[2]

    @property
    def lora_A(self) -> torch.Tensor:
        """The factors A in the padded layout ``[N, r_max, d_in]`` (see :meth:`_padded`)."""
        return self._padded()[0]

    @property
    def lora_BT(self) -> torch.Tensor:
        """``s_j B_j^T`` in the padded layout ``[N, r_max, d_out]`` (see :meth:`_padded`)."""
        return self._padded()[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        ctx = self.context
        if self.group is not None and not ctx.keep_deltas and not torch.is_grad_enabled():
            return self._forward_shared(x, result)
        route = self.router(x, self)
        if ctx.recorder is not None:
            ctx.recorder.add(self, x.shape[:-1], route)
        x2d = x.reshape(-1, x.shape[-1]).to(self.A_rows.dtype)
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
            self.add_sparse_delta(out, x2d.to(self.A_rows.dtype), idx, weight)
        else:
            kernels.add_dense(out, x2d, self.lora_A_cat, self.BT_rows, self.row_owner, self.n_experts,
                              self.common_rank, idx,
                              weight.to(z.dtype), False, z=z)
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
        """Add the routed LoRA delta to ``out`` [tokens, d_out] (returns ``out``) with the
        kernel that fits: dense, sparse-dense products, grouped_mm or padded blocks."""
        t, k = idx.shape
        if t * k == 0:
            return out
        weight = weight.to(x.dtype)
        filtered = self.router.may_skip or self.router.n_free  # indices outside 0..N-1 occur
        # in place where no gradient flows through (inference); out of place when training
        inplace = not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad or out.requires_grad)
        if self.dense:
            return kernels.add_dense(out, x, self.lora_A_cat, self.BT_rows, self.row_owner, self.n_experts,
                              self.common_rank, idx,
                                     weight, filtered, inplace)
        if inplace and self.csr and x.device.type == "cpu" and x.dtype in _CSR_DTYPES + _CSR_CAST \
                and out.dtype == x.dtype:
            if x.dtype in _CSR_DTYPES:
                acc, xs, ws, (A, BT) = out, x, weight, (self.A_rows, self.BT_rows)
            else:  # bfloat16/float16: the products in float32, added to out once (one rounding)
                acc, xs, ws = out.new_zeros(out.shape, dtype=torch.float32), x.float(), weight.float()
                A, BT = self._float32_rows()
            if kernels.add_csr(acc, xs, A, BT, self.row_start, self.rank_of, self.common_rank, idx, ws, filtered):
                return out if acc is out else out.add_(acc)
        experts, weight = idx.reshape(-1), weight.reshape(-1)
        if filtered:  # only the assignments to LoRA experts are computed
            rows = ((experts >= 0) & (experts < self.n_experts)).nonzero().squeeze(1)
            if rows.numel() == 0:
                return out
            experts, weight = experts.index_select(0, rows), weight.index_select(0, rows)
        else:
            rows = None
        return self._add_products(out, x, experts, weight, inplace, rows=rows, k=k)

    def _add_products(self, out, x, experts, weight, inplace=True, rows=None, k=1):
        """Add ``weight[i] · s_e B_e A_e x[t]`` (``e = experts[i]``, a LoRA expert, ``t =
        rows[i] // k``; see :func:`kernels.sort_by_expert`) with grouped_mm or padded blocks."""
        tokens, experts, weight, counts = kernels.sort_by_expert(experts, weight, self.n_experts, rows, k)
        if self._use_grouped_mm and inplace and x.device.type in self.grouped_mm_devices:
            try:
                return kernels.add_grouped(out, x, self.lora_A, self.lora_BT, tokens, counts, weight)
            except RuntimeError:  # unsupported here (e.g. an old GPU): padded blocks from now on
                self._use_grouped_mm = False
        return kernels.add_blocks(out, x, self.lora_A, self.lora_BT, tokens, experts, weight, counts, inplace,
                                  self.chunk_bytes)

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
