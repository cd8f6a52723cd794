"""Installing a composition of LoRA experts on a Hugging Face model, and removing it.

Entry point: :func:`build_routed_model`. It loads the experts' PEFT folders, replaces each
adapted ``nn.Linear`` with a :class:`RoutedLoraLinear` (routed methods) or a merged copy
(``uniform``), and returns a :class:`RoutedModel` handle. ``handle.remove()`` puts the
original module objects back: the base model's parameters are never modified.

Methods (SPEC §1):

================  =====================================================================
``phatgoose``     per token, standardised gate vectors (``gates``: name -> safetensors file
                  of module path -> v [d_in]), top-k, softmax or sigmoid weighting
``avg-activation``same routing with ``prototypes`` (see :func:`compute_prototypes`)
``arrow``         per token, PEFT's Arrow (see :class:`ArrowRouter`); ``temperature`` is
                  Arrow's router temperature
``retrieval``     per example, 1-NN over the experts' training texts; call
                  ``handle.set_examples(texts=...)`` (or ``experts=``) before each batch
``oracle``        per example, the expert of the example's task: ``set_examples(experts=...)``
``single``        one expert (``expert=NAME``) with weight 1 everywhere: equals PeftModel
``uniform``       ``W + (1/N) Σ_i s_i B_i A_i`` merged into a copy of each weight; an expert
                  that does not adapt a module counts as a zero delta there (mean over all
                  N experts, the merge of the deltas), no inference overhead
``base``          nothing installed
================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from recycle.errors import RecycleError
from recycle.routing.experts import LoraExpert, load_expert, load_vectors
from recycle.routing.layer import RoutedLoraLinear
from recycle.routing.retrieval import RetrievalIndex, SentenceEmbedder
from recycle.routing.routers import ArrowRouter, AvgActivationRouter, ExampleRouter, GateRouter
from recycle.routing.stats import RoutingRecord

METHODS = ("phatgoose", "avg-activation", "arrow", "retrieval", "oracle", "single", "uniform", "base")


class RoutedModel:
    """Handle on a model with a composition installed.

    Attributes: ``model`` (the same object that was passed in, modified in place),
    ``method``, ``expert_names`` (global order), ``layers`` (module path -> installed module),
    ``router`` (shared by all routed layers; ``None`` for uniform/base).
    Usable as a context manager (removes on exit).
    """

    def __init__(self, model, method, expert_names, router, originals, embedder=None, index=None):
        self.model, self.method, self.expert_names, self.router = model, method, expert_names, router
        self._originals: dict[str, nn.Module] = originals
        self.layers = {p: model.get_submodule(p) for p in originals}
        self._embedder, self._index = embedder, index

    def remove(self) -> None:
        """Put every original module back (idempotent)."""
        for path, original in self._originals.items():
            _set_submodule(self.model, path, original)
        self._originals, self.layers = {}, {}

    def __enter__(self) -> RoutedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def set_examples(
        self, experts: Sequence[str | None] | None = None, texts: Sequence[str] | None = None
    ) -> list[str | None]:
        """For per-example methods (retrieval, oracle): the expert of each example of the next
        batches, given by name (``None``: no expert, the base model, e.g. an oracle example
        whose task has no expert), or (retrieval) chosen from the examples' texts.
        Returns the names."""
        if not isinstance(self.router, ExampleRouter) or self.router.fixed is not None:
            raise RecycleError(f"method {self.method} does not take per-example experts")
        if texts is not None:
            if self._index is None or self._embedder is None:
                raise RecycleError("set_examples(texts=...) needs a retrieval index and embedder")
            experts = self._index.choose_texts(self._embedder, texts)
        if experts is None:
            self.router.assign(None)
            return []
        unknown = sorted(set(experts) - set(self.expert_names) - {None})
        if unknown:
            raise RecycleError(f"unknown experts: {', '.join(unknown)}")
        none = len(self.expert_names)
        self.router.assign([none if n is None else self.expert_names.index(n) for n in experts])
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
        routed = [m for m in self.layers.values() if isinstance(m, RoutedLoraLinear)]
        for m in routed:
            m.recorder = rec
        try:
            yield rec
        finally:
            for m in routed:
                m.recorder = None


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def _vectors(source: Mapping | None, names: list[str], what: str) -> dict[str, dict[str, torch.Tensor]]:
    source = source or {}
    missing = [n for n in names if n not in source]
    if missing:
        raise RecycleError(f"no {what} for experts: {', '.join(missing)}")
    return {n: dict(source[n]) if isinstance(source[n], Mapping) else load_vectors(source[n]) for n in names}


def _linear_at(model: nn.Module, path: str) -> nn.Linear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise RecycleError(f"the model has no module {path} (adapter made for another model?)") from None
    if not isinstance(module, nn.Linear):
        raise RecycleError(f"{path} is a {type(module).__name__}: only nn.Linear targets can be routed")
    return module


def _merged_linear(base: nn.Linear, deltas: Iterable[torch.Tensor], n: int) -> nn.Linear:
    merged = torch.nn.utils.skip_init(
        nn.Linear, base.in_features, base.out_features, bias=base.bias is not None,
        device=base.weight.device, dtype=base.weight.dtype,
    )  # fmt: skip
    total = sum(deltas)
    with torch.no_grad():
        merged.weight.copy_((base.weight.float() + total.to(base.weight.device) / n).to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    merged.requires_grad_(False)
    return merged


def build_routed_model(
    model: nn.Module,
    expert_dirs: Mapping[str, str | Path | LoraExpert],
    method: str,
    *,
    top_k: int = 2,
    weighting: str = "softmax",
    temperature: float = 1.0,
    gates: Mapping[str, str | Path | Mapping[str, torch.Tensor]] | None = None,
    prototypes: Mapping[str, str | Path | Mapping[str, torch.Tensor]] | None = None,
    expert: str | None = None,
    embedder: SentenceEmbedder | None = None,
    retrieval_index: RetrievalIndex | None = None,
    arrow_seed: int | None = 0,
    arrow_iters: int = 15,
) -> RoutedModel:
    """Install a composition of LoRA experts on ``model`` (in place) and return its handle.

    Args:
        model: a Hugging Face model (decoder-only or encoder-decoder), not a PeftModel.
        expert_dirs: expert name -> PEFT adapter folder (or an already loaded LoraExpert).
        method: one of ``METHODS`` (``"single NAME"`` is accepted for ``single``).
        top_k, weighting, temperature: token-router settings (phatgoose, avg-activation, arrow).
        gates: phatgoose gate files per expert (name -> safetensors path or dict).
        prototypes: avg-activation router vectors per expert (same format).
        expert: the expert for ``single``.
        embedder, retrieval_index: for ``retrieval`` with ``set_examples(texts=...)``.
        arrow_seed, arrow_iters: PEFT Arrow's ``rng_seed`` and power-iteration steps.
    """
    if method.startswith("single ") and expert is None:
        method, expert = "single", method.split(maxsplit=1)[1]
    if method not in METHODS:
        raise RecycleError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if not expert_dirs and method != "base":
        raise RecycleError(f"method {method} needs at least one expert")
    if method == "single":
        if expert not in expert_dirs:
            raise RecycleError(f"single: expert {expert!r} is not among the experts")
        expert_dirs = {expert: expert_dirs[expert]}
    if method == "base":
        return RoutedModel(model, method, list(expert_dirs), None, {})

    experts = [e if isinstance(e, LoraExpert) else load_expert(e, n) for n, e in expert_dirs.items()]
    names = [e.name for e in experts]
    paths = sorted({p for e in experts for p in e.modules})
    bases = {p: _linear_at(model, p) for p in paths}

    if method == "uniform":
        originals = {}
        for p in paths:
            deltas = [e.modules[p].delta_weight() for e in experts if p in e.modules]
            _set_submodule(model, p, _merged_linear(bases[p], deltas, len(experts)))
            originals[p] = bases[p]
        return RoutedModel(model, method, names, None, originals)

    if method == "phatgoose":
        router = GateRouter(_vectors(gates, names, "gates"), top_k, weighting, temperature)
    elif method == "avg-activation":
        router = AvgActivationRouter(_vectors(prototypes, names, "prototypes"), top_k, weighting, temperature)
    elif method == "arrow":
        router = ArrowRouter(top_k, weighting, temperature, seed=arrow_seed, iters=arrow_iters)
    elif method == "single":
        router = ExampleRouter("single", fixed=0)
    else:  # retrieval, oracle
        router = ExampleRouter(method)

    originals = {}
    try:
        for p in paths:
            here = [(g, e.name, e.modules[p]) for g, e in enumerate(experts) if p in e.modules]
            layer = RoutedLoraLinear(bases[p], p, here, len(experts), router)
            _set_submodule(model, p, layer)
            originals[p] = bases[p]
    except Exception:
        for p, original in originals.items():
            _set_submodule(model, p, original)
        raise
    return RoutedModel(model, method, names, router, originals, embedder, retrieval_index)


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
    """Write one expert's router vectors (module path -> [d_in]) as safetensors."""
    save_file({k: v.detach().float().contiguous().cpu() for k, v in vectors.items()}, str(path))
