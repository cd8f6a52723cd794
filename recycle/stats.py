"""The statistics results are read with: intervals, generalised zero-shot (S, U, H), paired
tests between two methods on the same examples, and calibration.

Pure functions of stored numbers (per-example correctness, per-choice scores); nothing here
runs a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def suh(seen: list[float], unseen: list[float]) -> dict:
    """Generalised zero-shot: S, U (macro accuracies) and their harmonic mean H."""
    s = sum(seen) / len(seen) if seen else float("nan")
    u = sum(unseen) / len(unseen) if unseen else float("nan")
    h = 2 * s * u / (s + u) if seen and unseen and (s + u) > 0 else float("nan")
    return {"S": s, "U": u, "H": h}


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of two classifiers on the same examples: ``a_only`` (A right, B
    wrong), ``b_only``, and the two-sided binomial p-value of the discordant pairs."""
    if len(a) != len(b):
        raise ValueError("paired results need the same examples")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p": 1.0}
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}


def balanced_accuracy(labels, predictions):
    """Balanced accuracy: the mean over the classes present in ``labels`` of the share of that
    class's examples predicted right. A constant answer scores 1 / classes whatever the
    split's balance, where plain accuracy rewards answering the majority class. Works on
    the last axis of numpy arrays too (one value per row: a bootstrap's resamples), each
    row averaging over the classes it holds."""
    import numpy as np

    y, p = np.asarray(labels), np.asarray(predictions)
    if y.shape != p.shape or not y.shape[-1]:
        raise ValueError("balanced accuracy needs paired, non-empty labels and predictions")
    hits, counts = [], []
    for c in np.unique(y):
        is_c = y == c
        hits.append((is_c & (p == c)).sum(-1))
        counts.append(is_c.sum(-1))
    hits, counts = np.asarray(hits, dtype=float), np.asarray(counts, dtype=float)
    present = counts > 0
    recall = np.where(present, hits / np.maximum(counts, 1), 0.0)
    out = recall.sum(0) / present.sum(0)
    return float(out) if np.ndim(out) == 0 else out


def _bootstrap(groups, statistic, reps: int, seed: int) -> dict:
    """Paired bootstrap of the mean over groups of ``statistic(*arrays)`` (an A − B
    difference), resampling the examples within each group: the same resampled examples
    for every array of a group. ``statistic`` maps arrays of shape (n,) to a number and
    arrays of shape (reps, n) to one number per row."""
    import numpy as np

    if not groups:
        raise ValueError("no groups to compare")
    rng = np.random.default_rng(seed)
    observed, boots = 0.0, np.zeros(reps)
    for arrays in groups:
        arrays = [np.asarray(a) for a in arrays]
        n = len(arrays[0])
        if not n or any(len(a) != n for a in arrays):
            raise ValueError("paired results need the same, non-empty examples")
        observed += statistic(*arrays)
        idx = rng.integers(0, n, size=(reps, n))
        boots += statistic(*(a[idx] for a in arrays))
    observed, boots = observed / len(groups), np.sort(boots / len(groups))
    lo, hi = boots[int(0.025 * reps)], boots[min(reps - 1, int(0.975 * reps))]
    # two-sided, counted conservatively ((k + 1) / (reps + 1)): never 0, at least 1 / (reps + 1)
    tail = min(int((boots <= 0).sum()), int((boots >= 0).sum()))
    p = 2 * (tail + 1) / (reps + 1)
    return {"diff": float(observed), "ci_low": float(lo), "ci_high": float(hi), "p": float(min(1.0, p))}


def paired_bootstrap(groups: Sequence[tuple[Sequence[bool], Sequence[bool]]], reps: int = 10_000,
                     seed: int = 0) -> dict:
    """Difference of macro accuracy (mean over groups, e.g. tasks, of A's accuracy minus B's)
    with a 95% percentile interval and a two-sided p-value, resampling examples within each
    group (paired: the same resampled examples for A and B)."""
    return _bootstrap([(a, b) for a, b in groups],
                      lambda a, b: (a.astype(float) - b.astype(float)).mean(-1), reps, seed)


def paired_bootstrap_balanced(groups: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                              reps: int = 10_000, seed: int = 0) -> dict:
    """As :func:`paired_bootstrap` for balanced accuracy: each group is (labels, A's
    predictions, B's predictions); the difference of macro balanced accuracy, each resample's
    balanced accuracy over the classes it holds."""
    return _bootstrap(list(groups), lambda y, a, b: balanced_accuracy(y, a) - balanced_accuracy(y, b), reps, seed)


def expected_calibration_error(confidence: Sequence[float], outcome: Sequence[bool], bins: int = 10) -> dict:
    """ECE of probabilities ``confidence`` for binary ``outcome`` (equal-width bins), with
    the reliability diagram's points: per bin, mean confidence, observed frequency, count."""
    if len(confidence) != len(outcome) or not confidence:
        raise ValueError("calibration needs paired, non-empty values")
    table = [[0.0, 0.0, 0] for _ in range(bins)]
    for c, o in zip(confidence, outcome):
        i = min(bins - 1, max(0, int(c * bins)))
        table[i][0] += c
        table[i][1] += float(o)
        table[i][2] += 1
    n = len(confidence)
    ece, points = 0.0, []
    for conf, freq, count in table:
        if count:
            ece += count / n * abs(conf / count - freq / count)
            points.append({"confidence": conf / count, "frequency": freq / count, "count": count})
    return {"ece": ece, "bins": points}


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve (the probability that a random positive scores above a
    random negative; ties count one half)."""
    pairs = sorted(zip(scores, positive))
    n_pos = sum(1 for _, p in pairs if p)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # average 1-based rank of the tie block
        rank_sum += mid * sum(1 for _, p in pairs[i:j] if p)
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
