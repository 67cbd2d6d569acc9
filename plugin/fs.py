"""Filesystems on block devices: make, mount, grow (a snapshot's freeze: freeze.py).

Shared by every block backend (loop, devicemapper, EBS), so a backend only has to hand over a
device. Every call is an external tool with a timeout; a hung mount must not hang the daemon.
"""

import logging
import os
from pathlib import Path

from . import mountinfo
from .errors import Conflict, InvalidInput, PyvolError
from .run import run
from .units import format_size

log = logging.getLogger(__name__)

FILESYSTEMS = ("ext4", "xfs")


def check_fstype(fstype: str) -> str:
    if fstype not in FILESYSTEMS:
        raise InvalidInput(f"invalid fs {fstype!r}: accepted are {', '.join(FILESYSTEMS)}")
    return fstype


def _probe(path: str, tag: str) -> str:
    """What blkid's low-level probe says of ``tag`` for the filesystem in ``path`` (a device
    or an image file); empty when there is none. blkid exits 2 when it finds nothing; any
    other failure (an I/O error) raises, so that a device that could not be read is never
    taken for an empty one."""
    return run(["blkid", "-p", "-o", "value", "-s", tag, path], timeout=30,
               ok_codes=(0, 2)).strip()


def detect(device: str) -> str | None:
    """The filesystem on ``device``, or None when it has none (never reformat one that has)."""
    return _probe(device, "TYPE") or None


def sector_size(path: str) -> int | None:
    """The sector size the filesystem in ``path`` was made for; None when blkid finds no
    filesystem or does not say."""
    out = _probe(path, "BLOCK_SIZE")
    return int(out) if out.isdigit() else None


def mkfs(device: str, fstype: str, label: str = "") -> None:
    check_fstype(fstype)
    if fstype == "ext4":
        # No reserved blocks: a volume is for the application, not for root's rescue.
        # lazy init keeps a thin volume thin; nodiscard skips a useless pass over fresh space.
        argv = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]
        if label:
            argv += ["-L", label[:16]]
    else:
        argv = ["mkfs.xfs", "-q", "-f", "-K"]
        if label:
            argv += ["-L", label[:12]]
    run(argv + [device], timeout=300)


def mount(device: str, mount_point: Path, fstype: str, discard: bool = False) -> None:
    opts = ["noatime"]
    if discard:
        opts.append("discard")  # deleted files return their space to a thin pool
    if fstype == "ext4":
        opts.append("errors=remount-ro")
    elif fstype == "xfs":
        opts.append("nouuid")  # a clone carries its origin's UUID
    mount_point.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", fstype, "-o", ",".join(opts), device, str(mount_point)], timeout=120)


def bind(directory: str, mount_point: Path) -> None:
    """A directory volume (nfs) appears at its mountpoint as a bind mount."""
    mount_point.mkdir(parents=True, exist_ok=True)
    run(["mount", "--bind", directory, str(mount_point)], timeout=60)


def umount(mount_point: Path) -> None:
    """Unmount every layer at ``mount_point``; raise if it is busy (never lazily detach data)."""
    while mountinfo.is_mounted(mount_point):
        run(["umount", str(mount_point)], timeout=120)


def grow(device: str, fstype: str, mount_point: Path, size: int) -> None:
    """Grow the filesystem on ``device`` to ``size`` bytes: the volume's recorded size, which
    the device already holds, and never past it. The device may be larger than its record (a
    resize a crash cut short before the record; EBS's whole GiB); a filesystem spread over
    that would outgrow the record, which is what a snapshot keeps and how many bytes a block
    backup reads: the backup of such a filesystem, cut off, would not mount once restored.

    ext4 is grown offline when it is not mounted (online growth needs CAP_SYS_RESOURCE, which
    containers and sandboxes often drop); xfs can only grow online, so it is mounted briefly.
    The size it already has again is not an error: both tools then do nothing.
    """
    if fstype == "ext4":
        spans = _ext4_size(device)
        if spans > size:
            # resize2fs takes a smaller size as an order to shrink: never. Only a crash in a
            # resize of an older pyvol leaves a filesystem past its record; resizing to its
            # size puts the record right.
            raise Conflict(f"the filesystem on {device} spans {format_size(spans)}, more than "
                           f"{format_size(size)}: resize the volume to at least "
                           f"{format_size(spans)}")
        if spans == size:
            return
        if not mountinfo.is_mounted(mount_point):
            run(["e2fsck", "-f", "-p", device], timeout=600, ok_codes=(0, 1))
        run(["resize2fs", device, f"{size // 1024}K"], timeout=600)
        return
    was_mounted = mountinfo.is_mounted(mount_point)
    if not was_mounted:
        mount(device, mount_point, fstype)
    try:
        block = os.statvfs(mount_point).f_frsize  # xfs_growfs -D counts the fs's blocks
        run(["xfs_growfs", "-D", str(size // block), str(mount_point)], timeout=600)
    finally:
        if not was_mounted:
            umount(mount_point)


def _ext4_size(device: str) -> int:
    """The bytes the ext4 filesystem on ``device`` spans, from its superblock."""
    fields = {}
    for line in run(["dumpe2fs", "-h", device], timeout=60).splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    try:
        return int(fields["Block count"]) * int(fields["Block size"])
    except (KeyError, ValueError):
        raise PyvolError(f"dumpe2fs gave no block count and size for {device}") from None


CAP_SYS_RESOURCE = 24  # <linux/capability.h>


def online_grow_refusal(fstype: str) -> str | None:
    """Why a mounted ``fstype`` cannot be grown by this process, or None when it can:
    the kernel grows a mounted ext4 only for CAP_SYS_RESOURCE, which containers and
    sandboxes often drop. Asked before the device grows, so nothing is left half-done."""
    if fstype == "ext4" and not _has_capability(CAP_SYS_RESOURCE):
        return ("growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which the pyvol "
                "daemon runs without here (a container or sandbox dropped it): stop the "
                "containers using the volume and resize it unmounted, or give the daemon "
                "that capability")
    return None


def _has_capability(cap: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def device_size(device: str) -> int:
    """Size in bytes of a block device (or file)."""
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def usage(mount_point: Path) -> dict:
    st = os.statvfs(mount_point)
    return {"fs_size": st.f_blocks * st.f_frsize, "fs_used": (st.f_blocks - st.f_bfree) * st.f_frsize}
