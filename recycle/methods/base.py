"""``base``: the base model alone, no experts (the floor every method is compared with)."""

from __future__ import annotations

from recycle.methods.method import Method


class Base(Method):
    name = "base"
    summary = "the base model alone, no experts"
    members = "none"

    def build(self, model, experts, settings):
        from recycle.routing import install_nothing

        return install_nothing(model, [e.name for e in experts], self.name)

    def install(self, plan, model, tokenizer):
        from recycle.routing import install_nothing

        return install_nothing(model, [m.name for m in plan.members], self.name)


METHOD = Base()
