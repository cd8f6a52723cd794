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

This file is the method: settings and installation; its router, ``SpectrRouter``, sits
beside Arrow's in :mod:`recycle.routing.routers` (the method table stays free of torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from recycle.methods.method import Method, TokenSettings, setting


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
        from recycle.routing import SpectrRouter, install_routed

        s = settings
        return install_routed(
            model, experts, lambda layer: SpectrRouter(layer, s.top_k, s.weighting, s.temperature), self.name)


METHOD = Spectr()
