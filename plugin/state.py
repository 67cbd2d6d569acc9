"""pyvol's records: volumes, their snapshots, and who has them mounted.

SQLite in WAL mode, one file under the root dir; docs/state.md is the schema's contract.
Only the lifecycle parts write it, each change under the volume's lock. Each thread of each worker opens its own connection (sqlite
connections must not cross a fork or be shared between threads).
"""

import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .clock import stamp
from .errors import PyvolError

SCHEMA_VERSION = 5
# meta key, set by the upgrade to version 5 until the runner has written the schedules of
# shared volumes into their records
PUBLISH_SCHEDULES = "publish_schedules"

_VOLUMES_V3 = """
CREATE TABLE IF NOT EXISTS volumes (
    name       TEXT PRIMARY KEY,
    backend    TEXT NOT NULL,
    size       INTEGER NOT NULL,
    fs         TEXT,
    options    TEXT NOT NULL DEFAULT '{}',
    status     TEXT NOT NULL CHECK (status IN ('creating', 'ready', 'removing')),
    created_at TEXT NOT NULL
);
"""

# Version 4: schedules (plugin/schedules.py), and the backups they made, which are the only
# backups a schedule's retention may remove.
_SCHEDULES_V4 = """
CREATE TABLE IF NOT EXISTS schedules (
    volume      TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    what        TEXT NOT NULL CHECK (what IN ('snapshot', 'backup')),
    every       INTEGER NOT NULL CHECK (every > 0),
    keep        TEXT,
    target      TEXT,
    next_at     TEXT NOT NULL,
    last_at     TEXT,
    last_result TEXT,
    last_error  TEXT,
    failures    INTEGER NOT NULL DEFAULT 0,
    runs        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (volume, what)
);
CREATE TABLE IF NOT EXISTS scheduled_backups (
    volume     TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    url        TEXT NOT NULL,
    repo       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (volume, url)
);
"""

# Version 5: the schedules table has ran_by, the host that ran a shared volume's last slot
# when another host did, and cron, a schedule's cron expression (every is then its shortest
# gap); a new state gets the columns in the table's CREATE, an older one by ALTER TABLE.
_RAN_BY_V5 = "    ran_by      TEXT"
_CRON_V5 = "    cron        TEXT"
_RUNS = "    runs        INTEGER NOT NULL DEFAULT 0,\n"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
""" + _VOLUMES_V3 + """
CREATE TABLE IF NOT EXISTS snapshots (
    volume     TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('creating', 'ready', 'removing')),
    created_at TEXT NOT NULL,
    origin     TEXT NOT NULL DEFAULT 'user',
    PRIMARY KEY (volume, name)
);
CREATE TABLE IF NOT EXISTS mounts (
    volume     TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    mount_id   TEXT NOT NULL,
    count      INTEGER NOT NULL CHECK (count > 0),
    first_at   TEXT NOT NULL,
    PRIMARY KEY (volume, mount_id)
);
-- Docker's List: the names of ready volumes, from the index alone
CREATE INDEX IF NOT EXISTS volumes_by_status ON volumes(status, name);
""" + _SCHEDULES_V4.replace(_RUNS, _RUNS + _RAN_BY_V5 + ",\n" + _CRON_V5 + ",\n")


def now() -> str:
    return stamp()


@dataclass
class Volume:
    name: str
    backend: str
    size: int
    fs: str | None  # the filesystem a block volume holds; None for a directory volume
    status: str
    created_at: str
    options: dict = field(default_factory=dict)


# Who took a snapshot, and so who may remove it: pyvol removes only snapshots it took itself
# ('backup': a backup's own snapshot; 'schedule': a snapshot schedule's, which its retention
# removes); a user's ('user') is removed only when a user says so.
ORIGINS = ("user", "backup", "schedule")


@dataclass
class Snapshot:
    volume: str
    name: str
    size: int
    status: str
    created_at: str
    origin: str = "user"


@dataclass
class Schedule:
    """A volume's schedule of one kind of work; times are RFC 3339 UTC (docs/state.md)."""

    volume: str
    what: str                  # 'snapshot' or 'backup'
    every: int                 # seconds
    keep: dict | None          # a retention policy (backup/retention.py Policy.as_dict)
    target: str | None         # a backup's repository URL
    next_at: str
    last_at: str | None = None
    last_result: str | None = None
    last_error: str | None = None
    failures: int = 0
    runs: int = 0
    ran_by: str | None = None  # the host that ran the last slot of a shared volume, not this
    cron: str | None = None    # runs at a cron expression's times (UTC) rather than every


_SCHEDULE_COLUMNS = ("volume, what, every, keep, target, next_at, last_at, last_result, "
                     "last_error, failures, runs, ran_by, cron")


def _schedule(row: tuple) -> Schedule:
    volume, what, every, keep, *rest = row
    return Schedule(volume, what, every, None if keep is None else json.loads(keep), *rest)


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self._names: tuple | None = None  # volume_names' last answer, with what it came from

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a mount record must survive a crash
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def init(self) -> None:
        """Create or check the schema; refuse a newer one rather than misread it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        found = None
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
            found = self.meta("schema_version")
        if found is not None and int(found) > SCHEMA_VERSION:
            raise PyvolError(
                f"state {self.path} has schema version {found}, newer than this pyvol "
                f"understands ({SCHEMA_VERSION}): upgrade pyvol"
            )
        if found is not None and int(found) < SCHEMA_VERSION:
            self._migrate(int(found))
        conn.executescript(_SCHEMA)
        self.set_meta("schema_version", str(SCHEMA_VERSION))

    def _migrate(self, found: int) -> None:
        """Bring an older state up to SCHEMA_VERSION, one version at a time (docs/state.md).

        Version 3 rebuilds the volumes table (SQLite cannot drop a NOT NULL), so foreign
        keys are off for the rebuild: with them on, dropping the old table would cascade
        into every snapshot and mount row. They are checked before the commit."""
        conn = self._conn()
        conn.execute("PRAGMA foreign_keys=OFF")  # no effect inside a transaction: set first
        try:
            with self.tx():
                if found < 2:
                    # Before version 2 a backup's own snapshots were told apart by their name.
                    conn.execute(
                        "ALTER TABLE snapshots ADD COLUMN origin TEXT NOT NULL DEFAULT 'user'")
                    conn.execute(
                        "UPDATE snapshots SET origin='backup' WHERE substr(name, 1, 7)='backup-'")
                if found < 3:
                    # Before version 3 a directory volume's fs held its backend's name ("nfs").
                    conn.execute(_VOLUMES_V3.replace("volumes (", "volumes_v3 (", 1))
                    conn.execute(
                        "INSERT INTO volumes_v3(name, backend, size, fs, options, status, "
                        "created_at) SELECT name, backend, size, "
                        "CASE WHEN fs IN ('ext4', 'xfs') THEN fs END, options, status, "
                        "created_at FROM volumes")
                    conn.execute("DROP TABLE volumes")
                    conn.execute("ALTER TABLE volumes_v3 RENAME TO volumes")
                if found < 4:
                    # Version 4 adds tables and changes no row: schedules, scheduled_backups.
                    for statement in _SCHEDULES_V4.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                if found < 5:
                    # the rows of shared volumes go into their records, once (scheduler.py)
                    self.set_meta(PUBLISH_SCHEDULES, "1")
                    conn.execute("ALTER TABLE schedules ADD COLUMN" + _RAN_BY_V5)
                    conn.execute("ALTER TABLE schedules ADD COLUMN" + _CRON_V5)
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise PyvolError(f"state {self.path}: the upgrade to schema version "
                                     f"{SCHEMA_VERSION} found {len(broken)} rows whose volume "
                                     f"is missing; left at version {found}")
                # in the same transaction: a daemon killed after the commit must not find
                # the old version and run the steps again on tables they have changed
                self.set_meta("schema_version", str(SCHEMA_VERSION))
        finally:
            conn.execute("PRAGMA foreign_keys=ON")

    def tx(self):
        """An immediate transaction: the write lock is taken at BEGIN, so no upgrade deadlock."""
        return _Tx(self._conn())

    # meta
    def meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row["value"] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._conn().execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def delete_meta(self, key: str) -> None:
        self._conn().execute("DELETE FROM meta WHERE key=?", (key,))

    def meta_keys(self, prefix: str) -> list[str]:
        rows = self._conn().execute("SELECT key FROM meta WHERE substr(key, 1, ?) = ?",
                                    (len(prefix), prefix))
        return [r["key"] for r in rows]

    # volumes
    def add_volume(self, v: Volume) -> None:
        self._conn().execute(
            "INSERT INTO volumes(name, backend, size, fs, options, status, created_at) "
            "VALUES(?, ?, ?, ?, ?, ?, ?)",
            (v.name, v.backend, v.size, v.fs, json.dumps(v.options), v.status, v.created_at))

    def set_volume_status(self, name: str, status: str) -> None:
        self._conn().execute("UPDATE volumes SET status=? WHERE name=?", (status, name))

    def set_volume_size(self, name: str, size: int) -> None:
        self._conn().execute("UPDATE volumes SET size=? WHERE name=?", (size, name))

    def delete_volume(self, name: str) -> None:
        self._conn().execute("DELETE FROM volumes WHERE name=?", (name,))

    def _tuples(self, sql: str, args=()) -> list[tuple]:
        """Rows as plain tuples: for queries of many rows, where sqlite3.Row costs more
        than the query."""
        cur = self._conn().cursor()
        cur.row_factory = None
        return cur.execute(sql, args).fetchall()

    def volume(self, name: str) -> Volume | None:
        rows = self._tuples(f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE name=?", (name,))
        return _volume(rows[0]) if rows else None

    def volumes(self, status: str | None = None) -> list[Volume]:
        if status:
            rows = self._tuples(
                f"SELECT {_VOLUME_COLUMNS} FROM volumes WHERE status=? ORDER BY name", (status,))
        else:
            rows = self._tuples(f"SELECT {_VOLUME_COLUMNS} FROM volumes ORDER BY name")
        return [_volume(r) for r in rows]

    def volume_names(self, status: str | None = None) -> tuple[str, ...]:
        """The names ``volumes`` would give, in the same order, without building each one:
        one row of names joined by SQLite (a row per name costs several times more), split
        and sorted here (names are ASCII, so Python's order is SQLite's BINARY order). While
        that row is what it was, the answer is the last one, shared by every caller: a tuple,
        so that no caller can change what the next one is given."""
        sql = "SELECT group_concat(name, '/') FROM volumes"  # no name holds a '/'
        rows = self._tuples(sql + " WHERE status=?", (status,)) if status else self._tuples(sql)
        key = (status, rows[0][0] or "")
        last = self._names
        if last is not None and last[0] == key:
            return last[1]
        names = tuple(sorted(key[1].split("/"))) if key[1] else ()
        self._names = (key, names)
        return names

    # snapshots
    def add_snapshot(self, s: Snapshot) -> None:
        self._conn().execute(
            "INSERT INTO snapshots(volume, name, size, status, created_at, origin) "
            "VALUES(?, ?, ?, ?, ?, ?)",
            (s.volume, s.name, s.size, s.status, s.created_at, s.origin))

    def set_snapshot_status(self, volume: str, name: str, status: str) -> None:
        self._conn().execute(
            "UPDATE snapshots SET status=? WHERE volume=? AND name=?", (status, volume, name))

    def delete_snapshot(self, volume: str, name: str) -> None:
        self._conn().execute("DELETE FROM snapshots WHERE volume=? AND name=?", (volume, name))

    def snapshot(self, volume: str, name: str) -> Snapshot | None:
        row = self._conn().execute(
            "SELECT * FROM snapshots WHERE volume=? AND name=?", (volume, name)).fetchone()
        return Snapshot(**dict(row)) if row else None

    def snapshot_counts(self, status: str) -> dict[str, int]:
        """How many snapshots of ``status`` each volume has, in one query (volumes with none
        are left out)."""
        rows = self._tuples("SELECT volume, COUNT(*) FROM snapshots WHERE status=? "
                            "GROUP BY volume", (status,))
        return dict(rows)

    def snapshot_count(self, volume: str, status: str) -> int:
        return self._tuples("SELECT COUNT(*) FROM snapshots WHERE volume=? AND status=?",
                            (volume, status))[0][0]

    def snapshots(self, volume: str | None = None, status: str | None = None) -> list[Snapshot]:
        sql, args = "SELECT * FROM snapshots WHERE 1=1", []
        if volume is not None:
            sql += " AND volume=?"
            args.append(volume)
        if status is not None:
            sql += " AND status=?"
            args.append(status)
        rows = self._conn().execute(sql + " ORDER BY volume, rowid", args)  # creation order
        return [Snapshot(**dict(r)) for r in rows]

    # mounts: a count per (volume, mount id); the filesystem is mounted while any row exists
    def add_mount(self, volume: str, mount_id: str) -> None:
        self._conn().execute(
            "INSERT INTO mounts(volume, mount_id, count, first_at) VALUES(?, ?, 1, ?) "
            "ON CONFLICT(volume, mount_id) DO UPDATE SET count = count + 1",
            (volume, mount_id, now()))

    def drop_mount(self, volume: str, mount_id: str, every: bool = False) -> bool:
        """Take one count off (all of them with ``every``); False when the id was unknown
        (a leaked or repeated Unmount)."""
        conn = self._conn()
        row = conn.execute("SELECT count FROM mounts WHERE volume=? AND mount_id=?",
                           (volume, mount_id)).fetchone()
        if row is None:
            return False
        if row["count"] > 1 and not every:
            conn.execute("UPDATE mounts SET count = count - 1 WHERE volume=? AND mount_id=?",
                         (volume, mount_id))
        else:
            conn.execute("DELETE FROM mounts WHERE volume=? AND mount_id=?", (volume, mount_id))
        return True

    def mounts(self, volume: str | None = None) -> dict[str, int]:
        if volume is None:
            rows = self._conn().execute("SELECT volume, SUM(count) AS n FROM mounts GROUP BY volume")
            return {r["volume"]: r["n"] for r in rows}
        rows = self._conn().execute("SELECT mount_id, count FROM mounts WHERE volume=?", (volume,))
        return {r["mount_id"]: r["count"] for r in rows}

    def mount_records(self, volume: str) -> list[dict]:
        """Each mount ID of ``volume`` in full, with its count and since when, oldest first:
        what an operator needs to find a count that Docker will never release."""
        rows = self._tuples(
            "SELECT mount_id, count, first_at FROM mounts WHERE volume=? ORDER BY first_at, "
            "mount_id", (volume,))
        return [{"ID": i, "Count": n, "Since": since} for i, n, since in rows]

    def all_mount_records(self) -> dict[str, list[dict]]:
        """``mount_records`` of every volume that has any, in one query."""
        out: dict[str, list[dict]] = {}
        for volume, i, n, since in self._tuples(
                "SELECT volume, mount_id, count, first_at FROM mounts ORDER BY volume, "
                "first_at, mount_id"):
            out.setdefault(volume, []).append({"ID": i, "Count": n, "Since": since})
        return out

    def clear_mounts(self, volume: str | None = None) -> None:
        if volume is None:
            self._conn().execute("DELETE FROM mounts")
        else:
            self._conn().execute("DELETE FROM mounts WHERE volume=?", (volume,))


    # schedules: what the runner does for each volume (plugin/schedules.py)
    def put_schedule(self, s: Schedule) -> None:
        """Add or replace a volume's schedule of one kind; its outcome so far is kept when
        only its settings change."""
        self._conn().execute(
            f"INSERT INTO schedules({_SCHEDULE_COLUMNS}) VALUES({', '.join('?' * 13)}) "
            "ON CONFLICT(volume, what) DO UPDATE SET every=excluded.every, "
            "keep=excluded.keep, target=excluded.target, next_at=excluded.next_at, "
            "cron=excluded.cron",
            (s.volume, s.what, s.every, None if s.keep is None else json.dumps(s.keep),
             s.target, s.next_at, s.last_at, s.last_result, s.last_error, s.failures, s.runs,
             s.ran_by, s.cron))

    def schedules(self, volume: str | None = None) -> list[Schedule]:
        sql = f"SELECT {_SCHEDULE_COLUMNS} FROM schedules"
        rows = (self._tuples(sql + " WHERE volume=? ORDER BY what DESC", (volume,))
                if volume is not None else self._tuples(sql + " ORDER BY volume, what DESC"))
        return [_schedule(r) for r in rows]

    def schedule(self, volume: str, what: str) -> Schedule | None:
        rows = self._tuples(f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE volume=? AND "
                            "what=?", (volume, what))
        return _schedule(rows[0]) if rows else None

    def due_schedules(self, at: str) -> list[Schedule]:
        """Schedules whose next run is at ``at`` or before, the most overdue first."""
        rows = self._tuples(f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE next_at <= ? "
                            "ORDER BY next_at, volume, what", (at,))
        return [_schedule(r) for r in rows]

    def delete_schedules(self, volume: str, what: str | None = None) -> int:
        if what is None:
            cur = self._conn().execute("DELETE FROM schedules WHERE volume=?", (volume,))
        else:
            cur = self._conn().execute("DELETE FROM schedules WHERE volume=? AND what=?",
                                       (volume, what))
        return cur.rowcount

    def schedule_ran(self, s: Schedule) -> None:
        """Record a run's outcome and the next run; a schedule removed or replaced meanwhile
        (its settings changed) is left as it now is."""
        self._conn().execute(
            "UPDATE schedules SET next_at=?, last_at=?, last_result=?, last_error=?, "
            "failures=?, runs=?, ran_by=? WHERE volume=? AND what=? AND every=? AND keep IS ? "
            "AND target IS ? AND cron IS ?",
            (s.next_at, s.last_at, s.last_result, s.last_error, s.failures, s.runs, s.ran_by,
             s.volume,
             s.what, s.every, None if s.keep is None else json.dumps(s.keep), s.target,
             s.cron))

    def add_scheduled_backup(self, volume: str, url: str, repo: str, created_at: str) -> None:
        self._conn().execute(
            "INSERT OR REPLACE INTO scheduled_backups(volume, url, repo, created_at) "
            "VALUES(?, ?, ?, ?)", (volume, url, repo, created_at))

    def scheduled_backups(self, volume: str, repo: str) -> list[tuple[str, str]]:
        """(url, created_at) of the backups of ``volume`` a schedule made into ``repo``."""
        return self._tuples("SELECT url, created_at FROM scheduled_backups WHERE volume=? AND "
                            "repo=? ORDER BY created_at, url", (volume, repo))

    def delete_scheduled_backup(self, volume: str, url: str) -> None:
        self._conn().execute("DELETE FROM scheduled_backups WHERE volume=? AND url=?",
                             (volume, url))


class _Tx:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, *_):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


_VOLUME_COLUMNS = "name, backend, size, fs, status, created_at, options"  # Volume's order


def _volume(row: tuple) -> Volume:
    *fields, options = row
    return Volume(*fields, {} if options == "{}" else json.loads(options))
