"""The registry's schema only changes through sqlite-utils Migrations."""

import sqlite3

import sqlite_utils

from recycle.migrations import migrations
from recycle.registry import Registry


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
