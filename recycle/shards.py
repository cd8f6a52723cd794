"""The shards of a resumable batch prediction (``predict --workers``), kept in a folder
beside the output until the output is complete.

Each shard file starts with a header line ``{"shard": i, "inputs": sha256, "outputs":
sha256}``: the digest of the input lines it answers (canonical JSON, in shard order) and
of its answer lines. On resume every shard already there is checked against the input it
should answer; a shard that fails (another shard's content, edited answers, the wrong number
of lines, not UTF-8, no header) is refused, and all such shards are named in one message,
before any work starts: deleting them (or the folder) recomputes them. A refused shard is
never silently recomputed: a shard that does not match means something other than this
run wrote into the folder, and the user should know.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from recycle.errors import RecycleError


class ShardProblem(Exception):
    """Why one shard file cannot be used (one short phrase)."""


def input_digest(items: Sequence[dict]) -> str:
    """The digest of the input lines a shard answers, in order."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def shard_path(state: Path, i: int) -> Path:
    return Path(state) / f"shard-{i:06d}.jsonl"


def shard_text(i: int, items: Sequence[dict], results: Sequence[dict]) -> str:
    """A shard file's content: the digest header, then one JSON answer per input."""
    lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in results)
    header = {"shard": i, "inputs": input_digest(items), "outputs": hashlib.sha256(lines.encode()).hexdigest()}
    return json.dumps(header) + "\n" + lines


def read_shard(path: Path, i: int, items: Sequence[dict]) -> list[str]:
    """The answer lines of shard ``i``, checked to answer ``items``; :class:`ShardProblem` if not."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ShardProblem(f"unreadable ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardProblem(f"not UTF-8 text (byte {e.start})") from None
    head, _, body = text.partition("\n")
    try:
        header = json.loads(head)
        inputs, outputs = header["inputs"], header["outputs"]
    except (ValueError, TypeError, KeyError):
        raise ShardProblem("no digest header") from None
    if inputs != input_digest(items):
        other = header.get("shard")
        raise ShardProblem("answers other inputs" + (f" (shard {other}'s)" if isinstance(other, int) and other != i
                                                     else ""))
    if hashlib.sha256(body.encode()).hexdigest() != outputs:
        raise ShardProblem("its answers changed after they were written")
    lines = body.splitlines(keepends=True)
    if len(lines) != len(items):
        raise ShardProblem(f"{len(lines)} answers for {len(items)} inputs")
    return lines


def _refuse(state: Path, problems: list[str]) -> None:
    raise RecycleError(f"{len(problems)} shard file(s) in {state} do not answer this input ({'; '.join(problems)}): "
                       "delete them (or the folder) and run again to recompute them", exit_code=1)


def done_shards(state: Path, shards: Sequence[Sequence[dict]]) -> set[int]:
    """Indices of the shards already written for these inputs; every damaged shard is
    refused at once (see the module docstring)."""
    done, problems = set(), []
    for i, items in enumerate(shards):
        path = shard_path(state, i)
        if not path.exists():
            continue
        try:
            read_shard(path, i, items)
            done.add(i)
        except ShardProblem as e:
            problems.append(f"{path.name}: {e}")
    if problems:
        _refuse(state, problems)
    return done


def assemble(state: Path, index: Sequence[Sequence[int]], shards: Sequence[Sequence[dict]], n: int) -> list[str]:
    """The output lines in input order (``index[i]``: the input positions of shard ``i``),
    every shard checked once more as it is read."""
    lines: list[str] = [""] * n
    problems = []
    for i, (idx, items) in enumerate(zip(index, shards)):
        try:
            got = read_shard(shard_path(state, i), i, items)
        except ShardProblem as e:
            problems.append(f"{shard_path(state, i).name}: {e}")
            continue
        for j, line in zip(idx, got):
            lines[j] = line
    if problems:
        _refuse(state, problems)
    return lines
