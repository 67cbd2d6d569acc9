"""The state schema upgrades in place: an older state keeps every row and gains what the
newer versions record (docs/state.md, "Migrations")."""

import sqlite3

import pytest

from pyvol.errors import PyvolError
from pyvol.state import SCHEMA_VERSION, Store

V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE volumes (name TEXT PRIMARY KEY, backend TEXT NOT NULL, size INTEGER NOT NULL,
    fs TEXT NOT NULL, options TEXT NOT NULL DEFAULT '{}', status TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE snapshots (volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    name TEXT NOT NULL, size INTEGER NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (volume, name));
CREATE TABLE mounts (volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    mount_id TEXT NOT NULL, count INTEGER NOT NULL, first_at TEXT NOT NULL,
    PRIMARY KEY (volume, mount_id));
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO volumes VALUES ('db', 'loop', 1073741824, 'ext4', '{}', 'ready', '2026-11-25T20:00:00Z');
INSERT INTO volumes VALUES ('files', 'nfs', 1073741824, 'nfs', '{"backend": "nfs"}', 'ready',
    '2026-11-25T20:00:00Z');
INSERT INTO mounts VALUES ('files', 'def', 1, '2026-11-25T20:00:00Z');
INSERT INTO snapshots VALUES ('db', 'nightly', 1073741824, 'ready', '2026-11-25T21:00:00Z');
INSERT INTO snapshots VALUES ('db', 'backup-20261125T210000Z-1a2b3c4d', 1073741824, 'ready',
    '2026-11-25T21:00:00Z');
INSERT INTO mounts VALUES ('db', 'abc', 2, '2026-11-25T20:00:00Z');
"""


def v1_store(path) -> Store:
    """A version 1 state at ``path``, opened (and so upgraded) by today's Store."""
    conn = sqlite3.connect(path)
    conn.executescript(V1)
    conn.close()
    store = Store(path)
    store.init()
    return store


def test_a_version_1_state_is_upgraded_keeping_every_row(tmp_path):
    store = v1_store(tmp_path / "state.db")
    assert store.meta("schema_version") == str(SCHEMA_VERSION) == "5"
    # version 3: a directory volume has no fs (it held the backend's name); a block one keeps it
    assert {v.name: (v.fs, v.options) for v in store.volumes()} == {
        "db": ("ext4", {}), "files": (None, {"backend": "nfs"})}
    origins = {s.name: s.origin for s in store.snapshots("db")}
    assert origins == {"nightly": "user", "backup-20261125T210000Z-1a2b3c4d": "backup"}
    # the volumes table is rebuilt for version 3: no row that points at it may be lost
    assert store.mounts("db") == {"abc": 2} and store.mounts("files") == {"def": 1}
    assert list(store.volume_names()) == ["db", "files"]
    store.init()  # a second start changes nothing
    assert {s.name: s.origin for s in store.snapshots("db")} == origins
    with store.tx():  # the rebuilt table still cascades: removing a volume takes its rows
        store.delete_volume("db")
    assert store.snapshots("db") == [] and store.mounts("db") == {}


def test_a_version_2_state_keeps_its_rows_when_the_volumes_table_is_rebuilt(tmp_path):
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1)
    conn.executescript("ALTER TABLE snapshots ADD COLUMN origin TEXT NOT NULL DEFAULT 'user';"
                       "UPDATE meta SET value='2' WHERE key='schema_version';")
    conn.close()
    store = Store(path)
    store.init()
    assert [v.fs for v in store.volumes()] == ["ext4", None]
    assert len(store.snapshots("db")) == 2 and store.mounts("files") == {"def": 1}
    index = sqlite3.connect(path).execute(
        "SELECT name FROM sqlite_master WHERE type='index' AND name='volumes_by_status'")
    assert index.fetchone() is not None


def test_a_version_3_state_gains_the_schedule_tables_and_keeps_its_rows(tmp_path):
    from pyvol.state import Schedule

    path = tmp_path / "state.db"
    old = Store(path)
    old.init()  # today's tables, then taken back to what version 3 had
    conn = sqlite3.connect(path)
    conn.executescript("""
        INSERT INTO volumes VALUES ('db', 'loop', 1073741824, 'ext4', '{}', 'ready',
            '2026-11-25T20:00:00Z');
        INSERT INTO snapshots VALUES ('db', 'nightly', 1073741824, 'ready',
            '2026-11-25T21:00:00Z', 'user');
        DROP TABLE schedules; DROP TABLE scheduled_backups;
        UPDATE meta SET value='3' WHERE key='schema_version';""")
    conn.close()
    store = Store(path)
    store.init()
    assert store.meta("schema_version") == "5"
    assert [s.name for s in store.snapshots("db")] == ["nightly"]
    with store.tx():
        store.put_schedule(Schedule("db", "snapshot", 3600, {"last": 24}, None,
                                    "2026-11-25T22:00:00Z"))
        store.add_scheduled_backup("db", "file:///b#db/20261125T220000Z-1a2b3c4d", "file:///b",
                                   "2026-11-25T22:00:00Z")
    assert store.schedules("db")[0].keep == {"last": 24}
    assert store.due_schedules("2026-11-25T21:59:59Z") == []
    assert [s.volume for s in store.due_schedules("2026-11-25T22:00:00Z")] == ["db"]
    with pytest.raises(sqlite3.IntegrityError):  # a schedule's kind is checked
        store.put_schedule(Schedule("db", "gc", 60, None, None, "2026-11-25T22:00:00Z"))
    with store.tx():  # removing a volume removes its schedules and their records
        store.delete_volume("db")
    assert store.schedules() == [] and store.scheduled_backups("db", "file:///b") == []


def test_a_version_4_state_gains_ran_by_and_cron_and_keeps_its_schedules_outcomes(tmp_path):
    """Version 5 adds the column naming the host that ran a shared volume's last slot and
    the one for cron expressions; a schedule's outcome so far is kept, it has run on no other
    host, and it runs every interval as before."""
    from dataclasses import replace

    from pyvol.state import Schedule

    path = tmp_path / "state.db"
    old = v1_store(path)
    with old.tx():
        old.put_schedule(Schedule("db", "snapshot", 3600, {"last": 24}, None,
                                  "2026-11-25T22:00:00Z", "2026-11-25T21:00:00Z",
                                  "db@sched-20261125T210000Z", None, 0, 7))
    conn = sqlite3.connect(path)  # taken back to what version 4 had
    conn.executescript("ALTER TABLE schedules DROP COLUMN ran_by;"
                       "ALTER TABLE schedules DROP COLUMN cron;"
                       "UPDATE meta SET value='4' WHERE key='schema_version';")
    conn.close()
    store = Store(path)
    store.init()
    assert store.meta("schema_version") == "5"
    # the schedules of shared volumes go into their records once, after this upgrade
    assert store.meta("publish_schedules") == "1"
    [s] = store.schedules("db")
    assert (s.runs, s.last_result, s.ran_by, s.cron) == (7, "db@sched-20261125T210000Z", None,
                                                         None)
    with store.tx():
        store.schedule_ran(replace(s, ran_by="i-0b"))
    assert store.schedule("db", "snapshot").ran_by == "i-0b"
    store.init()  # a second start changes nothing
    assert store.schedule("db", "snapshot").ran_by == "i-0b"


def test_a_newer_state_is_refused(tmp_path):
    store = Store(tmp_path / "state.db")
    store.init()
    assert store.meta("publish_schedules") is None  # a new state has nothing to publish
    store.set_meta("schema_version", "99")
    with pytest.raises(PyvolError, match="newer than this pyvol"):
        Store(tmp_path / "state.db").init()


def test_a_start_killed_right_after_the_upgrade_finds_the_new_version(tmp_path, monkeypatch):
    """The upgrade's steps and the version it reaches are one transaction: a start that
    dies after the upgrade (here: at the schema statements that follow it) leaves a state
    the next start opens, rather than one whose old version number runs the steps again
    (ALTER TABLE ... ADD COLUMN origin a second time fails, and the daemon never starts)."""
    import pyvol.state as state

    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1)
    conn.close()
    monkeypatch.setattr(state, "_SCHEMA", "THIS IS NOT SQL")
    with pytest.raises(sqlite3.OperationalError):
        Store(path).init()
    monkeypatch.undo()
    store = Store(path)
    store.init()
    assert store.meta("schema_version") == str(SCHEMA_VERSION)
    assert {s.name: s.origin for s in store.snapshots("db")}["nightly"] == "user"
    assert store.mounts("db") == {"abc": 2}
