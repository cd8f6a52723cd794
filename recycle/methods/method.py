"""What every composition method is made of (one module per method in this package).

A method is a :class:`Method` subclass with

- ``Settings``: a frozen dataclass validated in ``__post_init__`` (one-line
  :class:`RecycleError`), stored with a composition and hashed into result keys;
- the driver side, which reads the registry: :meth:`Method.member` (what each member
  needs, or why it cannot be one), :meth:`Method.select` (the members by default) and
  :meth:`Method.gather` (plain data a worker needs, such as a sample of each member's own
  training data);
- the worker side, which never sees the registry: :meth:`Method.build` (install the
  method on a model from loaded experts, settings and artifacts), :meth:`Method.install`
  (the same from a :class:`Plan`) and, for per-example methods, :meth:`Method.assign`;
- where the method trains something per composition (MoE++'s router, COSMO's gate): its
  ``TrainSettings``, :meth:`Method.train` (the driver: Ray tasks of :meth:`Method.train_job`,
  a plain function, then the state recorded with the composition by
  :meth:`Method.record_state`) and :meth:`Method.load_state` (the worker puts it back on an
  installed model). ``recycle train NAME`` and a pipeline's ``[[training]]`` read these.

A :class:`Plan` is the picklable hand-over from driver to worker; :func:`install` builds a
plan's composition on a model (with anything trained for it) inside the worker.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from recycle.errors import RecycleError
from recycle.records import Expert, Member
from recycle.settings import Settings, setting


@dataclass
class Plan:
    """Everything a worker needs to install a composition, as plain picklable data."""

    label: str  # composition name, or the method (as shown in result tables)
    method: str
    base: str  # base model name, for recycle.basemodels.resolve_base
    settings: dict
    members: list[Member]
    artifacts_dir: str
    data: dict = field(default_factory=dict)  # method-specific data gathered by the driver
    state: dict = field(default_factory=dict)  # trained parts: {key: {path, sha256, ...}}

    @classmethod
    def from_dict(cls, values: dict) -> Plan:
        """The plan :meth:`to_dict` made (members back to :class:`Member` records)."""
        return cls(**{**values, "members": [Member(**m) for m in values["members"]]})

    @property
    def member_hashes(self) -> dict[str, str]:
        return {m.name: m.sha256 for m in self.members}

    @property
    def content_key(self) -> str:
        """A hash of what decides this composition's outputs: method, settings, members'
        content and anything trained for it (results and caches are keyed by it)."""
        key = {
            "method": self.method,
            "settings": self.settings,
            "members": sorted((m.name, m.sha256, m.config_sha256 or "", m.gates_sha or "") for m in self.members),
        }
        if self.state:
            key["state"] = {k: v.get("sha256") for k, v in sorted(self.state.items())}
        if self.data.get("parts"):
            key["parts"] = {k: Plan.from_dict(v).content_key for k, v in sorted(self.data["parts"].items())}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def expert_dirs(self) -> dict[str, str]:
        return {m.name: m.path for m in self.members}


class Method:
    """One composition method (see the module docstring). Class attributes describe it to
    the drivers and the CLI."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line, for help texts and the README
    Settings: ClassVar[type[Settings]] = Settings
    needs: ClassVar[str | None] = None  # what each member needs: "gates", "task" or None
    members: ClassVar[str] = "many"  # "many", "one" (named by settings.expert), "none", "multitask"
    token_routed: ClassVar[bool] = False  # routes each token (routing is recorded)
    per_example: ClassVar[bool] = False  # needs assign() before each batch
    in_default_eval: ClassVar[bool] = True  # one of `recycle eval`'s default methods
    shares_trunk: ClassVar[bool] = True  # its scorer takes the layers below the experts computed once for all
    # training something per composition (None: nothing to train; see the module docstring)
    TrainSettings: ClassVar[type[Settings] | None] = None  # what `recycle train NAME` takes
    state_key: ClassVar[str] = ""  # the trained state's entry in the composition and its file's prefix
    state_what: ClassVar[str] = ""  # how messages name it
    trains: ClassVar[str | None] = None  # the command that trains what it needs (per composition: an alias of train)

    # ---- settings ------------------------------------------------------------------

    def settings(self, values: Mapping[str, Any] | None = None) -> Settings:
        return self.Settings.from_dict(dict(values or {}), self.name)

    def label(self, settings: Settings) -> str:
        """How an ad-hoc use of the method is named in result tables."""
        return self.name

    def unavailable(self, registry) -> str | None:
        """Why the method cannot run over this registry's experts at all (None: it can)."""
        return None

    def skips(self, plan: Plan, task: str) -> str | None:
        """Why ``plan`` is not evaluated on ``task`` (None: it is)."""
        return None

    # ---- driver side ---------------------------------------------------------------

    def select(self, registry, names: list[str] | None, values: dict) -> list[Expert]:
        """The member experts: the named ones, or every single-task expert (one base);
        ``values``: the settings as given (a method may name its member there)."""
        if names:
            experts = [registry.expert(n) for n in names]
        elif self.members == "multitask":
            experts = [e for e in registry.experts() if e.multitask]
        else:
            experts = [e for e in registry.experts() if not e.multitask]
        if not experts and self.members != "none":
            raise RecycleError("no experts to compose: register some, or name them with --experts")
        bases = {(e.base_model, e.base_config_hash) for e in experts}
        if len(bases) > 1:
            raise RecycleError("the experts are on different base models (" + ", ".join(sorted(b for b, _ in bases))
                               + "); name the ones to compose with --experts")
        return experts

    def member(self, registry, expert: Expert) -> Member | str:
        """The member entry for a worker, or why this expert cannot be a member."""
        gates = gates_sha = None
        if self.needs == "gates":
            g = registry.latest_gates(expert)
            if g is None:
                return "no gates for their current adapter (run recycle train-gates)"
            gates, gates_sha = g["path"], g["settings_hash"]
        elif self.needs == "task" and (not expert.task or expert.multitask):
            return "no registered single task (their own data is needed)"
        return Member(expert.name, expert.path, expert.sha256, expert.config_sha256, expert.task, gates, gates_sha)

    def plan_members(self, registry, experts: list[Expert]) -> list[Member]:
        members, missing = [], {}
        for e in experts:
            m = self.member(registry, e)
            if isinstance(m, str):
                missing.setdefault(m, []).append(e.name)
            else:
                members.append(m)
        for reason, names in missing.items():
            raise RecycleError(f"{self.name} needs what these experts lack, {reason}: {', '.join(names)}")
        return members

    def complete(self, values: dict, experts: list[Expert]) -> dict:
        """The settings values once the members are known (e.g. the one expert's name)."""
        return values

    def check_stored(self, registry, name: str, settings: Settings, members: list[Member], base: str | None) -> None:
        """Refuse, when the composition ``name`` is stored, settings that could only fail
        when it is used (nothing to check here)."""

    def gather(self, registry, plan: Plan, seed: int = 0) -> None:
        """Add to ``plan.data`` what workers need beyond the members' files (nothing here)."""

    # ---- worker side ---------------------------------------------------------------

    def build(self, model, experts, settings: Settings, **artifacts):
        """Install on ``model`` from loaded experts (``LoraExpert`` list, global order)."""
        raise NotImplementedError

    def install(self, plan: Plan, model, tokenizer):
        """Install the plan's composition on ``model`` (in place); returns the handle."""
        from recycle.routing import load_expert

        # lazy: each file is read once, when installed, straight into the stacked layout
        experts = [load_expert(m.path, m.name, m.sha256, lazy=True) for m in plan.members]
        return self.build(model, experts, self.settings(plan.settings), **self.artifacts(plan, model, tokenizer))

    def artifacts(self, plan: Plan, model, tokenizer) -> dict:
        """What :meth:`build` needs beyond the experts, read or computed from the plan."""
        return {}

    def assign(self, handle, plan: Plan, examples: Sequence, tasks: Sequence[str | None]) -> list | None:
        """Per-example methods: choose (and return) each example's expert; None otherwise."""
        return None

    def scorer(self, plan: Plan, model, tokenizer) -> InstalledScorer:
        """What scores examples for this plan on a loaded base model (worker side): by
        default the composition installed once, rank classification through it."""
        return InstalledScorer(self, plan, model, tokenizer)

    # ---- training (methods with TrainSettings) ---------------------------------------

    def train(self, registry, name: str, settings: Settings, *, force: bool = False, address: str | None = None,
              gpus: float | None = None, cpus: float = 1.0, report=None) -> dict:
        """Driver: train stored composition ``name``'s state as Ray tasks of
        :meth:`train_job` and record it; found done (``status: skipped``) when trained with
        the same composition and settings. Returns the state plus ``status``."""
        raise RecycleError(f"{self.name} trains nothing per composition")

    @staticmethod
    def train_job(job) -> dict:
        """Worker side: one Ray task of :meth:`train` (plain data in, a plain result out)."""
        raise NotImplementedError

    def state_path(self, registry, name: str, key: str) -> Path:
        """Where the state trained for composition ``name`` with content key ``key`` is written."""
        return registry.artifacts_dir / "compositions" / name / f"{self.state_key}-{key[:16]}.safetensors"

    def found_done(self, row: dict, key: str) -> dict | None:
        """The composition's recorded state when it was trained for ``key`` and its file is intact."""
        from recycle.adapters import sha256_file

        old = (row.get("state") or {}).get(self.state_key)
        try:
            return old if old and old.get("key") == key and sha256_file(old["path"]) == old["sha256"] else None
        except OSError:
            return None

    def record_state(self, registry, row: dict, state: dict) -> None:
        """Record the trained state with the composition (refused if it was replaced meanwhile)."""
        registry.set_composition_state(row["name"], self.state_key, state, expect_settings=row["settings"])

    def trained_file(self, plan: Plan) -> str | None:
        """Worker side: the path of the state trained for ``plan`` (None if none), checked
        against the hash recorded when it was trained."""
        from recycle.adapters import sha256_file

        part = plan.state.get(self.state_key) if self.state_key else None
        if not part:
            return None
        try:
            if sha256_file(part["path"]) != part["sha256"]:
                raise RecycleError(f"{self.state_what} {part['path']} changed since {self._it('they were', 'it was')} "
                                   f"trained; train {self._it('them', 'it')} again (recycle train {plan.label})")
        except OSError:
            raise RecycleError(f"{self.state_what} {part['path']} {self._it('are', 'is')} missing; "
                               f"train {self._it('them', 'it')} again") from None
        return part["path"]

    def _it(self, plural: str, singular: str) -> str:
        return plural if self.state_what.endswith("s") else singular

    def load_state(self, plan: Plan, handle) -> None:
        """Worker side: put the state trained for ``plan`` on its installed ``handle``."""


@dataclass
class Scored:
    """Rank-classification output for a list of examples."""

    scores: list  # per example, every choice's score (higher is better; argmax = the answer)
    experts: list | None = None  # per-example methods: each example's expert
    stats: dict | None = None  # routing statistics per module, when recorded
    extra: dict = field(default_factory=dict)  # method-specific per-example values (lists)

    def __post_init__(self):
        check_finite(self.scores)


def check_finite(scores: Sequence[Sequence[float]]) -> None:
    """Refuse (exit 1, HTTP 500) scores that are NaN or infinite: argmax over them is no
    answer. Predict, serve and eval all score through :class:`Scored`, so none of them
    ever returns one."""
    for i, row in enumerate(scores):
        bad = [j for j, v in enumerate(row) if not math.isfinite(float(v))]
        if bad:
            raise RecycleError(f"example {i + 1}: the score of choice {bad[0] + 1} is {float(row[bad[0]])} (not a "
                               "finite number: the composition's weights or a routing value overflowed); "
                               "no answer given", exit_code=1)


class InstalledScorer:
    """A plan installed on the model once; ``score`` rank-classifies through it."""

    def __init__(self, method: Method, plan: Plan, model, tokenizer):
        self.method, self.plan, self.model, self.tokenizer = method, plan, model, tokenizer
        self.handle = install(method, plan, model, tokenizer)

    def score(self, examples: Sequence, tasks: Sequence[str | None], *, batch_size: int = 16,
              max_length: int = 256, record: bool = False, trunk=None) -> Scored:
        """``trunk``: lower layers shared with other scorers over the same examples
        (:class:`recycle.scoring.Trunk`)."""
        from recycle.scoring import score_choices

        on_rows, chosen = assign_examples(self.method, self.handle, self.plan, examples, tasks)
        kw = dict(batch_size=batch_size, max_length=max_length, on_rows=on_rows, trunk=trunk)
        if record and self.handle.routed:
            with self.handle.record() as rec:
                scores = score_choices(self.model, self.tokenizer, examples, **kw)
            return Scored(scores, chosen, rec.stats())
        return Scored(score_choices(self.model, self.tokenizer, examples, **kw), chosen)

    def explain(self, example, task: str | None, max_length: int = 256) -> tuple[list, dict]:
        """One example's scores and the experts used per routed module."""
        from recycle.scoring import score_choices

        on_rows, _ = assign_examples(self.method, self.handle, self.plan, [example], [task])
        hook = (lambda rows: on_rows([0] * len(rows))) if on_rows else None
        with self.handle.record() as rec:
            (scores,) = score_choices(self.model, self.tokenizer, [example], batch_size=1, on_rows=hook,
                                      max_length=max_length)
        return scores, rec.explain(0)

    def close(self) -> None:
        self.handle.remove()


@dataclass(frozen=True)
class TokenSettings(Settings):
    """Per-token top-k routing."""

    top_k: int = setting(2, "experts per token", minimum=1)
    weighting: str = setting("softmax", "softmax (competitive), sigmoid (SPEC 4) or uniform (1/k)",
                             choices=("softmax", "sigmoid", "uniform"))
    temperature: float = setting(1.0, "router temperature", positive=True)


@dataclass(frozen=True)
class ExpertSettings(Settings):
    """One named expert."""

    expert: str = setting("", "the expert")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.expert, str) or not self.expert:
            raise RecycleError("this method needs one expert: --method 'single NAME' or --experts NAME")


def cache_path(plan: Plan, kind: str, key) -> Path:
    """Where a worker caches what it computed for a plan (keyed by content, so equal keys
    are equal files): ``<artifacts>/<kind>/<hash>.safetensors``."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(plan.artifacts_dir) / kind / f"{h}.safetensors"


def own_examples(registry, plan: Plan, n: int, seed: int) -> None:
    """``plan.data[member] = [[prompt, answer, text], ...]``: up to ``n`` examples of each
    member's own task's train split (never pooled: each stays with its expert)."""
    from recycle.tasks import load_examples

    for m in plan.members:
        exs = load_examples(registry, m.task, "train", n=n, seed=seed)
        plan.data[m.name] = [[ex.prompt, ex.answer, ex.text] for ex in exs]


def per_example_rows(handle, chosen: list | None):
    """``on_rows`` for :func:`recycle.scoring.score_choices`: sets each row's expert."""
    if chosen is None:
        return None

    def on_rows(rows: list[int]) -> None:
        handle.set_examples([chosen[i] for i in rows])

    return on_rows


def install(method: Method, plan: Plan, model, tokenizer):
    """Install the plan's composition (of ``method``) on ``model`` (in place), with anything
    trained for it (:meth:`Method.load_state`); returns the RoutedModel handle."""
    handle = method.install(plan, model, tokenizer)
    try:
        method.load_state(plan, handle)
    except BaseException:
        handle.remove()
        raise
    return handle


def assign_examples(method: Method, handle, plan: Plan, examples, tasks=None):
    """For per-example methods, each example's expert and the ``on_rows`` hook that sets it
    before each forward pass; ``(None, None)`` for the others."""
    if not method.per_example:
        return None, None
    chosen = method.assign(handle, plan, examples, list(tasks) if tasks is not None else [None] * len(examples))
    return per_example_rows(handle, chosen), chosen
