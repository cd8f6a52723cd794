"""Installing a composition of LoRA experts on a Hugging Face model, and removing it.

The building blocks every method uses (:mod:`recycle.methods` decides which, with what):

- :func:`install_routed`: replaces each adapted ``nn.Linear`` with a
  :class:`RoutedLoraLinear` whose router is built by ``make_router(layer)``;
- :func:`install_merged`: replaces each adapted ``nn.Linear`` with a merged copy
  ``W + Σ_i c_i s_i B_i A_i`` (the uniform merge: ``c_i = 1/N``);
- :func:`install_nothing`: the base model as it is.

Each returns a :class:`RoutedModel` handle; ``handle.remove()`` puts the original module
objects back: the base model's parameters are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from recycle.errors import RecycleError
from recycle.routing.context import RoutingContext
from recycle.routing.experts import LoraExpert
from recycle.routing.layer import RoutedLoraLinear
from recycle.routing.siblings import group_siblings
from recycle.routing.stats import RoutingRecord


class RoutedModel:
    """Handle on a model with a composition installed.

    Attributes: ``model`` (the same object that was passed in, modified in place),
    ``method``, ``expert_names`` (global order), ``layers`` (module path -> installed
    module), ``context`` (the routing context, reset at the start of every forward).
    Usable as a context manager (removes on exit).
    """

    def __init__(self, model: nn.Module, method: str, expert_names: list[str], originals: dict[str, nn.Module],
                 context: RoutingContext | None = None):
        self.model, self.method, self.expert_names = model, method, expert_names
        self._originals: dict[str, nn.Module] = originals
        self.layers = {p: model.get_submodule(p) for p in originals}
        self.context = context or RoutingContext()
        self.extras: dict = {}  # method-specific objects (e.g. the retrieval index)
        self._hook = model.register_forward_pre_hook(lambda module, args: self.context.reset()) if self.routed else None

    @property
    def routed(self) -> list[RoutedLoraLinear]:
        return [m for m in self.layers.values() if isinstance(m, RoutedLoraLinear)]

    def remove(self) -> None:
        """Put every original module back (idempotent)."""
        for path, original in self._originals.items():
            _set_submodule(self.model, path, original)
        self._originals, self.layers = {}, {}
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> RoutedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def set_examples(self, experts: Sequence[str | None] | None) -> list[str | None]:
        """For per-example methods (retrieval, oracle): the expert of each example of the next
        batches by name (``None``: no expert, the base model, e.g. an oracle example whose
        task has no expert). Returns the names."""
        if experts is None:
            self.context.assignment = None
            return []
        unknown = sorted(set(experts) - set(self.expert_names) - {None})
        if unknown:
            raise RecycleError(f"unknown experts: {', '.join(unknown)}")
        none = len(self.expert_names)
        ids = [none if n is None else self.expert_names.index(n) for n in experts]
        self.context.assignment = torch.as_tensor(ids, dtype=torch.long)
        return list(experts)

    @torch.no_grad()
    def explain(self, example: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        """Run one example (a batch of size 1: ``model(**example)``) and return the experts
        used per routed module with the share of its (unmasked) tokens that used each."""
        with self.record() as rec:
            self.model(**example)
        return rec.explain(0, example.get("attention_mask"))

    @contextmanager
    def record(self):
        """Record routing decisions of the forward passes inside the block::

            with handle.record() as rec:
                model(**batch)
            rec.stats(batch["attention_mask"]); rec.explain(example=0)
        """
        rec = RoutingRecord()
        self.context.recorder = rec
        try:
            yield rec
        finally:
            self.context.recorder = None

    # ---- router parameters ---------------------------------------------------------

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.routed for p in m.router.parameters()]

    def router_state(self) -> dict[str, torch.Tensor]:
        """Every router's saved tensors, keyed ``<module path>/<name>`` (empty for routers
        that learn nothing)."""
        return {f"{m.path}/{k}": v.detach().cpu().contiguous()
                for m in self.routed for k, v in m.router.state_dict().items()}

    def load_router_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`router_state` output; every key must match a router's tensor exactly."""
        by_path: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            path, _, name = key.rpartition("/")
            by_path.setdefault(path, {})[name] = value
        unknown = sorted(set(by_path) - {m.path for m in self.routed})
        if unknown:
            raise RecycleError(f"router parameters name module {unknown[0]}, which this composition does not route")
        for m in self.routed:
            state = by_path.get(m.path, {})
            want = m.router.state_dict()
            if set(state) != set(want):
                missing = sorted(set(want) - set(state)) or sorted(set(state) - set(want))
                raise RecycleError(f"router parameters at {m.path} do not match the composition ({missing[0]})")
            for k, v in state.items():
                if tuple(v.shape) != tuple(want[k].shape):
                    raise RecycleError(f"router parameter {m.path}/{k} has shape {tuple(v.shape)}, "
                                       f"the composition needs {tuple(want[k].shape)}")
            m.router.load_state_dict({k: v.to(want[k].device, want[k].dtype) for k, v in state.items()})


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def _linear_at(model: nn.Module, path: str) -> nn.Linear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise RecycleError(f"the model has no module {path} (adapter made for another model?)") from None
    if not isinstance(module, nn.Linear):
        raise RecycleError(f"{path} is a {type(module).__name__}: only nn.Linear targets can be routed")
    return module


def _paths(model: nn.Module, experts: Sequence[LoraExpert]) -> dict[str, nn.Linear]:
    return {p: _linear_at(model, p) for p in sorted({p for e in experts for p in e.modules})}


def install_routed(
    model: nn.Module,
    experts: Sequence[LoraExpert],
    make_router: Callable[[RoutedLoraLinear], nn.Module],
    method: str,
) -> RoutedModel:
    """Replace every Linear an expert adapts with a :class:`RoutedLoraLinear` over the
    experts present there, its router ``make_router(layer)``; returns the handle."""
    if not experts:
        raise RecycleError(f"method {method} needs at least one expert")
    names = [e.name for e in experts]
    bases = _paths(model, experts)
    context = RoutingContext()
    originals: dict[str, nn.Module] = {}
    try:
        layers = {}
        for p, base in bases.items():
            here = [(g, e.name, e.modules[p]) for g, e in enumerate(experts) if p in e.modules]
            layers[p] = RoutedLoraLinear(base, p, here, len(experts), context)
        if any(e.lazy for e in experts):
            _fill(layers, experts)
        for p, layer in layers.items():
            layer.set_router(make_router(layer))
            _set_submodule(model, p, layer)
            originals[p] = bases[p]
    except Exception:
        for p, original in originals.items():
            _set_submodule(model, p, original)
        raise
    handle = RoutedModel(model, method, names, originals, context)
    context.groups = group_siblings(handle.layers)
    return handle


def _fill(layers: dict[str, RoutedLoraLinear], experts: Sequence[LoraExpert]) -> None:
    """Read the lazy experts one at a time straight into the layers' stacked rows (each
    file once, hash-checked; only one expert's factors held besides the stack), then finish
    the layers."""
    local = {p: {n: j for j, n in enumerate(layer.expert_names)} for p, layer in layers.items()}
    for e in experts:
        loaded = e.materialise()
        for p, m in loaded.modules.items():
            layers[p].fill(local[p][e.name], m, e.name)
        if set(loaded.modules) != set(e.modules):
            raise RecycleError(f"expert {e.name}: its file no longer adapts the modules it announced")
        del loaded
    for layer in layers.values():
        layer.finish()


def _merged_linear(base: nn.Linear, delta: torch.Tensor) -> nn.Linear:
    merged = torch.nn.utils.skip_init(
        nn.Linear, base.in_features, base.out_features, bias=base.bias is not None,
        device=base.weight.device, dtype=base.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        merged.weight.copy_((base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    merged.requires_grad_(False)
    return merged


def install_merged(model: nn.Module, experts: Sequence[LoraExpert], method: str = "uniform") -> RoutedModel:
    """``W + (1/N) Σ_i s_i B_i A_i`` merged into a copy of each adapted weight: an expert
    that does not adapt a module counts as a zero delta there (mean over all N experts, the
    merge of the deltas, never of A and B separately); no inference overhead."""
    if not experts:
        raise RecycleError(f"method {method} needs at least one expert")
    originals = {}
    bases = _paths(model, experts)
    if any(e.lazy for e in experts):  # one expert read at a time, its deltas summed
        totals: dict[str, torch.Tensor] = {}
        for e in experts:
            for p, m in e.materialise().modules.items():
                totals[p] = totals[p] + m.delta_weight() if p in totals else m.delta_weight()
    else:
        totals = {p: sum(e.modules[p].delta_weight() for e in experts if p in e.modules) for p in bases}
    for p, base in bases.items():
        _set_submodule(model, p, _merged_linear(base, totals[p] / len(experts)))
        originals[p] = base
    return RoutedModel(model, method, [e.name for e in experts], originals)


def install_nothing(model: nn.Module, names: Sequence[str] = (), method: str = "base") -> RoutedModel:
    return RoutedModel(model, method, list(names), {})


@torch.no_grad()
def compute_prototypes(
    model: nn.Module,
    batches_per_expert: Mapping[str, Iterable[Mapping[str, torch.Tensor]]],
    module_paths: Iterable[str],
) -> dict[str, dict[str, torch.Tensor]]:
    """Average-activation router vectors: for each expert, the mean input of each module over
    that expert's own batches (``model(**batch)`` is run; run it on the base model, nothing
    installed). Padding is excluded where the batch has ``attention_mask`` (or, for a decoder,
    ``decoder_attention_mask``) of the module's token-grid shape. Returns
    {expert: {module path: mean [d_in] float32}}, the same format as gates
    (write one expert's dict with :func:`save_vectors`)."""
    module_paths = list(module_paths)
    out = {}
    for name, batches in batches_per_expert.items():
        sums = {p: None for p in module_paths}
        counts = dict.fromkeys(module_paths, 0)
        current: dict = {}

        def hook(path):
            def fn(module, args):
                x = args[0]
                x2d = x.reshape(-1, x.shape[-1]).float()
                for key in ("attention_mask", "decoder_attention_mask"):
                    mask = current.get(key)
                    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                        x2d = x2d[mask.reshape(-1).bool()]
                        break
                s = x2d.sum(0)
                sums[path] = s if sums[path] is None else sums[path] + s
                counts[path] += x2d.shape[0]

            return fn

        handles = [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in module_paths]
        try:
            for batch in batches:
                current.clear()
                current.update(batch)
                model(**batch)
        finally:
            for h in handles:
                h.remove()
        empty = [p for p in module_paths if counts[p] == 0]
        if empty:
            raise RecycleError(f"prototypes for {name}: no tokens reached {', '.join(empty[:3])}")
        out[name] = {p: (sums[p] / counts[p]).cpu() for p in module_paths}
    return out


def save_vectors(path: str | Path, vectors: Mapping[str, torch.Tensor]) -> None:
    """Write one expert's router vectors (module path -> [d_in]) as safetensors (atomically)."""
    from recycle.files import save_tensors

    save_tensors(path, {k: v.detach().float() for k, v in vectors.items()})
