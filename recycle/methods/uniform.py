"""``uniform``: the merge of the deltas, ``W + (1/N) Σ_i s_i B_i A_i`` (SPEC §1): a true sum of
the products, never an average of A and B separately; no inference overhead."""

from __future__ import annotations

from recycle.methods.method import Method


class Uniform(Method):
    name = "uniform"
    summary = "merge of the deltas W + mean_i s_i B_i A_i"

    def build(self, model, experts, settings):
        from recycle.routing import install_merged

        return install_merged(model, experts, self.name)


METHOD = Uniform()
