"""``single``: one expert with weight 1 everywhere; equals PEFT's ``PeftModel`` with it."""

from __future__ import annotations

from recycle.errors import RecycleError
from recycle.methods.method import ExpertSettings, Method


class Single(Method):
    name = "single"
    summary = "one expert with weight 1 everywhere (= PeftModel): --method 'single NAME'"
    Settings = ExpertSettings
    members = "one"
    in_default_eval = False

    def label(self, settings):
        return f"{self.name} {settings.expert}"

    def select(self, registry, names, values):
        expert = values.get("expert") or (names[0] if names and len(names) == 1 else None)
        if not expert or (names and names != [expert]):
            raise RecycleError(f"{self.name} needs one expert: --method '{self.name} NAME' or --experts NAME")
        return [registry.expert(expert)]

    def complete(self, values, experts):
        return {"expert": experts[0].name}

    def build(self, model, experts, settings):
        from recycle.routing import ExampleRouter, install_routed

        names = [e.name for e in experts]
        if settings.expert not in names:
            raise RecycleError(f"{self.name}: expert {settings.expert!r} is not among the experts")
        chosen = [experts[names.index(settings.expert)]]
        return install_routed(model, chosen, lambda layer: ExampleRouter(self.name, fixed=0), self.name)


METHOD = Single()
