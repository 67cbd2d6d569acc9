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

from helpers import Daemon, until
from helpers import put_schedules as put
from pyvol import clock

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRETzz"


def wait_for(check, timeout: float, what: str):
    """Poll ``check`` until it gives something true; fail naming ``what`` after ``timeout``."""
    return until(what, check, timeout, every=0.2)


def schedules(d: Daemon, volume: str) -> dict:
    return {s["what"]: s for s in d.get(f"/schedules?volume={volume}")}


def snaps(d: Daemon, volume: str, origin: str | None = None) -> list[str]:
    return [s["Name"] for s in d.get(f"/snapshots?volume={volume}")
            if origin is None or s["Origin"] == origin]


def state(d: Daemon) -> sqlite3.Connection:
    return sqlite3.connect(d.root / "state.db", timeout=30, isolation_level=None)


def test_snapshot_schedule_keeps_its_newest_and_never_a_users_or_one_being_read(daemon):
    d = daemon
    # bad schedules are refused at create with what is accepted, and nothing is made; a
    # destination that every run would fail on is refused here, not at every slot
    bad = {"snapshot-every": "1x"}, {"snapshot-every": "0s"}, {"snapshot-keep": "3"}, \
        {"snapshot-every": "1h", "snapshot-keep": "daily=x"}, {"backup-every": "1h"}, \
        {"snapshot-every": "1h"}, \
        {"backup-every": "1h", "backup-to": "file:///r"}, \
        {"backup-every": "1h", "backup-keep": "3", "backup-to": "s3://key:secret@bucket/p"}, \
        {"backup-every": "1h", "backup-keep": "3", "backup-to": "s3://b/p?X-Amz-Credential=secret"}, \
        {"backup-every": "1h", "backup-keep": "3", "backup-to": "s3://"}, \
        {"backup-every": "1h", "backup-keep": "3", "backup-to": "file://host/p"}, \
        {"backup-every": "1h", "backup-keep": "3", "backup-to": "ebs://garbage"}, \
        {"backup-every": "1h", "backup-keep": "3", "backup-to": "ebs://us-east-1"}  # loop
    for opts in bad:
        err = d.api.err("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "64M", **opts}})
        assert "accepted" in err or "needs" in err, (opts, err)
        assert "secret" not in err, err
    code, body = put(d, "nosuch", {"snapshot-every": "1h", "snapshot-keep": "3"})
    assert code == 404, body
    err = d.api.err("/VolumeDriver.Create", {"Name": "v", "Opts": {
        "size": "64M", "snapshot-every": "1h"}})
    assert "needs snapshot-keep" in err
    assert d.api.raw("/pyvol/v1/volumes", method="GET").json() == []

    d.api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {
        "size": "64M", "snapshot-every": "1s", "snapshot-keep": "3"}})
    # the schedules table is their record; the volume's options never hold a copy
    with state(d) as db:
        [(options,)] = db.execute("SELECT options FROM volumes WHERE name='v'")
    assert "snapshot" not in options, options
    d.cli("snapshot", "create", "v", "--name", "mine")
    # a schedule's names are its own: on shared storage its retention knows them by name
    r = d.cli("snapshot", "create", "v", "--name", "sched-20261127T090000Z", check=False)
    assert r.returncode == 1 and "are the snapshot schedules' own" in r.stderr, r.stderr
    first = wait_for(lambda: snaps(d, "v", "schedule"), 10, "a first scheduled snapshot")[0]
    # a backup reading the first one (its readers lock, as `backup create v@sched-...` holds
    # it): kept whatever the policy, until the backup ends
    import fcntl

    reader = os.open(d.root / "locks" / f"snap.v@{first}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(reader, fcntl.LOCK_SH)
    seen = []

    def trimmed():
        s, names = schedules(d, "v")["snapshot"], snaps(d, "v", "schedule")
        seen.append(len(names))
        return s["runs"] >= 6 and len(names) == 4 and names

    try:
        names = wait_for(trimmed, 20, "six runs and the policy applied")
        assert first in names and "mine" in snaps(d, "v", "user")
        assert max(seen[3:] or [0]) <= 5, seen  # never more than keep + read + one in flight
    finally:
        os.close(reader)  # the backup ends: the next run's retention takes it
    status = d.api.ok("/VolumeDriver.Get", {"Name": "v"})["Volume"]["Status"]
    [shown] = status["schedules"]
    assert shown["what"] == "snapshot" and shown["every"] == "1s" and shown["keep"] == "3"
    assert shown["result"].startswith("v@sched-") and shown["error"] is None
    out = d.cli("schedule", "ls").stdout
    assert "snapshot" in out and "v@sched-" in out and "1s" in out

    wait_for(lambda: first not in snaps(d, "v"), 10, "the snapshot no longer read removed")
    assert "mine" in snaps(d, "v")

    code, body = put(d, "v", {"snapshot-keep": "weekly=x"})
    assert code == 400 and "snapshot-keep" in body["Err"] and "accepted" in body["Err"]
    code, body = put(d, "v", {"backup-every": "1h", "backup-keep": "2",
                              "backup-to": f"s3://b/p?sig={SECRET}"})
    assert code == 400 and SECRET not in body["Err"] and "s3://b/p" in body["Err"], body
    assert d.cli("schedule", "rm", "v").stdout.strip() == "removed 1 schedule(s) of v"
    d.cli("rm", "v")
    assert d.api.raw("/pyvol/v1/schedules", method="GET").json() == []


def test_several_workers_run_each_slot_once_and_a_dead_runner_is_replaced(workdir):
    d = Daemon(workdir / "root", workdir / "pyvol.sock", env={"PYVOL_WORKERS": "3"}).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "64M"}})
        code, _ = put(d, "v", {"snapshot-every": "1s", "snapshot-keep": "100"})
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
            "size": "64M", "snapshot-every": "1h", "snapshot-keep": "3"}})
        began = time.monotonic()
        d.stop()  # no run in flight: the runner's worker exits at once, as the others do
        assert time.monotonic() - began < 5
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
            "size": "64M", "snapshot-every": "4s", "snapshot-keep": "10"}})
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


# The runner alone, on a real state database, with the snapshot and backup parts faked: what it
# starts, when, and with which settings.

class FakeSnapshots:
    def __init__(self):
        self.taken = []

    def create(self, volume, snap=None, origin="user", prefix=""):
        self.taken.append(volume)
        return {"Ref": f"{volume}@{prefix}{len(self.taken)}"}


class FakeBackups:
    """Backups that run until ``release`` is set, or until their job is cancelled."""

    def __init__(self, store, listed=()):
        import threading

        self.store, self.listed = store, list(listed)
        self.release = threading.Event()
        self.started, self.pending_seen, self.removed = [], [], []

    def create(self, volume, target, job, bid=None, schedule_of=None, lock_wait=0.0):
        from pyvol.backup.job import Cancelled

        self.started.append(volume)
        self.pending_seen.append([u for u, _ in self.store.scheduled_backups(volume, target)])
        while not self.release.wait(0.05):
            if job.cancelled:
                raise Cancelled("cancelled")
        return {"url": f"{target}#k/{bid}", "created": clock.stamp()}

    def list(self, target, volume, passing_over_bad=False):
        return self.listed

    def remove(self, url):
        self.removed.append(url)


@pytest.fixture
def runner_rig(tmp_path):
    from types import SimpleNamespace

    from pyvol.scheduler import Runner
    from pyvol.state import Store, Volume

    store = Store(tmp_path / "state.db")
    store.init()
    for name in ("a", "b", "c", "d"):
        store.add_volume(Volume(name, "loop", 1 << 26, "ext4", "ready", clock.stamp()))
    host = SimpleNamespace(store=store, config=SimpleNamespace(root=tmp_path, schedule_sync=30),
                           backends={}, shared_backends=lambda: [])
    snapshots, backups = FakeSnapshots(), FakeBackups(store)
    r = Runner(host, snapshots, backups)
    yield SimpleNamespace(store=store, runner=r, snapshots=snapshots, backups=backups)
    backups.release.set()
    r.stop(5)


def put_row(store, volume, what, every=3600, keep=None, target=None, at=None):
    from pyvol.state import Schedule

    with store.tx():
        store.put_schedule(Schedule(volume, what, every, keep or {"last": 5}, target,
                                    at or clock.stamp(time.time() - 1)))
    return store.schedule(volume, what)


def test_a_run_reads_its_schedule_again_and_skips_one_removed_or_made_again(runner_rig):
    rig = runner_rig
    s = put_row(rig.store, "a", "snapshot")
    with rig.store.tx():
        rig.store.delete_schedules("a")
    rig.runner.run_once(s)  # queued before `schedule rm`: nothing taken
    assert rig.snapshots.taken == []

    # the volume removed and made again with the same schedule: the old run is not its run
    from pyvol.state import Volume

    with rig.store.tx():
        rig.store.delete_volume("a")
        rig.store.add_volume(Volume("a", "loop", 1 << 26, "ext4", "ready", clock.stamp()))
    fresh = put_row(rig.store, "a", "snapshot", at=clock.stamp(time.time() + 600))
    rig.runner.run_once(s)
    assert rig.snapshots.taken == []
    changed = put_row(rig.store, "a", "snapshot", keep={"last": 9}, at=fresh.next_at)
    rig.runner.run_once(fresh)  # its keep changed meanwhile: not run with the old one
    assert rig.snapshots.taken == []
    rig.runner.run_once(changed)
    assert rig.snapshots.taken == ["a"] and rig.store.schedule("a", "snapshot").runs == 1


def test_long_backups_never_hold_up_snapshots_and_a_stop_cancels_and_waits(runner_rig):
    rig = runner_rig
    for v in ("a", "b", "c"):
        put_row(rig.store, v, "backup", target="file:///r")
    put_row(rig.store, "d", "snapshot")
    rig.runner._dispatch()
    wait_for(lambda: rig.snapshots.taken == ["d"], 5, "the snapshot run beside two backups")
    wait_for(lambda: len(rig.backups.started) == 2, 5, "two backups started")
    rig.runner._dispatch()
    time.sleep(0.3)
    assert len(rig.backups.started) == 2  # the third waits for a backup slot, still due
    # recorded as the schedule's before the work: found even if the daemon dies mid-way
    assert all(len(p) == 1 and p[0].startswith("pending:") for p in rig.backups.pending_seen)

    began = time.monotonic()
    assert rig.runner.stop(10) == 0  # the backups cancelled at their next step, and waited for
    assert time.monotonic() - began < 2
    rig.runner._dispatch()
    time.sleep(0.2)
    assert len(rig.backups.started) == 2  # nothing starts once stopping
    for v in ("a", "b", "c"):  # cut off by the exit: no failure, no pending row, still due
        s = rig.store.schedule(v, "backup")
        assert s.failures == 0 and s.runs == 0 and clock.parse(s.next_at) < time.time()
        assert rig.store.scheduled_backups(v, "file:///r") == []


def test_a_stop_with_no_run_in_flight_returns_at_once(runner_rig):
    began = time.monotonic()
    assert runner_rig.runner.stop(20) == 0
    assert time.monotonic() - began < 0.1


def test_a_backup_left_pending_by_a_crash_is_found_or_forgotten_at_the_next_run(runner_rig):
    rig = runner_rig
    s = put_row(rig.store, "a", "backup", target="file:///r", keep={"last": 1})
    with rig.store.tx():  # a daemon died in two runs: one after its manifest, one before
        rig.store.add_scheduled_backup("a", "pending:made", "file:///r", clock.stamp())
        rig.store.add_scheduled_backup("a", "pending:lost", "file:///r", clock.stamp())
    rig.backups.listed = [{"id": "made", "url": "file:///r#k/made",
                           "created": clock.stamp(time.time() - 60)},
                          {"id": "users", "url": "file:///r#k/users", "created": clock.stamp()}]
    rig.backups.release.set()
    rig.runner.run_once(s)
    s = rig.store.schedule("a", "backup")
    assert s.runs == 1 and s.last_error is None
    rows = [u for u, _ in rig.store.scheduled_backups("a", "file:///r")]
    # the one found is the schedule's, and its retention (keep 1) removed it; never the user's
    assert rig.backups.removed == ["file:///r#k/made"] and rows == [s.last_result], rows


def test_a_slot_set_while_the_clock_was_ahead_is_moved_back(runner_rig):
    rig = runner_rig
    put_row(rig.store, "a", "snapshot", every=3600, at=clock.stamp(time.time() + 90 * 86400))
    near = put_row(rig.store, "b", "snapshot", every=3600, at=clock.stamp(time.time() + 1800))
    rig.runner._dispatch()
    moved = clock.parse(rig.store.schedule("a", "snapshot").next_at)
    assert time.time() < moved <= time.time() + 3600
    assert rig.store.schedule("b", "snapshot").next_at == near.next_at


@pytest.mark.parametrize("what,value,why", [
    ("snapshot", [3600], "not an object"),
    ("snapshot", {"every": 3600, "keep": {"last": 3}, "target": None, "x": 1}, "not an object"),
    ("snapshot", {"every": "3600", "keep": {"last": 3}}, "every '3600'"),
    ("snapshot", {"every": True, "keep": {"last": 3}}, "every True"),
    ("snapshot", {"every": 0, "keep": {"last": 3}}, "every 0"),
    ("snapshot", {"every": 3600}, "retention policy"),
    ("snapshot", {"every": 3600, "keep": {"last": 0}}, "last"),
    ("snapshot", {"every": 3600, "keep": {"last": 3}, "target": "file:///r"}, "has a target"),
    ("backup", {"every": 3600, "keep": {"last": 3}}, "backup-to"),
    ("backup", {"every": 3600, "keep": {"last": 3}, "target": "s3://k:s@b/p"}, "backup-to"),
    ("backup", {"every": 3600, "keep": {"last": 3}, "target": "ebs://us-east-1"}, "ebs"),
    ("backup", {"every": 3600, "keep": {"last": 3}, "target": "s3://[x"}, "backup-to"),
    ("snapshot", {"every": 3600, "keep": {"last": 3}, "cron": "61 * * * *"}, "cron"),
])
def test_a_schedule_another_host_wrote_is_checked_before_it_runs(what, value, why):
    """A shared volume's record is another host's: what is not a schedule as pyvol writes it
    is refused by name, not run half-understood."""
    from pyvol.errors import InvalidInput
    from pyvol.schedules import check_published

    with pytest.raises(InvalidInput) as e:
        check_published(what, value, "nfs")
    assert why in str(e.value) and "k:s" not in str(e.value), str(e.value)


def test_a_schedule_another_host_wrote_reads_as_the_options_would_set_it():
    from pyvol.schedules import check_published, parse_options

    spec = parse_options({"backup-every": "1d", "backup-keep": "daily=7,weekly=4",
                          "backup-to": "s3://bucket/db"}, backend="ebs")["backup"]
    assert check_published("backup", json.loads(json.dumps(spec)), "ebs") == spec
    assert check_published("snapshot", None, "ebs") is None  # removed on that host


def test_a_cron_schedule_runs_at_its_expressions_times_and_bad_ones_are_refused(daemon):
    """Cron expressions beside intervals: 5 fields (UTC), or 6 with seconds last, which lets
    a test see several runs in seconds."""
    from pyvol.schedules import next_after, parse_cron, parse_options, phase

    assert parse_cron(" 0  3 * * * ", "x") == ("0 3 * * *", 86400)
    assert parse_cron("*/15 * * * 1-5", "x")[1] == 900
    t = 1_800_000_000.0
    n = next_after(t, "db", "snapshot", 86400, "0 3 * * *")
    p = phase("db", "snapshot", 86400)
    assert t < n <= t + 86400 and (n - p) % 86400 == 3 * 3600  # 03:00 UTC, plus the phase
    for bad in ("0 3 * *", "61 * * * *", "0 0 31 2 *", "bogus", "* " * 7, "", "0 3 * * * * *",
                "R 3 * * *", "H(0-29) * * * *", "0 r/2 * * *"):
        with pytest.raises(Exception, match="accepted is a cron expression"):
            parse_cron(bad, "snapshot-cron")
    with pytest.raises(Exception, match="give one"):
        parse_options({"snapshot-every": "1h", "snapshot-cron": "0 3 * * *",
                       "snapshot-keep": "3"})

    d = daemon
    err = d.api.err("/VolumeDriver.Create", {"Name": "c", "Opts": {
        "size": "64M", "snapshot-cron": "0 25 * * *", "snapshot-keep": "2"}})
    assert "invalid snapshot-cron '0 25 * * *'" in err and "accepted" in err
    d.api.ok("/VolumeDriver.Create", {"Name": "c", "Opts": {
        "size": "64M", "snapshot-cron": "* * * * * */2", "snapshot-keep": "2"}})
    row = wait_for(lambda: (s := schedules(d, "c")["snapshot"])["runs"] >= 3 and s, 20,
                   "three runs of a cron schedule every 2 s")
    assert row["every"] == "cron * * * * * */2" and row["error"] is None
    wait_for(lambda: len(snaps(d, "c", "schedule")) == 2, 10, "the policy keeping 2")
    times = sorted(snaps(d, "c", "schedule"))
    assert times[0] != times[1]
    # back to an interval: the cron expression goes
    code, body = put(d, "c", {"snapshot-every": "1h"})
    assert code == 200 and body[0]["every"] == "1h", body
