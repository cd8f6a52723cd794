"""The registry file: its schema only changes through sqlite-utils Migrations, and a newer,
read-only or empty file is refused or read without a write."""

import json
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest
import sqlite_utils

from recycle.migrations import migrations
from recycle.registry import Registry
from tests.conftest import cli, copy, dump, ok, one_line_error, rows


def test_fresh_registry_applies_every_migration_once(tmp_path):
    path = tmp_path / "r.db"
    reg = Registry(path)
    applied = [m.name for m in migrations.applied(reg.db)]
    assert applied == [m.name for m in migrations._migrations]
    assert {"base_models", "experts"} <= set(reg.db.table_names())
    reg.close()
    Registry(path).close()  # reopening applies nothing twice
    conn = sqlite3.connect(path)
    names = [r[0] for r in conn.execute("select name from _sqlite_migrations")]
    assert len(names) == len(set(names)) == len(migrations._migrations)


def test_old_registry_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    first = migrations._migrations[0].name
    later = [m.name for m in migrations._migrations[1:]]
    if later:
        migrations.apply(db, stop_before=later[0])
    else:
        migrations.apply(db)
    db["base_models"].insert({"name": "tiny-llama", "kind": "alias", "config_hash": "x", "created": "t"})
    db.close()
    reg = Registry(path)
    assert [m.name for m in migrations.applied(reg.db)][0] == first
    assert not migrations.pending(reg.db)
    assert reg.db["base_models"].count == 1, "upgrading keeps the data"


def test_not_a_database_is_a_clear_error(tmp_path):
    import pytest

    from recycle.errors import RecycleError

    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RecycleError, match="not a usable registry"):
        Registry(bad)


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
    ok("add-expert", library["a"], "--base", "tiny-llama")
    ok("add-expert", library["b"], "--base", "tiny-llama")
    ok("compose", "u", "--method", "uniform", "--all")
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
    ok("add-expert", library["a"], "--base", "tiny-llama")  # the first write creates it
    assert [r["name"] for r in rows()] == ["a"]


def test_reading_an_empty_file_writes_nothing_into_it(library):
    db = Path(os.environ["RECYCLE_DB"])
    db.touch()
    r = ok("experts", "list", "--json")
    assert json.loads(r.stdout) == [] and db.stat().st_size == 0
    assert ok("compose", "list", "--json").stdout.strip() == "[]" and db.stat().st_size == 0
    ok("add-expert", library["a"], "--base", "tiny-llama")  # a writing command makes it a registry
    assert [r["name"] for r in rows()] == ["a"]
