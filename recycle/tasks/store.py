"""Tasks in the registry: add (checked against the data), list, look up."""

from __future__ import annotations

import json

from recycle.errors import RecycleError
from recycle.registry import Registry, now
from recycle.tasks.build import build_splits
from recycle.tasks.spec import TaskSpec, parse_spec


def add_task(registry: Registry, spec: TaskSpec, replace: bool = False) -> dict:
    """Check a spec against its data (every example renders, no split is empty) and
    record it. Returns the row plus ``status``: added, unchanged or replaced."""
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
    with registry.transaction() as db:
        old = list(db.query("select * from tasks where name = ?", [spec.name]))
        if old:
            old = old[0]
            if old["spec_sha256"] == row["spec_sha256"]:
                counts = {k: row[k] for k in ("n_train", "n_validation", "n_test") if row[k] != old[k]}
                if counts:  # same spec, the data under it changed
                    db["tasks"].update(old["id"], counts)
                status = "unchanged"
            elif not replace:
                raise RecycleError(
                    f"task {spec.name!r} already exists with another spec; use --replace to overwrite it"
                )
            else:
                db["tasks"].update(old["id"], {**row, "created": now()})
                status = "replaced"
        else:
            db["tasks"].insert({**row, "created": now()})
            status = "added"
    return {**get_task(registry, spec.name), "status": status}


def _decode(row: dict) -> dict:
    row = dict(row)
    row["spec"] = json.loads(row["spec"])
    return row


def get_task(registry: Registry, name: str) -> dict:
    rows = list(registry.db.query("select * from tasks where name = ?", [name]))
    if not rows:
        known = [r["name"] for r in registry.db.query("select name from tasks order by name")]
        hint = f" (registered: {', '.join(known)})" if known else " (none registered: see recycle tasks catalogue)"
        raise RecycleError(f"no task named {name!r}{hint}")
    return _decode(rows[0])


def list_tasks(registry: Registry) -> list[dict]:
    return [_decode(r) for r in registry.db.query("select * from tasks order by name")]


def task_spec(registry: Registry, name: str) -> TaskSpec:
    return parse_spec(get_task(registry, name)["spec"], origin=f"task {name}")


def remove_task(registry: Registry, name: str) -> dict:
    row = get_task(registry, name)
    with registry.transaction() as db:
        db["tasks"].delete(row["id"])
    return row
