"""The registry: one SQLite file (``./registry.db`` by default) that owns every write.

Opening a :class:`Registry` applies pending migrations (serialised across processes by
``BEGIN IMMEDIATE``); every change goes through :meth:`Registry.transaction`.
Artifacts the registry produces (trained adapters, gates) live in the folder next to
the database file, ``<db stem>.artifacts/``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from recycle.errors import RecycleError
from recycle.migrations import migrations

DEFAULT_DB = "registry.db"
ENV_DB = "RECYCLE_DB"


def default_db_path() -> Path:
    return Path(os.environ.get(ENV_DB) or DEFAULT_DB).expanduser().absolute()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _retry_locked(fn, attempts: int = 50):
    """Run ``fn``; retry on 'database is locked' that slipped past the busy timeout."""
    for i in range(attempts):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))


class Registry:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser().absolute() if path else default_db_path()
        if self.path.exists() and self.path.is_dir():
            raise RecycleError(f"registry path {self.path} is a folder, not a database file")
        if not self.path.parent.is_dir():
            raise RecycleError(f"registry folder {self.path.parent} does not exist")
        conn = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        try:
            _retry_locked(self._wal)
            _retry_locked(self._migrate)
        except sqlite3.DatabaseError as e:
            raise RecycleError(f"{self.path} is not a usable registry: {e}") from None
        self.db.execute("PRAGMA foreign_keys = ON")

    def _wal(self):
        if self.db.journal_mode != "wal":
            self.db.enable_wal()

    def _migrate(self):
        if not migrations.pending(self.db):
            return
        with self.transaction():
            migrations.apply(self.db)

    @property
    def artifacts_dir(self) -> Path:
        return self.path.with_name(self.path.stem + ".artifacts")

    def close(self):
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction (``BEGIN IMMEDIATE``): all of it or none of it."""
        conn = self.db.conn
        if conn.in_transaction:  # nested: a savepoint
            with self.db.atomic():
                yield self.db
            return
        _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield self.db
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    # ---- base models -------------------------------------------------------------

    def ensure_base_model(self, name: str, kind: str, config_hash: str | None) -> int:
        """Id of the base model row, creating it if needed (inside the caller's
        transaction when there is one)."""
        with self.transaction() as db:
            rows = list(
                db.query(
                    "select id from base_models where name = ? and config_hash is ?",
                    [name, config_hash],
                )
            )
            if rows:
                return rows[0]["id"]
            return db["base_models"].insert(
                {"name": name, "kind": kind, "config_hash": config_hash, "created": now()}
            ).last_pk

    def base_model(self, base_id: int) -> dict:
        return self.db["base_models"].get(base_id)

    # ---- experts -----------------------------------------------------------------

    def experts(self, base: str | None = None, task: str | None = None) -> list[dict]:
        where, params = [], []
        if base:
            where.append("(b.name = ? or b.config_hash = ?)")
            params += [base, base]
        if task:
            where.append("e.task = ?")
            params.append(task)
        sql = (
            "select e.*, b.name as base_model, b.config_hash as base_config_hash "
            "from experts e join base_models b on b.id = e.base_model_id"
        )
        if where:
            sql += " where " + " and ".join(where)
        sql += " order by e.name"
        return [_decode_expert(r) for r in self.db.query(sql, params)]

    def expert(self, name: str) -> dict:
        rows = list(
            self.db.query(
                "select e.*, b.name as base_model, b.config_hash as base_config_hash "
                "from experts e join base_models b on b.id = e.base_model_id where e.name = ?",
                [name],
            )
        )
        if not rows:
            raise RecycleError(f"no expert named {name!r} in {self.path}")
        return _decode_expert(rows[0])

    def expert_or_none(self, name: str) -> dict | None:
        try:
            return self.expert(name)
        except RecycleError:
            return None


def _decode_expert(row: dict) -> dict:
    row = dict(row)
    for key in ("ranks", "target_modules", "meta"):
        if row.get(key):
            row[key] = json.loads(row[key])
    row["use_rslora"] = bool(row.get("use_rslora"))
    return row


def encode_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
