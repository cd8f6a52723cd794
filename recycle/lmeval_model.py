"""recycle's routed model behind lm-evaluation-harness: an ``lm_eval.api.model.LM`` whose
``loglikelihood`` is recycle's own scorer.

Imports ``lm_eval`` at the top: only :mod:`recycle.lmeval`'s worker imports this module.

The harness asks for ``loglikelihood(context, continuation)`` one (document, choice) pair at
a time; a multiple-choice document's pairs share its context. They are grouped back into
recycle :class:`~recycle.data.Example` s (one per document: the context as the prompt, the
continuations as its choices, in the harness's order) and scored by the plan's scorer
(:meth:`recycle.methods.Method.scorer`), so token routing, per-example methods, MoE++ and
COSMO all run exactly as in ``recycle eval``: ``[BOS] context`` then each continuation's own
tokens, the context cut from the left past ``max_length``.

What the harness receives per pair:

- installed compositions (every method but COSMO): recycle scores a choice by the mean
  log-probability of its tokens; the harness gets the sum, mean × the continuation's token
  count, its own convention (``acc`` is the argmax of the sums, ``acc_norm`` of the sums
  divided by the continuation's length in characters, ``acc_bytes`` in UTF-8 bytes);
- COSMO: the log of COSMO's combined answer distribution over the document's choices
  (SPEC §3), the only score it has; every normalisation the harness applies then divides
  a log-probability of a whole answer.

``is_greedy`` (read by the harness's ``exact_match`` and by single-continuation tasks'
``acc``) is not computed: recycle's scorer does not look at the argmax of every token.
:func:`recycle.lmeval.check_task` refuses tasks that are not ``multiple_choice``.
"""

from __future__ import annotations

from lm_eval.api.model import LM

from recycle.errors import RecycleError


class RecycleLM(LM):
    """A plan installed on a loaded base model, as the harness's model."""

    def __init__(self, plan, model, tokenizer, *, batch_size: int = 16, max_length: int = 2048):
        super().__init__()
        from recycle import methods

        self.plan, self.model, self.tokenizer = plan, model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.scorer = methods.get(plan.method).scorer(plan, model, tokenizer)
        self.calls: list[dict] = []  # per loglikelihood call: its examples' keys and the scorer's output

    def close(self) -> None:
        self.scorer.close()

    @property
    def per_token(self) -> bool:
        """Whether the scorer's scores are mean log-probs per token (else log-probabilities
        over the choices, as COSMO's)."""
        from recycle.methods.method import InstalledScorer

        return isinstance(self.scorer, InstalledScorer)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from recycle.data import Example

        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            context, continuation = req.args
            groups.setdefault((req.task_name, req.doc_id, context), []).append(i)
        keys = list(groups)
        examples = [Example(k[2], [requests[i].args[1] for i in groups[k]], "", None, k[2]) for k in keys]
        tasks = [k[0] for k in keys]
        out = self.scorer.score(examples, tasks, batch_size=self.batch_size, max_length=self.max_length, record=True)
        self.calls.append({"keys": keys, "scored": out})
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for k, ex, scores in zip(keys, examples, out.scores):
            for i, choice, s in zip(groups[k], ex.choices, scores):
                n = len(self.tokenizer(choice, add_special_tokens=False)["input_ids"]) if self.per_token else 1
                results[i] = (float(s) * n, False)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise RecycleError("recycle lm-eval scores multiple-choice tasks only (this task asks for "
                           "loglikelihood_rolling, a perplexity)")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise RecycleError("recycle lm-eval scores multiple-choice tasks only (this task asks for generation)")
