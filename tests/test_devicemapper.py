"""The devicemapper backend through the daemon, in a kernel with dm-thin (the qemu lane)."""

import json
import os
import subprocess
import time

import pytest

from helpers import Daemon, seed_demo

pytestmark = pytest.mark.devicemapper


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
    backend.teardown()
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
    b.teardown()
    with open(b.metadata_file, "r+b") as f:  # smash the superblock
        f.write(os.urandom(4096))
    again = DevicemapperBackend(workdir / "root", {"data_size": "1G"})
    with pytest.raises(PyvolError, match="thin_check.*thin_repair"):
        again.setup()
    assert not again._exists(again.pool), "a pool with bad metadata must not be activated"
    again.teardown()


def test_seed_demo_through_dockerd_in_the_guest(dockerd, plugin):
    seed_demo(dockerd, plugin.driver)
    vol = plugin.api.ok("/VolumeDriver.Get", {"Name": "test_volume"})["Volume"]
    assert vol["Status"]["backend"] == "devicemapper"
    removed = dockerd.run("volume", "rm", "test_volume")
    assert removed.stdout.strip() == "test_volume"


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
