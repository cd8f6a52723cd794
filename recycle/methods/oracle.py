"""``oracle``: each example goes to the expert trained on its own task (held-in tasks only):
the best a router over these experts could do by picking one expert per example."""

from __future__ import annotations

from recycle.errors import RecycleError
from recycle.methods.method import Method


class Oracle(Method):
    name = "oracle"
    summary = "each example to the expert of its own task (held-in tasks only)"
    needs = "task"
    per_example = True

    def build(self, model, experts, settings):
        from recycle.routing import ExampleRouter, install_routed

        return install_routed(model, experts, lambda layer: ExampleRouter(self.name), self.name)

    def skips(self, plan, task):
        return None if task in {m.task for m in plan.members} else "no expert for this task (held-out)"

    def assign(self, handle, plan, examples, tasks):
        by_task = {m.task: m.name for m in plan.members}
        missing = sorted({t for t in tasks if t not in by_task}, key=str)
        if missing:
            raise RecycleError(f"oracle: no expert for task(s) {', '.join(map(str, missing))}")
        return [by_task[t] for t in tasks]


METHOD = Oracle()
