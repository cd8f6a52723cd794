"""``phatgoose`` (Muqeeth et al., 2024; SPEC §1): every expert's gate vectors, trained post hoc
on its own data (:mod:`recycle.gates`, ``recycle train-gates``), route each token at each
module: ``LN(x) · LN(v_i) / sqrt(d)``, top-k, softmax."""

from __future__ import annotations

from collections.abc import Mapping

from recycle.errors import RecycleError
from recycle.methods.method import Method, TokenSettings


def vectors_for(source: Mapping | None, names: list[str], what: str) -> dict:
    """``{expert: {module path: vector}}`` from dicts or safetensors files, one per expert."""
    from recycle.routing import load_vectors

    source = source or {}
    missing = [n for n in names if n not in source]
    if missing:
        raise RecycleError(f"no {what} for experts: {', '.join(missing)}")
    return {n: dict(source[n]) if isinstance(source[n], Mapping) else load_vectors(source[n]) for n in names}


class Phatgoose(Method):
    name = "phatgoose"
    summary = "PHATGOOSE: post-hoc gates per expert route each token, top-k (needs train-gates)"
    Settings = TokenSettings
    needs = "gates"
    token_routed = True
    trains = "train-gates"  # recycle.gates.train

    def artifacts(self, plan, model, tokenizer):
        return {"gates": {m.name: m.gates for m in plan.members}}

    def build(self, model, experts, settings, gates=None):
        from recycle.routing import GateRouter, install_routed

        vectors = vectors_for(gates, [e.name for e in experts], "gates")
        return install_routed(
            model, experts,
            lambda layer: GateRouter(layer, vectors, settings.top_k, settings.weighting, settings.temperature),
            self.name)


METHOD = Phatgoose()
