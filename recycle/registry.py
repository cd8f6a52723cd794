"""The registry: one SQLite file (``./registry.db`` by default) that owns every write.

Opening a :class:`Registry` applies pending migrations (serialised across processes by
``BEGIN IMMEDIATE``); every change goes through :meth:`Registry.transaction`. All of
recycle's SQL lives in this module: the other modules ask the registry for rows (plain
dicts, JSON columns decoded; experts as :class:`~recycle.records.Expert` records) and hand
it rows to record.

Artifacts the registry produces (trained adapters, gates, router parameters, results) live
in the folder next to the database file, ``<db stem>.artifacts/``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# sqlite_utils imports pandas and numpy if it can (0.43 CPU-s, most of a read command's
# start) only to infer column types from their values when it creates a table from a row;
# every table here is created by the migrations with its types, so it does without them.
_SKIPPED = [m for m in ("pandas", "numpy") if m not in sys.modules]
sys.modules.update(dict.fromkeys(_SKIPPED))  # None: `import` raises ImportError
try:
    import sqlite_utils
finally:
    for _m in _SKIPPED:
        del sys.modules[_m]

from recycle.errors import RecycleError
from recycle.migrations import migrations
from recycle.records import Expert

DEFAULT_DB = "registry.db"
ENV_DB = "RECYCLE_DB"

# JSON-encoded columns, decoded on the way out
_JSON = {
    "experts": ("ranks", "target_modules", "meta"),
    "tasks": ("spec",),
    "gates": ("settings", "memory"),
    "compositions": ("settings", "members", "state"),
    "eval_runs": ("settings",),
    "eval_results": ("routing", "member_hashes", "predictions", "scores", "labels", "extra", "memory"),
}


def default_db_path() -> Path:
    return Path(os.environ.get(ENV_DB) or DEFAULT_DB).expanduser().absolute()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def encode_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _retry_locked(fn, attempts: int = 50):
    """Run ``fn``; retry on 'database is locked' that slipped past the busy timeout."""
    for i in range(attempts):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))


def _decode(table: str, row: dict | None) -> dict | None:
    if row is None:
        return None
    row = dict(row)
    for key in _JSON.get(table, ()):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    if table == "experts":
        row["use_rslora"] = bool(row.get("use_rslora"))
    return row


class Registry:
    """``Registry(path)`` opens (and migrates) the registry; ``create=False`` refuses to
    make a new one (read-only commands must not leave an empty registry behind a typo).

    ``lazy=True`` (what the CLI's commands use) creates a missing file only with the first
    write: a command refused before it records anything leaves no file behind. Until then,
    and for an existing empty file opened with ``create=False``, reads see an empty
    registry held in memory; the file is never touched by reading."""

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = True, lazy: bool = False):
        self.path = Path(path).expanduser().absolute() if path else default_db_path()
        if self.path.exists() and self.path.is_dir():
            raise RecycleError(f"registry path {self.path} is a folder, not a database file")
        if not self.path.exists() and not create:
            raise RecycleError(f"no registry at {self.path} (register something first, or give --db)")
        if not self.path.parent.is_dir():
            raise RecycleError(f"registry folder {self.path.parent} does not exist")
        empty = self.path.is_file() and self.path.stat().st_size == 0
        self._unwritten = (lazy and not self.path.exists()) or (empty and not create)
        self._open(":memory:" if self._unwritten else str(self.path))

    def _open(self, target: str) -> None:
        self._in_memory = target == ":memory:"
        conn = sqlite3.connect(target, timeout=60, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self._opening = True
        try:
            if not self._in_memory:
                _retry_locked(self._wal)
            _retry_locked(self._migrate)
        except sqlite3.DatabaseError as e:
            raise RecycleError(f"{self.path} is not a usable registry: {e}") from None
        finally:
            self._opening = False
        self.db.execute("PRAGMA foreign_keys = ON")

    def _materialise(self) -> None:
        """Create the file of a lazily opened registry: the schema is written to a temporary
        file that is then linked into place, so no other process sees a half-made registry
        and one made meanwhile by another process (or an empty file) is used, not replaced."""
        self.db.close()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
        try:
            if not self.path.exists():
                fresh = sqlite3.connect(str(tmp))
                try:
                    db = sqlite_utils.Database(fresh)
                    db.enable_wal()
                    migrations.apply(db)
                finally:
                    fresh.close()
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    pass  # another process made it first: use theirs
                except OSError:
                    pass  # no hard links on this file system: sqlite creates it below
        except sqlite3.OperationalError as e:
            self._open(":memory:")
            raise RecycleError(f"cannot create the registry {self.path}: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._unwritten = False
        self._open(str(self.path))

    def _wal(self):
        if self.db.journal_mode != "wal" and os.access(self.path, os.W_OK):
            self.db.enable_wal()

    def _migrate(self):
        known = {m.name for m in migrations._migrations}
        if "_sqlite_migrations" in self.db.table_names():
            applied = {r["name"] for r in self.db.query(
                "select name from _sqlite_migrations where migration_set = ?", [migrations.name])}
            newer = sorted(applied - known)
            if newer:
                raise RecycleError(
                    f"{self.path} was written by a newer recycle (schema step {newer[0]} is unknown "
                    "here); upgrade recycle to use it")
        if not migrations.pending(self.db):
            return
        if not self._in_memory and self.path.exists() and not os.access(self.path, os.W_OK):
            raise RecycleError(f"registry {self.path} is read-only and needs an upgrade")
        with self.transaction():
            migrations.apply(self.db)

    def close(self) -> None:
        self.db.close()

    @property
    def artifacts_dir(self) -> Path:
        return self.path.with_name(self.path.stem + ".artifacts")

    def writable(self) -> bool:
        """Whether this process may write the file and its folder (the folder holds the
        write-ahead log); for a registry not created yet, its folder."""
        if self._unwritten and not self.path.exists():
            return os.access(self.path.parent, os.W_OK)
        return os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)

    def check_writable(self) -> None:
        """Refuse, at once, a registry this process cannot write (permissions, an immutable
        file, a read-only file system): an empty write transaction is tried and rolled back."""
        if not self.writable():
            raise RecycleError(f"registry {self.path} is read-only")
        if self._unwritten:
            return
        conn = self.db.conn
        if conn.in_transaction:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except sqlite3.OperationalError as e:
            self._rolled_back(conn, e)

    def _rolled_back(self, conn, e: sqlite3.OperationalError):
        """Roll back after a failed statement; a read-only file or folder is one line."""
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if "readonly" in str(e) or "read-only" in str(e):
            raise RecycleError(f"registry {self.path} is read-only") from None
        raise e

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction (``BEGIN IMMEDIATE``): all of it or none of it."""
        conn = self.db.conn
        if conn.in_transaction:  # nested: a savepoint
            with self.db.atomic():
                yield self.db
            return
        if self._unwritten and not self._opening:  # not the in-memory stand-in's own schema
            if not self.writable():
                raise RecycleError(f"registry {self.path} is read-only")
            self._materialise()
            conn = self.db.conn
        elif not self._in_memory and not self.writable():
            # every writing command ends here: a read-only file or folder is one line, not the
            # OperationalError of the first insert (or a write into the WAL beside an immutable file)
            raise RecycleError(f"registry {self.path} is read-only")
        try:
            _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
            yield self.db
        except sqlite3.OperationalError as e:
            self._rolled_back(conn, e)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self._rolled_back(conn, e)

    def _rows(self, table: str, sql: str, params=()) -> list[dict]:
        return [_decode(table, r) for r in self.db.query(sql, list(params))]

    def _one(self, table: str, sql: str, params=()) -> dict | None:
        rows = self._rows(table, sql, params)
        return rows[0] if rows else None

    # ---- base models -------------------------------------------------------------

    def ensure_base_model(self, name: str, kind: str, config_hash: str | None) -> int:
        """Id of the base model row, creating it if needed (inside the caller's
        transaction when there is one)."""
        with self.transaction() as db:
            row = self._one("base_models", "select id from base_models where name = ? and config_hash is ?",
                            [name, config_hash])
            if row:
                return row["id"]
            return db["base_models"].insert(
                {"name": name, "kind": kind, "config_hash": config_hash, "created": now()}).last_pk

    def first_base_name(self) -> str | None:
        row = self._one("base_models", "select name from base_models order by id limit 1")
        return row["name"] if row else None

    # ---- experts -----------------------------------------------------------------

    _EXPERTS = ("select e.*, b.name as base_model, b.config_hash as base_config_hash "
                "from experts e join base_models b on b.id = e.base_model_id")

    def experts(self, base: str | None = None, task: str | None = None) -> list[Expert]:
        where, params = [], []
        if base:
            where.append("(b.name = ? or b.config_hash = ?)")
            params += [base, base]
        if task:
            where.append("e.task = ?")
            params.append(task)
        sql = self._EXPERTS + (" where " + " and ".join(where) if where else "") + " order by e.name"
        return [Expert(**r) for r in self._rows("experts", sql, params)]

    def expert_or_none(self, name: str) -> Expert | None:
        row = self._one("experts", self._EXPERTS + " where e.name = ?", [name])
        return Expert(**row) if row else None

    def expert(self, name: str) -> Expert:
        row = self.expert_or_none(name)
        if row is None:
            raise RecycleError(f"no expert named {name!r} in {self.path}")
        return row

    def record_expert(self, row: dict, *, base: tuple[str, str, str | None], replace: bool,
                      explicit_name: bool = False) -> dict:
        """Insert or update an expert (``row``: the experts columns, JSON values already
        encoded; ``base``: name, kind, config hash). Returns the stored row plus ``status``:
        ``added``, ``unchanged`` (same content under that name, or under another name),
        ``replaced``."""
        with self.transaction() as db:
            base_id = self.ensure_base_model(*base)
            row = {**row, "base_model_id": base_id}
            old = self._one("experts", "select * from experts where name = ?", [row["name"]])
            if old:
                same_config = old.get("config_sha256") in (None, row.get("config_sha256"))
                if old["sha256"] == row["sha256"] and old["base_model_id"] == base_id and same_config:
                    updates = {k: row[k] for k in ("task", "dataset") if row.get(k) and row[k] != old[k]}
                    for k in ("path", "config_sha256", "weights_size", "weights_mtime_ns", "config_size",
                              "config_mtime_ns"):
                        if row.get(k) is not None and row[k] != old.get(k):
                            updates[k] = row[k]
                    if updates:
                        db["experts"].update(old["id"], updates)
                    status = "unchanged"
                elif not replace:
                    what = ("other weights" if old["sha256"] != row["sha256"] else
                            "another base model" if old["base_model_id"] != base_id else "another adapter_config.json")
                    raise RecycleError(
                        f"expert {row['name']!r} already exists with {what} "
                        f"(sha256 {old['sha256'][:12]}); use --replace to overwrite it")
                else:
                    db["experts"].update(old["id"], {**row, "created": now()})
                    self._drop_dependents(old["id"])
                    status = "replaced"
            else:
                twin = self._one("experts", "select name from experts where sha256 = ? and base_model_id = ? "
                                 "and (config_sha256 is null or config_sha256 = ?)",
                                 [row["sha256"], base_id, row.get("config_sha256")])
                if twin and explicit_name:
                    raise RecycleError(f"the same adapter (weights and config) is already registered as expert "
                                       f"{twin['name']!r}; use that name")
                if twin:
                    return {**self.expert(twin["name"]).to_dict(), "status": "unchanged", "twin_of": twin["name"]}
                db["experts"].insert({**row, "created": now()})
                status = "added"
        return {**self.expert(row["name"]).to_dict(), "status": status}

    def set_expert_path(self, expert_id: int, path: str) -> None:
        with self.transaction() as db:
            db["experts"].update(expert_id, {"path": path})

    def set_expert_files(self, expert_id: int, values: dict) -> None:
        """Record the config hash and the files' sizes and mtimes of an unchanged adapter."""
        if self._unwritten or not self.writable():
            return  # a read-only registry: the check still holds, it is just not remembered
        with self.transaction() as db:
            db["experts"].update(expert_id, values)

    def _dependent_tables(self) -> list[tuple[str, str]]:
        return [(t, fk.column) for t in self.db.table_names() if not t.startswith("_")
                for fk in self.db[t].foreign_keys if fk.other_table == "experts"]

    def _drop_dependents(self, expert_id: int) -> dict[str, int]:
        """Delete rows that describe an expert's old content (gates...)."""
        counts = {}
        for table, column in self._dependent_tables():
            n = self.db.execute(f"select count(*) from [{table}] where [{column}] = ?", [expert_id]).fetchone()[0]
            if n:
                self.db.execute(f"delete from [{table}] where [{column}] = ?", [expert_id])
                counts[table] = n
        return counts

    def remove_expert(self, name: str) -> dict:
        expert = self.expert(name)
        with self.transaction() as db:
            dropped = self._drop_dependents(expert.id)
            db["experts"].delete(expert.id)
        return {"expert": expert, "dropped": dropped}

    # ---- tasks -------------------------------------------------------------------

    def record_task(self, row: dict, *, replace: bool) -> str:
        """Insert or update a task row (``spec`` JSON-encoded); returns the status."""
        with self.transaction() as db:
            old = self._one("tasks", "select * from tasks where name = ?", [row["name"]])
            if old is None:
                db["tasks"].insert({**row, "created": now()})
                return "added"
            if old["spec_sha256"] == row["spec_sha256"]:
                counts = {k: row[k] for k in ("n_train", "n_validation", "n_test") if row[k] != old[k]}
                if json.loads(row["spec"]) != old["spec"]:  # a key outside the identity (family)
                    counts["spec"] = row["spec"]
                if counts:  # same spec, the data under it (or its family label) changed
                    db["tasks"].update(old["id"], counts)
                return "unchanged"
            if not replace:
                raise RecycleError(f"task {row['name']!r} already exists with another spec; use --replace to overwrite it")
            db["tasks"].update(old["id"], {**row, "created": now()})
            return "replaced"

    def task_or_none(self, name: str) -> dict | None:
        return self._one("tasks", "select * from tasks where name = ?", [name])

    def task(self, name: str) -> dict:
        row = self.task_or_none(name)
        if row is None:
            known = [t["name"] for t in self.tasks()]
            hint = f" (registered: {', '.join(known)})" if known else " (none registered: see recycle tasks catalogue)"
            raise RecycleError(f"no task named {name!r}{hint}")
        return row

    def tasks(self) -> list[dict]:
        return self._rows("tasks", "select * from tasks order by name")

    # ---- gates -------------------------------------------------------------------

    def gates_row(self, expert_id: int, settings_hash: str, adapter_sha: str) -> dict | None:
        return self._one("gates", "select * from gates where expert_id = ? and settings_hash = ? and adapter_sha256 = ?",
                         [expert_id, settings_hash, adapter_sha])

    def record_gates(self, expert: Expert, row: dict) -> dict:
        """Record a worker's gates (one transaction); replaces a row for the same expert,
        settings and adapter content. Refused if the expert changed meanwhile."""
        with self.transaction() as db:
            current = self._one("experts", "select id, sha256 from experts where id = ?", [expert.id])
            if current is None or current["sha256"] != expert.sha256:
                raise RecycleError(f"expert {expert.name} was removed or replaced during training")
            db.execute("delete from gates where expert_id = ? and settings_hash = ? and adapter_sha256 = ?",
                       [expert.id, row["settings_hash"], expert.sha256])
            row = {**row, "expert_id": expert.id, "adapter_sha256": expert.sha256, "created": now()}
            row["id"] = db["gates"].insert(row).last_pk
        return _decode("gates", row)

    def gates_rows(self, expert: str | None = None) -> list[dict]:
        """Every gates row with its expert's name and task, newest first; only gates whose
        adapter content is the expert's current one."""
        sql = ("select g.*, e.name as expert, e.task as task from gates g "
               "join experts e on e.id = g.expert_id where g.adapter_sha256 = e.sha256")
        params = []
        if expert is not None:
            sql += " and e.name = ?"
            params.append(expert)
        return self._rows("gates", sql + " order by e.name, g.created desc, g.id desc", params)

    def latest_gates(self, expert: Expert) -> dict | None:
        """The newest gates trained for the expert's current adapter content."""
        return self._one("gates", "select * from gates where expert_id = ? and adapter_sha256 = ? "
                         "order by created desc, id desc limit 1", [expert.id, expert.sha256])

    def gates_recorded(self, path: str) -> bool:
        return self.db.execute("select count(*) from gates where path = ?", [path]).fetchone()[0] > 0

    # ---- compositions ------------------------------------------------------------

    def save_composition(self, row: dict, *, replace: bool) -> dict:
        """Insert a composition (``row`` JSON values encoded), or overwrite one of the same
        name with ``replace`` (what was trained for the old one is dropped). Storing the
        same method, settings and members again changes nothing. Returns the row plus
        ``status``: added, unchanged or replaced."""
        with self.transaction() as db:
            old = self._one("compositions", "select * from compositions where name = ?", [row["name"]])
            same = old is not None and (old["method"], old["settings"], old["members"]) == (
                row["method"], json.loads(row["settings"]), json.loads(row["members"]))
            if same:
                status = "unchanged"
            elif old and not replace:
                raise RecycleError(f"composition {row['name']!r} already exists; use --replace")
            elif old:
                db["compositions"].update(old["id"], {**row, "state": None})
                status = "replaced"
            else:
                db["compositions"].insert(row)
                status = "added"
        return {**self.composition(row["name"]), "status": status}

    def composition_or_none(self, name: str) -> dict | None:
        return self._one("compositions", "select * from compositions where name = ?", [name])

    def composition(self, name: str) -> dict:
        row = self.composition_or_none(name)
        if row is None:
            raise RecycleError(f"no composition named {name!r}")
        return row

    def compositions(self) -> list[dict]:
        return self._rows("compositions", "select * from compositions order by name")

    def remove_composition(self, name: str) -> dict:
        row = self.composition(name)
        with self.transaction() as db:
            db.execute("delete from compositions where id = ?", [row["id"]])
        return row

    def set_composition_state(self, name: str, key: str, value: dict | None, *, expect_settings: dict) -> dict:
        """Record (or clear) a trained part of a composition (``state[key]``: router
        parameters, a gate). Refused if the composition was replaced meanwhile."""
        with self.transaction() as db:
            row = self.composition(name)
            if row["settings"] != expect_settings:
                raise RecycleError(f"composition {name} was replaced during training; train it again")
            state = dict(row.get("state") or {})
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
            db["compositions"].update(row["id"], {"state": encode_json(state) if state else None})
        return self.composition(name)

    # ---- evaluation --------------------------------------------------------------

    def start_run(self, settings: dict) -> int:
        with self.transaction() as db:
            return db["eval_runs"].insert({"created": now(), "settings": encode_json(settings), "status": "running",
                                           "pid": os.getpid(), "host": os.uname().nodename}).last_pk

    def finish_run(self, run_id: int, status: str, seconds: float) -> None:
        with self.transaction() as db:
            db["eval_runs"].update(run_id, {"status": status, "seconds": seconds})

    @contextmanager
    def recording_run(self, run_id: int, t0: float, failures: list) -> Iterator[None]:
        """Around a run's jobs: how it ended (interrupted; failed on an error or a failed job;
        done) and its seconds since ``t0``."""
        try:
            yield
        except KeyboardInterrupt:
            self.finish_run(run_id, "interrupted", time.time() - t0)
            raise
        except BaseException:
            self.finish_run(run_id, "failed", time.time() - t0)
            raise
        self.finish_run(run_id, "failed" if failures else "done", time.time() - t0)

    def mark_dead_runs(self) -> int:
        """Runs still ``running`` whose process (on this host) is gone become ``died``."""
        host, dead = os.uname().nodename, []
        for r in self._rows("eval_runs", "select id, pid, host from eval_runs where status = 'running'"):
            if r.get("host") == host and r.get("pid") and not _alive(r["pid"]):
                dead.append(r["id"])
        if dead and self.writable():  # a read-only registry keeps showing them as running
            with self.transaction() as db:
                for run_id in dead:
                    db["eval_runs"].update(run_id, {"status": "died"})
        return len(dead)

    def record_result(self, row: dict) -> dict:
        """Store one (label, task) result; JSON columns are encoded here."""
        stored = {k: (encode_json(v) if k in _JSON["eval_results"] and v is not None else v) for k, v in row.items()}
        with self.transaction() as db:
            stored["id"] = db["eval_results"].insert({**stored, "created": now()}).last_pk
        return _decode("eval_results", stored)

    def stored_result(self, key: str) -> dict | None:
        """The newest result with this key (equal keys, equal results)."""
        return self._one("eval_results", "select * from eval_results where key = ? order by id desc limit 1", [key])

    def run_results(self, run_id: int) -> list[dict]:
        return self._rows("eval_results", "select * from eval_results where run_id = ? order by id", [run_id])

    def run(self, run_id: int) -> dict:
        row = self._one("eval_runs", "select * from eval_runs where id = ?", [run_id])
        if row is None:
            raise RecycleError(f"no evaluation run {run_id}")
        return row

    def runs(self) -> list[dict]:
        return self._rows("eval_runs",
                          "select r.id, r.created, r.status, r.seconds, r.settings, count(e.id) as results "
                          "from eval_runs r left join eval_results e on e.run_id = r.id group by r.id order by r.id")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
