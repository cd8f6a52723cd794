"""Typed records for the data that crosses modules (plain, frozen, picklable; no torch).

The registry hands out rows as dicts; the places that turn them into these records are
few and named: :meth:`recycle.methods.Method.member` makes a :class:`Member` of an expert
row, and :meth:`recycle.methods.Plan.from_dict` rebuilds a plan's members after a plan
travelled as plain data (to a Ray worker, a Serve replica, a COSMO fold).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Member:
    """One expert of a composition as a worker installs it: its adapter folder and the
    hashes it had when planned, and what its method needs (PHATGOOSE gates)."""

    name: str
    path: str  # the adapter folder
    sha256: str  # of adapter_model.safetensors
    config_sha256: str | None = None  # of adapter_config.json
    task: str | None = None  # the expert's own task (None: unknown)
    gates: str | None = None  # the gates file, for methods that need one
    gates_sha: str | None = None  # the settings hash of those gates


@dataclass(frozen=True)
class Expert:
    """A registered expert: a row of the registry's experts table (JSON columns decoded)
    with its base model's name and config hash. Made only by the registry."""

    id: int
    name: str
    path: str  # the adapter folder
    sha256: str  # of adapter_model.safetensors
    base_model_id: int
    peft_type: str
    rank: int | None
    ranks: dict | None  # {module: rank} where rank_pattern differs from rank
    alpha: float | None
    use_rslora: bool
    target_modules: list | None  # the adapted module paths
    n_params: int | None
    task: str | None  # its task ("a,b" for some multitask experts)
    dataset: str | None
    created: str
    meta: dict | None
    config_sha256: str | None  # of adapter_config.json
    weights_size: int | None
    weights_mtime_ns: int | None
    config_size: int | None
    config_mtime_ns: int | None
    base_model: str
    base_config_hash: str | None

    @property
    def multitask(self) -> bool:
        """Trained on several tasks (recorded so, or a task list)."""
        return bool((self.meta or {}).get("multitask")) or "," in (self.task or "")

    @property
    def hub(self) -> dict | None:
        """Where it was fetched from: ``{repo, revision, commit}``, or None for a folder."""
        return (self.meta or {}).get("hub")

    @classmethod
    def from_dict(cls, values: dict) -> Expert:
        """The expert of an outcome that carries its fields (``experts add``'s rows)."""
        return cls(**{f.name: values[f.name] for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)
