"""The loop backend's pool: thin, auto-provisioned, and failing fast when full."""

import errno
import json
import os
import subprocess
import threading
import time

import helpers
from helpers import Daemon, in_mount_ns, release, write_at
from pyvol import mountinfo
from pyvol.backends import loopdev


def test_pool_is_sparse_and_provisioned_at_first_start(daemon):
    pool = daemon.root / "loop/pool.img"
    st = os.stat(pool)
    assert st.st_size == 20 << 30
    assert st.st_blocks * 512 < 200 << 20, "the pool file must not allocate up front"
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "thin", "Opts": {"size": "10G"}})
    image = daemon.root / "loop/pool/volumes/thin.img"
    assert os.stat(image).st_blocks * 512 < 300 << 20, "a new volume is thin"
    api.ok("/VolumeDriver.Remove", {"Name": "thin"})


def test_full_pool_fails_writes_fast_and_refuses_creates_clearly(workdir):
    d = Daemon(workdir / "root", workdir / "pyvol.sock", env={"PYVOL_LOOP_POOL_SIZE": "1G"})
    d.start()
    try:
        api = d.api
        api.ok("/VolumeDriver.Create", {"Name": "a", "Opts": {"size": "700M"}})
        api.ok("/VolumeDriver.Create", {"Name": "b", "Opts": {"size": "700M"}})  # thin: overcommit
        mps = [api.ok("/VolumeDriver.Mount", {"Name": n, "ID": "w"})["Mountpoint"] for n in "ab"]
        chunk = os.urandom(1 << 20)
        started, failure = time.monotonic(), None
        for mp in mps:
            try:
                with open(os.path.join(mp, "fill"), "wb") as f:
                    for i in range(600):  # fits each volume; both overflow the pool
                        f.write(chunk)
                        if i % 16 == 15:
                            f.flush()
                            os.fsync(f.fileno())
                    os.fsync(f.fileno())
            except OSError as e:
                failure = e
                break
        elapsed = time.monotonic() - started
        assert failure is not None, "1.2G written into a 1G pool without an error"
        assert failure.errno in (errno.EIO, errno.ENOSPC, errno.EROFS), failure
        assert elapsed < 120, f"writes into a full pool took {elapsed:.0f}s to fail"

        err = api.err("/VolumeDriver.Create", {"Name": "c", "Opts": {"size": "100M"}})
        assert "the loop pool is full" in err
        info = api.ok("/VolumeDriver.Get", {"Name": "a"})["Volume"]
        assert info["Status"]["allocated"] > 100 << 20
        # a full pool must still let the user clean up
        for n in "ab":
            api.ok("/VolumeDriver.Unmount", {"Name": n, "ID": "w"})
            api.ok("/VolumeDriver.Remove", {"Name": n})
        api.ok("/VolumeDriver.Create", {"Name": "c", "Opts": {"size": "100M"}})
    finally:
        d.stop()


def _bound_to(path) -> list[str]:
    want = loopdev.identity(path)
    return [d for d, s in loopdev.bound().items() if (s.st_dev, s.st_ino) == want]


def test_a_bound_device_with_a_detach_pending_is_reused_not_doubled(workdir):
    """`losetup -d` of a device someone holds open only marks it autoclear: it stays bound,
    the file's one device. Attaching must reuse it (a second device would be a second
    filesystem instance on the same file) and make sure it stays bound for the mount."""
    image = workdir / "v.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    dev = loopdev.attach(image)
    holder = os.open(dev, os.O_RDONLY)  # as a mount in another namespace, or a scan, would
    try:
        subprocess.run(["losetup", "-d", dev], check=True)
        assert loopdev.status(dev).autoclear, "the detach should be pending"
        assert loopdev.find(image) == dev
        assert loopdev.attach(image) == dev
        assert _bound_to(image) == [dev]
        assert not loopdev.status(dev).autoclear, "reused, so the pending detach is cancelled"
    finally:
        os.close(holder)
    # the holder's close no longer unbinds it: still there for the mount that follows
    assert loopdev.status(dev) is not None and loopdev.find(image) == dev
    loopdev.detach(image)
    assert loopdev.find(image) is None and _bound_to(image) == []


def test_a_teardown_never_detaches_a_device_bound_again_since_it_was_listed(workdir,
                                                                          monkeypatch):
    """The suite's two lanes run at once: one test's teardown lists its devices, unmounts,
    then detaches them. A device whose detach was pending unbinds at that unmount, and the
    other lane's next attach takes its number. The teardown must leave that device bound (the
    ebs lane's volume read "can't read superblock" when it did not)."""
    root, theirs = workdir / "root", workdir / "theirs.img"
    root.mkdir()
    for image in (root / "mine.img", theirs):
        with open(image, "wb") as f:
            f.truncate(16 << 20)
    dev = loopdev.attach(root / "mine.img")
    listed = helpers._bound_under(root)
    assert list(listed) == [dev]
    loopdev.detach(root / "mine.img")
    dev = loopdev.attach(theirs)  # the freed number, unless another process took it first
    stale = iter([{dev: listed.popitem()[1]}])  # the listing, then nothing left under root
    monkeypatch.setattr(helpers, "_bound_under", lambda _: next(stale, {}))
    try:
        release(root)
        assert loopdev.find(theirs) == dev, "another test's device was detached"
    finally:
        loopdev.detach(theirs)


def test_detach_outlasts_a_passing_opener(workdir):
    """A scan holding the device open for a moment defers the unbind; detach waits it out,
    so the device is gone when detach returns (and is never found again half-detached)."""
    image = workdir / "v.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    dev = loopdev.attach(image)
    holder = os.open(dev, os.O_RDONLY)
    threading.Timer(0.3, os.close, [holder]).start()
    loopdev.detach(image)
    assert loopdev.find(image) is None, f"{dev} still bound to the image after detach"


def test_restart_in_a_new_mount_namespace_reuses_the_mounted_device(workdir):
    """A managed plugin restarted with a container running: the new instance (a new mount
    namespace) does not see the old mount, drops its count and detaches, which only marks the
    device autoclear since the old mount holds it. The next Mount must use that same device:
    one filesystem instance, so what either side writes the other reads at once."""
    d = Daemon(workdir / "root", workdir / "pyvol.sock")
    d.start()
    try:
        api = d.api
        api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "64M"}})
        mp = api.ok("/VolumeDriver.Mount", {"Name": "v", "ID": "c1"})["Mountpoint"]
        image = d.root / "loop/pool/volumes/v.img"
        dev = loopdev.find(image)
        d.kill()
        # the new instance's namespace lacks the old mount; the host keeps it
        d.wrap = ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
                  f'umount "{mp}" && exec "$@"', "sh"]
        d.start()
        assert mountinfo.is_mounted(mp)
        assert loopdev.status(dev).autoclear, "recovery's detach should be pending"
        assert d.api.ok("/VolumeDriver.Mount", {"Name": "v", "ID": "c2"})["Mountpoint"] == mp
        assert _bound_to(image) == [dev], "a second loop device on the same image"
        with open(os.path.join(mp, "from-host"), "w") as f:
            f.write("host")
        assert in_mount_ns(d.proc.pid, "cat", f"{mp}/from-host").stdout == "host"
        in_mount_ns(d.proc.pid, "sh", "-c", f'printf plugin > "{mp}/from-plugin"')
        with open(os.path.join(mp, "from-plugin")) as f:
            assert f.read() == "plugin"
        d.api.ok("/VolumeDriver.Unmount", {"Name": "v", "ID": "c2"})
        assert mountinfo.is_mounted(mp)  # the host's mount, the old container's, stays
    finally:
        d.stop()
        subprocess.run(["umount", mp], check=False)


def test_a_foreign_filesystem_on_the_pool_directory_is_refused(workdir):
    """Whatever is mounted on ROOT/loop/pool must be the filesystem in ROOT/loop/pool.img (by
    device numbers): another daemon's pool there, as an older pyvol could leave it, holds
    another daemon's images, and the loop backend refuses to start on it."""
    d = Daemon(workdir / "root", workdir / "pyvol.sock")
    d.start()
    d.stop()
    release(workdir / "root")
    pool = workdir / "root/loop/pool"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "intruder", str(pool)], check=True)
    try:
        d.start()
        reason = json.loads(d.cli("info", "--json").stdout)["backends"]["loop"]["reason"]
        assert "not the one in" in reason and str(workdir / "root/loop/pool.img") in reason
        d.api.err("/VolumeDriver.Create", {"Name": "v"})
        d.stop()
    finally:
        subprocess.run(["umount", str(pool)], check=False)
    d.start()  # once it is gone, the pool is mounted again
    assert json.loads(d.cli("info", "--json").stdout)["backends"]["loop"]["available"]
    d.stop()


def _pool_device(root) -> str:
    dev = loopdev.find(root / "loop/pool.img")
    assert dev is not None, "the pool file is not attached"
    return os.path.basename(dev)


def _sys(dev: str, attribute: str) -> str:
    with open(f"/sys/block/{dev}/{attribute}") as f:
        return f.read().strip()


def test_the_pool_bypasses_the_page_cache_and_older_pools_still_mount(workdir):
    """The pool's loop device uses direct I/O: buffered, the pool file's pages were a second
    copy of what the volumes' filesystems cache. A pool that an earlier pyvol made (512-byte
    sectors; new ones have 4096) is attached with its own sector size, so it still mounts."""
    old = workdir / "old"
    (old / "loop").mkdir(parents=True)
    with open(old / "loop/pool.img", "wb") as f:
        f.truncate(2 << 30)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", "-L", "pyvol-pool",
                    str(old / "loop/pool.img")], check=True, timeout=120)
    for root, sectors in ((workdir / "new", "4096"), (old, "512")):
        d = Daemon(root, workdir / f"{root.name}.sock", env={"PYVOL_LOOP_POOL_SIZE": "2G"})
        d.start()
        try:
            dev = _pool_device(root)
            assert _sys(dev, "loop/dio") == "1", f"{root.name} pool attached buffered"
            assert _sys(dev, "queue/logical_block_size") == sectors
            api = d.api
            api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "64M"}})
            mp = api.ok("/VolumeDriver.Mount", {"Name": "v", "ID": "c"})["Mountpoint"]
            with open(os.path.join(mp, "data"), "wb") as f:
                f.write(b"x" * (1 << 20))
                os.fsync(f.fileno())
            api.ok("/VolumeDriver.Unmount", {"Name": "v", "ID": "c"})
            api.ok("/VolumeDriver.Remove", {"Name": "v"})
        finally:
            d.stop()
            release(root)


def test_a_file_that_refuses_direct_io_is_attached_buffered(workdir):
    """ramfs has no O_DIRECT (nor tmpfs before Linux 6.6: the qemu lane's pools are on one),
    and the kernel refuses a loop device with direct I/O on it: attach falls back to
    buffered rather than fail. Nor has it XFS's handles, which an untimed attach falls back
    from to losetup."""
    fs_dir = workdir / "ramfs"
    fs_dir.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "pyvol-test", str(fs_dir)], check=True)
    try:
        image = fs_dir / "v.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        dev = os.path.basename(loopdev.attach(image))
        assert _sys(dev, "loop/dio") == "0"
        assert _sys(dev, "queue/logical_block_size") == "4096"
        loopdev.detach(image)
        # nor is it XFS: an untimed attach (a volume's) falls back to losetup's, as ever
        dev = os.path.basename(loopdev.attach(image, untimed=True))
        assert _sys(dev, "loop/backing_file") == str(image)
        assert _sys(dev, "loop/dio") == "0"
        loopdev.detach(image)
    finally:
        subprocess.run(["umount", str(fs_dir)], check=False)


def test_writes_through_a_volume_leave_its_image_timestamps_alone(daemon):
    """Each flush on a volume is a full fsync of its image in the pool's XFS, and an image
    whose mtime had moved since the last one cost the pool a log commit and force to record
    it. The image is bound through its XFS handle (no c/mtime updates): its blocks fill, its
    times stay."""
    api = daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "256M"}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "v", "ID": "c"})["Mountpoint"]
    image = daemon.root / "loop/pool/volumes/v.img"
    dev = os.path.basename(loopdev.find(image))
    assert _sys(dev, "loop/dio") == "1"
    assert _sys(dev, "queue/logical_block_size") == "4096"
    assert _sys(dev, "loop/backing_file") == str(image)
    before = os.stat(image)
    time.sleep(0.1)  # many clock ticks: a timestamp that moved would show it
    with open(os.path.join(mp, "data"), "wb") as f:
        for _ in range(32):
            f.write(os.urandom(256 << 10))
            os.fsync(f.fileno())
    after = os.stat(image)
    assert after.st_blocks - before.st_blocks >= (8 << 20) // 512, "the writes reached the image"
    assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
    api.ok("/VolumeDriver.Unmount", {"Name": "v", "ID": "c"})
    api.ok("/VolumeDriver.Remove", {"Name": "v"})


def test_an_untimed_attach_the_kernel_refuses_falls_back_to_losetup(workdir, monkeypatch):
    """A kernel without LOOP_CONFIGURE (before 5.8) answers it with EINVAL or ENOTTY: the
    volume is then attached by losetup, with its timestamps following its writes, not
    refused."""
    pool, mnt = workdir / "pool.img", workdir / "pool"
    with open(pool, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-s", "size=4096", str(pool)], check=True, timeout=120)
    mnt.mkdir()
    subprocess.run(["mount", loopdev.attach(pool), str(mnt)], check=True, timeout=60)
    try:
        image = mnt / "v.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        monkeypatch.setattr(loopdev, "LOOP_CONFIGURE", 0x4CFF)  # no such loop ioctl
        dev = loopdev.attach(image, untimed=True)
        assert _sys(os.path.basename(dev), "loop/dio") == "1"
        assert _sys(os.path.basename(dev), "loop/backing_file") == str(image)
        before = os.stat(image).st_mtime_ns
        time.sleep(0.1)
        write_at(dev, 0, b"x" * 4096)
        assert os.stat(image).st_mtime_ns != before, "attached through the handle after all"
        loopdev.detach(image)
    finally:
        subprocess.run(["umount", str(mnt)], check=False, timeout=60)
        loopdev.detach(pool)
