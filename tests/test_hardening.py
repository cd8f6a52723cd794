"""Bad inputs and faults from the probe of 185 (issue "Hardening"): each case gives one line
and a non-zero exit, and changes nothing."""

from __future__ import annotations

import json
import os
import stat
import struct
import time
from pathlib import Path

import pytest

from tests.test_experts import cli, copy, dump, library, one_line_error, rows  # noqa: F401

BAD_NAMES = ["../../evil", "/abs", "..", "a\nb", "\x1b[31mred", "x" * 10_000, "a,b", "--help", "-x", ".hidden", ""]


def _ok(*args):
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return r


# ---- security -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_one_name_rule_for_experts(library, name):
    from recycle.registry import Registry

    Registry().close()
    before = dump()
    err = one_line_error(cli("add-expert", library["a"], "--name", name, "--base", "tiny-llama"))
    assert "is not usable" in err and "\x1b" not in err
    assert dump() == before


def test_one_name_rule_for_folders_tasks_and_compositions(library, tmp_path, world):
    odd = copy(library["a"], tmp_path / "my adapter")  # the default name is the folder's
    assert "give one with --name" in one_line_error(cli("add-expert", odd, "--base", "tiny-llama"))
    _ok("add-expert", odd, "--name", "fine", "--base", "tiny-llama")
    spec = tmp_path / "t.toml"
    spec.write_text(world["specs"]["t_alpha"].read_text().replace('name = "t_alpha"', 'name = "--help"')
                    .replace('data_files = "', f'data_files = "{world["root"]}/'))
    assert "task name" in one_line_error(cli("add-task", spec))
    for name in ("a/b", "x y", "..", ".hidden"):
        r = cli("compose", "create", name, "--method", "uniform", "--all")
        assert r.exit_code == 2 and "composition name" in r.stderr, r.output
    from recycle import compose
    from recycle.errors import RecycleError
    from recycle.registry import Registry

    with pytest.raises(RecycleError, match="composition name '--help' is not usable"):
        compose.create(Registry(), "--help", "uniform", None)


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


def test_a_runaway_or_invalid_rank_pattern(library, tmp_path):
    for pattern, words in (("(", "not a valid regular expression"), ("(.*.*.*.*.*.*.*.*.*)*X", None)):
        bad = copy(library["patterned"], tmp_path / f"p{len(words or 'x')}")
        cfg = json.loads((bad / "adapter_config.json").read_text())
        cfg["rank_pattern"] = {pattern: 2}
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        t0 = time.time()
        r = cli("add-expert", bad, "--base", "tiny-llama")
        assert time.time() - t0 < 30
        if words:
            err = one_line_error(r)
            assert words in err and "adapter_config.json rank_pattern" in err and str(bad) in err
        else:  # matches nothing: the modules keep r, which their tensors do not have
            assert "rank" in one_line_error(r)


def test_templates_are_plain_fields(world, tmp_path):
    spec = tmp_path / "t.toml"
    text = world["specs"]["t_alpha"].read_text().replace('data_files = "', f'data_files = "{world["root"]}/')
    for template in ("{text!r:>99999999}", "{text:>999}", "{text!s}", "{text.upper}", "{text[0]}"):
        spec.write_text(text.replace('"Alpha: {text}\\nAnswer:"', json.dumps(template)))
        err = one_line_error(cli("add-task", spec))
        assert "plain field" in err, err


# ---- data integrity ---------------------------------------------------------------------


def test_adapters_changed_on_disk_are_refused_wherever_they_are_used(library, tmp_path, world):
    for spec in world["specs"].values():
        _ok("add-task", spec)
    a = copy(library["a"], tmp_path / "ea")
    _ok("add-expert", a, "--task", "t_alpha", "--base", "tiny-llama")
    _ok("compose", "u", "--method", "uniform", "--all")
    _ok("predict", "u", "--prompt", "Alpha: x\nAnswer:", "--choices", " a, b")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 50
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    assert "adapter_config.json of expert ea changed" in one_line_error(
        cli("predict", "u", "--prompt", "x", "--choices", "a,b"))
    assert "changed on disk" in one_line_error(cli("eval", "--methods", "uniform", "--tasks", "t_alpha"))
    verify = cli("experts", "verify")
    assert verify.exit_code == 1 and "adapter_config.json differs" in verify.stdout
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": cfg["lora_alpha"] / 50}))
    w = a / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in a weight
    w.write_bytes(bytes(data))
    assert "weights of expert ea changed" in one_line_error(cli("predict", "u", "--prompt", "x", "--choices", "a,b"))
    import shutil

    shutil.rmtree(a)
    assert "is missing" in one_line_error(cli("compose", "v", "--method", "uniform", "--all"))


def test_nan_and_inf_weights_and_alpha_are_refused(library, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    bad = copy(library["a"], tmp_path / "nanw")
    w = bad / "adapter_model.safetensors"
    t = load_file(str(w))
    first = sorted(t)[0]
    t[first][0, 0] = float("nan")
    save_file(t, str(w))
    assert "NaN or infinite" in one_line_error(cli("add-expert", bad, "--base", "tiny-llama"))
    t[first][0, 0] = float("inf")
    save_file(t, str(w))
    assert "NaN or infinite" in one_line_error(cli("add-expert", bad, "--base", "tiny-llama"))
    alpha = copy(library["a"], tmp_path / "nana")
    text = (alpha / "adapter_config.json").read_text()
    cfg = json.loads(text)
    for value, words in (("NaN", "NaN is not a number"), ("0", "lora_alpha=0"), ("-1", "lora_alpha=-1")):
        (alpha / "adapter_config.json").write_text(json.dumps(cfg).replace(f'"lora_alpha": {cfg["lora_alpha"]}',
                                                                           f'"lora_alpha": {value}'))
        assert words in one_line_error(cli("add-expert", alpha, "--base", "tiny-llama"))
    assert rows() == []
    int8 = copy(library["a"], tmp_path / "int8")
    t = load_file(str(int8 / "adapter_model.safetensors"))
    save_file({k: (v * 10).to(torch.int8) for k, v in t.items()}, str(int8 / "adapter_model.safetensors"))
    assert "floating point" in one_line_error(cli("add-expert", int8, "--base", "tiny-llama"))


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("edit, words", [
    (lambda h: h[sorted(k for k in h if k != "__metadata__")[0]].update(dtype="Q7"), "unknown dtype"),
    (lambda h: h[sorted(k for k in h if k != "__metadata__")[0]].update(shape=None), "malformed"),
    (lambda h: h[sorted(k for k in h if k != "__metadata__")[0]].update(data_offsets=["0", "8"]), "malformed"),
    (lambda h: [h[k].update(data_offsets=[0, h[k]["data_offsets"][1] - h[k]["data_offsets"][0]])
                for k in h if k != "__metadata__"], "overlaps"),
])
def test_safetensors_header_gaps(library, tmp_path, edit, words):
    bad = copy(library["a"], tmp_path / "hdr")
    _rewrite_header(bad / "adapter_model.safetensors", edit)
    assert words in one_line_error(cli("add-expert", bad, "--base", "tiny-llama"))


def test_deep_json_config_and_odd_configs(library, tmp_path):
    deep = copy(library["a"], tmp_path / "deep")
    (deep / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    err = one_line_error(cli("add-expert", deep, "--base", "tiny-llama"))
    assert "adapter_config.json" in err and str(deep) in err
    for key, value, words in (("r", 4.7, "whole number"), ("fan_in_fan_out", True, "fan_in_fan_out")):
        odd = copy(library["a"], tmp_path / f"odd-{key}")
        cfg = json.loads((odd / "adapter_config.json").read_text())
        cfg[key] = value
        (odd / "adapter_config.json").write_text(json.dumps(cfg))
        assert words in one_line_error(cli("add-expert", odd, "--base", "tiny-llama"))


def test_duplicates_are_weights_and_config(library, tmp_path):
    _ok("add-expert", library["a"], "--name", "e0", "--base", "tiny-llama")
    err = one_line_error(cli("add-expert", library["a"], "--name", "pk", "--base", "tiny-llama"))
    assert "already registered as expert 'e0'" in err
    other = copy(library["a"], tmp_path / "other-alpha")
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] + 1
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    _ok("add-expert", other, "--name", "e1", "--base", "tiny-llama")  # same weights, another config: another expert
    assert sorted(r["name"] for r in rows()) == ["e0", "e1"]


def test_a_newer_registry_is_not_written(tmp_path):
    import sqlite3

    from recycle.registry import Registry

    db = tmp_path / "new.db"
    Registry(db).close()
    conn = sqlite3.connect(db)
    conn.execute("insert into _sqlite_migrations (migration_set, name, applied_at) values ('recycle', 'm999_future', 'x')")
    conn.commit()
    conn.close()
    err = one_line_error(cli("experts", "list", "--db", db))
    assert "newer recycle" in err and "m999_future" in err


def test_a_read_only_registry_is_refused_at_once(library, tmp_path):
    import subprocess

    from recycle.registry import Registry

    db = tmp_path / "r.db"
    Registry(db).close()
    os.chmod(db, stat.S_IRUSR)
    immutable = False
    if os.access(db, os.W_OK):  # root writes read-only files: make it immutable instead
        immutable = subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("cannot make a file read-only for this user")
    try:
        t0 = time.time()
        assert "read-only" in one_line_error(cli("add-expert", library["a"], "--base", "tiny-llama", "--db", db))
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(30)))
        spec = tmp_path / "t.toml"
        spec.write_text('name = "t"\ntemplate = "T: {text}"\nchoices = [" a", " b"]\nlabel_field = "label"\n'
                        f'[source]\nbuilder = "json"\ndata_files = "{data.name}"\n')
        assert "read-only" in one_line_error(cli("add-task", spec, "--db", db))
        assert time.time() - t0 < 10
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(db)])
        os.chmod(db, stat.S_IRUSR | stat.S_IWUSR)


def test_every_writing_command_refuses_a_read_only_registry(library, tmp_path):
    import subprocess

    db = Path(os.environ["RECYCLE_DB"])
    _ok("add-expert", library["a"], "--base", "tiny-llama")
    _ok("add-expert", library["b"], "--base", "tiny-llama")
    _ok("compose", "u", "--method", "uniform", "--all")
    before = dump()
    os.chmod(db, stat.S_IRUSR)
    immutable = False
    if os.access(db, os.W_OK):  # root writes read-only files: make it immutable instead
        immutable = subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("cannot make a file read-only for this user")
    try:
        for args in (("compose", "v", "--method", "uniform", "--all"), ("compose", "remove", "u"),
                     ("experts", "remove", "a", "--yes"), ("add-expert", library["c"], "--base", "tiny-llama")):
            r = cli(*args)
            assert r.exit_code == 2 and "read-only" in one_line_error(r), (args, r.output)
            assert "OperationalError" not in r.output
        assert cli("experts", "list").exit_code == 0  # reading still works
        assert dump() == before
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(db)])
        os.chmod(db, stat.S_IRUSR | stat.S_IWUSR)


def test_a_refused_first_command_leaves_no_registry_file(library, tmp_path):
    db = Path(os.environ["RECYCLE_DB"])
    alpha = copy(library["a"], tmp_path / "nana")
    cfg = json.loads((alpha / "adapter_config.json").read_text())
    (alpha / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": float("nan")}))
    assert "NaN" in one_line_error(cli("add-expert", alpha, "--base", "tiny-llama"))
    assert "no experts" in one_line_error(cli("compose", "u", "--method", "uniform", "--all"))
    assert not db.exists() and sorted(p.name for p in db.parent.iterdir() if "registry" in p.name) == []
    _ok("add-expert", library["a"], "--base", "tiny-llama")  # the first write creates it
    assert [r["name"] for r in rows()] == ["a"]


def test_reading_an_empty_file_writes_nothing_into_it(library):
    db = Path(os.environ["RECYCLE_DB"])
    db.touch()
    r = _ok("experts", "list", "--json")
    assert json.loads(r.stdout) == [] and db.stat().st_size == 0
    assert _ok("compose", "list", "--json").stdout.strip() == "[]" and db.stat().st_size == 0
    _ok("add-expert", library["a"], "--base", "tiny-llama")  # a writing command makes it a registry
    assert [r["name"] for r in rows()] == ["a"]


def test_dead_and_interrupted_runs_agree(world):
    import sqlite3

    from recycle.registry import Registry

    reg = Registry()
    run = reg.start_run({"x": 1})
    conn = sqlite3.connect(reg.path)
    conn.execute("update eval_runs set pid = 999999999 where id = ?", [run])  # a process that is gone
    conn.commit()
    assert reg.mark_dead_runs() == 1
    assert reg.run(run)["status"] == "died"
    shown = cli("eval", "runs", "--json")
    assert json.loads(shown.stdout)[0]["status"] == "died"


def test_predict_output_onto_a_folder(world, library, tmp_path):
    for spec in world["specs"].values():
        _ok("add-task", spec)
    _ok("add-expert", library["a"], "--task", "t_alpha", "--base", "tiny-llama")
    folder = tmp_path / "out"
    folder.mkdir()
    assert "it is a folder" in one_line_error(cli("predict", "uniform", "--prompt", "x", "--choices", "a,b",
                                                 "--output", folder))
    assert list(tmp_path.glob(".out*")) == []


# ---- one-line errors, exit 2 -------------------------------------------------------------


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "x", "choices": "abc"}', "must be a list of strings"),
    ('{"prompt": "x", "choices": [1, 2]}', "must be a list of strings"),
    ('{"prompt": "", "choices": ["a", "b"]}', 'non-empty "prompt"'),
    ('{"prompt": "x", "choices": ["a"]}', "at least two"),
    ('{"prompt": "x", "choices": ["a", ""]}', "is empty"),
])
def test_predict_input_is_checked(world, library, tmp_path, line, words):
    _ok("add-expert", library["a"], "--base", "tiny-llama")
    f = tmp_path / "in.jsonl"
    f.write_text(line + "\n")
    assert words in one_line_error(cli("predict", "uniform", "--input", f))


def test_predict_options_and_encoding(world, library, tmp_path):
    _ok("add-expert", library["a"], "--base", "tiny-llama")
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"prompt": "caf\xe9"}\n')
    assert "not UTF-8" in one_line_error(cli("predict", "uniform", "--input", f))
    assert "--batch-size" in one_line_error(cli("predict", "uniform", "--prompt", "x", "--batch-size", "0"))
    assert "--max-new-tokens" in one_line_error(cli("predict", "uniform", "--prompt", "x", "--max-new-tokens", "-5"))


@pytest.mark.parametrize("split, data, words", [
    ("train = nan\ntest = 0.5", None, "split.train"),
    ("train = 0.6\nvalidation = 0.1\ntest = 0.2", None, "add up to 0.9"),
    (None, "", "is empty"),
    (None, "\n  \n", "is empty"),
    (None, "not json\nat all\n", "cannot load"),
])
def test_task_data_errors(tmp_path, split, data, words):
    f = tmp_path / "d.jsonl"
    f.write_text(data if data is not None else "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n"
                                                        for i in range(30)))
    spec = tmp_path / "t.toml"
    spec.write_text('name = "t"\ntemplate = "T: {text}"\nchoices = [" a", " b"]\nlabel_field = "label"\n'
                    f'[source]\nbuilder = "json"\ndata_files = "{f.name}"\n' + (f"[split]\n{split}\n" if split else ""))
    assert words in one_line_error(cli("add-task", spec))


def test_pipeline_types_are_checked_at_load(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('name = "x"\nbase = "tiny-llama"\n[train]\nsteps = "many"\n')
    assert "[train]: steps must be int" in one_line_error(cli("run", f))
    f.write_text('name = "x"\nbase = "tiny-llama"\n[gates]\nlr = "fast"\n')
    assert "[gates]: lr must be float" in one_line_error(cli("run", f))


def test_data_prints_literally(world, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f":x: [bold]item[/bold] {i}", "label": i % 2}) + "\n" for i in range(30)))
    spec = tmp_path / "t.toml"
    spec.write_text('name = "lit"\ntemplate = "T: {text}"\nchoices = [" a", " b"]\nlabel_field = "label"\n'
                    f'[source]\nbuilder = "json"\ndata_files = "{f.name}"\n')
    _ok("add-task", spec)
    out = _ok("tasks", "preview", "lit", "-n", "3").stdout
    assert ":x: [bold]item[/bold]" in out and "❌" not in out


def test_a_hub_data_set_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    spec = tmp_path / "t.toml"
    spec.write_text('name = "remote"\ntemplate = "T: {text}"\nchoices = [" a", " b"]\nlabel_field = "label"\n'
                    '[source]\nhub = "some-org/not-cached-anywhere"\n')
    t0 = time.time()
    err = one_line_error(cli("add-task", spec))
    assert "cannot load" in err and time.time() - t0 < 20


@pytest.mark.parametrize("args", [["train-router", "c", "-x"], ["train-router", "c", "--steps", "nan"],
                                  ["eval", "--bogus"], ["compose"]])
def test_usage_errors_exit_2_without_a_traceback_line(args):
    """Typer carries its own copy of click: its usage errors are bad input (exit 2, click's
    usage message), not an internal error (exit 1)."""
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert "run with --debug" not in r.output and "Traceback" not in r.output
