"""The shared LM data layer: examples of a registered task, and LM batches over them.

Training (experts, gates) and evaluation all read examples through
:func:`recycle.tasks.load_examples` and tokenise with :func:`encode_lm`, so the loss and the
scores see the same tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from recycle.errors import RecycleError

if TYPE_CHECKING:
    import torch

IGNORE = -100
SPLIT_NAMES = ("train", "validation", "test")


@dataclass
class Example:
    prompt: str
    choices: list[str] | None  # answer strings for rank classification; None for generation
    answer: str  # the gold target string (choices[label] for classification)
    label: int | None  # index of the answer in choices
    text: str  # the raw input text (retrieval embedding, dedupe)


def _special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text (BOS), found by encoding an empty string."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return list(ids) if len(ids) <= 2 else []


def encode_lm(tokenizer, prompt: str, target: str, max_length: int) -> dict:
    """``input_ids`` = [BOS] prompt target; ``labels`` = -100 except on the target tokens.
    A too-long prompt is cut from the left (after BOS); the target is kept whole unless it
    alone exceeds ``max_length`` (then its end is cut, keeping one prompt token)."""
    if max_length < 2:
        raise RecycleError("max_length must be at least 2")
    prefix = _special_prefix(tokenizer)
    p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    t_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not t_ids:
        raise RecycleError(f"target {target!r} encodes to no tokens")
    if len(t_ids) > max_length - 1:
        t_ids = t_ids[: max_length - 1]
    room = max_length - len(t_ids)  # >= 1
    body = prefix + p_ids
    if len(body) > room:
        keep = prefix if len(prefix) < room else []
        body = keep + p_ids[max(0, len(p_ids) - (room - len(keep))):]
    if not body:
        raise RecycleError("empty prompt: the target needs at least one token before it")
    return {"input_ids": body + t_ids, "labels": [IGNORE] * len(body) + t_ids}


def collate(encoded: list[dict], pad_id: int) -> "dict[str, torch.Tensor]":
    """Right-pad a list of :func:`encode_lm` outputs into tensors."""
    import torch

    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    return 0 if pid is None else int(pid)


def lm_batches(
    examples: list[Example], tokenizer, batch_size: int, max_length: int, seed: int, window: int = 32,
    encoded: list[dict] | None = None,
) -> Iterator[dict]:
    """Endless batches of (prompt, answer) LM examples, deterministic by ``seed``.

    Each epoch is a fresh permutation; the stream runs across epoch boundaries so every
    batch is full. To waste little compute on padding, ``window`` batches' worth of the
    stream are sorted by length, cut into batches, and those batches shuffled.
    """
    if not examples:
        raise RecycleError("no training examples")
    if batch_size < 1:
        raise RecycleError("batch size must be at least 1")
    if encoded is None:  # else: these examples, already encoded this way (by a worker that reuses them)
        encoded = [encode_lm(tokenizer, e.prompt, e.answer, max_length) for e in examples]
    pad = pad_id_of(tokenizer)
    rng = random.Random(seed)
    order: list[int] = []
    span = batch_size * max(1, window)
    while True:
        while len(order) < span:
            perm = list(range(len(encoded)))
            rng.shuffle(perm)
            order += perm
        take, order = order[:span], order[span:]
        take.sort(key=lambda i: len(encoded[i]["input_ids"]))
        chunks = [take[k:k + batch_size] for k in range(0, span, batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield collate([encoded[i] for i in chunk], pad)
