"""recycle run: a tiny pipeline end to end, resumability, bad files, and `ray job submit`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recycle.cli import app
from tests.conftest import cli, one_line_error

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


def write_tiny_pipeline(root: Path, n_test: int = 6) -> Path:
    """Two held-in tasks with experts, one held-out, over local JSONL; tiny-llama base."""
    for name, word in (("t_one", "One"), ("t_two", "Two"), ("t_out", "Out")):
        with (root / f"{name}.jsonl").open("w") as f:
            for j in range(40):
                f.write(json.dumps({"text": f"{word} {j} {'z' * (j % 5)}", "label": j % 2}) + "\n")
        (root / f"{name}.toml").write_text(
            f'name = "{name}"\ntemplate = "{word}: {{text}}\\nAnswer:"\nchoices = [" yes", " no"]\n'
            f'label_field = "label"\n[source]\nbuilder = "json"\ndata_files = "{name}.jsonl"\n'
        )
    p = root / "tiny.toml"
    p.write_text(f'''
name = "tiny"
base = "tiny-llama"

[tasks]
specs = ["t_one.toml", "t_two.toml", "t_out.toml"]

[train]
rank = 4
steps = 2
batch_size = 4
max_length = 48

[[experts]]
task = "t_one"

[[experts]]
task = "t_two"

[[experts]]
multitask = ["t_one", "t_two"]
name = "mt"

[gates]
steps = 2
batch_size = 4
max_length = 48

[[compositions]]
name = "pg"
method = "phatgoose"
top_k = 1

[[evaluations]]
methods = ["base", "uniform", "phatgoose", "multitask"]
compositions = ["pg"]
tasks = "all"
n = {n_test}
output = "{root / 'out' / 'tiny'}"
''')
    return p


def test_tiny_pipeline_runs_and_resumes(tmp_path):
    pipe = write_tiny_pipeline(tmp_path)
    r = runner.invoke(app, ["run", str(pipe)])
    assert r.exit_code == 0, r.output
    conn = sqlite3.connect(os.environ["RECYCLE_DB"])
    assert sorted(x[0] for x in conn.execute("select name from experts")) == ["mt", "t_one", "t_two"]
    assert conn.execute("select count(*) from gates").fetchone()[0] == 2  # not for the multitask expert
    # trained in the experts' own tasks, so the gates step finds them done
    assert r.stderr.count(" gates: loss ") == 2 and r.stderr.count("gates exist for settings") == 2
    labels = {x[0] for x in conn.execute("select label from eval_results")}
    assert labels == {"base", "uniform", "phatgoose", "multitask", "pg"}
    out = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert out["summary"]["held"] == {"t_one": "in", "t_two": "in", "t_out": "out"}
    assert "H" in out["summary"]["methods"]["phatgoose"]
    md = (tmp_path / "out" / "tiny.md").read_text()
    assert "| method |" in md and "Balanced accuracy" in md
    # the export carries balanced accuracy beside accuracy: same tasks, values in [0, 1]
    bal = out["balanced"]
    assert bal["metric"] == "balanced" and set(bal["methods"]) == set(out["summary"]["methods"])
    assert all(0 <= v <= 1 for m in bal["methods"].values() for v in m["tasks"].values())
    assert (tmp_path / "out" / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    # it ends with the evaluation's table on stdout (S/U/H: the run mixes held-in and held-out
    # tasks), the progress on stderr
    cells = [[c.strip() for c in line.replace("┃", "│").split("│")[1:-1]] for line in r.stdout.splitlines()
             if line.count("│") + line.count("┃") > 2]
    assert "evaluation run" in r.stdout and cells[0][-5:] == ["held-in avg", "held-out avg", "S", "U", "H"]
    assert "t_out (out)" in cells[0]
    pg = next(row for row in cells if row[0] == "pg")
    assert pg[cells[0].index("held-out avg")] == f"{out['summary']['methods']['pg']['held_out_avg']:.3f}"
    assert "held-out avg" not in r.stderr and "── tiny" not in r.stdout
    # again: every step is found done (no new experts, gates or computed results)
    r = runner.invoke(app, ["run", str(pipe)])
    assert r.exit_code == 0, r.output
    assert "already registered, skipped" in r.stderr
    assert "reusing 15 stored result" in r.stderr
    assert conn.execute("select count(*) from gates").fetchone()[0] == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("name = ", "not valid TOML"),
        ('base = "tiny-llama"', "needs name"),
        ('name = "x"\nbase = "tiny-llama"\nbogus = 1', "unknown key(s) in [top level]: bogus"),
        ('name = "x"\nbase = "tiny-llama"\n[[experts]]\nname = "a"', "exactly one of task, multitask or adapter"),
        ('name = "x"\nbase = "tiny-llama"\n[[evaluations]]\ntasks = "all"', "needs methods or compositions"),
        ('name = "x"\nbase = "tiny-llama"\n[gates]\nstep = 3', "unknown key(s) in [gates]: step"),
    ],
)
def test_bad_pipeline_file(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    r = runner.invoke(app, ["run", str(f)])
    assert r.exit_code == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


CHECKED_WHOLE = [
    ('[[compositions]]\nname = "c"\nmethod = "phatgoose"\ntop_k = "two"', "[[compositions]] 1: top_k must be int"),
    ('[[compositions]]\nname = "c"\nmethod = "phatgoose"\ntop_k = -3', "[[compositions]] 1: top_k must be at least 1"),
    ('[[compositions]]\nname = "c"\nmethod = "arrow"\ntemperature = nan', "[[compositions]] 1: temperature must be"),
    ('[[evaluations]]\nmethods = ["base"]\nn = -5', "[[evaluations]] 1: n must be at least 1, not -5"),
    ('[gates]\ncpus_per_expert = -1', "[gates]: cpus_per_expert must be positive, not -1"),
    ('[gates]\ncpus_per_expert = "x"', "[gates]: cpus_per_expert must be float (a finite number), not 'x'"),
    ('[gates]\ngpus_per_expert = nan', "[gates]: gpus_per_expert must be float (a finite number), not nan"),
    ('[gates]\nweight_decay = -1.0', "[gates]: weight_decay must be 0 or more"),
    ('[train]\ncpus_per_task = inf', "[train]: cpus_per_task must be float (a finite number), not inf"),
    ('[train]\ndropout = 1.5', "[train]: dropout must be in [0, 1), not 1.5"),
    ('[[experts]]\ntask = "t_one"\nsteps = 0', "[[experts]] 2: steps must be at least 1, not 0"),
    ('[[evaluations]]\nmethods = ["base"]\ntasks = ["a"]', "[[evaluations]] 1: tasks must be str, not ['a']"),
    ('[[evaluations]]\nmethods = ["base"]\ntop_k = 1.5', "[[evaluations]] 1: top_k must be int, not 1.5"),
    ('[[evaluations]]\nmethods = ["base"]\ncpus_per_task = 0', "[[evaluations]] 1: cpus_per_task must be positive"),
    ('[[evaluations]]\nmethods = ["base"]\noutput = "/proc/x"', "[[evaluations]] 1 output: cannot write in /proc"),
    ('[[evaluations]]\nmethods = ["base"]\noutput = 3', "[[evaluations]] 1: output must be a non-empty string"),
    ('[[evaluations]]\ncompositions = ["nowhere"]', "evaluation 1: no composition nowhere"),
    ('[[evaluations]]\ncompositions = ["../x"]', "evaluation 1 compositions"),
    ('[[compositions]]\nname = "c"\nmethod = "cosmo"\nseen = "all"', "[[compositions]] 1: seen must be top1 or"),
    ('[[compositions]]\nname = "c"\nmethod = "cosmo"\n[[training]]\ncomposition = "c"\nfolds = 1',
     "[[training]] 1: folds must be at least 2"),
    ('[[compositions]]\nname = "m"\nmethod = "moepp"\n[[training]]\ncomposition = "m"\nsteps = "many"',
     "[[training]] 1: steps must be int"),
    ('[[training]]\ncomposition = "c"\ncpus = 0', "[[training]] 1: cpus must be positive"),
    ('[[training]]\ncomposition = "c"\ngpus = -1', "[[training]] 1: gpus must be 0 or more"),
    ('[[training]]\ncomposition = "nowhere"', "training 1: no composition nowhere"),
]


@pytest.mark.parametrize("text, message", CHECKED_WHOLE, ids=[m.split(":")[-1][:40] for _, m in CHECKED_WHOLE])
def test_pipeline_checked_whole_before_any_step_writes(tmp_path, text, message):
    """A bad value anywhere stops the run before its first step: a task and an expert come
    before it in the file, and neither is written (nor is a registry file made)."""
    (tmp_path / "t_one.jsonl").write_text("".join(json.dumps({"text": f"x{j}", "label": j % 2}) + "\n"
                                                  for j in range(30)))
    (tmp_path / "t_one.toml").write_text('name = "t_one"\ntemplate = "{text}"\nchoices = [" y", " n"]\n'
                                         'label_field = "label"\n[source]\nbuilder = "json"\n'
                                         'data_files = "t_one.jsonl"\n')
    f = tmp_path / "p.toml"
    f.write_text('name = "x"\nbase = "tiny-llama"\n[tasks]\nspecs = ["t_one.toml"]\n'
                 '[[experts]]\ntask = "t_one"\n' + text + "\n")
    db = Path(os.environ["RECYCLE_DB"])
    r = runner.invoke(app, ["run", str(f)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.stderr
    assert not db.exists()  # nothing written, not even an empty registry


def test_missing_pipeline_file(tmp_path):
    r = runner.invoke(app, ["run", str(tmp_path / "nope.toml")])
    assert r.exit_code == 2 and "not found" in r.stderr


def test_builtin_pipelines_parse():
    from recycle import pipeline as P

    for name in ("demo", "benchmark"):
        p = P.load(P.builtin(name))
        assert p.base == "smollm2-135m" and p.experts and p.evaluations


def test_pipeline_through_ray_job_submit(tmp_path, tiny_base, cache_root):
    """A real 2-node cluster with the job server; the pipeline runs as a Ray job, the
    registry it names is filled, every expert (with its gates) and evaluation task ran on
    the cluster's own nodes, and the job started no Ray of its own (one GCS: the head's)."""
    from tests.raycluster import loopback, marked

    write_tiny_pipeline(tmp_path, n_test=4)
    db = tmp_path / "job-registry.db"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    with loopback(dashboard=True) as cluster:
        env = dict(cluster["env"])
        runtime_env = {"env_vars": {"RECYCLE_CACHE": str(cache_root), "RECYCLE_DB": str(db),
                                    "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}}
        cmd = [ray_bin, "job", "submit", "--address", cluster["dashboard_url"], "--working-dir", str(tmp_path),
               "--runtime-env-json", json.dumps(runtime_env), "--",
               sys.executable, "-m", "recycle", "run", "tiny.toml"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        gcs = [p for p in marked("RECYCLE_TEST_CLUSTER", cluster["marker"]) if p.name() == "gcs_server"]

        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "pipeline tiny: done" in proc.stdout + proc.stderr

        def state(*what):
            r = subprocess.run([ray_bin, "list", *what, "--address", cluster["dashboard_url"], "--format", "json",
                                "--limit", "10000"], env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-2000:]
            # An empty listing is printed as a sentence, not as "[]".
            return [] if r.stdout.strip() == "No resource in the cluster" else json.loads(r.stdout)

        nodes = {n["node_id"] for n in state("nodes")}
        # Workers report task events to the GCS on a timer (about once a second), so the
        # FINISHED records of the last tasks can arrive after the job itself has returned.
        deadline = time.monotonic() + 90
        while True:
            tasks = [t for t in state("tasks", "--detail") if t["name"] in ("run_expert_job", "run_eval_group")]
            ran = {t["name"] for t in tasks if t["state"] == "FINISHED"}
            if ran == {"run_expert_job", "run_eval_group"} or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert len(gcs) == 1, [p.cmdline()[:2] for p in gcs]
    assert len(nodes) == 2
    assert ran == {"run_expert_job", "run_eval_group"}, tasks
    assert {t["node_id"] for t in tasks} <= nodes
    conn = sqlite3.connect(db)
    assert conn.execute("select count(*) from experts").fetchone()[0] == 3
    assert conn.execute("select count(*) from gates").fetchone()[0] == 2
    assert conn.execute("select count(distinct label) from eval_results").fetchone()[0] == 5


def test_pipeline_trains_a_composition_and_finds_it_done(tmp_path, make_adapter):
    """A ``[[training]]`` step trains what a composition's method learns (here MoE++'s
    router) as ``recycle train`` does, after the compositions and before the evaluations."""
    from recycle.registry import Registry

    write_tiny_pipeline(tmp_path)
    for seed, name in enumerate(("t_one", "t_two")):
        make_adapter(tmp_path / f"a_{name}", seed=seed)
    p = tmp_path / "trained.toml"
    p.write_text('''
name = "trained"
base = "tiny-llama"

[tasks]
specs = ["t_one.toml", "t_two.toml"]

[[experts]]
adapter = "a_t_one"
task = "t_one"

[[experts]]
adapter = "a_t_two"
task = "t_two"

[gates]
steps = 2
batch_size = 4
max_length = 48

[[compositions]]
name = "moe"
method = "moepp"

[[training]]
composition = "moe"
steps = 2
examples = 8
batch_size = 4
max_length = 48
calibration = "t_one"
''')
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 0, r.output
    state = Registry().composition("moe")["state"]["router"]
    assert state["steps"] == 2 and state["examples"] == 8 and list(state["calibration"]["tasks"]) == ["t_one"]
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 0, r.output
    assert "composition moe: skipped" in r.stderr
    assert Registry().composition("moe")["state"]["router"] == state


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[training]]\nsteps = 3', "training 1 needs composition"),
        ('[[compositions]]\nname = "u"\nmethod = "uniform"\n[[training]]\ncomposition = "u"',
         "uniform, which trains nothing"),
        ('[[compositions]]\nname = "m"\nmethod = "moepp"\n[[training]]\ncomposition = "m"\nfolds = 2',
         "unknown key(s) in [training 1]: folds"),
    ],
)
def test_bad_training_step(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text('name = "x"\nbase = "tiny-llama"\n' + text)
    r = runner.invoke(app, ["run", str(f)])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_training_a_stored_composition_is_checked_before_any_step(tmp_path, make_adapter):
    """A ``[[training]]`` step for a composition stored before the run is checked against
    its method (read from the registry) before the first step writes anything."""
    from recycle.registry import Registry

    r = runner.invoke(app, ["add-expert", str(make_adapter(tmp_path / "a", seed=0)), "--base", "tiny-llama"])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["compose", "u", "--method", "uniform", "--all"]).exit_code == 0
    write_tiny_pipeline(tmp_path)
    f = tmp_path / "p.toml"
    f.write_text('name = "x"\nbase = "tiny-llama"\n[tasks]\nspecs = ["t_one.toml"]\n[[training]]\ncomposition = "u"')
    r = runner.invoke(app, ["run", str(f)])
    assert r.exit_code == 2, r.output
    assert "training 1: composition u is uniform, which trains nothing" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert Registry().tasks() == []  # the tasks step never ran


def test_pipeline_values_never_become_options(tmp_path):
    for text, words in (
        ('[tasks]\ncatalogue = ["--db=/tmp/other.db", "sms_spam"]', "tasks.catalogue"),
        ('[[compositions]]\nname = "--help"\nmethod = "uniform"', "composition 1"),
        ('[[experts]]\ntask = "t"\nname = "--help"', "expert 1 name"),
        ('[[evaluations]]\nmethods = ["--force"]', "unknown method"),
    ):
        f = tmp_path / "p.toml"
        f.write_text('name = "x"\nbase = "tiny-llama"\n' + text)
        err = one_line_error(cli("run", f))
        assert words in err, err
    assert not Path("/tmp/other.db").exists()


def test_pipeline_types_are_checked_at_load(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('name = "x"\nbase = "tiny-llama"\n[train]\nsteps = "many"\n')
    assert "[train]: steps must be int" in one_line_error(cli("run", f))
    f.write_text('name = "x"\nbase = "tiny-llama"\n[gates]\nlr = "fast"\n')
    assert "[gates]: lr must be float" in one_line_error(cli("run", f))
