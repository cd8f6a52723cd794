"""The routed LoRA dispatch kernels: pure functions over one stacked layout of the experts.

Each adds the routed LoRA delta to ``out`` [T, d_out] (in place; out of place with
``inplace=False``, for gradients) and returns it. Semantics::

    for t, k in product(range(T), range(K)):
        e = idx[t, k]
        if 0 <= e < N:  # -1 (no expert) and computation-free indices add nothing
            out[t] += weight[t, k] * (A[e] @ x[t]) @ BT[e]

The layout, allocated once by :class:`~recycle.routing.layer.RoutedLoraLinear`: each expert's
rows after the previous one's, whatever the ranks: ``A`` ``[R, d_in]`` (``R = Σ_j r_j``; each
``A_j`` as PEFT stores it), ``BT`` ``[R, d_out]`` (``s_j B_j^T``, the scaling folded in), expert
``j`` at rows ``start[j] ... start[j] + rank[j]``, ``owner`` ``[R]`` the expert of each row; and
``A_cat`` ``[d_in, R]`` (each ``A_j^T`` side by side) for the dense kernel where the layer is
narrow enough for it (a view of ``A`` there is a different BLAS call, with different bits). The
block and grouped kernels take a padded ``[N, r_max, d]`` layout the layer makes from these
where they run. ``rank``: the rank all experts share, or 0 where they differ.

- :func:`add_dense`, for few experts: ``x A_cat`` in one matmul, each expert's block times its
  routing weight (zero where not chosen), then one matmul with the stacked ``BT``: all N
  products in ~6 operations, on CPU as fast as the sparse kernels up to ``dense_max_columns``.
- :func:`add_csr`, on CPU without gradients: the chosen (token, expert) pairs, ``r`` columns
  each, are the pattern of a CSR matrix ``[T, N r]``; ``sampled_addmm`` computes ``x A_cat`` at
  exactly those entries, scaled by the routing weights, and the CSR result times ``BT`` is added
  (MKL's sparse kernels, no gathers, padding or scatter: 1.27x the base model against 1.36x with
  blocks, at 210 routed modules, N=32, 1024 tokens).
- :func:`add_blocks`, over the assignments sorted by expert (:func:`sort_by_expert`): blocks of
  equal size, each one expert's rows (padded with weight-0 rows); one gather of the inputs, two
  ``bmm`` (``A_e x`` as ``[r, d_in] @ [d_in, rows]``, whose wide output vectorises well on CPU,
  then ``@ BT_e``), the weighted rows added to their tokens with ``index_add_``. A block per used
  expert while the largest pads the others to at most twice the assignments; else heavy experts
  split into blocks of the mean size (padding again at most doubles the rows).
- :func:`add_grouped`, on CUDA: ``grouped_mm``, one GEMM per expert over ragged blocks, no
  padding or host sync.
"""

import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
# add_csr's pattern is sorted and in range by construction: torch's opt-in check stays off
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def add_dense(out, x, A_cat, BT, owner, n, rank, idx, weight, filtered, inplace=True, z=None):
    """``x A_cat`` (or ``z``, computed already: a view into siblings' shared product), scaled
    per expert by ``p[t, e] = Σ_k weight[t, k] [idx[t, k] = e]``, times the stacked ``BT``.
    ``filtered``: ``idx`` may hold indices outside ``0..N-1`` (dropped)."""
    t = x.shape[0]
    if filtered:  # -1 and computation-free experts land in an extra column, dropped
        col = torch.where((idx >= 0) & (idx < n), idx, n)
        p = x.new_zeros(t, n + 1).scatter_add_(1, col, weight)[:, :n]
    else:
        p = x.new_zeros(t, n).scatter_add_(1, idx, weight)
    if z is None:
        z = torch.mm(x, A_cat)
        if rank:
            z = z.view(t, n, -1)
            z = (z.mul_(p.unsqueeze(-1)) if inplace else z * p.unsqueeze(-1)).view(t, -1)
        else:  # ranks differ: each column times its expert's weight
            z = z.mul_(p.index_select(1, owner)) if inplace else z * p.index_select(1, owner)
    elif rank:  # not in place
        z = (z.view(t, n, -1) * p.unsqueeze(-1)).view(t, -1)
    else:
        z = z * p.index_select(1, owner)
    if not inplace:
        return out + (z @ BT).to(out.dtype)
    if out.dtype == z.dtype:
        return out.addmm_(z, BT)
    return out.add_((z @ BT).to(out.dtype))


def add_csr(out, x, A, BT, start, ranks, rank, idx, weight, filtered) -> bool:
    """In place, as two sparse-dense products (see the module docstring); ``x``, ``out``
    float32/64 on CPU. Returns False (nothing added) where a token picks one expert twice;
    :func:`add_blocks` then adds both."""
    t, k = idx.shape
    n = start.shape[0]
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
    if rank:  # every expert r rows: pair i's columns are experts[i] * r ... + r
        cols = (experts.unsqueeze(1) * rank + torch.arange(rank, device=x.device)).reshape(-1)
        crow, values_w, width = crow * rank, None, rank
    else:  # ranks differ: pair i's columns are start[e] ... start[e] + rank[e]
        r = ranks.index_select(0, experts)
        ends = r.cumsum(0)
        total = int(ends[-1]) if ends.numel() else 0
        pair = torch.repeat_interleave(torch.arange(r.numel(), device=x.device), r, output_size=total)
        cols = start.index_select(0, experts).index_select(0, pair) + torch.arange(total, device=x.device) \
            - (ends - r).index_select(0, pair)
        crow = torch.cat([ends.new_zeros(1), ends]).index_select(0, crow)
        values_w, width = w.index_select(0, pair), 0
    pattern = torch.sparse_csr_tensor(crow, cols, x.new_zeros(cols.numel()), (t, A.shape[0]))
    z = torch.sparse.sampled_addmm(pattern, x, A.t(), beta=0.0)
    if width:
        z.values().view(-1, width).mul_(w.unsqueeze(1))
    else:
        z.values().mul_(values_w)
    out.addmm_(z, BT)
    return True


def sort_by_expert(experts, weight, n, rows=None, k=1):
    """Assignments ``i`` (expert ``experts[i]`` in ``0..N-1``, weight ``weight[i]``, token ``rows[i] // k``,
    or ``i // k`` where ``rows`` is None: all ``k`` choices of every token) sorted by expert, as
    :func:`add_blocks` and :func:`add_grouped` take them: ``(tokens, experts, weights, counts)``."""
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=n)
    tokens = order if rows is None else rows.index_select(0, order)
    tokens = tokens // k if k > 1 else tokens
    return tokens, experts.index_select(0, order), weight.index_select(0, order), counts


def add_grouped(out, x, A, BT, tokens, counts, weight):
    """In place, by ``grouped_mm`` over sorted assignments; RuntimeError (nothing added) if unsupported."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    z = F.grouped_mm(x.index_select(0, tokens), A.mT, offs=offs).mul_(weight[:, None])
    return out.index_add_(0, tokens, F.grouped_mm(z, BT, offs=offs).to(out.dtype))


def add_blocks(out, x, A, BT, tokens, experts, weight, counts, inplace=True, chunk_bytes=4 << 20):
    """By padded blocks (see the module docstring) over the assignments sorted by expert
    (:func:`sort_by_expert`), in chunks of about ``chunk_bytes`` of gathered input or
    product rows, so that they stay in cache between the steps."""
    n, m = BT.shape[0], experts.numel()
    size, one_each = block_size(counts, m)
    blocks = (counts + (size - 1)).div_(size, rounding_mode="floor")  # per expert
    ends = torch.cumsum(blocks, 0)
    n_blocks = int(ends[-1])
    # slot of each sorted assignment: its expert's first block * size + rank among its rows
    starts = torch.cumsum(counts, 0).sub_(counts)
    slot = (ends - blocks).index_select(0, experts).mul_(size)
    slot += torch.arange(m, device=x.device) - starts.index_select(0, experts)
    # padding rows read token 0 with weight 0: they add exact zeros to it
    src = torch.zeros(n_blocks * size, dtype=torch.long, device=x.device).index_copy_(0, slot, tokens)
    w = weight.new_zeros(n_blocks * size).index_copy(0, slot, weight).view(n_blocks, 1, size)
    if not one_each:  # some experts unused, or split: factors per block
        owner = torch.repeat_interleave(torch.arange(n, device=x.device), blocks, output_size=n_blocks)
        A, BT = A.index_select(0, owner), BT.index_select(0, owner)
    # chunks whose gathers and products stay in cache (AMD EPYC, 2 cores, AVX-512 yes: B products and scatter
    # for 1536-wide outputs 1.65 ms in chunks of 4-8 blocks, 2.7 ms in one pass; the model at 210 modules, N=32: ~5%)
    step = max(1, chunk_bytes // (size * max(x.shape[1], BT.shape[2]) * x.element_size()))
    for first in range(0, n_blocks, step):
        last = min(n_blocks, first + step)
        rows = src[first * size : last * size]
        xb = x.index_select(0, rows).view(last - first, size, -1)
        z = torch.bmm(A[first:last], xb.transpose(1, 2))  # [blocks, r, size]: A_e x for each row
        z = z.mul_(w[first:last]) if inplace else z * w[first:last]
        y = torch.bmm(z.transpose(1, 2), BT[first:last]).view(-1, BT.shape[2])  # [rows, d_out]
        out = out.index_add_(0, rows, y.to(out.dtype)) if inplace else out.index_add(0, rows, y.to(out.dtype))
    return out


def block_size(counts: torch.Tensor, m: int) -> tuple[int, bool]:
    """Rows per block for ``counts`` assignments per expert (``m`` in all), and whether that makes
    one block per expert: a block per used expert, the size of the largest; if that more than
    doubles the rows (unbalanced routing), blocks of the mean size, heavy experts taking several."""
    largest, used = torch.stack([counts.max(), (counts > 0).sum()]).tolist()
    if largest * used <= 2 * m:
        return largest, used == counts.numel()
    return -(-m // used), False
