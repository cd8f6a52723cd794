"""Routing statistics: what the routers chose, per routed module.

A :class:`RoutingRecord` collects, for every forward call of every routed module, the
chosen experts and weights (on CPU). It is filled inside ``RoutedModel.record()``.

Attention masks: a mask ``[batch, seq]`` is applied to the calls whose token grid has that
shape (the encoder, or a decoder-only model's full pass); tokens of calls of any other shape
(a T5 decoder, cached generation steps) are all counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class _Call:
    shape: tuple[int, ...]  # token grid, e.g. (batch, seq)
    idx: torch.Tensor  # [tokens, k]
    weight: torch.Tensor  # [tokens, k]


@dataclass
class RoutingRecord:
    """Routing decisions of the forward passes run while recording."""

    expert_names: dict[str, list[str]] = field(default_factory=dict)  # module path -> route names
    n_lora: dict[str, int] = field(default_factory=dict)  # module path -> LoRA experts there
    calls: dict[str, list[_Call]] = field(default_factory=dict)

    def add(self, layer, shape, route) -> None:
        self.expert_names.setdefault(layer.path, list(layer.route_names))
        self.n_lora.setdefault(layer.path, layer.n_experts)
        call = _Call(tuple(shape), route.idx.detach().cpu(), route.weight.detach().float().cpu())
        self.calls.setdefault(layer.path, []).append(call)

    def _selected(self, call: _Call, mask: torch.Tensor | None, example: int | None):
        idx, weight = call.idx, call.weight
        keep = None
        if mask is not None and tuple(mask.shape) == call.shape:
            keep = mask.reshape(-1).bool().cpu()
        if example is not None:
            rows = torch.zeros(call.shape, dtype=torch.bool)
            if len(call.shape) < 2 or example >= call.shape[0]:
                return idx[:0], weight[:0]
            rows[example] = True
            rows = rows.reshape(-1)
            keep = rows if keep is None else keep & rows
        if keep is not None:
            idx, weight = idx[keep], weight[keep]
        return idx, weight

    def stats(self, attention_mask: torch.Tensor | None = None, example: int | None = None) -> dict[str, dict]:
        """Per routed module: ``tokens`` counted; ``load`` = {expert: fraction of tokens that
        use it} (sums to the effective k; computation-free experts included by name);
        ``entropy`` = entropy (nats) of the load shares (``load / sum``; log N is perfectly
        balanced); ``token_entropy`` = mean entropy of a token's normalised routing weights
        (0 for k = 1); ``lora_products`` = LoRA expert products computed per token."""
        report = {}
        for path, calls in self.calls.items():
            names = self.expert_names[path]
            counts = torch.zeros(len(names))
            tokens, token_entropy = 0, 0.0
            for call in calls:
                idx, weight = self._selected(call, attention_mask, example)
                valid = idx >= 0
                counts += torch.bincount(idx[valid], minlength=len(names)).float()
                tokens += idx.shape[0]
                w = weight * valid
                p = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
                token_entropy += float(-(p * torch.log(p.clamp_min(1e-12))).sum())
            load = counts / max(tokens, 1)
            share = counts / counts.sum().clamp_min(1)
            entropy = float(-(share * torch.log(share.clamp_min(1e-12))).sum())
            report[path] = {
                "tokens": tokens,
                "load": {n: float(v) for n, v in zip(names, load)},
                "entropy": entropy,
                "max_entropy": math.log(len(names)) if names else 0.0,
                "token_entropy": token_entropy / max(tokens, 1),
                "lora_products": float(load[: self.n_lora[path]].sum()),
            }
        return report

    def explain(self, example: int = 0, attention_mask: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
        """Experts used per routed module for one example of the batch: {path: {expert: share
        of the example's tokens that used it}}, experts never used omitted, largest first."""
        out = {}
        for path, s in self.stats(attention_mask, example=example).items():
            used = {n: v for n, v in s["load"].items() if v > 0}
            out[path] = dict(sorted(used.items(), key=lambda kv: -kv[1]))
        return out
