"""Schedules run by the daemon (issue 16): snapshots and backups every interval, one runner per
host however many workers, a missed run done once after a restart, retention that removes only
what the schedule made, and a failing schedule shown and logged once.

Real daemons on loop volumes; intervals of a second so that several periods pass in seconds.
"""

import json
import os
import signal
import sqlite3
import time

import pytest

from helpers import Daemon
from pyvol import clock

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRETzz"


def wait_for(check, timeout: float, what: str):
    """Poll ``check`` until it gives something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.2)


def schedules(d: Daemon, volume: str) -> dict:
    r = d.api.raw(f"/pyvol/v1/schedules?volume={volume}", method="GET")
    assert r.status_code == 200, r.text
    return {s["what"]: s for s in r.json()}


def snaps(d: Daemon, volume: str, origin: str | None = None) -> list[str]:
    r = d.api.raw(f"/pyvol/v1/snapshots?volume={volume}", method="GET").json()
    return [s["Name"] for s in r if origin is None or s["Origin"] == origin]


def put(d: Daemon, volume: str, opts) -> tuple[int, dict]:
    r = d.api.http.put(f"/pyvol/v1/volumes/{volume}/schedules", json={"Opts": opts})
    return r.status_code, r.json()


def state(d: Daemon) -> sqlite3.Connection:
    return sqlite3.connect(d.root / "state.db", timeout=30, isolation_level=None)


def test_snapshot_schedule_keeps_its_newest_and_never_a_users_or_a_needed_base(daemon):
    d = daemon
    # bad schedules are refused at create with what is accepted, and nothing is made
    bad = {"snapshot-every": "1x"}, {"snapshot-every": "0s"}, {"snapshot-keep": "3"}, \
        {"snapshot-every": "1h", "snapshot-keep": "daily=x"}, {"backup-every": "1h"}, \
        {"backup-every": "1h", "backup-to": "s3://key:secret@bucket/p"}
    for opts in bad:
        err = d.api.err("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "64M", **opts}})
        assert "accepted" in err or "needs" in err, err
        assert "secret" not in err
    assert d.api.raw("/pyvol/v1/volumes", method="GET").json() == []

    d.api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {
        "size": "64M", "snapshot-every": "1s", "snapshot-keep": "3"}})
    d.cli("snapshot", "create", "v", "--name", "mine")
    first = wait_for(lambda: snaps(d, "v", "schedule"), 10, "a first scheduled snapshot")[0]
    # the first one is now a backup's incremental base (the note a backup leaves, as
    # docs/state.md says): kept whatever the policy, until the note goes
    with state(d) as db:
        db.execute("INSERT INTO meta VALUES (?, 'file:///elsewhere')", (f"backup-base:v@{first}",))
    seen = []

    def trimmed():
        s, names = schedules(d, "v")["snapshot"], snaps(d, "v", "schedule")
        seen.append(len(names))
        return s["runs"] >= 6 and len(names) == 4 and names

    names = wait_for(trimmed, 20, "six runs and the policy applied")
    assert first in names and "mine" in snaps(d, "v", "user")
    assert max(seen[3:] or [0]) <= 5, seen  # never more than keep + base + one in flight
    status = d.api.ok("/VolumeDriver.Get", {"Name": "v"})["Volume"]["Status"]
    [shown] = status["schedules"]
    assert shown["what"] == "snapshot" and shown["every"] == "1s" and shown["keep"] == "3"
    assert shown["result"].startswith("v@sched-") and shown["error"] is None
    out = d.cli("schedule", "ls").stdout
    assert "snapshot" in out and "v@sched-" in out and "1s" in out

    with state(d) as db:  # no backup needs it any more: the next run's retention takes it
        db.execute("DELETE FROM meta WHERE key=?", (f"backup-base:v@{first}",))
    wait_for(lambda: first not in snaps(d, "v"), 10, "the former base removed")
    assert "mine" in snaps(d, "v")

    code, body = put(d, "v", {"snapshot-keep": "weekly=x"})
    assert code == 400 and "snapshot-keep" in body["Err"] and "accepted" in body["Err"]
    assert d.cli("schedule", "rm", "v").stdout.strip() == "removed 1 schedule(s) of v"
    d.cli("rm", "v")
    assert d.api.raw("/pyvol/v1/schedules", method="GET").json() == []


def test_several_workers_run_each_slot_once_and_a_dead_runner_is_replaced(workdir):
    d = Daemon(workdir / "root", workdir / "pyvol.sock", env={"PYVOL_WORKERS": "3"}).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "64M"}})
        code, _ = put(d, "v", {"snapshot-every": "1s"})
        assert code == 200
        errors = []

        def runs() -> int:  # a second runner would collide with the first: an error shows
            s = schedules(d, "v")["snapshot"]
            errors.extend([s["error"]] if s["error"] or s["failures"] else [])
            return s["runs"]

        wait_for(lambda: runs() >= 3, 15, "three runs")
        lock = d.root / "scheduler.lock"
        holder = int(lock.read_text())
        assert holder != d.proc.pid  # a worker, not the master
        os.kill(holder, signal.SIGKILL)
        wait_for(lambda: lock.read_text().strip() not in ("", str(holder)), 15,
                 "another worker taking the runner's lock")
        before = runs()
        wait_for(lambda: runs() >= before + 3, 15, "three more runs by the new runner")
        code, _ = put(d, "v", {"snapshot-every": "1h"})  # no more runs for now
        assert code == 200
        time.sleep(1.5)  # a run already started ends
        made, counted = len(snaps(d, "v", "schedule")), runs()
        # each run counted once, one snapshot each; a run under way when the interval changed
        # (and the one the killed worker was in) made a snapshot but is not counted
        assert errors == [] and counted >= 6 and 0 <= made - counted <= 2, (made, counted)
    finally:
        d.stop()


def test_a_schedule_missed_while_the_daemon_was_down_runs_once_at_start(workdir):
    d = Daemon(workdir / "root", workdir / "pyvol.sock").start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {
            "size": "64M", "snapshot-every": "1h"}})
        d.stop()
        with state(d) as db:  # down for five periods and more
            db.execute("UPDATE schedules SET next_at=?", (clock.stamp(time.time() - 5 * 3600 - 60),))
        d.start()
        s = wait_for(lambda: (x := schedules(d, "v")["snapshot"])["runs"] >= 1 and x, 15,
                     "the missed run")
        time.sleep(3)  # six looks of the runner: a run per missed slot would show by now
        s = schedules(d, "v")["snapshot"]
        assert s["runs"] == 1 and len(snaps(d, "v", "schedule")) == 1
        assert time.time() < clock.parse(s["next"]) <= time.time() + 3600
    finally:
        d.stop()


@pytest.mark.slow
def test_a_daemon_down_for_several_real_periods_runs_the_missed_slot_once(workdir):
    """The same as the test above without touching the records: 4 s slots, 14 s down."""
    d = Daemon(workdir / "root", workdir / "pyvol.sock").start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {
            "size": "64M", "snapshot-every": "4s"}})
        wait_for(lambda: schedules(d, "v")["snapshot"]["runs"] >= 1, 15, "a first run")
        d.stop()
        before = len(snaps_in(d))
        time.sleep(14)
        started = time.time()
        d.start()
        s = wait_for(lambda: (x := schedules(d, "v")["snapshot"])["runs"] >= 2 and x, 15,
                     "the missed run")
        next_slot = clock.parse(s["next"])
        wait_for(lambda: time.time() > next_slot + 2, 10, "the next slot passing")
        after = [t for t in snaps_in(d)[before:] if t < next_slot]
        assert len(after) == 1 and after[0] >= started - 1, after
    finally:
        d.stop()


def snaps_in(d: Daemon) -> list[float]:
    with state(d) as db:
        return [clock.parse(t) for (t,) in db.execute(
            "SELECT created_at FROM snapshots WHERE origin='schedule' ORDER BY created_at")]


def test_a_failing_backup_destination_shows_is_logged_once_and_retention_spares_others(
        workdir):
    env = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "us-east-1",
           "PYVOL_BACKUP_MAX_ATTEMPTS": "1", "PYVOL_BACKUP_CONNECT_TIMEOUT": "1"}
    d = Daemon(workdir / "root", workdir / "pyvol.sock", env=env).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {
            "size": "64M", "backup-every": "1s", "backup-to": "s3://bucket/p",
            "backup-keep": "last=2"}})
        s = wait_for(lambda: (x := schedules(d, "v")["backup"])["failures"] >= 2 and x, 30,
                     "two failed runs")
        assert s["error"] and s["result"] is None and s["runs"] == 0
        status = d.api.ok("/VolumeDriver.Get", {"Name": "v"})["Volume"]["Status"]
        assert status["schedules"][0]["failures"] >= 2 and status["schedules"][0]["error"]
        ls = d.cli("schedule", "ls", "v").stdout
        assert "s3://bucket/p" in ls and s["error"].split()[0] in ls
        log = d.log_path.read_text()
        assert log.count("scheduled backup of v failed") == 1, log[-3000:]
        for shown in (ls, json.dumps(status), log):
            assert SECRET not in shown

        # the destination fixed: a repository with a user's own backup of the volume too
        repo = f"file://{workdir}/repo"
        d.cli("backup", "init", repo)
        mine = d.cli("backup", "create", "v", "--dest", repo).stdout.strip()
        code, body = put(d, "v", {"backup-to": repo})
        assert code == 200, body
        wait_for(lambda: schedules(d, "v")["backup"]["runs"] >= 3, 40, "three scheduled backups")
        s = schedules(d, "v")["backup"]
        assert s["failures"] == 0 and s["error"] is None and s["result"].startswith(repo)
        d.cli("schedule", "rm", "v", "--what", "backup")

        def settled():  # a run in flight when the schedule went still ends with its trim
            listed = [b["url"] for b in json.loads(
                d.cli("backup", "ls", repo, "--volume", "v", "--json").stdout)]
            with state(d) as db:
                made = [u for (u,) in db.execute("SELECT url FROM scheduled_backups")]
            return sorted(listed) == sorted([mine, *made]) and len(made) == 2

        wait_for(settled, 15, "the user's backup and the schedule's newest two, no other")
        assert d.log_path.read_text().count("schedule works again") == 1
    finally:
        d.stop()


def test_runs_are_spread_by_volume_and_fall_on_each_ones_grid():
    from pyvol.schedules import format_interval, next_after, parse_interval, parse_keep, phase

    phases = [phase(f"vol{i}", "snapshot", 3600) for i in range(100)]
    assert all(0 <= p < 900 for p in phases)  # within a quarter of the interval
    assert len(set(phases)) > 90  # a hundred volumes, (nearly) a hundred different seconds
    assert phase("vol1", "snapshot", 3600) == phases[1]  # the same on every host and start
    t = 1_800_000_000.0
    n = next_after(t, "db", "backup", 86400)
    assert t < n <= t + 86400 and next_after(n, "db", "backup", 86400) == n + 86400
    # however long the daemon was down, the next slot is one, in the future
    assert t < next_after(t, "db", "snapshot", 60) <= t + 60
    assert parse_interval("1h30m", "x") == 5400 and format_interval(5400) == "1h30m"
    assert parse_keep("24", "x") == {"last": 24}
    assert parse_keep("daily=7, weekly=4,within-daily=2d", "x") == {
        "daily": 7, "weekly": 4, "within_daily": "2d"}
