"""What the tests ask of a backend that the product never does.

The backend contract (pyvol/backends/base.py) holds exactly what pyvol calls. Tests also
need to see a volume's recorded size, whether it is active now, and to release a backend's
host resources as a shutdown would, so that a fresh instance proves it can bring everything
back. Those questions are answered here, from each backend's own storage, so that no backend
carries methods only tests use.
"""

from __future__ import annotations

import contextlib
import subprocess

from pyvol.backends import loopdev
from pyvol.backends.devicemapper import DevicemapperBackend, dmsetup
from pyvol.backends.ebs import EbsBackend, GiB
from pyvol.backends.loop import LoopBackend
from pyvol.backends.nfs import NfsBackend
from pyvol.errors import Conflict, NotFound


def size(b, name: str) -> int:
    """The size the backend recorded for the volume (a file volume's is advisory)."""
    if isinstance(b, LoopBackend):
        return b._need(b._image(name), f"volume {name}").stat().st_size
    if isinstance(b, DevicemapperBackend):
        return b._vol(name)["size"]
    if isinstance(b, NfsBackend):
        return int(b._find(name)[1]["size"])
    if isinstance(b, EbsBackend):
        return b._find(name)["Size"] * GiB
    raise TypeError(f"no size probe for {type(b).__name__}")


def active_device(b, name: str) -> str | None:
    """The device (or directory) of a volume this host has active, else None."""
    if isinstance(b, LoopBackend):
        return loopdev.find(b._image(name))
    if isinstance(b, DevicemapperBackend):
        vol = b._load()["volumes"].get(name)
        if vol is None or not b._exists(b._thin_name(vol["id"])):
            return None
        return f"/dev/mapper/{b._thin_name(vol['id'])}"
    if isinstance(b, NfsBackend):
        try:
            share, _ = b._find(name)
        except NotFound:
            return None
        claim = share.base / "leases" / name / f"{b.instance}.json"
        return str(share.base / "volumes" / name) if share.call(claim.exists) else None
    if isinstance(b, EbsBackend):
        try:
            v = b._find(name)
        except NotFound:
            return None
        mine = b._attachment(v)
        return b._device(v["VolumeId"], mine["Device"]) if mine else None
    raise TypeError(f"no active_device probe for {type(b).__name__}")


def teardown(b) -> None:
    """Release host resources (devices, pool mounts) as a host shutdown would; keep data."""
    if isinstance(b, LoopBackend):
        for name in b.list():
            b.deactivate(name)
        try:
            ours = b._mounted_pool()
        except Conflict:
            ours = None  # someone else's filesystem: not ours to unmount
        if ours is not None:
            subprocess.run(["umount", str(b.pool)], check=True, timeout=120)
        loopdev.detach(b.pool_file)
    elif isinstance(b, DevicemapperBackend):
        for line in dmsetup("ls", timeout=10).splitlines():
            dm_name = line.split()[0] if line.strip() else ""
            if dm_name.startswith(b.prefix + "-") and dm_name != b.pool:
                dmsetup("remove", "--retry", dm_name)
        if b._exists(b.pool):
            dmsetup("remove", "--retry", b.pool)
        if not b.data_device:
            loopdev.detach(b.data_file)
            loopdev.detach(b.metadata_file)
    elif isinstance(b, NfsBackend):
        # as at host shutdown: deletions stop, and the next setup finishes them
        b._closed = True
        for proc in list(b._rm_procs):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for t in list(b._deleters):
            t.join(timeout=30)
        for share in b.shares.values():
            if share.mounted():
                subprocess.run(["umount", "-f", str(share.mount_dir)], check=True,
                               timeout=share.timeout + 5)
    elif isinstance(b, EbsBackend):
        b._ec2 = None
    else:
        raise TypeError(f"no teardown probe for {type(b).__name__}")


def quietly_teardown(b) -> None:
    """teardown() at the end of a test, where a failure must not hide the test's own."""
    with contextlib.suppress(Exception):
        teardown(b)

