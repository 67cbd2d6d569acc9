"""Crashes and restarts: records and reality agree again, and nothing half-made survives."""

import os
import sqlite3
import subprocess

import backend_probes as probe
import pytest
from helpers import loop_devices_under, release
from pyvol import config as pyvol_config
from pyvol import fs, mountinfo
from pyvol.errors import CommandFailed
from pyvol.server import build


def test_sigkill_with_a_mounted_volume_keeps_the_mount_and_its_count(daemon):
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "k", "Opts": {"size": "64M"}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "k", "ID": "c1"})["Mountpoint"]
    api.ok("/VolumeDriver.Mount", {"Name": "k", "ID": "c2"})
    daemon.kill()
    with open(os.path.join(mp, "f"), "w") as f:  # writes go on with the daemon dead
        f.write("while down")
    daemon.start()
    api = daemon.api
    vol = api.ok("/VolumeDriver.Get", {"Name": "k"})["Volume"]
    assert vol["Mountpoint"] == mp and vol["Status"]["mounts"] == 2
    api.ok("/VolumeDriver.Unmount", {"Name": "k", "ID": "c1"})
    assert mountinfo.is_mounted(mp)
    api.ok("/VolumeDriver.Unmount", {"Name": "k", "ID": "c2"})
    assert not mountinfo.is_mounted(mp)
    api.ok("/VolumeDriver.Remove", {"Name": "k"})
    assert list(loop_devices_under(daemon.root).values()) == [str(daemon.root / "loop/pool.img")]


def test_second_daemon_on_the_same_root_is_refused(daemon, workdir):
    from helpers import Daemon

    other = Daemon(daemon.root, workdir / "other.sock")
    with pytest.raises(RuntimeError, match="another pyvol daemon"):
        other.start(wait=20)


def test_reboot_clears_stale_mounts_and_reattaches_the_pool(daemon):
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "r", "Opts": {"size": "64M"}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "r", "ID": "before-reboot"})["Mountpoint"]
    with open(os.path.join(mp, "f"), "w") as f:
        f.write("kept")
    daemon.stop()
    release(daemon.root)  # every mount and loop device gone, as after a power cycle
    db = sqlite3.connect(daemon.root / "state.db")
    db.execute("UPDATE meta SET value='another-boot' WHERE key='boot_id'")
    db.commit()
    db.close()
    daemon.start()
    api = daemon.api
    vol = api.ok("/VolumeDriver.Get", {"Name": "r"})["Volume"]
    assert vol["Status"]["mounts"] == 0 and vol["Mountpoint"] == ""
    mp = api.ok("/VolumeDriver.Mount", {"Name": "r", "ID": "after"})["Mountpoint"]
    assert open(os.path.join(mp, "f")).read() == "kept"
    api.ok("/VolumeDriver.Unmount", {"Name": "r", "ID": "after"})
    api.ok("/VolumeDriver.Remove", {"Name": "r"})


def test_interrupted_create_and_stray_mount_are_cleaned_at_start(daemon):
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "half", "Opts": {"size": "64M"}})
    api.ok("/VolumeDriver.Create", {"Name": "stray", "Opts": {"size": "64M"}})
    daemon.stop()
    # as if the daemon died mid-create of 'half', and after mounting 'stray' but before
    # recording who asked for it
    db = sqlite3.connect(daemon.root / "state.db")
    db.execute("UPDATE volumes SET status='creating' WHERE name='half'")
    db.commit()
    db.close()
    image = daemon.root / "loop/pool/volumes/stray.img"
    dev = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                         text=True, check=True).stdout.strip()
    mp = daemon.root / "mounts/stray"
    mp.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", dev, str(mp)], check=True)
    daemon.start()
    api = daemon.api
    assert "no such volume" in api.err("/VolumeDriver.Get", {"Name": "half"})
    assert not (daemon.root / "loop/pool/volumes/half.img").exists()
    assert not mountinfo.is_mounted(mp)
    assert api.ok("/VolumeDriver.Get", {"Name": "stray"})["Volume"]["Status"]["mounts"] == 0
    assert list(loop_devices_under(daemon.root).values()) == [str(daemon.root / "loop/pool.img")]
    api.ok("/VolumeDriver.Create", {"Name": "half", "Opts": {"size": "64M"}})  # name is free


def test_start_releases_devices_nothing_mounts_and_keeps_mounted_volumes(daemon):
    """Start-up releases, in one pass per backend, every device no mount holds: one a killed
    daemon left attached, and one whose mount went while the daemon was down (its count goes
    too); a volume still mounted keeps its device, its mount and its count."""
    api = daemon.api
    for name in ("busy", "gone", "leftover", "idle"):
        api.ok("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "64M"}})
    busy = api.ok("/VolumeDriver.Mount", {"Name": "busy", "ID": "c1"})["Mountpoint"]
    gone = api.ok("/VolumeDriver.Mount", {"Name": "gone", "ID": "c2"})["Mountpoint"]
    daemon.stop()
    subprocess.run(["umount", gone], check=True)  # its loop device stays bound
    images = daemon.root / "loop/pool/volumes"
    subprocess.run(["losetup", "-f", str(images / "leftover.img")], check=True)
    assert {os.path.basename(f) for f in loop_devices_under(daemon.root).values()} == {
        "pool.img", "busy.img", "gone.img", "leftover.img"}
    daemon.start()
    api = daemon.api
    assert sorted(loop_devices_under(daemon.root).values()) == [
        str(daemon.root / "loop/pool.img"), str(images / "busy.img")]
    assert mountinfo.is_mounted(busy)
    assert api.ok("/VolumeDriver.Get", {"Name": "busy"})["Volume"]["Status"]["mounts"] == 1
    assert api.ok("/VolumeDriver.Get", {"Name": "gone"})["Volume"]["Status"]["mounts"] == 0
    assert api.ok("/VolumeDriver.Mount", {"Name": "gone", "ID": "c3"})["Mountpoint"] == gone
    api.ok("/VolumeDriver.Unmount", {"Name": "gone", "ID": "c3"})
    api.ok("/VolumeDriver.Unmount", {"Name": "busy", "ID": "c1"})


def test_failed_mkfs_leaves_no_record_and_no_image(workdir, monkeypatch):
    """In-process: the one fault injected is the narrowest seam, mkfs itself failing."""
    cfg = pyvol_config.load(root=str(workdir / "root"), socket=str(workdir / "s.sock"),
                            env={"PYVOL_LOOP_POOL_SIZE": "4G"})
    parts = build(cfg)
    loop = parts.host.backends["loop"]

    def broken_mkfs(*a, **kw):
        raise CommandFailed("mkfs.ext4 failed (exit 1): injected")

    monkeypatch.setattr(fs, "mkfs", broken_mkfs)
    with pytest.raises(CommandFailed, match="injected"):
        parts.volumes.create("doomed", {"size": "64M"})
    assert parts.host.store.volume("doomed") is None
    assert loop.list() == []
    assert list(loop_devices_under(workdir / "root").values()) == [
        str(workdir / "root/loop/pool.img")]
    monkeypatch.undo()
    assert parts.volumes.create("doomed", {"size": "64M"})["Name"] == "doomed"
    probe.teardown(loop)


def test_orphaned_image_is_never_overwritten(daemon):
    api = daemon.api
    orphan = daemon.root / "loop/pool/volumes/orphan.img"
    orphan.write_bytes(b"precious")
    err = api.err("/VolumeDriver.Create", {"Name": "orphan", "Opts": {"size": "64M"}})
    assert "no record of" in err
    assert orphan.read_bytes() == b"precious"
    assert "no such volume" in api.err("/VolumeDriver.Get", {"Name": "orphan"})
