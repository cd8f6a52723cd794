"""Tasks: TOML specs, their data through ``datasets``, seeded splits, and the built-in
catalogue of real tasks (see ``catalogue/*.toml``)."""

from recycle.tasks.build import build_splits, load_source, render
from recycle.tasks.catalogue import catalogue_names, catalogue_spec, catalogue_specs
from recycle.tasks.spec import TaskSpec, load_spec_file, parse_spec
from recycle.tasks.store import add_task, get_task, list_tasks, load_examples, task_spec

__all__ = [
    "TaskSpec", "load_spec_file", "parse_spec", "build_splits", "load_source", "render",
    "add_task", "get_task", "list_tasks", "load_examples", "task_spec",
    "catalogue_names", "catalogue_spec", "catalogue_specs",
]
