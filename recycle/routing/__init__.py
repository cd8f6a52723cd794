"""Routed inference over recycled LoRA experts (SPEC §1, §4).

::

    from recycle.routing import build_routed_model

    handle = build_routed_model(model, {"a": "experts/a", "b": "experts/b"}, "phatgoose",
                                top_k=2, gates={"a": "gates/a.safetensors", "b": ...})
    with handle.record() as rec:
        logits = model(**batch).logits
    rec.stats(batch["attention_mask"])   # per-module load and entropy
    handle.remove()                      # the original modules are back
"""

from recycle.routing.engine import METHODS, RoutedModel, build_routed_model, compute_prototypes, save_vectors
from recycle.routing.experts import ExpertModule, LoraExpert, load_expert, load_experts, load_vectors, lora_scaling
from recycle.routing.layer import RoutedLoraLinear
from recycle.routing.retrieval import RetrievalIndex, SentenceEmbedder, default_embedder_path
from recycle.routing.routers import ArrowRouter, AvgActivationRouter, ExampleRouter, GateRouter, select_top_k
from recycle.routing.stats import RoutingRecord

__all__ = [
    "METHODS",
    "ArrowRouter",
    "AvgActivationRouter",
    "ExampleRouter",
    "ExpertModule",
    "GateRouter",
    "LoraExpert",
    "RetrievalIndex",
    "RoutedLoraLinear",
    "RoutedModel",
    "RoutingRecord",
    "SentenceEmbedder",
    "build_routed_model",
    "compute_prototypes",
    "default_embedder_path",
    "load_expert",
    "load_experts",
    "load_vectors",
    "lora_scaling",
    "save_vectors",
    "select_top_k",
]
