"""Routed inference over recycled LoRA experts (SPEC §1, §4): the routed layer, routers, and
installing / removing a composition on a Hugging Face model. No registry in here: the
methods (:mod:`recycle.methods`) decide which router, with what.

::

    from recycle.methods import build_routed_model

    handle = build_routed_model(model, {"a": "experts/a", "b": "experts/b"}, "phatgoose",
                                top_k=2, gates={"a": "gates/a.safetensors", "b": ...})
    with handle.record() as rec:
        logits = model(**batch).logits
    rec.stats(batch["attention_mask"])   # per-module load and entropy
    handle.remove()                      # the original modules are back
"""

from recycle.routing.context import Route, RoutingContext, module_kind
from recycle.routing.engine import (
    RoutedModel,
    compute_prototypes,
    install_merged,
    install_nothing,
    install_routed,
    save_vectors,
)
from recycle.routing.experts import ExpertModule, LoraExpert, load_expert, load_vectors, lora_scaling
from recycle.routing.layer import RoutedLoraLinear
from recycle.routing.retrieval import RetrievalIndex, SentenceEmbedder, default_embedder_path
from recycle.routing.routers import (
    ArrowRouter,
    AvgActivationRouter,
    ExampleRouter,
    GateRouter,
    Router,
    SpectrRouter,
    TokenRouter,
    right_singular_vectors,
    select_top_k,
)
from recycle.routing.stats import RoutingRecord

__all__ = [
    "ArrowRouter",
    "AvgActivationRouter",
    "ExampleRouter",
    "ExpertModule",
    "GateRouter",
    "LoraExpert",
    "RetrievalIndex",
    "Route",
    "RoutedLoraLinear",
    "RoutedModel",
    "Router",
    "RoutingContext",
    "RoutingRecord",
    "SentenceEmbedder",
    "SpectrRouter",
    "TokenRouter",
    "compute_prototypes",
    "default_embedder_path",
    "install_merged",
    "install_nothing",
    "install_routed",
    "load_expert",
    "load_vectors",
    "lora_scaling",
    "module_kind",
    "right_singular_vectors",
    "save_vectors",
    "select_top_k",
]
