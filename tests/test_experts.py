"""add-expert and the experts commands, through the real CLI and the real SQLite file."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli, copy, dump, ok, one_line_error, rows


def test_add_records_everything(library, tiny_base):
    r = cli("add-expert", library["a"], "--task", "sentiment", "--dataset", "rt", "--base", "tiny-llama",
            "--meta", "author=ann", "--meta", "note=x=y")
    assert r.exit_code == 0, r.output
    (row,) = rows()
    assert row["name"] == "a"
    assert row["path"] == str(library["a"].resolve())
    assert row["task"] == "sentiment" and row["dataset"] == "rt"
    assert row["peft_type"] == "LORA" and row["rank"] == 4 and row["alpha"] == 8.0
    assert row["use_rslora"] == 0
    assert json.loads(row["meta"]) == {"author": "ann", "note": "x=y"}
    assert len(json.loads(row["target_modules"])) == 8  # q and v in 4 layers
    # A (4x64) + B (64x4) for q; A (4x64) + B (32x4) for v (2 kv heads of 16), 4 layers
    assert row["n_params"] == 4 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    import hashlib

    assert row["sha256"] == hashlib.sha256((library["a"] / "adapter_model.safetensors").read_bytes()).hexdigest()
    (base,) = rows("base_models")
    assert base["name"] == "tiny-llama" and base["kind"] == "alias" and len(base["config_hash"]) == 64


def test_readd_is_a_noop_and_says_so(library):
    assert cli("add-expert", library["a"], "--base", "tiny-llama").exit_code == 0
    before = dump()
    r = cli("add-expert", library["a"], "--base", "tiny-llama")
    assert r.exit_code == 0
    assert "already registered" in r.output
    assert dump() == before


def test_same_name_other_content_needs_replace(library, tmp_path):
    assert cli("add-expert", library["a"], "--name", "x", "--base", "tiny-llama").exit_code == 0
    before = dump()
    err = one_line_error(cli("add-expert", library["b"], "--name", "x", "--base", "tiny-llama"))
    assert "--replace" in err
    assert dump() == before
    r = cli("add-expert", library["b"], "--name", "x", "--base", "tiny-llama", "--replace")
    assert r.exit_code == 0, r.output
    (row,) = rows()
    assert row["rank"] == 8 and row["path"] == str(library["b"].resolve())


def test_rslora_and_rank_pattern_recorded(library):
    assert cli("add-expert", library["c"], library["patterned"], "--base", "tiny-llama").exit_code == 0
    by = {r["name"]: r for r in rows()}
    assert by["c"]["use_rslora"] == 1
    ranks = json.loads(by["patterned"]["ranks"])
    assert ranks and set(ranks.values()) == {2} and all(k.endswith("v_proj") for k in ranks)


def test_base_taken_from_adapter_config(library):
    """Without --base the adapter's base_model_name_or_path (the tiny model's folder) is used,
    and an alias's own folder is recognised as that alias."""
    r = cli("add-expert", library["a"])
    assert r.exit_code == 0, r.output
    assert rows("base_models")[0]["name"] == "tiny-llama"


def test_recursive_with_progress_and_failures(library, tmp_path):
    root = tmp_path / "pile"
    for k in ("a", "b", "c"):
        copy(library[k], root / "team" / k)
    bad = copy(library["a"], root / "bad")
    (bad / "adapter_config.json").write_text("{not json")
    r = cli("add-expert", root, "--recursive", "--base", "tiny-llama")
    assert r.exit_code == 2
    assert "3 added" in r.output and "1 failed" in r.output and "unparsable" in r.output
    assert sorted(x["name"] for x in rows()) == ["a", "b", "c"]


# ---- one test per validation error -------------------------------------------------


def _mutate_config(folder: Path, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(folder: Path, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(fn(tensors), folder / "adapter_model.safetensors")


def _err(folder, *extra):
    from recycle.registry import Registry

    Registry().close()  # an existing registry, so "unchanged" compares real tables
    before = dump()
    line = one_line_error(cli("add-expert", folder, *extra))
    assert dump() == before, "a refused adapter must leave the registry unchanged"
    return line


def test_missing_folder(tmp_path):
    assert "missing" in _err(tmp_path / "nope")


def test_missing_config(library, tmp_path):
    f = copy(library["a"], tmp_path / "f")
    (f / "adapter_config.json").unlink()
    assert "missing file adapter_config.json" in _err(f)


def test_missing_weights(library, tmp_path):
    f = copy(library["a"], tmp_path / "f")
    (f / "adapter_model.safetensors").unlink()
    assert "missing file adapter_model.safetensors" in _err(f)


def test_pickle_weights_refused(library, tmp_path):
    f = copy(library["a"], tmp_path / "f")
    (f / "adapter_model.safetensors").rename(f / "adapter_model.bin")
    assert "refusing adapter_model.bin (pickle)" in _err(f)


def test_config_unparsable(library, tmp_path):
    f = copy(library["a"], tmp_path / "f")
    (f / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    assert "unparsable" in _err(f)


def test_non_lora_unsupported(library, tmp_path):
    f = copy(library["a"], tmp_path / "f")
    _mutate_config(f, peft_type="IA3")
    assert "unsupported peft_type 'IA3'" in _err(f)


def test_header_unreadable(library, tmp_path):
    f = copy(library["a"], tmp_path / "f")
    (f / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    assert "header unreadable" in _err(f)


def test_truncated_weights(library, tmp_path):
    assert cli("add-expert", library["b"], "--base", "tiny-llama").exit_code == 0
    f = copy(library["a"], tmp_path / "f")
    w = f / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    assert "truncated" in _err(f, "--base", "tiny-llama")


def test_rank_disagrees_with_r(library, tmp_path):
    f = copy(library["a"], tmp_path / "f")
    _mutate_config(f, r=16)
    assert "has rank 4 but the config says r=16" in _err(f)


def test_rank_disagrees_with_rank_pattern(library, tmp_path):
    f = copy(library["patterned"], tmp_path / "f")
    _mutate_config(f, rank_pattern={"v_proj": 3})
    assert "config says r=3" in _err(f)


def test_a_and_b_do_not_chain(library, tmp_path):
    import torch

    f = copy(library["a"], tmp_path / "f")

    def widen_b(t):
        k = next(k for k in t if "lora_B" in k)
        t[k] = torch.zeros(t[k].shape[0], 5)
        return t

    _rewrite_tensors(f, widen_b)
    assert "do not chain" in _err(f)


def test_target_module_absent_from_base(library, tmp_path):
    f = copy(library["a"], tmp_path / "f")
    _rewrite_tensors(f, lambda t: {k.replace("layers.0.", "layers.9."): v for k, v in t.items()})
    assert "model.layers.9.self_attn.q_proj is absent from the base model" in _err(f, "--base", "tiny-llama")


def test_target_module_shape_differs_from_base(library, tmp_path):
    import torch

    f = copy(library["a"], tmp_path / "f")

    def wrong_in(t):
        return {k: (torch.zeros(v.shape[0], 48) if "lora_A" in k else v) for k, v in t.items()}

    _rewrite_tensors(f, wrong_in)
    assert "48->" in _err(f, "--base", "tiny-llama")


def test_base_differs_from_flag(library, tmp_path):
    other = tmp_path / "other-base"
    from recycle.basemodels import resolve_base

    shutil.copytree(resolve_base("tiny-llama").path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    assert "not" in _err(library["a"], "--base", other)


def test_base_differs_from_group(library, tmp_path):
    f = copy(library["b"], tmp_path / "f")
    _mutate_config(f, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    r = cli("add-expert", library["a"], f)
    assert r.exit_code == 2
    assert "like the other adapters in this call" in r.output
    assert [x["name"] for x in rows()] == ["a"]


def test_no_base_anywhere(library, tmp_path):
    f = copy(library["a"], tmp_path / "f")
    _mutate_config(f, base_model_name_or_path=None)
    assert "pass --base" in _err(f)


# ---- listing, showing, removing, verifying ---------------------------------------------


def test_list_show_filters_json(library):
    assert cli("add-expert", library["a"], "--task", "t1", "--base", "tiny-llama").exit_code == 0
    assert cli("add-expert", library["b"], "--task", "t2", "--base", "tiny-llama").exit_code == 0
    r = cli("experts", "list", "--json")
    assert [e["name"] for e in json.loads(r.stdout)] == ["a", "b"]
    r = cli("experts", "list", "--task", "t2", "--json")
    assert [e["name"] for e in json.loads(r.stdout)] == ["b"]
    r = cli("experts", "list", "--base", "nothing", "--json")
    assert json.loads(r.stdout) == []
    r = cli("experts", "list")
    assert "a" in r.stdout and "t2" in r.stdout
    r = cli("experts", "show", "b", "--json")
    assert json.loads(r.stdout)["rank"] == 8
    assert "b" in cli("experts", "show", "b").stdout
    one_line_error(cli("experts", "show", "zzz"))


def test_remove(library):
    assert cli("add-expert", library["a"], "--base", "tiny-llama").exit_code == 0
    r = cli("experts", "remove", "a", input="n\n")
    assert r.exit_code != 0 and len(rows()) == 1
    r = cli("experts", "remove", "a", "--yes")
    assert r.exit_code == 0 and rows() == []
    assert (library["a"] / "adapter_model.safetensors").exists(), "files are the user's: never deleted"
    one_line_error(cli("experts", "remove", "a", "--yes"))


def test_verify_reports_modified_missing_moved(library, tmp_path):
    for k in ("a", "b", "c"):
        copy(library[k], tmp_path / "reg" / k)
        assert cli("add-expert", tmp_path / "reg" / k, "--base", "tiny-llama").exit_code == 0
    assert cli("experts", "verify").exit_code == 0
    w = tmp_path / "reg" / "a" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + b"\x01")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(tmp_path / "reg" / "b", tmp_path / "elsewhere" / "b")
    shutil.rmtree(tmp_path / "reg" / "c")
    r = cli("experts", "verify", "--search", tmp_path / "elsewhere", "--json")
    assert r.exit_code == 1
    status = {e["name"]: e["status"] for e in json.loads(r.stdout)}
    assert status == {"a": "modified", "b": "moved", "c": "missing"}
    cli("experts", "verify", "--search", tmp_path / "elsewhere", "--fix")
    assert {x["name"]: x["path"] for x in rows()}["b"] == str((tmp_path / "elsewhere" / "b").resolve())


def test_errors_are_one_line_unless_debug(tmp_path):
    one_line_error(cli("add-expert", tmp_path / "missing"))
    r = cli("--debug", "add-expert", tmp_path / "missing")
    assert r.exit_code == 2 and "Traceback" in r.output


def test_db_path_default_env_and_flag(tmp_path, monkeypatch):
    assert cli("db", "path").stdout.strip() == os.environ["RECYCLE_DB"]
    assert cli("db", "path", "--db", tmp_path / "x.db").stdout.strip() == str(tmp_path / "x.db")
    monkeypatch.delenv("RECYCLE_DB")
    monkeypatch.chdir(tmp_path)
    assert cli("db", "path").stdout.strip() == str(tmp_path / "registry.db")


def test_concurrent_adds_from_four_processes(library, tmp_path):
    """Four processes add different experts to one fresh registry at the same time."""
    folders = [copy(library[k], tmp_path / f"p{i}") for i, k in enumerate(["a", "b", "c", "patterned"])]
    env = {**os.environ, "RECYCLE_DB": str(tmp_path / "shared.db")}
    procs = [
        subprocess.Popen([sys.executable, "-m", "recycle", "add-expert", str(f), "--base", "tiny-llama"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for f in folders
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    conn = sqlite3.connect(tmp_path / "shared.db")
    names = sorted(r[0] for r in conn.execute("select name from experts"))
    assert names == ["p0", "p1", "p2", "p3"]
    assert conn.execute("select count(*) from base_models").fetchone()[0] == 1
    assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"


BAD_NAMES = ["../../evil", "/abs", "..", "a\nb", "\x1b[31mred", "x" * 10_000, "a,b", "--help", "-x", ".hidden", ""]


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
    ok("add-expert", odd, "--name", "fine", "--base", "tiny-llama")
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


def test_adapters_changed_on_disk_are_refused_wherever_they_are_used(library, tmp_path, world):
    for spec in world["specs"].values():
        ok("add-task", spec)
    a = copy(library["a"], tmp_path / "ea")
    ok("add-expert", a, "--task", "t_alpha", "--base", "tiny-llama")
    ok("compose", "u", "--method", "uniform", "--all")
    ok("predict", "u", "--prompt", "Alpha: x\nAnswer:", "--choices", " a, b")
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


def test_duplicates_are_weights_and_config(library, tmp_path):
    ok("add-expert", library["a"], "--name", "e0", "--base", "tiny-llama")
    err = one_line_error(cli("add-expert", library["a"], "--name", "pk", "--base", "tiny-llama"))
    assert "already registered as expert 'e0'" in err
    other = copy(library["a"], tmp_path / "other-alpha")
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] + 1
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    ok("add-expert", other, "--name", "e1", "--base", "tiny-llama")  # same weights, another config: another expert
    assert sorted(r["name"] for r in rows()) == ["e0", "e1"]


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


def test_registration_hashes_the_bytes_it_checks(library, make_adapter, tmp_path):
    """add-expert reads the weights once: the sha256 recorded is of the bytes whose header and
    values were checked, and a file swapped for another between the look at its structure and
    that read is refused, not recorded under the first one's shapes."""
    import hashlib

    from recycle.adapters import AdapterError, check_and_hash, inspect_adapter

    a = copy(library["a"], tmp_path / "a")
    info = inspect_adapter(a, check_values=False)
    w = a / "adapter_model.safetensors"
    assert check_and_hash(info, None) == hashlib.sha256(w.read_bytes()).hexdigest()
    other = make_adapter(tmp_path / "other", r=2, targets=("q_proj",), seed=3)
    w.write_bytes((other / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="changed while it was being registered"):
        check_and_hash(info, None)
