"""Compositions: a named method over a set of experts, and the plan a worker builds it from.

A composition is stored in the registry (method, settings, members with the adapter hashes
they had, and anything trained for it). :func:`plan` turns a composition, or an ad-hoc
method over experts, into a :class:`~recycle.methods.Plan`: plain, picklable data that
:func:`recycle.methods.method.install` turns into a routed model inside any process, a Ray
worker included, without touching the registry.
"""

from __future__ import annotations

from recycle import methods
from recycle.errors import RecycleError
from recycle.experts import check_files
from recycle.methods import Plan
from recycle.names import check_name
from recycle.registry import Registry, encode_json, now


def create(
    registry: Registry,
    name: str,
    method: str,
    experts: list[str] | None = None,
    settings: dict | None = None,
    *,
    replace: bool = False,
) -> dict:
    """Store a composition, refusing members that lack what the method needs. ``method``
    may carry its argument (``"single NAME"``); ``settings`` are the method's settings."""
    check_name("composition", name)
    m, values = methods.parse(method)
    values.update(settings or {})
    chosen = [check_files(registry, e) for e in m.select(registry, experts, values)]
    members = m.plan_members(registry, chosen)
    s = m.settings(m.complete(values, chosen))
    base = chosen[0].base_model if chosen else registry.first_base_name()
    m.check_stored(registry, name, s, members, base)
    row = {
        "name": name,
        "method": m.name,
        "settings": encode_json(s.to_dict()),
        "members": encode_json([{"name": m.name, "sha256": m.sha256, "config_sha256": m.config_sha256}
                                for m in members]),
        "base_model": base,
        "created": now(),
    }
    return registry.save_composition(row, replace=replace)


def get(registry: Registry, name: str) -> dict:
    return registry.composition(name)


def list_all(registry: Registry) -> list[dict]:
    return registry.compositions()


def remove(registry: Registry, name: str) -> None:
    registry.remove_composition(name)


def plan(
    registry: Registry,
    *,
    composition: str | None = None,
    method: str | None = None,
    experts: list[str] | None = None,
    settings: dict | None = None,
    data_seed: int = 0,
) -> Plan:
    """A worker-ready plan from a stored composition, or from a method over experts."""
    if composition:
        row = registry.composition(composition)
        m = methods.get(row["method"])
        chosen = []
        for mem in row["members"]:
            e = registry.expert_or_none(mem["name"])
            if e is None:
                raise RecycleError(f"composition {composition}: member {mem['name']} is no longer registered")
            if e.sha256 != mem["sha256"] or mem.get("config_sha256") not in (None, e.config_sha256):
                raise RecycleError(f"composition {composition}: member {mem['name']} has changed since it was "
                                   "composed; compose it again with --replace")
            chosen.append(e)
        values, label, state = row["settings"], composition, row.get("state") or {}
    else:
        m, values = methods.parse(method)
        values.update(settings or {})
        chosen = m.select(registry, experts, values)
        values = m.complete(values, chosen)
        label, state = m.label(m.settings(values)), {}
    s = m.settings(values)
    chosen = [check_files(registry, e) for e in chosen]
    members = m.plan_members(registry, chosen)
    base = chosen[0].base_model if chosen else registry.first_base_name()
    if base is None:
        raise RecycleError("no base model known: register an expert first")
    p = Plan(label, m.name, base, s.to_dict(), members, str(registry.artifacts_dir), state=state)
    m.gather(registry, p, data_seed)
    return p


def trainer(registry: Registry, name: str):
    """The method of stored composition ``name``, refusing one that trains nothing per composition."""
    method = registry.composition(name)["method"]
    m = methods.get(method)
    if m.TrainSettings is None:
        also = f" (its experts' part: recycle {m.trains})" if m.trains else ""
        raise RecycleError(f"composition {name} is {method}: it has nothing to train{also}")
    return m


def train(registry: Registry, name: str, values: dict, *, method: str | None = None, force: bool = False,
          address: str | None = None, gpus: float | None = None, cpus: float = 1.0, report=None) -> dict:
    """Train what composition ``name``'s method learns (``recycle train NAME``, a pipeline's
    ``[[training]]``) with its ``TrainSettings`` built from ``values``; ``method`` (the older
    commands' names) trains as that method, which refuses a composition of another.
    Returns the recorded state plus ``status`` (trained or skipped)."""
    m = methods.get(method) if method else trainer(registry, name)
    settings = m.TrainSettings.from_dict(values, f"{m.name} training")
    return m.train(registry, name, settings, force=force, address=address, gpus=gpus, cpus=cpus, report=report)
