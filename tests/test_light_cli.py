"""The CLI answers at once: the read-only commands and every --help import no torch, Ray,
transformers, PEFT, datasets or matplotlib (each run in a fresh interpreter, on a registry
with real experts); and no module of the package imports itself back (no import circles)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

import recycle
from recycle.cli import app
from recycle.registry import Registry

HEAVY = ("torch", "ray", "transformers", "peft", "datasets", "matplotlib")
# Runs each command line in turn in one fresh interpreter; after each, its exit code and the
# heavy modules imported so far (so the first command to import one is the one named).
RUN = """
import io, json, sys
from contextlib import redirect_stdout
from recycle.cli import app
for args in json.loads(sys.argv[1]):
    out = io.StringIO()
    with redirect_stdout(out):
        try:
            app(args, prog_name="recycle")
            code = 0
        except SystemExit as e:
            code = e.code
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
    print(json.dumps([args, code, heavy, out.getvalue()]))
""" % (HEAVY,)


def _run_fresh(commands: list[list[str]]) -> list[tuple[list[str], int, list[str], str]]:
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps(commands)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def small_registry(tmp_path_factory, make_adapter):
    """Three real experts, a stored composition and an evaluation run with one result."""
    root = tmp_path_factory.mktemp("light")
    db = root / "registry.db"
    folders = [make_adapter(root / f"ad{i}", seed=i) for i in range(3)]
    runner = CliRunner()
    env = {"RECYCLE_DB": str(db)}
    result = runner.invoke(app, ["add-expert", *map(str, folders), "--base", "tiny-llama"], env=env)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compose", "merged", "--method", "uniform", "--all"], env=env)
    assert result.exit_code == 0, result.output
    registry = Registry(db)
    run = registry.start_run({"methods": ["uniform"]})
    registry.record_result({"run_id": run, "key": "k", "label": "uniform", "method": "uniform", "settings_hash": "h",
                            "member_hashes": {}, "task": "t", "held": "in", "seed": 0, "n": 2, "correct": 1,
                            "accuracy": 0.5, "ci_low": 0.1, "ci_high": 0.9, "predictions": [0, 1], "labels": [0, 0],
                            "scores": [[0.0, -1.0], [-2.0, -1.0]], "seconds": 1.0})
    registry.finish_run(run, "done", 1.0)
    return db, run


def _commands(group: click.Group, prefix=()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


def test_read_commands_and_every_help_import_nothing_heavy(small_registry, monkeypatch):
    db, run = small_registry
    monkeypatch.setenv("RECYCLE_DB", str(db))
    helps = [[*path, "--help"] for path in _commands(typer.main.get_command(app))]
    reads = [["experts", "list"], ["experts", "list", "--json"], ["experts", "show", "ad1"], ["tasks", "list"],
             ["eval", "runs"], ["eval", "show", str(run)], ["compose", "list"], ["compose", "show", "merged"],
             ["gates", "list"], ["db", "path"]]
    results = _run_fresh([["--help"], *helps, *reads])
    assert len(results) == 1 + len(helps) + len(reads)
    for args, code, heavy, output in results:
        assert code == 0, (args, output)
        assert heavy == [], f"recycle {' '.join(args)} imported {heavy}"
    listed = results[-len(reads)][3]
    assert all(f"ad{i}" in listed for i in range(3)), listed


def _import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports``, at any depth of its code (a
    function's import included), leaving out imports only a type checker runs."""
    root = Path(recycle.__file__).parent
    mods = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    edges.add(full if full in mods else node.module)
        graph[name] = {e for e in edges if e in mods and e != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_package_has_no_import_circle():
    graph = _import_graph()
    assert {"recycle.cli", "recycle.compose", "recycle.methods.method", "recycle.gates"} <= set(graph)
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check finds one
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_list_tables_are_drawn_as_rich_draws_them(monkeypatch):
    import io

    from rich.console import Console
    from rich.table import Table

    from recycle import console as C

    headers = ["name", "task", "params", "é"]
    rows = [["a", "", "3,584", "日本語"], ["ümlaut expert", "t", "12", "x"], ["b", "long task name", "", ""]]
    drawn, fast = io.StringIO(), io.StringIO()
    table = Table(*headers)
    for r in rows:
        table.add_row(*r)
    Console(file=drawn, soft_wrap=True, markup=False, emoji=False, highlight=False, width=200).print(table)
    monkeypatch.setattr(C, "console", Console(file=fast, soft_wrap=True, markup=False, emoji=False, highlight=False,
                                              width=200))
    C.print_table(headers, rows)
    assert fast.getvalue() == drawn.getvalue()
    assert fast.getvalue().count("\n") == len(rows) + 4
