"""Tasks in the registry: add (checked against the data), look up, and their examples."""

from __future__ import annotations

import random

from recycle.data import SPLIT_NAMES, Example
from recycle.errors import RecycleError
from recycle.registry import Registry
from recycle.tasks.build import build_splits
from recycle.tasks.spec import TaskSpec, parse_spec


def add_task(registry: Registry, spec: TaskSpec, replace: bool = False) -> dict:
    """Check a spec against its data (every example renders, no split is empty) and
    record it. Returns the row plus ``status``: added, unchanged or replaced."""
    registry.check_writable()
    splits = build_splits(spec)
    row = {
        "name": spec.name,
        "kind": spec.kind,
        "description": spec.description,
        "source": spec.describe_source(),
        "dataset": spec.dataset_name,
        "spec": spec.to_json(),
        "spec_sha256": spec.sha256,
        "n_choices": len(spec.choices) if spec.choices else None,
        **{f"n_{k}": len(v) for k, v in splits.items()},
    }
    status = registry.record_task(row, replace=replace)
    return {**registry.task(spec.name), "status": status}


def get_task(registry: Registry, name: str) -> dict:
    return registry.task(name)


def list_tasks(registry: Registry) -> list[dict]:
    return registry.tasks()


def task_spec(registry: Registry, name: str) -> TaskSpec:
    return parse_spec(registry.task(name)["spec"], origin=f"task {name}")


def load_examples(registry: Registry, task_name: str, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """Examples of a registered task's split; ``n`` of them sampled by ``seed`` (all if None
    or more than there are)."""
    if split not in SPLIT_NAMES:
        raise RecycleError(f"unknown split {split!r} (use train, validation or test)")
    if n is not None and n < 0:
        raise RecycleError(f"cannot take {n} examples")
    examples = build_splits(task_spec(registry, task_name))[split]
    if n is None or n >= len(examples):
        return list(examples)
    return random.Random(f"{seed}:{task_name}:{split}").sample(examples, n)
