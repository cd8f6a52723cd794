"""Work shared by routed modules that read the same input.

In a transformer block q/k/v read one input and gate/up another (T5: q/k/v, wi_0/wi_1).
When such siblings are routed by standardised gate scores (PHATGOOSE, average activation),
what each would compute from that input is computed once for all: the standardisation
(mean and variance of x), one score matmul against the stacked keys of every sibling, and,
for the siblings that dispatch densely, one matmul against their stacked A factors. The first sibling
called with an input computes it; the others take their column slices while the input is
the same tensor (same storage, shape and version); once every sibling has taken its part
the cache is dropped (and it is reset with the routing context on every forward).
"""

from __future__ import annotations

import torch

SIBLINGS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"q", "k", "v"}, {"wi_0", "wi_1"},
            {"query", "key", "value"})


def shareable(layer) -> bool:
    """Routed by standardised gate scores (nothing computation-free)."""
    from recycle.routing.routers import AvgActivationRouter, GateRouter

    return type(layer.router) in (GateRouter, AvgActivationRouter)


class SiblingGroup:
    """Routed layers that read the same input (see the module docstring)."""

    def __init__(self, layers: list):
        self.layers = list(layers)
        proj = [layer.router.proj for layer in self.layers]
        self.n = [p.shape[1] - 1 for p in proj]  # experts per layer
        # [d, Σ N_i + 1]: every sibling's keys, then one column of 1/d (the mean of x)
        self.proj = torch.cat([p[:, :-1] for p in proj] + [proj[0][:, -1:]], dim=1).contiguous()
        a = [layer.lora_A_cat for layer in self.layers if layer.dense]
        self.width = [layer.lora_A_cat.shape[1] if layer.dense else 0 for layer in self.layers]
        self.A = torch.cat(a, dim=1).contiguous() if a else None  # [d, Σ N_i r_i] of the dense ones
        self._key = None
        self._parts: dict = {}

    def reset(self) -> None:
        self._key, self._parts = None, {}

    def take(self, layer, x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(raw scores [T, N], 1/std [T, 1], A products [T, N r] or None where ``layer``
        dispatches sparsely)`` of ``layer`` for input ``x`` [T, d] (computed for every
        sibling on first use)."""
        # Inference tensors (torch.inference_mode) carry no version counter; there the key is
        # the storage, shape and dtype, and the cache still lasts one pass over the siblings.
        key = (x.data_ptr(), tuple(x.shape), None if x.is_inference() else x._version, x.dtype)
        if key != self._key or layer not in self._parts:
            self._compute(x, eps)
            self._key = key
        return self._parts.pop(layer)

    def _compute(self, x: torch.Tensor, eps: float) -> None:
        xs = x.to(self.proj.dtype)
        raw = xs @ self.proj
        mean = raw[:, -1:]
        var = torch.linalg.vector_norm(xs, dim=-1, keepdim=True).square_().div_(xs.shape[-1]).sub_(mean.square())
        if bool((mean.square() > 1000 * var).any()) or xs.device.type != "cpu":  # exact, as GateRouter does
            xc = xs - xs.mean(-1, keepdim=True)
            raw = xc @ self.proj
            rstd = xc.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        else:
            rstd = var.clamp_min_(0).add_(eps).rsqrt_()
        z = None if self.A is None else x.to(self.A.dtype) @ self.A
        self._parts = {}
        s = w = 0
        for layer, n, width in zip(self.layers, self.n, self.width):
            self._parts[layer] = (raw[:, s:s + n], rstd, z[:, w:w + width] if width else None)
            s, w = s + n, w + width


def group_siblings(layers: dict) -> list[SiblingGroup]:
    """Attach a :class:`SiblingGroup` (``layer.group``) to every set of two or more
    shareable routed layers that are siblings: the same parent module, names in one of
    ``SIBLINGS``, the same input size, dtype and device."""
    by_parent: dict[tuple, list] = {}
    for path, layer in layers.items():
        parent, _, leaf = path.rpartition(".")
        for i, names in enumerate(SIBLINGS):
            if leaf in names and shareable(layer):
                w = layer.weight
                by_parent.setdefault((parent, i, layer.in_features, w.dtype, str(w.device)), []).append(layer)
    groups = []
    for members in by_parent.values():
        if len(members) > 1:
            group = SiblingGroup(members)
            for layer in members:
                layer.group = group
            groups.append(group)
    return groups
