"""`pyvol resize VOL SIZE` (issue 16, part 4): a mounted volume grows under a container that
writes to it, and the container sees the new size; shrinks and sizes the pool may not hold
are refused; a volume nobody mounts grows too, ext4 and xfs. (Each backend's grow:
tests/test_conformance.py; a directory volume's advisory size: test_resize_of_a_directory_
volume_changes_its_advisory_size, in the qemu lane.)"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers import Daemon

MiB = 1 << 20


def _df(out: str) -> list[str]:
    """busybox df's one row: FS, 1K-BLOCKS, USED, AVAILABLE, USE%, MOUNTED ON (a long device
    name, /dev/mapper/..., puts the numbers on a line of their own)."""
    return " ".join(out.splitlines()[1:]).split()


def _size(d: Daemon, vol: str) -> int:
    return json.loads(d.cli("inspect", vol, "--json").stdout)["Status"]["size"]


@pytest.mark.docker
@pytest.mark.parametrize("backend,fstype", [
    ("loop", "xfs"),
    # ext4 grows online only with CAP_SYS_RESOURCE, which the qemu lane's root has
    # (this host's sandbox drops it: test_a_mounted_ext4_grows_or_is_refused_before_any_change)
    pytest.param("devicemapper", "ext4", marks=pytest.mark.devicemapper),
])
def test_a_mounted_volume_grows_while_a_container_writes_to_it(dockerd, plugin, backend,
                                                               fstype):
    d = plugin.driver
    dockerd.run("volume", "create", "-d", d, "-o", "size=320M", "-o", f"backend={backend}",
                "-o", f"fs={fstype}", "growing")
    dockerd.run("run", "-d", "--name", "writer", "-v", "growing:/d", "busybox", "sh", "-c",
                "dd if=/dev/urandom of=/d/blob bs=1M count=16 2>/dev/null && sync && "
                "i=0; while true; do i=$((i+1)); echo $i >> /d/log; sleep 0.05; done")

    def lines():
        r = dockerd.run("exec", "writer", "sh", "-c", "wc -l < /d/log", check=False)
        return int(r.stdout.strip() or 0) if r.returncode == 0 else 0

    deadline = time.monotonic() + 60
    while lines() < 5:
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.2)
    blob = dockerd.run("exec", "writer", "sha256sum", "/d/blob").stdout.split()[0]
    df = _df(dockerd.run("exec", "writer", "df", "-k", "/d").stdout)
    assert int(df[1]) < 330 * 1024

    out = plugin.cli("resize", "growing", "1G").stdout
    assert out.split() == ["growing", "1G"]

    df = _df(dockerd.run("exec", "writer", "df", "-k", "/d").stdout)
    assert 900 * 1024 < int(df[1]) <= 1024 * 1024  # the container sees the new size
    before = lines()
    time.sleep(1)
    assert lines() > before  # and kept writing through it
    assert dockerd.run("exec", "writer", "sha256sum", "/d/blob").stdout.split()[0] == blob
    # room the old size did not have
    dockerd.run("exec", "writer", "dd", "if=/dev/zero", "of=/d/big", "bs=1M", "count=400")
    assert _size(plugin, "growing") == 1 << 30
    assert dockerd.run("volume", "inspect", "-f", "{{json .Status.size}}",
                       "growing").stdout.strip() == str(1 << 30)


def test_a_mounted_ext4_grows_or_is_refused_before_any_change(daemon):
    """Where the daemon has CAP_SYS_RESOURCE the mounted ext4 grows; where it does not (this
    host's sandbox), the refusal says so before the device changes, and an unmounted
    resize then works."""
    from pyvol.fs import CAP_SYS_RESOURCE, _has_capability

    daemon.cli("create", "e4", "--size", "128M", "--fs", "ext4")
    mp = daemon.cli("mount", "e4").stdout.strip()
    r = daemon.cli("resize", "e4", "256M", check=False)
    image = daemon.root / "loop" / "pool" / "volumes" / "e4.img"
    if _has_capability(CAP_SYS_RESOURCE):
        assert r.returncode == 0, r.stderr
        st = os.statvfs(mp)
        assert st.f_blocks * st.f_frsize > 200 * MiB
        daemon.cli("umount", "e4")
        return
    assert r.returncode == 1 and "CAP_SYS_RESOURCE" in r.stderr and "unmounted" in r.stderr
    assert image.stat().st_size == 128 * MiB and _size(daemon, "e4") == 128 * MiB
    daemon.cli("umount", "e4")
    daemon.cli("resize", "e4", "256M")
    assert image.stat().st_size == 256 * MiB and _size(daemon, "e4") == 256 * MiB


def test_shrink_and_sizes_beyond_the_pool_are_refused_and_change_nothing(daemon):
    daemon.cli("create", "fixed", "--size", "256M")
    r = daemon.cli("resize", "fixed", "128M", check=False)
    assert r.returncode == 1
    assert "smaller than volume fixed (256M)" in r.stderr and "only grows" in r.stderr
    assert "256M or larger" in r.stderr
    # the daemon's loop pool is 20G (tests/helpers.py): as at create, no volume is larger
    r = daemon.cli("resize", "fixed", "30G", check=False)
    assert r.returncode == 1 and "larger than the loop pool" in r.stderr
    assert "PYVOL_LOOP_POOL_SIZE" in r.stderr
    assert _size(daemon, "fixed") == 256 * MiB
    image = daemon.root / "loop" / "pool" / "volumes" / "fixed.img"
    assert image.stat().st_size == 256 * MiB
    r = daemon.api.raw("/pyvol/v1/volumes/fixed/resize", b'{"Size": 1024}')
    assert r.status_code == 400 and "'Size'" in r.json()["Err"] and "20G" in r.json()["Err"]
    r = daemon.api.raw("/pyvol/v1/volumes/fixed/resize", b'{"Size": "lots"}')
    assert r.status_code == 400 and "lots" in r.json()["Err"]
    r = daemon.api.raw("/pyvol/v1/volumes/nosuch/resize", b'{"Size": "1G"}')
    assert r.status_code == 404 and "no such volume: nosuch" in r.json()["Err"]


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_an_unmounted_volume_grows_with_its_filesystem(daemon, fstype):
    daemon.cli("create", "idle", "--size", "320M", "--fs", fstype)
    data = os.urandom(4 * MiB)
    mp = daemon.cli("mount", "idle").stdout.strip()
    with open(os.path.join(mp, "data"), "wb") as f:
        f.write(data)
    daemon.cli("umount", "idle")
    daemon.cli("resize", "idle", "1G")
    daemon.cli("resize", "idle", "1G")  # the same size again: nothing to do, no error
    mp = daemon.cli("mount", "idle").stdout.strip()
    try:
        st = os.statvfs(mp)
        assert st.f_blocks * st.f_frsize > 900 * MiB
        assert open(os.path.join(mp, "data"), "rb").read() == data
    finally:
        daemon.cli("umount", "idle")
    assert _size(daemon, "idle") == 1 << 30


@pytest.mark.nfs
def test_resize_of_a_directory_volume_changes_its_advisory_size(workdir, nfs_export):
    d = Daemon(workdir / "root", workdir / "pyvol.sock", env={
        "PYVOL_NFS_SHARES": f"main=127.0.0.1:{nfs_export}", "PYVOL_BACKENDS": "nfs"}).start()
    try:
        # the API for what is not resize's (each CLI call is seconds under the qemu lane)
        d.api.ok("/VolumeDriver.Create", {"Name": "shared", "Opts": {"size": "1G"}})
        mp = d.api.ok("/VolumeDriver.Mount", {"Name": "shared", "ID": "c"})["Mountpoint"]
        with open(os.path.join(mp, "f"), "w") as f:
            f.write("kept")
        d.cli("resize", "shared", "5G")  # mounted: only the record changes
        status = d.api.ok("/VolumeDriver.Get", {"Name": "shared"})["Volume"]["Status"]
        assert status["size"] == 5 << 30
        record = json.loads((nfs_export / "pyvol" / "meta" / "shared.json").read_text())
        assert record["size"] == 5 << 30  # what every host reads
        assert open(os.path.join(mp, "f")).read() == "kept"
        r = d.cli("resize", "shared", "2G", check=False)
        assert r.returncode == 1 and "only grows" in r.stderr
        d.api.ok("/VolumeDriver.Unmount", {"Name": "shared", "ID": "c"})
    finally:
        d.stop()


def _fs_bytes(mp: str) -> int:
    st = os.statvfs(mp)
    return st.f_blocks * st.f_frsize


@pytest.mark.parametrize("step,recorded", [
    ("resize.grown", 320 * MiB),   # the device grown, the record not yet
    ("resize.recorded", 1 << 30),  # the record says 1G, the filesystem not grown yet
])
def test_a_daemon_killed_during_a_resize_keeps_the_mount_and_data_and_a_rerun_finishes(
        workdir, step, recorded):
    """Killed at either step of a resize of a mounted volume: the container's mount and data
    are untouched, the filesystem is never larger than the record (a snapshot keeps the
    record's size and a block backup reads that many bytes: a filesystem past it would be
    backed up cut off), a snapshot taken then clones into a volume that mounts with the
    data, and the same resize again finishes it."""
    root, sock = workdir / "root", workdir / "pyvol.sock"
    data = os.urandom(4 * MiB)
    d = Daemon(root, sock, env={"PYVOL_CRASH_AT": step}).start()
    d.cli("create", "killed", "--size", "320M", "--fs", "xfs")
    mp = d.cli("mount", "killed", "--id", "container-1").stdout.strip()
    with open(os.path.join(mp, "data"), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    assert d.cli("resize", "killed", "1G", check=False).returncode != 0
    d.proc.wait(timeout=30)  # killed at the step
    d.stop()
    d = Daemon(root, sock).start()
    try:
        v = json.loads(d.cli("inspect", "killed", "--json").stdout)
        assert v["Status"]["mounts"] == 1 and v["Mountpoint"] == mp
        assert v["Status"]["size"] == recorded
        assert _fs_bytes(mp) <= 320 * MiB  # the filesystem has not grown, at either step
        assert open(os.path.join(mp, "data"), "rb").read() == data
        # what a snapshot keeps now holds the whole filesystem
        d.cli("snapshot", "create", "killed", "--name", "then")
        d.cli("create", "copy", "--from-snapshot", "killed@then")
        copy = d.cli("mount", "copy").stdout.strip()
        assert open(os.path.join(copy, "data"), "rb").read() == data
        d.cli("umount", "copy")
        d.cli("resize", "killed", "1G")
        assert 950 * MiB < _fs_bytes(mp) <= 1 << 30
        assert _size(d, "killed") == 1 << 30
        d.cli("umount", "killed", "--id", "container-1")
    finally:
        d.stop()


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_the_filesystem_grows_to_the_recorded_size_never_to_a_larger_device(daemon, fstype):
    """A device a crash left larger than its record (grown, not recorded), then resized to
    less than the device: the device is not shrunk, and the filesystem grows to the record,
    not over the whole device, which the record (and every backup) would cut off."""
    daemon.cli("create", "big", "--size", "320M", "--fs", fstype)
    image = daemon.root / "loop" / "pool" / "volumes" / "big.img"
    os.truncate(image, 1 << 30)  # what the loop backend's grow to 1G leaves
    daemon.cli("resize", "big", "512M")
    assert image.stat().st_size == 1 << 30 and _size(daemon, "big") == 512 * MiB
    mp = daemon.cli("mount", "big").stdout.strip()
    try:
        assert 400 * MiB < _fs_bytes(mp) <= 512 * MiB  # (less what xfs keeps for its log)
    finally:
        daemon.cli("umount", "big")



def test_an_ext4_past_its_record_is_never_shrunk_and_the_error_says_what_fixes_it(daemon):
    """A resize of an older pyvol, cut short by a crash, could leave ext4 spread over a
    device larger than the record. resize2fs takes a smaller size as an order to shrink:
    pyvol never gives it one, and says which size puts the record right."""
    daemon.cli("create", "past", "--size", "320M", "--fs", "ext4")
    mp = daemon.cli("mount", "past").stdout.strip()
    payload = os.urandom(1 << 20)
    Path(mp, "data").write_bytes(payload)
    daemon.cli("umount", "past")
    image = daemon.root / "loop" / "pool" / "volumes" / "past.img"
    os.truncate(image, 1 << 30)
    subprocess.run(["e2fsck", "-f", "-p", str(image)], capture_output=True)
    subprocess.run(["resize2fs", str(image), "1G"], check=True, capture_output=True)
    r = daemon.cli("resize", "past", "512M", check=False)
    assert r.returncode == 1 and "resize the volume to at least 1G" in r.stderr, r.stderr
    daemon.cli("resize", "past", "1G")
    mp = daemon.cli("mount", "past").stdout.strip()
    try:
        assert 900 * MiB < _fs_bytes(mp) <= 1 << 30
        assert Path(mp, "data").read_bytes() == payload
    finally:
        daemon.cli("umount", "past")

def test_sizes_are_whole_mebibytes_at_create_and_resize(daemon):
    """A size between two MiB is rounded up, at create and at resize alike: a device holds
    whole sectors, so a record between two would say more than the device holds, and a
    block backup reads what the record says."""
    daemon.cli("create", "odd", "--size", "100000001")  # 95.37 MiB
    image = daemon.root / "loop" / "pool" / "volumes" / "odd.img"
    assert _size(daemon, "odd") == 96 * MiB == image.stat().st_size
    daemon.cli("resize", "odd", "0.18750001G")  # 192 MiB and 10 bytes
    assert _size(daemon, "odd") == 193 * MiB == image.stat().st_size
    r = daemon.cli("resize", "odd", "200000001", check=False)  # 190.73 MiB, rounded: 191M
    assert r.returncode == 1 and "size 191M is smaller than volume odd (193M)" in r.stderr
    r = daemon.cli("resize", "odd", "8191.9999999999P", check=False)
    assert r.returncode == 1 and "8 EiB" in r.stderr


class _Share:
    """What _update_record touches of an nfs share, on a local directory."""

    name = "main"
    timeout = 4

    def __init__(self, base):
        self.base = base

    @staticmethod
    def gave_up() -> bool:
        return False


def _nfs_record(tmp_path, doc) -> tuple[_Share, object]:
    (tmp_path / "meta").mkdir()
    meta = tmp_path / "meta" / "v.json"
    meta.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return _Share(tmp_path), meta


READY = {"name": "v", "size": 1 << 30, "status": "ready", "created_by": "host-b"}


@pytest.mark.parametrize("doc,why", [
    ("[1, 2]", "not a JSON object"),
    ("not json", "not a JSON object"),
    ({**READY, "status": "removing"}, "'removing'"),
    ({**READY, "status": "creating"}, "'creating'"),
    ({"size": 1 << 30}, "None"),
])
def test_an_nfs_resize_refuses_a_record_that_is_not_a_ready_volumes(tmp_path, doc, why):
    """Another host's record is untrusted: one that is no object, or not 'ready' (another
    host making or removing it), is refused with a 409 saying so and left as it was."""
    from pyvol.backends.nfs import NfsBackend
    from pyvol.errors import Conflict

    share, meta = _nfs_record(tmp_path, doc)
    before = meta.read_text()
    with pytest.raises(Conflict, match="not resized") as e:
        NfsBackend._set_size(share, "v", 2 << 30)
    assert why in str(e.value) and e.value.http_status == 409
    assert meta.read_text() == before


def test_an_nfs_resize_overwrites_a_size_that_is_no_number_and_keeps_a_larger_one(tmp_path):
    from pyvol.backends.nfs import NfsBackend

    share, meta = _nfs_record(tmp_path, {**READY, "size": "lots"})
    NfsBackend._set_size(share, "v", 2 << 30)
    assert json.loads(meta.read_text()) == {**READY, "size": 2 << 30}
    NfsBackend._set_size(share, "v", 1 << 30)  # never smaller
    assert json.loads(meta.read_text())["size"] == 2 << 30


@pytest.mark.parametrize("race", ["removed", "rewritten"])
def test_an_nfs_resize_racing_another_hosts_remove_writes_no_ghost_record(
        tmp_path, monkeypatch, race):
    """Host B removes (or rewrites) the record between this host's read and its write: the
    resize is refused, and no record of a removed volume is written back."""
    from pyvol.backends import nfs
    from pyvol.errors import Conflict

    share, meta = _nfs_record(tmp_path, READY)
    real = nfs.json.loads

    def read_then_race(text, *a, **k):
        doc = real(text, *a, **k)
        if race == "removed":
            meta.unlink()
        else:  # as _write_json does: a new file renamed over the record
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps({**READY, "status": "removing"}))
            os.replace(tmp, meta)
        return doc

    monkeypatch.setattr(nfs.json, "loads", read_then_race)
    with pytest.raises(Conflict, match="changed while it was being resized"):
        nfs.NfsBackend._set_size(share, "v", 2 << 30)
    monkeypatch.setattr(nfs.json, "loads", real)
    if race == "removed":
        assert not meta.exists()
    else:
        assert json.loads(meta.read_text())["status"] == "removing"
