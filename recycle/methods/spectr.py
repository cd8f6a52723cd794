"""``spectr``: SpectR (Fleshman & Van Durme, 2025, arXiv 2504.03454), a training-free router
that reads each expert's whole spectrum rather than Arrow's top singular vector.

At a routed module, expert i's delta is ``ΔW_i = s_i B_i A_i = U_i Σ_i V_iᵀ`` (rank r_i).
For a token x the score is ``‖V_iᵀ x‖₂``: the length of x's projection onto the subspace
the expert reads from, all r_i right-singular directions with equal weight (no Σ, no
scaling, no normalisation of x; as in the authors' code, ``llm_merging/merging/SpectR.py``:
``norm(einsum(A', x))`` with ``A' = s Vᵀ``, the scaling being the same for every expert
there). Arrow is the special case of one direction (``|v_1ᵀ x|``).

The top-k experts are kept and weighted 1/k each (``weighting = "uniform"``, the authors'
rule; ``softmax`` and ``sigmoid`` are there as for the other token routers). Differences
from the authors' code, both for the SPEC's sake: the kept experts' deltas are mixed as
``Σ_i w_i ΔW_i x`` (their code averages the kept ``UΣ`` and the kept ``Vᵀ`` separately and
multiplies the averages, which adds cross terms between experts, SPEC §1), and the SVD is
exact (QR of B, then the SVD of the r×d_in matrix ``R A``) instead of ``svd_lowrank``.

This file is the whole method: router, settings and installation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recycle.methods.method import Method, TokenSettings, setting
from recycle.routing import TokenRouter, install_routed


def right_singular_vectors(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``Vᵀ`` [r, d_in] of ``B A`` (A: [r, d_in], B: [d_out, r]), exactly, in float64:
    ``B = Q R`` so ``B A = Q (R A)`` and the right-singular vectors of ``R A`` are those of
    ``B A``. Directions with a zero singular value (a rank-deficient delta) are dropped."""
    _, R = torch.linalg.qr(B.double())
    _, S, Vh = torch.linalg.svd(R @ A.double(), full_matrices=False)
    return Vh[S > S.max() * 1e-9] if S.numel() and S.max() > 0 else Vh[:0]


class SpectrRouter(TokenRouter):
    """``score_i = ‖V_iᵀ x‖`` for every expert at the layer (see the module docstring).

    The experts' ``V_iᵀ`` are stacked, zero-padded to the largest rank, into one
    ``[d_in, N·r_max]`` matrix: one matmul gives every expert's projection."""

    name = "spectr"

    def __init__(self, layer, top_k: int = 2, weighting: str = "uniform", temperature: float = 1.0):
        super().__init__(top_k, weighting, temperature)
        vs = [right_singular_vectors(A, B) for A, B in layer.factors()]
        r_max = max(v.shape[0] for v in vs)
        keys = torch.zeros(len(vs), r_max, layer.in_features, dtype=torch.float64)
        for j, v in enumerate(vs):
            keys[j, : v.shape[0]] = v
        dt = torch.promote_types(layer.weight.dtype, torch.float32)
        self.r_max = r_max
        self.register_buffer("keys", keys.reshape(-1, layer.in_features).T.contiguous().to(layer.weight.device, dt),
                             persistent=False)

    def scores(self, x: torch.Tensor):
        z = x.to(self.keys.dtype) @ self.keys  # [T, N * r_max]
        return torch.linalg.vector_norm(z.view(x.shape[0], -1, self.r_max), dim=-1), None


@dataclass(frozen=True)
class SpectrSettings(TokenSettings):
    weighting: str = setting("uniform", "uniform (1/k, the authors' rule), softmax or sigmoid",
                             choices=("softmax", "sigmoid", "uniform"))


class Spectr(Method):
    name = "spectr"
    summary = "SpectR: route each token by |V_i^T x| over each expert's whole spectrum, top-k (training-free)"
    Settings = SpectrSettings
    token_routed = True
    in_default_eval = False

    def build(self, model, experts, settings):
        s = settings
        return install_routed(
            model, experts, lambda layer: SpectrRouter(layer, s.top_k, s.weighting, s.temperature), self.name)


METHOD = Spectr()
