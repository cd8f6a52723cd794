"""The MoE++ router (the maths: :mod:`recycle.methods.moepp`, whose method installs it):
PHATGOOSE scores plus computation-free experts and gating residuals, and the switch to
plain PHATGOOSE routing that distillation uses as its teacher."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from recycle.routing.context import Route
from recycle.routing.routers import GateRouter

if TYPE_CHECKING:
    from recycle.methods.moepp import MoeppSettings

MARGIN = 1.0  # a computation-free expert's logit starts this far below the token's k-th LoRA logit




def free_names(s: MoeppSettings) -> tuple[str, ...]:
    def named(kind, n):
        return [f"@{kind}"] if n == 1 else [f"@{kind}{i}" for i in range(n)]

    return tuple(named("zero", s.zero) + named("copy", s.copy) + [f"@constant{i}" for i in range(s.constant)])


class MoeppRouter(GateRouter):
    """PHATGOOSE scores for the LoRA experts plus learned rows for the computation-free ones,
    the gating residual, and the computation-free experts' outputs (see :mod:`recycle.methods.moepp`)."""

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
