"""The devicemapper backend through the daemon, in a kernel with dm-thin (the qemu lane)."""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import backend_probes as probe
import pytest
from helpers import Daemon, read_at, seed_demo, until, write_at
from pyvol import fs, locks
from pyvol.backends import VolumeSpec
from pyvol.backends import devicemapper as dm
from pyvol.backends.devicemapper import DevicemapperBackend, dmsetup

pytestmark = pytest.mark.devicemapper

MiB = 1 << 20
BLOCK = 64 << 10  # the pool's default block: changed ranges come in these


def _pool(d: Daemon) -> dict:
    return json.loads(d.cli("info", "--json").stdout)["backends"]["devicemapper"]


def test_default_backend_is_a_self_provisioned_thin_pool(daemon):
    info = json.loads(daemon.cli("info", "--json").stdout)
    assert info["default_backend"] == "devicemapper"
    pool = info["backends"]["devicemapper"]
    assert pool["pool_size"] == 100 << 30 and pool["block_size"] == 64 << 10
    assert pool["metadata_size"] > 0 and pool["mode"] == "rw"
    data = daemon.root / "devicemapper/data.img"
    assert os.stat(data).st_size == 100 << 30 and os.stat(data).st_blocks * 512 < 64 << 20
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "big", "Opts": {"size": "100G"}})
    vol = api.ok("/VolumeDriver.Get", {"Name": "big"})["Volume"]
    assert vol["Status"]["backend"] == "devicemapper" and vol["Status"]["size"] == 100 << 30
    api.ok("/VolumeDriver.Remove", {"Name": "big"})


def test_snapshot_through_the_filesystem_stays_frozen(daemon):
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "db", "Opts": {"size": "1G", "fs": "xfs"}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "db", "ID": "w"})["Mountpoint"]
    with open(os.path.join(mp, "table"), "w") as f:
        f.write("row1\n")
    daemon.cli("snapshot", "create", "db", "--name", "s1")
    with open(os.path.join(mp, "table"), "a") as f:
        f.write("row2\n")
    api.ok("/VolumeDriver.Create", {"Name": "db-s1", "Opts": {"from-snapshot": "db@s1",
                                                              "size": "2G"}})
    cmp = api.ok("/VolumeDriver.Mount", {"Name": "db-s1", "ID": "r"})["Mountpoint"]
    assert open(os.path.join(cmp, "table")).read() == "row1\n"
    assert open(os.path.join(mp, "table")).read() == "row1\nrow2\n"
    st = os.statvfs(cmp)
    assert st.f_blocks * st.f_frsize > (3 << 30) // 2, "the clone's xfs grew to 2G"
    for name, mid in (("db-s1", "r"), ("db", "w")):
        api.ok("/VolumeDriver.Unmount", {"Name": name, "ID": mid})
        api.ok("/VolumeDriver.Remove", {"Name": name})


def test_overcommit_beyond_the_ratio_is_refused(workdir):
    d = Daemon(workdir / "root", workdir / "s.sock",
               env={"PYVOL_DEVICEMAPPER_DATA_SIZE": "1G",
                    "PYVOL_DEVICEMAPPER_OVERCOMMIT_RATIO": "2"}).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "a", "Opts": {"size": "1500M"}})
        err = d.api.err("/VolumeDriver.Create", {"Name": "b", "Opts": {"size": "1G"}})
        assert "over-commit" in err and "accepted: up to" in err
        assert "no such volume" in d.api.err("/VolumeDriver.Get", {"Name": "b"})
    finally:
        d.stop()


@pytest.mark.slow  # faster relative: test_overcommit_beyond_the_ratio_is_refused
def test_full_pool_fails_writes_fast_with_a_clear_error(workdir):
    d = Daemon(workdir / "root", workdir / "s.sock",
               env={"PYVOL_DEVICEMAPPER_DATA_SIZE": "256M"}).start()
    try:
        api = d.api
        api.ok("/VolumeDriver.Create", {"Name": "a", "Opts": {"size": "1G"}})
        mp = api.ok("/VolumeDriver.Mount", {"Name": "a", "ID": "w"})["Mountpoint"]
        started = time.monotonic()
        proc = subprocess.run(["dd", "if=/dev/urandom", f"of={mp}/fill", "bs=1M", "count=400",
                               "conv=fsync"], capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - started
        assert proc.returncode != 0, "400M written into a 256M pool without an error"
        # Depending on where ext4 meets the error first, dd sees EIO/ENOSPC or, once
        # errors=remount-ro has fired, EROFS; any of these is a fast, visible failure.
        failure = proc.stderr.lower()
        assert any(s in failure for s in ("input/output error", "no space left",
                                          "read-only file system")), proc.stderr
        assert elapsed < 240, f"a full pool took {elapsed:.0f}s to fail the write"
        err = api.err("/VolumeDriver.Create", {"Name": "b", "Opts": {"size": "64M"}})
        assert "out of space" in err or "error" in err.lower()
        pool = _pool(d)
        assert pool["pool_used"] == pool["pool_size"]
        api.ok("/VolumeDriver.Unmount", {"Name": "a", "ID": "w"})
        api.ok("/VolumeDriver.Remove", {"Name": "a"})
    finally:
        d.stop()


@pytest.mark.slow  # faster relative: the suspended-device and conformance restart tests
def test_kill_restart_and_pool_reactivation_keep_every_volume(daemon):
    api = daemon.api
    payload = os.urandom(3 << 20)
    for name in ("r1", "r2"):
        api.ok("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "256M"}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "r1", "ID": "live"})["Mountpoint"]
    with open(os.path.join(mp, "data"), "wb") as f:
        f.write(payload)
    daemon.cli("snapshot", "create", "r1", "--name", "s")
    daemon.kill()
    daemon.start()
    api = daemon.api
    assert api.ok("/VolumeDriver.Get", {"Name": "r1"})["Volume"]["Status"]["mounts"] == 1
    assert open(os.path.join(mp, "data"), "rb").read() == payload
    api.ok("/VolumeDriver.Unmount", {"Name": "r1", "ID": "live"})

    # as after a reboot: every device gone, pool included
    daemon.stop()
    from pyvol.backends.devicemapper import DevicemapperBackend

    backend = DevicemapperBackend(daemon.root)
    probe.teardown(backend)
    assert not [line for line in subprocess.run(["dmsetup", "ls"], capture_output=True,
                                                text=True).stdout.splitlines()
                if line.startswith(backend.prefix + "-")]
    daemon.start()
    api = daemon.api
    mp = api.ok("/VolumeDriver.Mount", {"Name": "r1", "ID": "again"})["Mountpoint"]
    assert open(os.path.join(mp, "data"), "rb").read() == payload
    api.ok("/VolumeDriver.Unmount", {"Name": "r1", "ID": "again"})
    api.ok("/VolumeDriver.Create", {"Name": "r1-s", "Opts": {"from-snapshot": "r1@s"}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "r1-s", "ID": "x"})["Mountpoint"]
    assert open(os.path.join(mp, "data"), "rb").read() == payload
    api.ok("/VolumeDriver.Unmount", {"Name": "r1-s", "ID": "x"})


def test_corrupt_metadata_is_refused_with_the_repair_step(workdir):
    from pyvol.backends.devicemapper import DevicemapperBackend
    from pyvol.errors import PyvolError

    b = DevicemapperBackend(workdir / "root", {"data_size": "1G"})
    b.setup()
    from pyvol.backends import VolumeSpec

    b.create(VolumeSpec("v", 64 << 20))
    probe.teardown(b)
    with open(b.metadata_file, "r+b") as f:  # smash the superblock
        f.write(os.urandom(4096))
    again = DevicemapperBackend(workdir / "root", {"data_size": "1G"})
    with pytest.raises(PyvolError, match="thin_check.*thin_repair"):
        again.setup()
    assert not again._exists(again.pool), "a pool with bad metadata must not be activated"
    probe.teardown(again)


def test_seed_demo_through_dockerd_in_the_guest(dockerd, plugin):
    seed_demo(dockerd, plugin.driver)
    vol = plugin.api.ok("/VolumeDriver.Get", {"Name": "test_volume"})["Volume"]
    assert vol["Status"]["backend"] == "devicemapper"
    removed = dockerd.run("volume", "rm", "test_volume")
    assert removed.stdout.strip() == "test_volume"


@pytest.mark.slow  # faster relative: test_backup.py on loop, conformance ranges
def test_a_block_backup_restores_across_backends_loop_to_devicemapper_and_back(daemon, workdir):
    """A backup names no backend: it restores into whichever block backend the user picks."""
    import hashlib

    repo = workdir / "repo"
    repo.mkdir()
    url = f"file://{repo}"
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "src", "Opts": {"size": "256M", "backend": "loop"}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "src", "ID": "w"})["Mountpoint"]
    payload = os.urandom(9 << 20)
    with open(os.path.join(mp, "data"), "wb") as f:
        f.write(payload)
        os.fsync(f.fileno())
    digest = hashlib.sha256(payload).hexdigest()
    first = json.loads(daemon.cli("backup", "create", "src", "--dest", url, "--json").stdout)
    daemon.cli("restore", first["url"], "on-dm", "--backend", "devicemapper", "--size", "512M")
    mp2 = api.ok("/VolumeDriver.Mount", {"Name": "on-dm", "ID": "r"})["Mountpoint"]
    vol = api.ok("/VolumeDriver.Get", {"Name": "on-dm"})["Volume"]
    assert vol["Status"]["backend"] == "devicemapper"
    with open(os.path.join(mp2, "data"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
    # restore skips zero blocks: the thin volume holds about the data, not its 512M
    assert vol["Status"]["allocated"] < 64 << 20, vol["Status"]
    # and back: a devicemapper backup (thin_delta ranges) restores into loop
    with open(os.path.join(mp2, "more"), "wb") as f:
        f.write(b"x" * (3 << 20))
        os.fsync(f.fileno())
    full = json.loads(daemon.cli("backup", "create", "on-dm", "--dest", url, "--json").stdout)
    with open(os.path.join(mp2, "more"), "r+b") as f:
        f.write(b"y" * (1 << 20))
        os.fsync(f.fileno())
    inc = json.loads(daemon.cli("backup", "create", "on-dm", "--dest", url, "--json").stdout)
    assert inc["incremental"] and inc["stats"]["read"] <= 12 << 20, inc["stats"]
    assert full["stats"]["chunks_reused"] >= 1  # a piece of src's data was already stored
    daemon.cli("restore", inc["url"], "back", "--backend", "loop")
    mp3 = api.ok("/VolumeDriver.Mount", {"Name": "back", "ID": "b"})["Mountpoint"]
    with open(os.path.join(mp3, "data"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
    with open(os.path.join(mp3, "more"), "rb") as f:
        assert f.read() == b"y" * (1 << 20) + b"x" * (2 << 20)


# What a daemon killed mid-operation leaves behind, and what the next start repairs

START_WAIT = 240  # a daemon's first start in the emulated guest, on a busy host, is slow


@pytest.fixture
def dm_daemon(workdir):
    """The ``daemon`` fixture's daemon, with time for a cold start under emulation."""
    d = Daemon(workdir / "root", workdir / "pyvol.sock").start(wait=START_WAIT)
    yield d
    d.stop()


def _backend(root: Path) -> DevicemapperBackend:
    """An instance on ``root``, as another worker or the next start makes."""
    return DevicemapperBackend(root, {"data_size": "1G"})


def _write_completes(path: str, within: float = 5.0) -> bool:
    """Append to ``path`` and fsync it (a buffered write alone never waits for the device);
    True if that finished within ``within`` seconds. A writer blocked on a suspended device
    or a frozen filesystem is left to finish once the test has released it."""
    done = threading.Event()

    def write():
        with open(path, "ab") as f:
            f.write(os.urandom(8192))
            f.flush()
            os.fsync(f.fileno())
        done.set()

    threading.Thread(target=write, daemon=True).start()
    return done.wait(within)


def _suspended(dm_name: str) -> bool:
    return dmsetup("info", "-c", "--noheadings", "-o", "suspended", dm_name).strip() == "Suspended"


def _held(b: DevicemapperBackend) -> str:
    """The pool's metadata snapshot (its root block), or "-" when none is reserved."""
    return dmsetup("status", b.pool).split()[6]


def _thin_ids(b: DevicemapperBackend) -> dict[str, int]:
    """Every active device of the pool (pool excluded) -> the thin id its table maps."""
    out = {}
    for line in dmsetup("table").splitlines():
        name, _, table = line.partition(": ")
        f = table.split()
        if name.startswith(b.prefix + "-") and len(f) >= 5 and f[2] == "thin":
            out[name] = int(f[4])
    return out


def test_a_device_left_suspended_by_a_killed_daemon_is_resumed_at_start(dm_daemon):
    daemon = dm_daemon
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "susp", "Opts": {"size": "256M"}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "susp", "ID": "w"})["Mountpoint"]
    dev = probe.active_device(_backend(daemon.root), "susp")
    dm_name = os.path.basename(dev)
    # as a daemon killed between `dmsetup suspend` and `resume` in snapshot leaves it
    dmsetup("suspend", "--nolockfs", dm_name)
    daemon.kill()
    try:
        assert _suspended(dm_name)
        daemon.start(wait=START_WAIT)
        assert not _suspended(dm_name)
        assert _write_completes(os.path.join(mp, "after-restart")), \
            "a write into the volume still blocks after the restart"
        events = [line for line in daemon.log_path.read_text().splitlines()
                  if "left suspended" in line]
        assert any(dm_name in line for line in events), events
    finally:
        subprocess.run(["dmsetup", "resume", dm_name], check=False, capture_output=True)
    api = daemon.api
    api.ok("/VolumeDriver.Unmount", {"Name": "susp", "ID": "w"})
    api.ok("/VolumeDriver.Remove", {"Name": "susp"})


def test_a_metadata_snapshot_left_reserved_is_released(workdir):
    b = _backend(workdir / "root")
    b.setup()
    b.create(VolumeSpec("v", 64 * MiB))
    dev = b.activate("v")
    write_at(dev, 0, b"1" * BLOCK)
    b.snapshot("v", "a")
    write_at(dev, 2 * MiB, b"2" * BLOCK)
    b.snapshot("v", "b")
    # as a daemon killed during thin_dump/thin_delta leaves it: every later reserve failed
    dmsetup("message", b.pool, "0", "reserve_metadata_snap")
    assert _held(b) != "-"
    assert b.changed_ranges("v", "a", "b") == [(2 * MiB, BLOCK)]
    assert _held(b) == "-"
    # and a start releases one too
    dmsetup("message", b.pool, "0", "reserve_metadata_snap")
    again = _backend(workdir / "root")
    again.setup()
    assert _held(again) == "-"
    assert again.mapped_ranges("v", "a") == [(0, BLOCK)]


def test_a_slow_changed_ranges_leaves_the_pool_to_creates_and_mounts(workdir, monkeypatch):
    b = _backend(workdir / "root")
    b.setup()
    b.create(VolumeSpec("v", 64 * MiB))
    write_at(b.activate("v"), 0, b"1" * BLOCK)
    b.snapshot("v", "s")
    in_dump, finish = threading.Event(), threading.Event()
    real_run = dm.run

    def slow_run(argv, *args, **kwargs):  # a dump of a big pool: minutes
        if argv[0] in ("thin_dump", "thin_delta"):
            in_dump.set()
            finish.wait(120)
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(dm, "run", slow_run)
    result = {}
    dumper = threading.Thread(target=lambda: result.update(ranges=b.mapped_ranges("v", "s")))
    dumper.start()
    try:
        assert in_dump.wait(60)
        other = _backend(workdir / "root")  # another worker, serving a Create and a Mount
        started = time.monotonic()
        other.create(VolumeSpec("w", 64 * MiB))
        other.activate("w")
        took = time.monotonic() - started
        assert took < 10, f"a create and an activate waited {took:.0f}s for a dump"
        assert not result, "the dump ended before the create: nothing was shown"
    finally:
        finish.set()
        dumper.join(180)
    assert result["ranges"] == [(0, BLOCK)]


def test_dm_names_are_thin_ids_so_names_neither_collide_nor_overflow(workdir):
    b = _backend(workdir / "root")
    b.setup()
    # a--b@c and a@b--c were both PREFIX-s-a--b--c
    b.create(VolumeSpec("a--b", 64 * MiB))
    b.create(VolumeSpec("a", 64 * MiB))
    write_at(b.activate("a--b"), 0, b"X" * 4096)
    write_at(b.activate("a"), 0, b"Y" * 4096)
    b.snapshot("a--b", "c")
    b.snapshot("a", "b--c")
    with b.read_snapshot("a--b", "c") as one, b.read_snapshot("a", "b--c") as two:
        assert one != two
        assert read_at(one, 0, 4096) == b"X" * 4096
        assert read_at(two, 0, 4096) == b"Y" * 4096
    # the longest names the API accepts: 128 and 64 characters (the kernel's limit is 127
    # bytes for a whole dm name)
    long, snap = "v" * 128, "s" * 64
    b.create(VolumeSpec(long, 64 * MiB))
    dev = b.activate(long)
    write_at(dev, MiB, b"L" * 4096)
    b.snapshot(long, snap)
    write_at(dev, MiB, b"M" * 4096)
    with b.read_snapshot(long, snap) as path:
        assert read_at(path, MiB, 4096) == b"L" * 4096
    b.clone(long, snap, VolumeSpec("c" * 128, 64 * MiB))
    assert read_at(b.activate("c" * 128), MiB, 4096) == b"L" * 4096
    assert probe.active_device(b, long) == dev and read_at(dev, MiB, 4096) == b"M" * 4096
    names = _thin_ids(b)
    assert len(set(names.values())) == len(names) == 4  # a, a--b, the long one, its clone
    assert all(len(n) < 40 for n in names), names


def test_a_device_named_by_the_old_scheme_is_renamed_at_start(workdir):
    b = _backend(workdir / "root")
    b.setup()
    b.create(VolumeSpec("old", 64 * MiB))
    b.activate("old")  # recorded active: the next start activates it
    thin_id = b._vol("old")["id"]
    # as an older pyvol named it, mounted and in use
    dmsetup("remove", b._thin_name(thin_id))
    old_name = f"{b.prefix}-v-old"
    dmsetup("create", old_name, "--table",
            f"0 {(64 * MiB) // 512} thin /dev/mapper/{b.pool} {thin_id}")
    mp = workdir / "mnt"
    fs.mkfs(f"/dev/mapper/{old_name}", "ext4")
    fs.mount(f"/dev/mapper/{old_name}", mp, "ext4")
    try:
        (mp / "before").write_text("written through the old name")
        again = _backend(workdir / "root")
        again.setup()
        assert [n for n, i in _thin_ids(again).items() if i == thin_id] == \
            [again._thin_name(thin_id)], "one device per thin id, named by it"
        assert probe.active_device(again, "old") == f"/dev/mapper/{again._thin_name(thin_id)}"
        assert _write_completes(str(mp / "after"))
        assert (mp / "before").read_text() == "written through the old name"
    finally:
        fs.umount(mp)
    assert fs.detect(probe.active_device(again, "old")) == "ext4"


def test_a_snapshot_waiting_for_the_pool_lock_leaves_the_filesystem_writable(dm_daemon):
    daemon = dm_daemon
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "frz", "Opts": {"size": "256M"}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "frz", "ID": "w"})["Mountpoint"]
    lock_file = str(daemon.root / "locks" / "devicemapper.lock")

    def waiting_for_the_pool() -> bool:  # a daemon process has the lock's file open
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():
                continue
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") == lock_file for fd in fds):
                    return True
            except OSError:
                continue
        return False

    result = {}
    with locks.held(daemon.root / "locks", "devicemapper", "the test"):
        snapper = threading.Thread(target=lambda: result.update(
            proc=daemon.cli("snapshot", "create", "frz", "--name", "s", check=False)))
        snapper.start()
        deadline = time.monotonic() + 60
        while not waiting_for_the_pool() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert waiting_for_the_pool(), "the snapshot never reached the pool lock"
        for i in range(2):
            assert _write_completes(os.path.join(mp, f"while-waiting-{i}")), \
                "the filesystem is frozen while the snapshot waits for the pool lock"
        assert snapper.is_alive(), "the snapshot did not wait for the pool lock"
    snapper.join(120)
    assert result["proc"].returncode == 0, result["proc"].stderr
    assert "s" in _backend(daemon.root).snapshots("frz")
    api.ok("/VolumeDriver.Unmount", {"Name": "frz", "ID": "w"})
    api.ok("/VolumeDriver.Remove", {"Name": "frz"})


def test_a_worker_killed_alone_while_its_device_is_suspended_leaves_it_resumed(workdir):
    """A worker killed between a snapshot's `dmsetup suspend` and `resume` (the OOM killer
    takes one process) is replaced by the master, and nothing restarts to resume the device.
    The master does, then thaws the filesystem (plugin/leftovers.py): writes in the
    container go on, and the next snapshot is taken as usual."""
    marker = workdir / "crashed"
    d = Daemon(workdir / "root", workdir / "pyvol.sock",
               env={"PYVOL_CRASH_AT": "devicemapper.suspended",
                    "PYVOL_CRASH_ALONE": str(marker), "PYVOL_WORKERS": "1"}).start(wait=START_WAIT)
    mp = dm_name = None
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "alone", "Opts": {"size": "256M"}})
        mp = d.api.ok("/VolumeDriver.Mount", {"Name": "alone", "ID": "w"})["Mountpoint"]
        dm_name = os.path.basename(probe.active_device(_backend(d.root), "alone"))
        out = d.cli("snapshot", "create", "alone", "--name", "s1", check=False)
        assert out.returncode != 0 and marker.exists(), out.stderr
        assert d.proc.poll() is None, "the master died with its worker"
        assert _write_completes(os.path.join(mp, "after"), within=30), \
            "a write into the volume still blocks after its worker was killed"
        assert not _suspended(dm_name)
        until("the daemon to log the resume and the thaw", lambda: all(
            text in d.log_path.read_text() for text in (
                "left suspended by a killed daemon or worker",
                "thawed a filesystem a killed process left frozen")), 30, 0.1)
        d.cli("snapshot", "create", "alone", "--name", "s2")
        assert _write_completes(os.path.join(mp, "after-s2"))
        d.api.ok("/VolumeDriver.Unmount", {"Name": "alone", "ID": "w"})
        d.api.ok("/VolumeDriver.Remove", {"Name": "alone"})
    finally:
        if dm_name is not None:  # whatever failed above, never leave the test's writer stuck
            subprocess.run(["dmsetup", "resume", dm_name], check=False, capture_output=True,
                           timeout=60)
        if mp is not None:
            subprocess.run(["fsfreeze", "--unfreeze", mp], check=False, capture_output=True,
                           timeout=60)
        d.stop()
