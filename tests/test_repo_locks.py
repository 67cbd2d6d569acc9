"""Repository locks (issue 11): a dead holder on this host is broken at once, another host's
lock only by its lease plus the skew allowance, a holder learns when its lock was broken, and
gc never deletes a chunk that a stalled backup still needs (docs/backup-repository.md,
"Locks" and "What garbage collection may delete")."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import Daemon, slow_backup, until
from pyvol import clock
from pyvol.backup import leases
from pyvol.backup.repo import Repository, holder_identity
from pyvol.errors import Conflict, PyvolError
from s3servers import FaultProxy
from test_backup import backup, fill, with_volume

MiB = 1 << 20

HOLDER = """
import sys, time
from pyvol.backup import leases
from pyvol.backup.repo import Repository
lock = leases.Lease(Repository.open(sys.argv[1], None), sys.argv[2])
lock.acquire()
print(lock.key, flush=True)
time.sleep(600)
"""


@pytest.fixture
def repo(workdir) -> Repository:
    (workdir / "repo").mkdir()
    return Repository.open(f"file://{workdir / 'repo'}", None, create=True)


def hold(repo: Repository, kind: str = "exclusive") -> tuple[subprocess.Popen, str]:
    """Another process of this host holding a lock (default lease: 300 s); its lock key."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, repo.url, kind],
                            stdout=subprocess.PIPE, text=True)
    key = proc.stdout.readline().strip()
    assert key.startswith("locks/"), key
    return proc, key


def lock_objects(repo: Repository) -> list[str]:
    return sorted(k for k, _ in repo.target.list("locks/"))


def plant(repo: Repository, **fields) -> str:
    """Write a lock object by hand: this process's identity, changed by ``fields``."""
    now = time.time()
    doc = {"kind": "exclusive", **holder_identity(), "holder": "0" * 16,
           "created": "2026-01-01T00:00:00Z", "expires": "2099-01-01T00:00:00Z",
           "renewed": now, "lease": 300.0, **fields}
    key = f"locks/{os.urandom(16).hex()}"
    assert repo.target.put_if_absent(key, repo.codec.seal(key, json.dumps(doc).encode()))
    return key


def taken_within(repo: Repository, seconds: float, kind: str = "shared") -> None:
    started = time.monotonic()
    with leases.locked(repo, kind):
        pass
    assert time.monotonic() - started < seconds


def test_a_lock_of_a_sigkilled_process_on_this_host_is_broken_at_once(workdir, repo):
    proc, key = hold(repo)
    try:
        with pytest.raises(Conflict) as refused:  # alive: it blocks, named precisely
            leases.locked(repo, "shared").__enter__()
        assert f"pid {proc.pid} on this host" in str(refused.value)
        proc.send_signal(signal.SIGKILL)
        time.sleep(0.5)  # not reaped yet: a zombie counts as dead too
        taken_within(repo, 5)
        assert lock_objects(repo) == []
    finally:
        proc.kill()
        proc.wait()
    # and a daemon's backup goes ahead at once, logging which lock it broke and why
    d = Daemon(workdir / "root", workdir / "s.sock").start()
    try:
        fill(f"{with_volume(d, 'v')}/f", 4 * MiB)
        proc, key = hold(repo)
        proc.kill()
        proc.wait()
        started = time.monotonic()
        made = backup(d, "v", repo.url)
        assert time.monotonic() - started < 60 and made["url"]
        lines = [json.loads(x) for x in d.log_path.read_text().splitlines() if x.startswith("{")]
        broke = [x for x in lines if x.get("msg") == "breaking the repository lock of a dead "
                 "holder"]
        assert broke and broke[-1]["lock"] == key and broke[-1]["pid"] == proc.pid
        assert "no longer exists" in broke[-1]["reason"]
        assert lock_objects(repo) == []
    finally:
        d.stop()


def test_a_scheduled_backup_waiting_for_the_repository_ends_with_the_daemons_stop(
        workdir, repo):
    """A removal or gc (another live process) holds the repository: a schedule's backup
    waits for it, up to scheduler.BACKUP_LOCK_WAIT (30 s). A daemon told to stop meanwhile
    stops at once, not after the wait, and the run cut off is no failure."""
    proc, _key = hold(repo)
    d = Daemon(workdir / "root", workdir / "s.sock").start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {
            "size": "64M", "backup-every": "1s", "backup-to": repo.url,
            "backup-keep": "last=2"}})
        until("the scheduled backup waiting for the repository lock",
              lambda: "waiting for the repository lock" in d.log_path.read_text())
        started = time.monotonic()
        d.stop()
        assert time.monotonic() - started < 8
        assert "scheduled backup of v failed" not in d.log_path.read_text()
    finally:
        d.stop()
        proc.kill()
        proc.wait()


def test_a_live_holder_blocks_and_another_hosts_lock_waits_for_lease_and_allowance(repo):
    proc, key = hold(repo, "shared")
    try:
        with pytest.raises(Conflict, match=f"shared lock held by host .* pid {proc.pid} on "):
            leases.locked(repo, "exclusive").__enter__()
        taken_within(repo, 5, "shared")  # shared locks coexist
        assert lock_objects(repo) == [key]
    finally:
        proc.kill()
        proc.wait()
    taken_within(repo, 5, "exclusive")
    # another machine: its pid means nothing here, so only the lease counts, and the lock is
    # expired only a further lease (the skew allowance) after the lease ended
    lease = 1.5
    other = plant(repo, kind="shared", host="elsewhere", machine="1" * 32, pid=4194000,
                  renewed=time.time(), lease=lease)
    started = time.monotonic()
    with pytest.raises(Conflict, match="shared lock held by host elsewhere pid 4194000"):
        leases.locked(repo, "exclusive").__enter__()
    lock = leases.Lease(repo, "exclusive")
    lock.acquire(wait=30)
    waited = time.monotonic() - started
    try:
        assert 2 * lease - 0.5 < waited < 2 * lease + 5, waited
        assert other not in lock_objects(repo)
        # breaking an expired shared lock leaves a record that holds gc back two leases
        records = [k for k, _ in repo.target.list(leases.BROKEN)]
        assert records == [leases.BROKEN + other.rpartition("/")[2]]
        held = leases.held_until(repo, 300)
        assert held is not None and time.time() < held <= time.time() + 2 * lease
    finally:
        lock.release()
    time.sleep(2 * lease + 0.2)
    assert leases.held_until(repo, 300) is None  # served its time, and deleted
    assert list(repo.target.list(leases.BROKEN)) == []


@pytest.mark.parametrize("change,dead", [
    ({"start": "wrong"}, True),  # this pid, but another process: the pid was reused
    ({"pid": 4194000}, True),  # no such process
    ({"boot": "00000000-0000-0000-0000-000000000000"}, True),  # this host rebooted since
    ({}, False),  # this very process: alive
    ({"pidns": 1}, False),  # another pid namespace: its pids mean other processes
    ({"boot": "00000000-0000-0000-0000-000000000000", "host": "clone"}, False),  # a cloned id
    ({"machine": "2" * 32}, False),  # another host
])
def test_which_holders_count_as_dead(repo, change, dead):
    if change.get("start") == "wrong":
        change = {"start": holder_identity()["start"] + 1}
    key = plant(repo, **change)
    if dead:
        taken_within(repo, 5)
        assert key not in lock_objects(repo)
    else:
        with pytest.raises(Conflict):
            leases.locked(repo, "shared").__enter__()
        assert key in lock_objects(repo)


def test_a_holder_learns_that_its_lock_was_broken_and_writes_nothing_more(repo):
    lost = threading.Event()
    lock = leases.Lease(repo, "shared", lease=2)
    lock.acquire()
    lock.on_lost(lost.set)
    time.sleep(1.2)  # a few renewals: it keeps two generations, deletes the older ones
    assert 1 <= len(lock_objects(repo)) <= 2
    lock.check(renew=True)
    for key in lock_objects(repo):  # what a taker does when it judges the lock expired
        repo.target.delete(key)
    assert lost.wait(5), "the renewer did not notice"
    with pytest.raises(PyvolError, match="lost the repository lock .* was deleted by another"):
        lock.check()
    wrote = []
    with pytest.raises(PyvolError, match="lost the repository lock"):
        lock.guarded(lambda: wrote.append(1), undo=lambda: wrote.clear())
    assert wrote == [] and lock_objects(repo) == []
    lock.release()

    # broken while the guarded write was on its way: the write is taken back
    lock = leases.Lease(repo, "shared")
    lock.acquire()

    def write():
        wrote.append(1)
        for key in lock_objects(repo):
            repo.target.delete(key)

    with pytest.raises(PyvolError, match="lost the repository lock"):
        lock.guarded(write, undo=lambda: wrote.append("undone"))
    assert wrote == [1, "undone"]
    lock.release()

    # a renewal that fails loses the lease too
    lock = leases.Lease(repo, "shared")
    lock.acquire()

    def broken(*_):
        raise PyvolError("the endpoint is down")

    lock.repo.target.put_if_absent = broken  # the instance only: the repository is fine
    with pytest.raises(PyvolError, match="lost the repository lock .* renewing it failed"):
        lock.check(renew=True)
    lock.release()
    assert lock_objects(repo) == []




def test_gc_on_another_host_never_deletes_chunks_a_stalled_backup_needs(workdir, moto):
    """Host a's backup reuses chunks of a removed backup, then stops (SIGSTOP) past its lease;
    host b runs gc twice meanwhile. Whatever happens, every listed backup verifies."""
    lease = 4
    proxy = FaultProxy(moto.endpoint)
    env = {**moto.env, "PYVOL_BACKUP_LOCK_LEASE": str(lease), "PYVOL_BACKUP_THREADS": "2"}
    a = Daemon(workdir / "host-a", workdir / "a.sock",
               env={**env, "AWS_ENDPOINT_URL": proxy.endpoint}).start()
    b = Daemon(workdir / "host-b", workdir / "b.sock", env=env).start()
    url = f"s3://{moto.bucket()}/r"
    stopped = False
    try:
        fill(f"{with_volume(a, 'keep')}/f", 8 * MiB)
        kept = backup(a, "keep", url)
        mp = with_volume(a, "v", "512M")
        fill(f"{mp}/old", 24 * MiB)
        first = backup(a, "v", url)
        a.cli("backup", "rm", first["url"])  # its chunks stay until a gc: unreferenced now
        fill(f"{mp}/new", 64 * MiB)  # the next backup uploads these and reuses the old ones
        cli = slow_backup(a, proxy, url, 12)
        os.killpg(a.proc.pid, signal.SIGSTOP)
        stopped, stop_time = True, time.monotonic()
        # its lock holds until its lease and the allowance are over: then gc breaks it, and
        # having just broken a shared lock, deletes nothing
        deadline = time.monotonic() + 60
        while True:
            r = b.cli("backup", "gc", url, "--json", check=False)
            if r.returncode == 0:
                break
            assert "locked (shared lock held by host" in r.stderr, r.stderr
            assert time.monotonic() < deadline, "the stalled backup's lock never expired"
            time.sleep(0.5)
        assert time.monotonic() - stop_time > lease
        gc = json.loads(r.stdout)
        assert gc["chunks_deleted"] == 0 and gc["chunks_marked"] > 0, gc
        assert gc["backups"] == 1 and gc["delete_after"], gc
        # two leases later, a gc deletes every unreferenced chunk: the ones the stalled
        # backup skipped as already stored among them
        time.sleep(max(0.0, clock.parse(gc["delete_after"]) - time.time()) + 1)
        gc2 = json.loads(b.cli("backup", "gc", url, "--json").stdout)
        assert gc2["chunks_marked"] == 0 and gc2["chunks_deleted"] >= gc["chunks_marked"], gc2
        os.killpg(a.proc.pid, signal.SIGCONT)
        stopped = False
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 1 and "lost the repository lock" in err, (out, err)
        assert "Traceback" not in err
        listed = json.loads(b.cli("backup", "ls", url, "--json").stdout)
        assert [x["url"] for x in listed] == [kept["url"]]
        for x in listed:
            b.cli("backup", "verify", x["url"])
        # the host that stalled backs up again, uploading what gc deleted
        proxy.set("pass")
        again = backup(a, "v", url)
        b.cli("backup", "verify", again["url"])
        assert json.loads(a.cli("backup", "ls", url, "--json").stdout)[-1]["url"] == again["url"]
    finally:
        if stopped:
            os.killpg(a.proc.pid, signal.SIGCONT)
        a.stop()
        b.stop()
        proxy.close()


def test_a_backup_whose_reused_chunks_vanish_while_it_runs_writes_no_manifest(workdir, moto):
    """Chunks deleted behind the locks' back (an older pyvol's gc, a person): the backup
    lists the repository again before its manifest and refuses to name missing chunks."""
    proxy = FaultProxy(moto.endpoint)
    d = Daemon(workdir / "root", workdir / "s.sock",
               env={**moto.env, "AWS_ENDPOINT_URL": proxy.endpoint,
                    "PYVOL_BACKUP_THREADS": "2"}).start()
    bucket = moto.bucket()
    url = f"s3://{bucket}/r"
    try:
        mp = with_volume(d, "v", "512M")
        fill(f"{mp}/old", 24 * MiB)
        first = backup(d, "v", url)
        d.cli("backup", "rm", first["url"])
        old = moto.keys(bucket, "r/chunks/")
        fill(f"{mp}/new", 48 * MiB)
        cli = slow_backup(d, proxy, url, 12)
        s3 = moto.client()
        for key in old:
            s3.delete_object(Bucket=bucket, Key=key)
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 1 and "were deleted from" in err, (out, err)
        assert moto.keys(bucket, "r/manifests/") == []
        proxy.set("pass")
        again = backup(d, "v", url)  # the rerun uploads them again
        d.cli("backup", "verify", again["url"])
    finally:
        d.stop()
        proxy.close()
