"""Rank classification against a direct computation, with length normalisation."""

import math

import pytest
import torch
import torch.nn.functional as F

from recycle.data import Example, _special_prefix
from recycle.scoring import predict, score_choices


@pytest.fixture(scope="module")
def tiny(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    return model, AutoTokenizer.from_pretrained(tiny_base)


def direct(model, tok, prompt, choice):
    """One full forward of [BOS] prompt choice; mean log-prob of the choice tokens."""
    p = _special_prefix(tok) + tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(p) - 1 + t, c[t]].item() for t in range(len(c))) / len(c)


def test_matches_direct_computation_with_shared_prefix(tiny):
    model, tok = tiny
    exs = [
        Example("Review: great fun\nSentiment:", [" positive", " negative"], " positive", 0, "great fun"),
        Example("Q: a much longer prompt about many things here?\nA:", [" yes", " no way", " x"], " no way", 1, ""),
        Example("Short:", [" a", " bb bb bb"], " a", 0, ""),
    ]
    got = score_choices(model, tok, exs, batch_size=2)
    for ex, s in zip(exs, got):
        want = [direct(model, tok, ex.prompt, c) for c in ex.choices]
        assert s == pytest.approx(want, abs=1e-4)


def test_length_normalisation_is_a_mean_over_tokens(tiny):
    model, tok = tiny
    ex = Example("Pick:", [" z", " zzzzzz"], " z", 0, "")
    (s,) = score_choices(model, tok, [ex])
    p = _special_prefix(tok) + tok("Pick:", add_special_tokens=False)["input_ids"]
    c = tok(" zzzzzz", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
    token_lp = [logp[len(p) - 1 + t, c[t]].item() for t in range(len(c))]
    assert len(c) == 7
    assert s[1] == pytest.approx(sum(token_lp) / 7, abs=1e-4)
    assert not math.isclose(s[1], sum(token_lp), abs_tol=1e-3)


def test_predict_is_argmax():
    assert predict([[-1.0, -0.5], [-0.1, -2.0, -3.0]]) == [1, 0]


def test_rows_hook_sees_every_row(tiny):
    model, tok = tiny
    exs = [Example("a", [" b", " c d"], " b", 0, ""), Example("e", [" f", " g"], " f", 0, "")]
    seen = []
    score_choices(model, tok, exs, batch_size=8, on_rows=lambda rows: seen.append(list(rows)))
    assert seen[0] == [0, 1]
    assert seen[1] == [0, 0, 1, 1]
