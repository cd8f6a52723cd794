"""The 36-expert library's held-out rule: which catalogue tasks get no expert.

Written down before any of these tasks was evaluated (pipelines/library.toml and the
README cite it); a test checks that the pipeline's lists are what the rule gives.

- Far (``n_far`` tasks): whole families, none of whose tasks is held-in. Families are taken
  in the order of ``sha256("far:" + family)``; a family is taken whole when it fits in
  what is left of ``n_far``, skipped otherwise, until ``n_far`` tasks are taken.
- Near (``n_near`` tasks): one task at a time from the families that are left and have at
  least three tasks (so at least two stay held-in), the families in the order of
  ``sha256("near:" + family)``, round after round; from a family the task with the
  smallest ``sha256("near:" + task name)`` not yet taken among those eligible: a task is
  eligible when its test split keeps at least ``min_test`` examples once every text that
  another task outside the far families trains or validates on is removed (word tasks share
  words; TREC's fine-type tasks share questions with ``trec_coarse``). This looks at texts
  and counts only, never at a label or a score.
- Held-in: every other task.

The hashes make the choice a fixed function of the names, not of anyone's guess about
which tasks are easy.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from recycle.errors import RecycleError


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def families(specs) -> dict[str, list[str]]:
    """{family: sorted task names}; every spec must name its family."""
    out: dict[str, list[str]] = defaultdict(list)
    for s in specs:
        if not s.family:
            raise RecycleError(f"task {s.name} has no family")
        out[s.family].append(s.name)
    return {f: sorted(ts) for f, ts in sorted(out.items())}


def held_out_split(specs, n_near: int = 6, n_far: int = 6, min_test: int = 200, test_left=None) -> dict:
    """``{"held_in", "near", "far", "far_families"}`` (each sorted) by the rule above.
    ``test_left(task, others)``: the test examples of ``task`` left once the train and
    validation texts of the tasks ``others`` are removed (default: built from the data)."""
    specs = list(specs)
    fam = families(specs)
    test_left = test_left or _test_left(specs)
    far: list[str] = []
    far_families = []
    for f in sorted(fam, key=lambda f: _h("far:" + f)):
        if len(far) + len(fam[f]) <= n_far:
            far += fam[f]
            far_families.append(f)
        if len(far) == n_far:
            break
    if len(far) != n_far:
        raise RecycleError(f"no whole families add up to {n_far} far tasks")
    kept = [t for f, ts in fam.items() if f not in far_families for t in ts]
    pools = {f: [t for t in sorted(fam[f], key=lambda t: _h("near:" + t))
                 if test_left(t, [o for o in kept if o != t]) >= min_test]
             for f in sorted(fam, key=lambda f: _h("near:" + f)) if f not in far_families and len(fam[f]) >= 3}
    pools = {f: pool + [None] * (len(fam[f]) - len(pool)) for f, pool in pools.items()}
    near: list[str] = []
    while len(near) < n_near:
        took = False
        for f, pool in pools.items():
            if len(near) == n_near:
                break
            if len(pool) > 2 and pool[0] is not None:  # keep at least two held-in tasks in the family
                near.append(pool.pop(0))
                took = True
        if not took:
            raise RecycleError(f"not enough tasks in shared families for {n_near} near tasks")
    out = set(near) | set(far)
    return {"held_in": sorted(t for ts in fam.values() for t in ts if t not in out),
            "near": sorted(near), "far": sorted(far), "far_families": sorted(far_families)}


def trained_texts(spec) -> set[str]:
    """The de-duplication keys of a task's train and validation texts."""
    from recycle.tasks.build import _dedupe_key, build_splits

    parts = build_splits(spec)
    return {_dedupe_key(e) for e in parts["train"] + parts["validation"]}


def test_texts(spec) -> set[str]:
    from recycle.tasks.build import _dedupe_key, build_splits

    return {_dedupe_key(e) for e in build_splits(spec)["test"]}


def _test_left(specs):
    by = {s.name: s for s in specs}
    trained: dict[str, set[str]] = {}

    def left(task: str, others: list[str]) -> int:
        seen: set[str] = set()
        for o in others:
            if o not in trained:
                trained[o] = trained_texts(by[o])
            seen |= trained[o]
        return len(test_texts(by[task]) - seen)

    return left


def overlaps(specs, held_out: list[str], held_in: list[str]) -> dict[str, list[str]]:
    """For each held-out task, the held-in tasks that train or validate on one of its test
    texts (what its ``split.disjoint_from`` must name)."""
    by = {s.name: s for s in specs}
    trained = {t: trained_texts(by[t]) for t in held_in}
    out = {}
    for t in held_out:
        test = test_texts(by[t])
        out[t] = sorted(o for o in held_in if trained[o] & test)
    return out
