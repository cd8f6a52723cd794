"""Named converters from raw files to a clean JSONL that ``datasets`` loads.

A spec's source can say ``preparer = "vader"`` with ``file = ...`` (and ``options``);
the preparer runs once and its JSONL is cached under ``<cache>/tasks/prepared``, keyed
on the file's identity and the preparer's version. Everything after that goes down the
ordinary path: ``load_dataset("json", data_files=...)``.

Each preparer yields plain dicts of strings; whitespace inside texts is collapsed.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
from pathlib import Path
from typing import Callable, Iterator

from recycle.basemodels import cache_dir
from recycle.errors import RecycleError

VERSION = 1  # bump when a preparer's output changes


def _clean(s: str) -> str:
    return " ".join(str(s).split())


def _open_text(path: Path):
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8", newline="")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _need_file(path: Path) -> None:
    if not path.is_file():
        raise RecycleError(f"data file {path} does not exist")


def vader(path: Path, options: dict) -> Iterator[dict]:
    """VADER ground truth (Hutto & Gilbert 2014): ``id<TAB>score<TAB>text`` with a header.
    The sign of the mean rating is the label; neutral (0) lines are dropped."""
    _need_file(path)
    with _open_text(path) as f:
        for i, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if i == 0 and row and row[0].strip().lower() == "id":
                continue
            if len(row) < 3:
                continue
            try:
                score = float(row[1])
            except ValueError:
                raise RecycleError(f"{path.name} line {i + 1}: score {row[1]!r} is not a number") from None
            if score == 0:
                continue
            yield {
                "id": row[0].strip(),
                "text": _clean("\t".join(row[2:])),
                "score": score,
                "label": "positive" if score > 0 else "negative",
            }


def trec(path: Path, options: dict) -> Iterator[dict]:
    """TREC question classification: ``COARSE:fine question`` a line."""
    _need_file(path)
    with _open_text(path) as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            label, _, question = line.partition(" ")
            coarse, _, fine = label.partition(":")
            if not question or not fine:
                raise RecycleError(f"{path.name} line {i + 1}: expected 'COARSE:fine question'")
            yield {"text": _clean(question), "coarse": coarse, "fine": f"{coarse}:{fine}"}


def csv_file(path: Path, options: dict) -> Iterator[dict]:
    """A CSV file (``.bz2``/``.gz`` read directly) through Python's csv module, which
    keeps quoted newlines; every value a whitespace-collapsed string.
    Options: ``columns`` = {old name = new name} keeps and renames only those columns."""
    _need_file(path)
    columns = options.get("columns")
    if columns is not None and not isinstance(columns, dict):
        raise RecycleError("preparer csv: options.columns must be a table {old = new}")
    csv.field_size_limit(2**31 - 1)  # some files carry very long fields (alternate names)
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=options.get("delimiter", ","))
        if columns:
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise RecycleError(f"{path.name} has no column(s) {', '.join(missing)}")
        for row in reader:
            if columns:
                yield {new: _clean(row[old] or "") for old, new in columns.items()}
            else:
                yield {(k or "index"): _clean(v or "") for k, v in row.items() if k is not None}


def folders(path: Path, options: dict) -> Iterator[dict]:
    """One sub-folder per label, one ``.txt`` document per file (BBC News layout).
    The first line is the title: ``text`` is ``title. body`` collapsed."""
    if not path.is_dir():
        raise RecycleError(f"data folder {path} does not exist")
    labels = sorted(p for p in path.iterdir() if p.is_dir())
    if not labels:
        raise RecycleError(f"data folder {path} has no label sub-folders")
    for label_dir in labels:
        for doc in sorted(label_dir.glob("*.txt")):
            raw = doc.read_bytes().decode("utf-8", errors="replace")
            lines = [ln.strip() for ln in raw.splitlines() if ln.strip()]
            if not lines:
                continue
            title, body = lines[0], " ".join(lines[1:])
            sep = "" if title.endswith((".", "?", "!")) else "."
            yield {
                "id": f"{label_dir.name}/{doc.stem}",
                "title": _clean(title),
                "text": _clean(f"{title}{sep} {body}"),
                "label": label_dir.name,
            }


def ratings(path: Path, options: dict) -> Iterator[dict]:
    """A CSV of items with a numeric rating (e.g. Warriner et al. 2013 word norms), split
    into two labels by thresholds; items between them are dropped.
    Options: ``text_column``, ``score_column``, ``high`` / ``low`` (score >= high is
    ``high_label``, score <= low is ``low_label``)."""
    _need_file(path)
    try:
        text_col, score_col = options["text_column"], options["score_column"]
        high, low = float(options["high"]), float(options["low"])
        high_label, low_label = options["high_label"], options["low_label"]
    except (KeyError, TypeError, ValueError) as e:
        raise RecycleError(f"preparer ratings: options need text_column, score_column, high, low, "
                           f"high_label, low_label ({e})") from None
    csv.field_size_limit(2**31 - 1)
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        missing = [c for c in (text_col, score_col) if c not in (reader.fieldnames or [])]
        if missing:
            raise RecycleError(f"{path.name} has no column(s) {', '.join(missing)}")
        for row in reader:
            try:
                score = float(row[score_col])
            except (TypeError, ValueError):
                continue
            label = high_label if score >= high else low_label if score <= low else None
            if label is not None and (row[text_col] or "").strip():
                yield {"text": _clean(row[text_col]), "score": score, "label": label}


def inquirer(path: Path, options: dict) -> Iterator[dict]:
    """The General Inquirer word lists (``inqtabs.txt``: one word sense a line, a column
    per category holding the category's name when the sense belongs to it). A word gets
    the label of the one category of ``options.categories`` = {column = label} its senses
    carry; words in several (or none) are dropped; senses (``WORD#2``) are merged."""
    _need_file(path)
    cats = options.get("categories")
    if not isinstance(cats, dict) or len(cats) < 2:
        raise RecycleError("preparer inquirer: options.categories must map two or more columns to labels")
    words: dict[str, set] = {}
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in cats if c not in (reader.fieldnames or [])]
        if missing:
            raise RecycleError(f"{path.name} has no column(s) {', '.join(missing)}")
        for row in reader:
            word = (row.get("Entry") or "").split("#")[0].strip().lower()
            if not word:
                continue
            labels = words.setdefault(word, set())
            for col, label in cats.items():
                if (row.get(col) or "").strip():
                    labels.add(label)
    for word, labels in words.items():
        if len(labels) == 1:
            yield {"text": word, "label": next(iter(labels))}


def lexicon(path: Path, options: dict) -> Iterator[dict]:
    """A word list with one class a row (e.g. Roget's thesaurus: ``word,CATEGORY``, no
    header). A word gets the label of the one class of ``options.classes`` = {class = label}
    it is listed under; words under several (or none) of them are dropped.
    Options: ``word_column`` / ``class_column`` (column indices, default 0 and 1),
    ``delimiter`` (default ``,``), ``header`` (skip the first row; default false),
    ``max_words`` (drop entries of more words than this; default 1). Lines are split on the
    delimiter as they are, without CSV quoting (Roget's file has stray quote marks)."""
    _need_file(path)
    classes = options.get("classes")
    if not isinstance(classes, dict) or len(classes) < 2:
        raise RecycleError("preparer lexicon: options.classes must map two or more classes to labels")
    wc, cc = int(options.get("word_column", 0)), int(options.get("class_column", 1))
    max_words = int(options.get("max_words", 1))
    delimiter = options.get("delimiter", ",")
    words: dict[str, set] = {}
    with _open_text(path) as f:
        for i, line in enumerate(f):
            row = line.rstrip("\r\n").split(delimiter)
            if (i == 0 and options.get("header")) or len(row) <= max(wc, cc):
                continue
            word, cls = _clean(row[wc]).lower(), _clean(row[cc])
            if not word or len(word.split()) > max_words or not any(ch.isalpha() for ch in word):
                continue
            labels = words.setdefault(word, set())
            if cls in classes:
                labels.add(classes[cls])
    for word, labels in words.items():
        if len(labels) == 1:
            yield {"text": word, "label": next(iter(labels))}


def paragraphs(path: Path, options: dict) -> Iterator[dict]:
    """A CSV of long texts (speeches) cut into paragraphs, one example each, carrying the
    row's other columns. Options: ``text_column``, ``columns`` (the other columns to keep,
    {old = new}), ``min_chars`` (shorter paragraphs dropped; default 80)."""
    _need_file(path)
    text_col = options.get("text_column", "text")
    keep = options.get("columns") or {}
    min_chars = int(options.get("min_chars", 80))
    csv.field_size_limit(2**31 - 1)
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        missing = [c for c in [text_col, *keep] if c not in (reader.fieldnames or [])]
        if missing:
            raise RecycleError(f"{path.name} has no column(s) {', '.join(missing)}")
        for row in reader:
            for para in (row[text_col] or "").splitlines():
                para = _clean(para)
                if len(para) >= min_chars:
                    yield {"text": para, **{new: _clean(row[old] or "") for old, new in keep.items()}}


PREPARERS: dict[str, Callable[[Path, dict], Iterator[dict]]] = {
    "vader": vader,
    "trec": trec,
    "csv": csv_file,
    "folders": folders,
    "ratings": ratings,
    "inquirer": inquirer,
    "lexicon": lexicon,
    "paragraphs": paragraphs,
}


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def prepare(name: str, path: Path, options: dict | None = None) -> Path:
    """Run a preparer once; return the cached JSONL path."""
    if name not in PREPARERS:
        raise RecycleError(f"unknown preparer {name!r} (known: {', '.join(sorted(PREPARERS))})")
    options = options or {}
    if not path.exists():
        raise RecycleError(f"data file {path} does not exist")
    key = hashlib.sha256(
        json.dumps([name, VERSION, _identity(path), options], sort_keys=True).encode()
    ).hexdigest()[:16]
    out = cache_dir() / "tasks" / "prepared" / f"{name}-{path.name.split('.')[0]}-{key}.jsonl"
    if out.is_file():
        return out
    from recycle.files import atomic_path

    n = 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in PREPARERS[name](path, options):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        if n == 0:
            raise RecycleError(f"preparer {name} found no examples in {path}")
    return out
