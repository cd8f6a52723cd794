"""Using a composition: rank classification over answer choices, or generation.

:class:`Predictor` loads the base model once, installs a plan (any method, any stored
composition) and answers batches of requests; ``recycle predict``, batch prediction on a
Ray cluster and the HTTP endpoint all go through it. :func:`check_item` is the one place a
request is validated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from recycle import cluster
from recycle import compose as comp
from recycle import methods
from recycle.errors import RecycleError
from recycle.methods import Plan


def resolve(registry, name: str, data_seed: int = 0) -> Plan:
    """A stored composition by name, else a method over every registered expert."""
    if registry.composition_or_none(name) is not None:
        return comp.plan(registry, composition=name, data_seed=data_seed)
    try:
        methods.parse(name)
    except RecycleError:
        raise RecycleError(f"no composition named {name!r} (and it is not a method name)") from None
    return comp.plan(registry, method=name, data_seed=data_seed)


MAX_CHOICES = 64  # answer choices per request: each is a forward row
MAX_CHARS = 100_000  # characters of prompt, choices and text per request, checked before tokenising
CHARS_PER_TOKEN = 16  # where a token bound is set, characters beyond 16 per token are refused untokenised


def check_item(item, where: str = "request", *, max_chars: int = MAX_CHARS, chars_why: str = "") -> dict:
    """One request: ``{"prompt": str, "choices": [str, ...] (optional), "task": str
    (optional), "text": str (optional)}``; anything else is refused in one line, and so is
    one that is too big to score (more than :data:`MAX_CHOICES` choices, the same choice
    twice, more than ``max_chars`` characters in all), before anything is tokenised."""
    if not isinstance(item, dict):
        raise RecycleError(f"{where}: must be a JSON object")
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecycleError(f"{where}: needs a non-empty \"prompt\" string")
    choices = []
    if "choices" in item and item["choices"] is not None:
        choices = item["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise RecycleError(f"{where}: \"choices\" must be a list of strings")
        if len(choices) < 2:
            raise RecycleError(f"{where}: \"choices\" needs at least two answers")
        if len(choices) > MAX_CHOICES:
            raise RecycleError(f"{where}: {len(choices)} answer choices; at most {MAX_CHOICES} are scored")
        if any(not c for c in choices):
            raise RecycleError(f"{where}: an answer choice is empty")
        seen = set()
        for c in choices:
            if c in seen:
                shown = c if len(c) <= 40 else c[:40] + "..."
                raise RecycleError(f"{where}: the answer choice {shown!r} is given twice (each choice gets one score)")
            seen.add(c)
    for key in ("task", "text"):
        if key in item and item[key] is not None and not isinstance(item[key], str):
            raise RecycleError(f"{where}: \"{key}\" must be a string")
    size = len(prompt) + sum(len(c) for c in choices) + len(item.get("text") or "") + len(item.get("task") or "")
    if size > max_chars:
        raise RecycleError(f"{where}: the prompt, choices and text are {size} characters; at most {max_chars} "
                           f"are taken{chars_why}")
    return item


def check_tokens(item: dict, tokenizer, max_tokens: int, *, where: str = "request", prompt_too: bool = True,
                 option: str = "--max-length") -> None:
    """A checked request's token count within ``max_tokens``: prompt plus every choice
    (``prompt_too``), or, where the prompt is cut from the left to fit, the longest
    choice within half of it (so the prompt keeps the other half)."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    choices = [count(c) for c in item.get("choices") or ()]
    if prompt_too:
        total = count(item["prompt"]) + sum(choices)
        if total > max_tokens:
            what = "the prompt and its choices are" if choices else "the prompt is"
            raise RecycleError(f"{where}: {what} {total} tokens; at most {max_tokens} are taken ({option})")
    elif choices and max(choices) > max_tokens // 2:
        raise RecycleError(f"{where}: an answer choice is {max(choices)} tokens; at most {max_tokens // 2} "
                           f"(half the {max_tokens}-token window, the prompt keeps the other half)")


def read_jsonl(path: str | Path) -> list[dict]:
    """Requests from a JSONL file, one per line (blank lines skipped), each checked."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise RecycleError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecycleError(f"{path}: not UTF-8 text (byte {e.start})") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecycleError(f"{path}:{n}: not JSON ({e.msg})") from None
        items.append(check_item(item, f"{path}:{n}"))
    if not items:
        raise RecycleError(f"{path}: no examples")
    return items


class Predictor:
    """A loaded composition: ``score`` (rank classification) and ``generate``."""

    def __init__(self, plan: Plan, device: str = "cpu", threads: int | None = None, dtype: str = "float32"):
        import torch

        from recycle.basemodels import load_base, resolve_base

        if threads:
            torch.set_num_threads(threads)
        self.plan = plan
        self.model, self.tokenizer = load_base(resolve_base(plan.base), dtype=dtype)
        self.device = cluster.device(device)
        self.model.to(self.device)
        self.method = methods.get(plan.method)
        self.scorer = self.method.scorer(plan, self.model, self.tokenizer)

    def close(self) -> None:
        self.scorer.close()

    def score(self, items: Sequence[dict], batch_size: int = 16, explain: bool = False,
              max_length: int = 256, fitted: bool = False) -> list[dict]:
        """Rank classification: per item ``answer``, ``scores`` {choice: score (mean log-prob of
        its tokens; for ensembles the log of the combined probability)}, the per-example
        ``expert`` for per-example methods, method-specific values (``p_seen`` ...), and with
        ``explain`` the experts used per routed module. ``fitted``: the caller has checked that
        each prompt plus its choices fit in ``max_length`` tokens (the server does)."""
        from recycle.data import Example
        from recycle.methods.method import check_finite
        from recycle.scoring import predict

        if not items:
            return []
        if not fitted:  # the prompt is cut from the left to fit max_length; a choice never is
            for n, it in enumerate(items, 1):
                check_tokens(it, self.tokenizer, max_length, where=f"example {n}", prompt_too=False)
        examples = [Example(it["prompt"], list(it["choices"]), it["choices"][0], None, it.get("text") or it["prompt"])
                    for it in items]
        tasks = [it.get("task") for it in items]
        if explain:
            pairs = [self.scorer.explain(ex, t, max_length=max_length) for ex, t in zip(examples, tasks)]
            scores, explained = [p[0] for p in pairs], [p[1] for p in pairs]
            check_finite(scores)
            out_extra, chosen = {}, None
            if self.method.per_example:
                chosen = self.scorer.score(examples, tasks, batch_size=batch_size, max_length=max_length).experts
        else:
            scored = self.scorer.score(examples, tasks, batch_size=batch_size, max_length=max_length)
            scores, chosen, out_extra, explained = scored.scores, scored.experts, scored.extra, None
        out = []
        for i, (it, ex, s, p) in enumerate(zip(items, examples, scores, predict(scores))):
            r = {**{k: v for k, v in it.items() if k != "choices"}, "answer": ex.choices[p],
                 "scores": dict(zip(ex.choices, s))}
            if chosen:
                r["expert"] = chosen[i]
            for key, values in out_extra.items():
                r[key] = values[i]
            if explained is not None:
                r["experts"] = explained[i]
            out.append(r)
        return out

    def generate(self, items: Sequence[dict], max_new_tokens: int = 32, batch_size: int = 8) -> list[dict]:
        """Greedy generation for each item's prompt."""
        from recycle.scoring import generate

        if self.method.per_example or not hasattr(self.scorer, "handle"):
            raise RecycleError(f"generation with {self.plan.method} is not supported; give choices")
        if max_new_tokens < 1:
            raise RecycleError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
        texts = generate(self.model, self.tokenizer, [it["prompt"] for it in items], max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
        return [{**it, "answer": t} for it, t in zip(items, texts)]
