"""Rank classification: score each answer choice by its length-normalised log-likelihood.

``score_choices`` returns, per example, the mean log-probability of each choice's tokens
given the prompt, tokenised as :func:`recycle.data.encode_lm` does for training
(``[BOS] prompt`` then the choice's own tokens). Each prompt runs once (left-padded, in
batches, keeping its KV cache); every choice then continues from that cache, so the
prompt is never recomputed per choice. ``predict`` is the argmax.
"""

from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager
from typing import Callable, Sequence

import torch

from recycle.data import Example, _special_prefix, pad_id_of


def _cache_kw(model) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever it takes."""
    import inspect

    inner = inner_model(model)
    try:
        params = inspect.signature(type(inner).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``: every row ends at the last column,
    so the next token of every row is predicted at the same position."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids, mask


def _encode(tokenizer, ex: Example, max_length: int) -> tuple[list[int], list[list[int]]]:
    choices = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in ex.choices]
    if any(not c for c in choices):
        raise ValueError(f"a choice of {ex.prompt[:40]!r}... encodes to no tokens")
    prefix = _special_prefix(tokenizer)
    prompt = list(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
    room = max(1, max_length - max(len(c) for c in choices))
    ids = prefix + prompt
    if len(ids) > room:  # cut from the left, keeping BOS, as encode_lm does
        keep = prefix if len(prefix) < room else []
        ids = keep + prompt[max(0, len(prompt) - (room - len(keep))):]
    return ids, choices


def inner_model(model):
    """The transformers model inside a PEFT wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model):
    """The model's list of decoder layers where it has the usual layout
    (``model.model.layers``: Llama, Mistral, Qwen, ...), else None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


class _Rows(torch.nn.Module):
    """Stands for a frozen Linear: computes the tokens at ``index`` (into the flattened
    ``[batch * length]`` tokens) only, zeros elsewhere."""

    def __init__(self, linear: torch.nn.Linear, index: torch.Tensor):
        super().__init__()
        self.linear, self.index = linear, index

    @property
    def weight(self):  # what a wrapper (PEFT's LoRA layer) may read of its base layer
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        picked = self.linear(flat.index_select(0, self.index))
        out = picked.new_zeros(flat.shape[0], picked.shape[-1]).index_copy(0, self.index, picked)
        return out.reshape(*x.shape[:-1], picked.shape[-1])


def _frozen_linears(mlp: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every frozen Linear doing the MLP's own product: its
    children, or a LoRA layer's ``base_layer``."""
    found = []
    for name, child in mlp.named_children():
        parent, attr = mlp, name
        if not isinstance(child, torch.nn.Linear) and isinstance(getattr(child, "base_layer", None), torch.nn.Linear):
            parent, attr, child = child, "base_layer", child.base_layer
        if isinstance(child, torch.nn.Linear) and not any(p.requires_grad for p in child.parameters()):
            found.append((parent, attr))
    return found


@contextmanager
def top_rows(model, index: torch.Tensor | None):
    """Inside the block the frozen products of the top decoder layer's MLP (three quarters
    of that layer's work in a Llama-style model) are computed only for the tokens at
    ``index`` (flat ``row * length + position``), zeros elsewhere; everything else (LoRA
    branches, gates, elementwise work) runs on every token as before. The model's final
    hidden states are right at those tokens only, which is all a loss on them reads, and
    the loss and every gradient come out bit for bit the same: a row of a matrix product
    does not depend on the other rows, the rows left out get a zero gradient either way
    (so they add exact zeros to every weight gradient), and no trained weight's product
    changes shape. Models without the usual layout run whole."""
    layers = decoder_layers(inner_model(model))
    mlp = getattr(layers[-1], "mlp", None) if layers is not None and len(layers) else None
    swaps = _frozen_linears(mlp) if index is not None and isinstance(mlp, torch.nn.Module) else []
    originals = [getattr(parent, attr) for parent, attr in swaps]
    for (parent, attr), linear in zip(swaps, originals):
        setattr(parent, attr, _Rows(linear, index))
    try:
        yield
    finally:
        for (parent, attr), linear in zip(swaps, originals):
            setattr(parent, attr, linear)


class _Replay(torch.nn.Module):
    """Stands for decoder layer ``index`` below the shared trunk's top: it records a place
    holder in the cache (so lengths and masks are those of the real run) and, as the
    trunk's last layer, returns the recorded hidden states."""

    def __init__(self, trunk, index: int):
        super().__init__()
        self.trunk, self.index = trunk, index

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            b, t = hidden_states.shape[:2]
            tiny = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(tiny, tiny, self.index)
        if self.index == self.trunk.start - 1:
            return self.trunk.next()
        return hidden_states


class Trunk:
    """The layers below ``start``, run once for every method of a group on the same
    examples. Every method there adapts only layers ``>= start``, so what enters layer
    ``start`` is the same for all of them: the first :func:`score_choices` run (any method)
    records it, forward pass by forward pass; later runs over the same examples and batches
    replay it instead of computing those layers (exactly the same tensors, so the same
    scores)."""

    def __init__(self, model, start: int):
        self.layers, self.start = decoder_layers(model), start
        self.records: list[torch.Tensor] = []
        self._at = 0

    @classmethod
    def for_model(cls, model, start: int | None):
        """A trunk below ``start``, or None where there is nothing to share."""
        if not start or decoder_layers(model) is None:
            return None
        return cls(model, start)

    def next(self) -> torch.Tensor:
        if self._at >= len(self.records):
            raise RuntimeError("the trunk was replayed on other examples than it recorded")
        h = self.records[self._at]
        self._at += 1
        return h

    @contextmanager
    def run(self):
        """Record (the first time) or replay (every later time) inside the block."""
        if not self.records:
            handle = self.layers[self.start].register_forward_pre_hook(
                lambda module, args, kwargs=None: self.records.append(args[0].detach()), with_kwargs=False)
            try:
                yield
            except BaseException:
                self.records.clear()  # a run that failed half-way recorded half: the next one records again
                raise
            finally:
                handle.remove()
            return
        originals = list(self.layers[: self.start])
        self._at = 0
        for i in range(self.start):
            self.layers[i] = _Replay(self, i)
        try:
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            if self._at != len(self.records):
                raise RuntimeError("the trunk was replayed on other examples than it recorded")


class TrunkCache:
    """What enters decoder layer ``start``, per batch, kept from one model's forward passes
    for another model whose layers below ``start`` are the same (same base weights, no
    adapter there): an expert's training records the batches its gates will then train on,
    and the gate training replays them instead of running the lower layers again.

    A batch is found by its token ids and attention mask (what the lower layers read), so
    a batch never recorded, or a different one, simply runs the whole model. Recording
    stops at ``max_bytes``.
    """

    def __init__(self, start: int, max_bytes: int = 1 << 30):
        self.start, self.max_bytes = start, max_bytes
        self.records: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0

    @staticmethod
    def key(batch: dict) -> bytes:
        h = hashlib.sha256()
        for name in ("input_ids", "attention_mask"):
            t = batch[name].detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes())
        return h.digest()

    @contextmanager
    def record(self, model, batch: dict):
        """Run the block (one forward pass over ``batch``) keeping what enters layer ``start``."""
        key = self.key(batch)
        trunk = None
        if key not in self.records and self.bytes < self.max_bytes:
            trunk = Trunk.for_model(inner_model(model), self.start)
        if trunk is None:
            yield
            return
        with trunk.run():  # a first run of a Trunk records
            yield
        if len(trunk.records) == 1:
            h = self.records[key] = trunk.records[0]
            self.bytes += h.numel() * h.element_size()

    @contextmanager
    def replay(self, model, batch: dict):
        """Run the block (one forward pass over ``batch``) with the layers below ``start``
        replaced by the recorded tensor, where there is one."""
        h = self.records.get(self.key(batch))
        trunk = None if h is None else Trunk.for_model(inner_model(model), self.start)
        if trunk is None:
            yield
            return
        trunk.records = [h]  # a Trunk that holds records replays them
        with trunk.run():
            yield
        self.hits += 1


def _forward_last(model, ids, mask, pos, cache_kw):
    """The prompt pass: the LM head runs on the last position only (``logits_to_keep=1``;
    a model without that argument computes them all)."""
    from transformers import DynamicCache

    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    try:
        return model(**kw, logits_to_keep=1, **{cache_kw: DynamicCache()})
    except TypeError:
        return model(**kw, **{cache_kw: DynamicCache()})


@torch.no_grad()
def score_choices(
    model,
    tokenizer,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_length: int = 256,
    on_rows: Callable[[list[int]], None] | None = None,
    trunk: Trunk | None = None,
) -> list[list[float]]:
    """Per example, the mean log-prob of each choice's tokens given the prompt.

    ``on_rows`` (if given) is called before every forward pass with the example index of
    each row in it: prompt batches first, then the choice rows continuing them. ``trunk``
    shares the lower layers' work with other runs over the same examples (see
    :class:`Trunk`).
    """
    if trunk is not None:
        with trunk.run():
            return score_choices(model, tokenizer, examples, batch_size, max_length, on_rows)

    pad = pad_id_of(tokenizer)
    cache_kw = _cache_kw(model)
    encoded = []
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError(f"example {i} has no answer choices")
        encoded.append(_encode(tokenizer, ex, max_length))
    scores: list[list[float]] = [[0.0] * len(ex.choices) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i][0]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            # 1. the prompts, left-padded, once each
            ids, mask = _left_pad([encoded[i][0] for i in group], pad)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            if on_rows:
                on_rows(list(group))
            out = _forward_last(model, ids, mask, pos, cache_kw)  # only the last position's logits
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts choice token 1
            cache = out.cache if "cache" in out else out.past_key_values
            # 2. every choice continues its prompt's cache
            rows = [(r, i, j) for r, i in enumerate(group) for j in range(len(examples[i].choices))]
            for rs in range(0, len(rows), batch_size):
                chunk = rows[rs:rs + batch_size]
                cwidth = max(len(encoded[i][1][j]) for _, i, j in chunk)
                cids = torch.full((len(chunk), cwidth), pad, dtype=torch.long)
                cmask = torch.zeros((len(chunk), cwidth), dtype=torch.long)
                for k, (_, i, j) in enumerate(chunk):
                    c = encoded[i][1][j]
                    cids[k, :len(c)] = torch.tensor(c)
                    cmask[k, :len(c)] = 1
                src = torch.tensor([r for r, _, _ in chunk])
                sub = copy.deepcopy(cache)
                sub.batch_select_indices(src)
                full_mask = torch.cat([mask[src], cmask], dim=1)
                cpos = mask[src].sum(1, keepdim=True) + torch.arange(cwidth).unsqueeze(0)
                if on_rows:
                    on_rows([i for _, i, _ in chunk])
                logits = None
                if cwidth > 1:
                    logits = model(input_ids=cids, attention_mask=full_mask, position_ids=cpos,
                                   use_cache=True, **{cache_kw: sub}).logits
                for k, (r, i, j) in enumerate(chunk):
                    c = encoded[i][1][j]
                    total = float(first[r, c[0]])
                    if len(c) > 1:
                        lp = torch.log_softmax(logits[k, : len(c) - 1].float(), dim=-1)
                        total += float(lp[torch.arange(len(c) - 1), torch.tensor(c[1:])].sum())
                    scores[i][j] = total / len(c)
    finally:
        model.train(was_training)
    return scores


def predict(scores: list[list[float]]) -> list[int]:
    """Index of the best-scoring choice of each example."""
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def accuracy(examples: Sequence[Example], scores: list[list[float]]) -> float:
    if not examples:
        return float("nan")
    return sum(int(p == ex.label) for p, ex in zip(predict(scores), examples)) / len(examples)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8) -> list[str]:
    """Greedy generation for tasks without answer choices (``[BOS] prompt`` as in training)."""
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    prefix = _special_prefix(tokenizer)
    out = []
    for start in range(0, len(prompts), batch_size):
        seqs = [prefix + list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts[start : start + batch_size]]
        ids, mask = _left_pad(seqs, pad)
        width = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out += [tokenizer.decode(g[width:], skip_special_tokens=True) for g in gen]
    return out


@torch.no_grad()
def embed_prompts(model, tokenizer, examples: Sequence[Example], batch_size: int = 16,
                  max_length: int = 256) -> torch.Tensor:
    """Per example, the mean over its prompt tokens of the model's last hidden state (after
    the final norm), the prompt encoded exactly as :func:`score_choices` encodes it:
    ``[len(examples), d]`` float32."""
    pad = pad_id_of(tokenizer)
    prompts = [_encode(tokenizer, ex, max_length)[0] if ex.choices else
               (_special_prefix(tokenizer) + list(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]))[-max_length:]
               for ex in examples]
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = _left_pad(prompts[start:start + batch_size], pad)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        output_hidden_states=True, use_cache=False)
            h = res.hidden_states[-1].float()
            m = mask.to(device).unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)
