"""``multitask``: the one LoRA trained on the union of the held-in data (``recycle
train-expert --multitask``), applied alone. An upper reference that breaks the premise
(the data was pooled), as in the PHATGOOSE paper."""

from __future__ import annotations

from recycle.errors import RecycleError
from recycle.methods.single import Single


class Multitask(Single):
    name = "multitask"
    summary = "the one multitask expert (trained on pooled data): an upper reference"
    members = "multitask"
    in_default_eval = True

    def label(self, settings):
        return self.name

    def unavailable(self, registry):
        return None if any(e.multitask for e in registry.experts()) else "no multitask expert registered"

    def select(self, registry, names, values):
        experts = [registry.expert(n) for n in names] if names else None
        if experts is None:
            experts = [e for e in registry.experts() if e.multitask]
        if len(experts) != 1:
            raise RecycleError(
                f"multitask needs exactly one multitask expert (found {len(experts)}); "
                "train one with recycle train-expert --multitask, or name it with --experts")
        return experts


METHOD = Multitask()
