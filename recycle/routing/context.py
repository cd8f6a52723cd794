"""What a router hands its layer, and what the routed layers of one model share per forward.

- :class:`Route`: a router's answer for the tokens of one module call: ``idx`` [T, k] (local
  expert indices: ``0..N-1`` the LoRA experts present at the module, ``N..N+Z-1`` the
  router's computation-free experts, ``-1`` nothing), ``weight`` [T, k], the full logits
  [T, N+Z] (computed only when asked for), and ``aux`` (anything a loss needs).
- :class:`RoutingContext`: reset by the routed model at the start of every forward pass;
  carries cross-layer state (the previous routed layer's logits and mixture delta for the
  same kind of module: ``model.layers.*.self_attn.q_proj``), auxiliary losses, the
  per-example expert assignment of example routers, and the routing recorder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

_LAYER_INDEX = re.compile(r"\.\d+(?=\.)")


def module_kind(path: str) -> str:
    """The module's path with its layer indices replaced by ``*``: consecutive layers'
    modules of the same kind share it (``model.layers.*.mlp.down_proj``)."""
    return _LAYER_INDEX.sub(".*", path)


@dataclass
class Route:
    idx: torch.Tensor  # [T, k] long
    weight: torch.Tensor  # [T, k]
    scores: torch.Tensor | None = None  # [T, E] logits, or raw scores to be multiplied by ``scale``
    scale: torch.Tensor | None = None  # [T, 1] positive per-token factor of ``scores``
    aux: dict = field(default_factory=dict)
    # the weights the layer computes the LoRA products with, when they differ from
    # ``weight`` (a router whose ``finish`` rescales the LoRA mixture); None: ``weight``
    dispatch: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor | None:
        """The full pre-softmax logits [T, E] (None for routers without any)."""
        if self.scores is None or self.scale is None:
            return self.scores
        return self.scores * self.scale


class RoutingContext:
    """Per-forward state of one routed model (see the module docstring)."""

    def __init__(self):
        self.recorder = None  # a RoutingRecord while recording
        self.keep_deltas = False  # keep every layer's mixture delta in ``deltas``
        self.assignment: torch.Tensor | None = None  # example routers: global expert id per example
        self.groups: list = []  # sibling groups sharing work (recycle.routing.siblings)
        self.reset()

    def reset(self) -> None:
        """Forget the previous forward pass's cross-layer state and losses."""
        for group in getattr(self, "groups", ()):
            group.reset()
        self.logits: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self.losses: list[torch.Tensor] = []
