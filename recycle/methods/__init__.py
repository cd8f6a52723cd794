"""The composition methods: one module per method, and the one table of them.

``METHODS`` (name -> :class:`~recycle.methods.method.Method`) is what the CLI help,
``compose``, ``eval``, pipelines and ``predict`` read. Adding a method is adding one module
here (a ``Method`` subclass and ``METHOD = ...``) and its name to ``_MODULES``; see
``base.py`` for the smallest one and ``spectr.py`` for a routed one. The table imports no
torch: a method module imports its routers and models inside the methods that use them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

from recycle.errors import RecycleError
from recycle.methods.method import Method, Plan, Settings, per_example_rows

# table order = the order of results tables and of `recycle eval`'s default methods
_MODULES = ("base", "uniform", "arrow", "spectr", "avg_activation", "retrieval", "phatgoose", "moepp", "cosmo",
            "oracle", "multitask", "single", "peft_arrow")

METHODS: dict[str, Method] = {}
for _mod in _MODULES:
    _m = importlib.import_module(f"recycle.methods.{_mod}").METHOD
    METHODS[_m.name] = _m

# what `recycle compose NAME --all` builds when no --method is given: chosen on the library
# benchmark's held-out tasks (README, "A library of 36 experts": which method to pick)
RECOMMENDED = "cosmo"

DEFAULT_EVAL = tuple(n for n, m in METHODS.items() if m.in_default_eval)
TOKEN_ROUTED = tuple(n for n, m in METHODS.items() if m.token_routed)


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise RecycleError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def parse(spec: str) -> tuple[Method, dict]:
    """A method as named on the command line or in a pipeline: ``NAME``, or ``single EXPERT``
    (the method's settings that the name carries)."""
    name, _, arg = spec.strip().partition(" ")
    method = get(name)
    if arg.strip():
        if method.members != "one":
            raise RecycleError(f"method {name} takes no argument ({spec!r})")
        return method, {"expert": arg.strip()}
    return method, {}


def help_text() -> str:
    """Every method, one line each, with its settings: for ``--help`` and the README."""
    lines = []
    for name, m in METHODS.items():
        opts = ", ".join(f"--{d['name'].replace('_', '-')} ({d['default']})" for d in m.Settings.describe()
                         if d["name"] != "expert")
        lines.append(f"{name}: {m.summary}" + (f" [{opts}]" if opts else ""))
    return "\n".join(lines)


def build_routed_model(model, expert_dirs: Mapping[str, str | Path], method: str, **kw):
    """Install a method on ``model`` from adapter folders (or loaded ``LoraExpert``s), for
    library use and tests: settings and artifacts (``gates``, ``prototypes``, ``embedder``,
    ``index``) as keyword arguments; ``method`` may be ``"single NAME"``."""
    from recycle.routing import LoraExpert, load_expert

    m, values = parse(method)
    names = {f for f in m.Settings.names()}
    values.update({k: kw.pop(k) for k in list(kw) if k in names})
    settings = m.settings(values)
    experts = [e if isinstance(e, LoraExpert) else load_expert(e, n) for n, e in expert_dirs.items()]
    return m.build(model, experts, settings, **kw)


__all__ = ["METHODS", "DEFAULT_EVAL", "TOKEN_ROUTED", "Method", "Plan", "Settings", "build_routed_model", "get",
           "help_text", "parse", "per_example_rows"]
