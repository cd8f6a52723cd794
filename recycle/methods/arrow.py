"""``arrow`` (Ostapenko et al., 2024): router vector = the top right-singular vector of each
expert's ``B A`` (PEFT's power iteration), score ``|x · v_i|``, top-k, softmax (see
:class:`recycle.routing.ArrowRouter`). Training-free; PEFT's ``ArrowConfig`` is its peer."""

from __future__ import annotations

from dataclasses import dataclass

from recycle.methods.method import Method, TokenSettings, setting


@dataclass(frozen=True)
class ArrowSettings(TokenSettings):
    seed: int = setting(0, "seed of the power iteration's start (PEFT's rng_seed)")
    iters: int = setting(15, "power-iteration steps", minimum=1)


class Arrow(Method):
    name = "arrow"
    summary = "Arrow: top singular vector of each B A as router vector, |x.v|, top-k"
    Settings = ArrowSettings
    token_routed = True

    def build(self, model, experts, settings):
        from recycle.routing import ArrowRouter, install_routed

        s = settings
        return install_routed(
            model, experts,
            lambda layer: ArrowRouter(layer, s.top_k, s.weighting, s.temperature, seed=s.seed, iters=s.iters),
            self.name)


METHOD = Arrow()
