"""Compositions: a named method over a set of experts, and what a worker needs to build it.

A composition is stored in the registry (method, settings, members with the adapter
hashes they had). :func:`plan` turns a composition, or an ad-hoc method over experts,
into a :class:`Plan`: plain, picklable data (paths, hashes, a sample of each member's own
training data where the method needs it) that :func:`install` turns into a routed model
inside any process, a Ray worker included, without touching the registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recycle.errors import RecycleError
from recycle.registry import Registry, encode_json, now

METHODS = ("phatgoose", "avg-activation", "arrow", "retrieval", "uniform", "single", "oracle", "base", "multitask")
TOKEN_ROUTED = ("phatgoose", "avg-activation", "arrow")
# What each method needs of every member, beyond its adapter.
NEEDS = {"phatgoose": "gates", "avg-activation": "task", "retrieval": "task", "oracle": "task"}
PROTOTYPE_EXAMPLES = 64  # avg-activation: training examples per expert averaged over
RETRIEVAL_EXAMPLES = 1000  # retrieval: training texts per expert (as in the paper)


@dataclass
class Plan:
    name: str
    method: str
    base: str  # resolve_base name
    settings: dict
    members: list[dict]  # name, path, sha256, task, gates (path or None)
    artifacts_dir: str
    data: dict = field(default_factory=dict)  # member -> list of [prompt, answer, text]

    @property
    def member_hashes(self) -> dict[str, str]:
        return {m["name"]: m["sha256"] for m in self.members}

    @property
    def settings_hash(self) -> str:
        """What decides this composition's outputs: method, settings, members' content."""
        key = {
            "method": self.method,
            "settings": self.settings,
            "members": sorted((m["name"], m["sha256"], m.get("gates_sha") or "") for m in self.members),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return asdict(self)


def is_multitask(expert: dict) -> bool:
    meta = expert.get("meta") or {}
    return bool(meta.get("multitask")) or "," in (expert.get("task") or "")


def check_settings(method: str, top_k: int, weighting: str, temperature: float) -> None:
    if method not in METHODS and not method.startswith("single "):
        raise RecycleError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if top_k < 1:
        raise RecycleError(f"--top-k must be at least 1, not {top_k}")
    if weighting not in ("softmax", "sigmoid"):
        raise RecycleError(f"--weighting must be softmax or sigmoid, not {weighting!r}")
    if not temperature > 0:
        raise RecycleError(f"--temperature must be positive, not {temperature}")


def select_experts(registry: Registry, names: list[str] | None, method: str) -> list[dict]:
    """The members: the named experts, or every single-task expert of the registry (one base)."""
    if names:
        experts = [registry.expert(n) for n in names]
    else:
        experts = [e for e in registry.experts() if not is_multitask(e)]
        if method == "multitask":
            experts = [e for e in registry.experts() if is_multitask(e)]
    if not experts and method != "base":
        raise RecycleError("no experts to compose: register some, or name them with --experts")
    bases = {(e["base_model"], e["base_config_hash"]) for e in experts}
    if len(bases) > 1:
        raise RecycleError(
            "the experts are on different base models ("
            + ", ".join(sorted(b for b, _ in bases))
            + "); name the ones to compose with --experts"
        )
    return experts


def latest_gates(registry: Registry, expert: dict) -> dict | None:
    if "gates" not in registry.db.table_names():
        return None
    rows = list(
        registry.db.query(
            "select * from gates where expert_id = ? and adapter_sha256 = ? order by created desc, id desc limit 1",
            [expert["id"], expert["sha256"]],
        )
    )
    return rows[0] if rows else None


def _members(registry: Registry, experts: list[dict], method: str) -> list[dict]:
    need = NEEDS.get(method)
    members, missing = [], []
    for e in experts:
        m = {"name": e["name"], "path": e["path"], "sha256": e["sha256"], "task": e.get("task"), "gates": None}
        if need == "gates":
            g = latest_gates(registry, e)
            if g is None:
                missing.append(e["name"])
            else:
                m["gates"], m["gates_sha"] = g["path"], g["settings_hash"]
        elif need == "task":
            if not e.get("task") or is_multitask(e):
                missing.append(e["name"])
        members.append(m)
    if missing:
        what = {"gates": "no gates for their current adapter (run recycle train-gates)",
                "task": "no registered single task (their own data is needed)"}[need]
        raise RecycleError(f"{method} needs what these experts lack, {what}: {', '.join(missing)}")
    return members


def create(
    registry: Registry,
    name: str,
    method: str,
    experts: list[str] | None,
    *,
    top_k: int = 2,
    weighting: str = "softmax",
    temperature: float = 1.0,
    replace: bool = False,
) -> dict:
    """Store a composition, refusing members that lack what the method needs."""
    expert = None
    if method.startswith("single "):
        method, expert = "single", method.split(maxsplit=1)[1]
    check_settings(method, top_k, weighting, temperature)
    if method == "single":
        if not expert and experts and len(experts) == 1:
            expert = experts[0]
        if not expert:
            raise RecycleError("single needs one expert: --method 'single NAME' or --experts NAME")
        experts = [expert]
    chosen = select_experts(registry, experts, method)
    members = _members(registry, chosen, method)
    settings = _settings(method, top_k, weighting, temperature, expert)
    base = chosen[0]["base_model"] if chosen else None
    row = {
        "name": name,
        "method": method,
        "settings": encode_json(settings),
        "members": encode_json([{k: m[k] for k in ("name", "sha256")} for m in members]),
        "base_model": base,
        "created": now(),
    }
    with registry.transaction() as db:
        old = list(db.query("select id from compositions where name = ?", [name]))
        if old and not replace:
            raise RecycleError(f"composition {name!r} already exists; use --replace")
        if old:
            db["compositions"].update(old[0]["id"], row)
        else:
            db["compositions"].insert(row)
    return get(registry, name)


def _settings(method, top_k, weighting, temperature, expert=None) -> dict:
    if method in TOKEN_ROUTED:
        return {"top_k": top_k, "weighting": weighting, "temperature": temperature}
    if method in ("single", "multitask"):
        return {"expert": expert}
    return {}


def get(registry: Registry, name: str) -> dict:
    rows = list(registry.db.query("select * from compositions where name = ?", [name]))
    if not rows:
        raise RecycleError(f"no composition named {name!r}")
    row = dict(rows[0])
    row["settings"] = json.loads(row["settings"])
    row["members"] = json.loads(row["members"])
    return row


def list_all(registry: Registry) -> list[dict]:
    return [get(registry, r["name"]) for r in registry.db.query("select name from compositions order by name")]


def remove(registry: Registry, name: str) -> None:
    get(registry, name)
    with registry.transaction() as db:
        db.execute("delete from compositions where name = ?", [name])


def plan(
    registry: Registry,
    *,
    composition: str | None = None,
    method: str | None = None,
    experts: list[str] | None = None,
    top_k: int = 2,
    weighting: str = "softmax",
    temperature: float = 1.0,
    data_seed: int = 0,
) -> Plan:
    """A worker-ready plan from a stored composition, or from a method over experts."""
    if composition:
        row = get(registry, composition)
        method, settings = row["method"], row["settings"]
        chosen = []
        for m in row["members"]:
            e = registry.expert_or_none(m["name"])
            if e is None:
                raise RecycleError(f"composition {composition}: member {m['name']} is no longer registered")
            if e["sha256"] != m["sha256"]:
                raise RecycleError(
                    f"composition {composition}: member {m['name']} has changed since it was composed; "
                    "compose it again with --replace"
                )
            chosen.append(e)
        name = composition
    else:
        expert = None
        if method.startswith("single "):
            method, expert = "single", method.split(maxsplit=1)[1]
            experts = [expert]
        check_settings(method, top_k, weighting, temperature)
        chosen = select_experts(registry, experts, method)
        if method == "multitask" and len(chosen) != 1:
            raise RecycleError(
                f"multitask needs exactly one multitask expert (found {len(chosen)}); "
                "train one with recycle train-expert --multitask, or name it with --experts"
            )
        settings = _settings(method, top_k, weighting, temperature, expert or (chosen[0]["name"] if method == "multitask" else None))
        name = method if not expert else f"single {expert}"
    members = _members(registry, chosen, method)
    base = chosen[0]["base_model"] if chosen else _any_base(registry)
    p = Plan(name, method, base, settings, members, str(registry.artifacts_dir))
    if method in ("avg-activation", "retrieval"):
        from recycle.data import load_examples

        n = PROTOTYPE_EXAMPLES if method == "avg-activation" else RETRIEVAL_EXAMPLES
        for m in members:
            exs = load_examples(registry, m["task"], "train", n=n, seed=data_seed)
            p.data[m["name"]] = [[ex.prompt, ex.answer, ex.text] for ex in exs]
    return p


def _any_base(registry: Registry) -> str:
    rows = list(registry.db.query("select name from base_models order by id limit 1"))
    if not rows:
        raise RecycleError("no base model known: register an expert first")
    return rows[0]["name"]


# ---- worker side: no registry below this line ---------------------------------------------


def _cache_file(plan: Plan, kind: str, key: dict) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(plan.artifacts_dir) / kind / f"{h}.safetensors"


def _atomic_write(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prototypes(plan: Plan, model, tokenizer, batch_size: int = 8, max_length: int = 256) -> dict:
    """avg-activation router vectors, computed on the base model from each member's own
    training sample, cached by (base, adapter, sample)."""
    from safetensors.torch import load_file

    from recycle.data import collate, encode_lm, pad_id_of
    from recycle.routing import compute_prototypes
    from recycle.routing.experts import load_expert

    out = {}
    for m in plan.members:
        rows = plan.data[m["name"]]
        path = _cache_file(plan, "prototypes", {"base": plan.base, "sha": m["sha256"], "rows": rows})
        if path.is_file():
            out[m["name"]] = load_file(str(path))
            continue
        modules = list(load_expert(m["path"], m["name"]).modules)
        enc = [encode_lm(tokenizer, p, a, max_length) for p, a, _ in rows]
        batches = [
            {k: v for k, v in collate(enc[i : i + batch_size], pad_id_of(tokenizer)).items() if k != "labels"}
            for i in range(0, len(enc), batch_size)
        ]
        vecs = compute_prototypes(model, {m["name"]: batches}, modules)[m["name"]]
        _atomic_write(path, vecs)
        out[m["name"]] = vecs
    return out


def retrieval_index(plan: Plan, embedder):
    from recycle.routing import RetrievalIndex

    names = [m["name"] for m in plan.members]
    path = _cache_file(plan, "retrieval", {"members": plan.member_hashes, "texts": [plan.data[n] for n in names]})
    if path.is_file():
        return RetrievalIndex.load(path)
    index = RetrievalIndex.build(embedder, {n: [t for _, _, t in plan.data[n]] for n in names})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    index.save(tmp)
    os.replace(tmp, path)
    return index


def install(plan: Plan, model, tokenizer):
    """Install the plan's composition on ``model`` (in place); returns the RoutedModel handle."""
    from recycle.routing import SentenceEmbedder, build_routed_model

    dirs = {m["name"]: m["path"] for m in plan.members}
    s = plan.settings
    method = plan.method
    kw: dict = {}
    if method in TOKEN_ROUTED:
        kw.update(top_k=s["top_k"], weighting=s["weighting"], temperature=s["temperature"])
    if method == "phatgoose":
        kw["gates"] = {m["name"]: m["gates"] for m in plan.members}
    elif method == "avg-activation":
        kw["prototypes"] = prototypes(plan, model, tokenizer)
    elif method == "retrieval":
        embedder = SentenceEmbedder.from_folder(s.get("embedder"))
        kw.update(embedder=embedder, retrieval_index=retrieval_index(plan, embedder))
    elif method in ("single", "multitask"):
        method, kw["expert"] = "single", s["expert"]
    return build_routed_model(model, dirs, method, **kw)


def per_example_hook(handle, plan: Plan, examples, task: str | None = None, tasks: list | None = None):
    """``on_rows`` for :func:`recycle.scoring.score_choices`: per-example experts for the
    retrieval (nearest training text) and oracle (the expert of the example's task)
    methods; None for the others. Also returns the chosen expert of each example."""
    if plan.method == "retrieval":
        chosen = handle.set_examples(texts=[ex.text or ex.prompt for ex in examples])
    elif plan.method == "oracle":
        by_task = {m["task"]: m["name"] for m in plan.members}
        wanted = tasks if tasks is not None else [task] * len(examples)
        missing = sorted({t for t in wanted if t not in by_task}, key=str)
        if missing:
            raise RecycleError(f"oracle: no expert for task(s) {', '.join(map(str, missing))}")
        chosen = [by_task[t] for t in wanted]
    else:
        return None, None

    def on_rows(rows: list[int]) -> None:
        handle.set_examples(experts=[chosen[i] for i in rows])

    return on_rows, chosen
