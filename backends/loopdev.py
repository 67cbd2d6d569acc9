"""Loop devices: attach a file, find what a file is attached to, detach.

A loop device is matched to its backing file by identity, never by path: LOOP_GET_STATUS64
gives the device and inode numbers of the file it is bound to, compared with ``os.stat`` of
ours. The path sysfs prints (``/sys/block/loopN/loop/backing_file``) is the file's path as
seen from the *reader's* mount namespace; a file another daemon attached in another namespace
can read exactly like ours (a managed plugin's ``/var/lib/pyvol/loop/pool.img`` and the host
service's), and a renamed or replaced file reads like its successor. The path is only a hint
for which devices to look at first. Device and inode numbers are exact while a device is bound:
the bound device holds its file open, so neither the inode nor its filesystem's device number
can be reused meanwhile.

Attach goes through losetup, which knows the kernel's races (LOOP_CTL_GET_FREE,
LOOP_CONFIGURE) better than we would, except for a file that must be bound through an fd of
our own (``untimed``): losetup can only open a path. Then attach takes a free device and
binds it with LOOP_CONFIGURE itself, as losetup does, trying the next free one when another
process took it first. Lookups and detach are ioctls on the device itself, so that the device
checked is the device acted on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyvol import devwait
from pyvol.errors import CommandFailed
from pyvol.run import run

from . import xfshandle

log = logging.getLogger(__name__)

SYS_BLOCK = Path("/sys/block")

# <linux/loop.h>
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64);
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32); lo_file_name[64],
# lo_crypt_name[64], lo_encrypt_key[32]; lo_init[2] (u64). 232 bytes, no padding.
_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
_FLAGS = 8  # index of lo_flags in the unpacked tuple
# struct loop_config: fd, block_size (u32); struct loop_info64 info; __reserved[8] (u64)
_CONFIG = struct.Struct(f"=2I{_INFO64.size}s64x")

# How long attach waits for the device it bound to be a node of the file's size here (where
# udevd, not devtmpfs, makes the nodes, they follow the attach by moments), and for a free
# device that others do not take first.
ATTACH_WAIT = 10.0

# How long detach waits for a short-lived opener (blkid, udev, another daemon's scan) to let
# go of a device, so that a detached device is gone when detach returns.
DETACH_WAIT = 2.0


@dataclass(frozen=True)
class Status:
    """What the kernel says a bound loop device is bound to."""

    st_dev: int  # device number of the backing file's filesystem
    st_ino: int  # the backing file's inode
    flags: int
    name: str  # lo_file_name: the path given at attach time, truncated; for messages only

    @property
    def autoclear(self) -> bool:
        """Detach pending: the device unbinds at its last close."""
        return bool(self.flags & LO_FLAGS_AUTOCLEAR)


def identity(path: str | Path) -> tuple[int, int]:
    """(st_dev, st_ino) of ``path``, the key a loop device is matched by."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def attached() -> dict[str, str]:
    """Map of /dev/loopN -> backing file *as this mount namespace prints it*, for every bound
    loop device. A hint, for ordering and messages: never decide identity with it.

    A device whose file was deleted shows the path with " (deleted)" appended.
    """
    result = {}
    for entry in SYS_BLOCK.glob("loop*"):
        try:
            result[f"/dev/{entry.name}"] = (entry / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:
            continue
    return result


def _number(dev: str) -> int:
    digits = dev[len("/dev/loop"):]
    return int(digits) if digits.isdigit() else 1 << 30


def _candidates(path: str | Path) -> list[str]:
    """Bound devices, those whose sysfs path reads like ``path`` first (the likely match)."""
    hint = os.path.realpath(path)
    return sorted(attached().items(), key=lambda kv: (kv[1] != hint, _number(kv[0])))


def _open(dev: str, flags: int = 0) -> int | None:
    """An fd on ``dev``, or None if it is no longer there or on its way out (ENXIO)."""
    try:
        return os.open(dev, os.O_RDONLY | os.O_CLOEXEC | flags)
    except FileNotFoundError:
        # bound (sysfs says so) but no node here: nothing this process could mount either
        log.debug("loop device %s has no device node; not inspected", dev)
        return None
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENODEV):
            return None
        raise


def _get_status(fd: int) -> tuple | None:
    buf = bytearray(_INFO64.size)
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
    except OSError as e:
        if e.errno == errno.ENXIO:  # not bound (any more)
            return None
        raise
    return _INFO64.unpack(buf)


def _to_status(info: tuple) -> Status:
    return Status(info[0], info[1], info[_FLAGS],
                  info[9].split(b"\0", 1)[0].decode(errors="replace"))


def status(dev: str) -> Status | None:
    """What ``dev`` is bound to, or None when it is not bound."""
    fd = _open(dev)
    if fd is None:
        return None
    try:
        info = _get_status(fd)
    finally:
        os.close(fd)
    return None if info is None else _to_status(info)


def bound() -> dict[str, Status]:
    """Every bound loop device with what it is bound to (opens each device briefly)."""
    result = {}
    for dev, _ in sorted(attached().items(), key=lambda kv: _number(kv[0])):
        st = status(dev)
        if st is not None:
            result[dev] = st
    return result


def find(path: Path) -> str | None:
    """The device bound to the file at ``path`` (by device and inode), if any.

    A device with a detach pending (autoclear) counts: it is still bound, and still the one
    filesystem instance of that file; attaching a second device next to it would make two.
    """
    try:
        want = identity(path)
    except FileNotFoundError:
        return None
    for dev, _ in _candidates(path):
        st = status(dev)
        if st is not None and (st.st_dev, st.st_ino) == want:
            return dev
    return None


def _reuse(path: Path, want: tuple[int, int]) -> str | None:
    """The device already bound to ``want``, made to stay bound; None if there is none.

    `losetup -d` only marks a device autoclear; it unbinds at the last close, so a device that
    someone holds open (a mount in another mount namespace, a scan, blkid) stays bound with
    the mark. Such a device is still the file's one device and must be reused; what must not
    happen is that it unbinds between here and the mount that follows. So it is checked on an
    fd held open (the kernel cannot unbind a device while it is open) and the pending detach is
    cancelled on that same fd before letting go: from then on it stays bound until detach()
    (the old holder may go at any time), and the mount that follows holds it open.
    """
    for dev, _ in _candidates(path):
        fd = _open(dev)
        if fd is None:
            continue
        try:
            info = _get_status(fd)
            if info is None or (info[0], info[1]) != want:
                continue
            if info[_FLAGS] & LO_FLAGS_AUTOCLEAR:
                _cancel_autoclear(fd, dev, info)
            return dev
        finally:
            os.close(fd)
    return None


def _cancel_autoclear(fd: int, dev: str, info: tuple) -> None:
    fields = list(info)
    fields[_FLAGS] &= ~LO_FLAGS_AUTOCLEAR
    try:
        fcntl.ioctl(fd, LOOP_SET_STATUS64, _INFO64.pack(*fields))
    except OSError as e:
        # Kernels that refuse status changes under an exclusive holder: the holder is a mount
        # of this very device, which keeps it bound; never attach a second device beside it.
        log.warning("could not cancel the pending detach of %s (%s); reusing it while its "
                    "other holder keeps it bound", dev, e)
    else:
        log.info("reusing %s, bound to %s with a detach pending; detach cancelled", dev,
                 _to_status(info).name)


def attach(path: Path, direct_io: bool = True, sector_size: int = 4096,
           untimed: bool = False) -> str:
    """Attach ``path`` (or return the device it is already bound to). ``sector_size`` (with
    direct I/O) must be the one the filesystem in the file was made for. Where the file's
    filesystem cannot take direct I/O at that size, the kernel attaches it buffered.

    ``untimed`` (with direct I/O only): writes through the device leave the file's mtime and
    ctime alone (xfshandle), where the file is on XFS; elsewhere it is attached as any other."""
    want = identity(path)
    existing = _reuse(path, want)
    if existing:
        return existing
    if untimed and direct_io:
        dev = _attach_untimed(path, want, sector_size)
        if dev:
            return dev
    # no --nooverlap: it opens every loop device to compare, by path, holding others' detaches
    argv = ["losetup", "--find", "--show"]
    if direct_io:
        # The filesystem above already caches; caching the image file again doubles memory use.
        # The sector size is pinned: with direct I/O the kernel would derive it from the image's
        # DIO alignment, which XFS raises from 512 to 4096 once the file shares extents with a
        # snapshot, and an xfs volume made on 512-byte sectors then refuses to mount.
        argv += ["--sector-size", str(sector_size)]
    try:
        dev = run(argv + (["--direct-io=on"] if direct_io else []) + [str(path)],
                  timeout=60).strip()
    except CommandFailed as e:
        if not direct_io:
            raise
        # A file on a filesystem without O_DIRECT (tmpfs): the kernel refuses the flag outright,
        # where elsewhere it attaches buffered by itself when it cannot honour it
        log.info("attaching %s with direct I/O failed (%s); attaching it buffered", path, e)
        dev = run(argv + [str(path)], timeout=60).strip()
    _wait_attached(dev, path, want)
    st = status(dev)
    if st is None or (st.st_dev, st.st_ino) != want:
        # the path was replaced between the stat and losetup's open: not the file we checked
        if st is not None:
            clear(dev, (st.st_dev, st.st_ino))
        raise CommandFailed(f"losetup attached {dev} to something other than {path}, which "
                            "changed meanwhile; try again")
    return dev


class _NotHere(Exception):
    """The untimed attach cannot be done here: losetup attaches the file as ever."""


_fallback_said = False


def _attach_untimed(path: Path, want: tuple[int, int], sector_size: int) -> str | None:
    """Bind a free device to ``path`` opened through its XFS handle; None where that cannot
    be done here (not XFS, no LOOP_CONFIGURE, no /dev/loop-control), for losetup to attach
    the file as ever. Only the file changing under us is an error."""
    global _fallback_said
    try:
        with contextlib.ExitStack() as stack:
            dev = _configure(_open_untimed(stack, path, want), path, sector_size)
    except _NotHere as e:
        log.log(logging.DEBUG if _fallback_said else logging.WARNING,
                "%s: %s; attaching it with losetup, so that the pool records its times on "
                "every flush, as before", path, e)
        _fallback_said = True
        return None
    _wait_attached(dev, path, want)
    return dev


def _open_untimed(stack: contextlib.ExitStack, path: Path, want: tuple[int, int]) -> int:
    """An fd on ``path`` through its XFS handle, checked to be the file ``want`` names."""
    try:
        directory = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, directory)
        fd = os.open(os.path.basename(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                     dir_fd=directory)
        stack.callback(os.close, fd)
    except OSError as e:
        raise _NotHere(f"could not be opened ({e.strerror})") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != want:
        raise CommandFailed(f"{path} changed while it was being attached; try again")
    try:
        untimed = xfshandle.open_untimed(fd, directory, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        raise _NotHere(f"cannot be opened through its XFS handle ({e.strerror})") from None
    stack.callback(os.close, untimed)
    st = os.fstat(untimed)
    if (st.st_dev, st.st_ino) != want:  # a handle names an inode on the directory's mount
        raise _NotHere("its XFS handle opened another file")
    return untimed


def _configure(fd: int, path: Path, sector_size: int) -> str:
    """LOOP_CONFIGURE a free device with ``fd`` (direct I/O, ``sector_size``), trying the
    next free one while others take them first, for at most ATTACH_WAIT s."""
    name = os.fsencode(path)[:63]
    info = _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_DIRECT_IO, name, b"", b"", 0, 0)
    config = _CONFIG.pack(fd, sector_size, info)
    deadline = time.monotonic() + ATTACH_WAIT
    offered = None
    while True:
        dev = _free_device()
        if dev == offered:
            time.sleep(0.2)  # offered again: someone holds it unbound, for a while perhaps
        offered = dev
        try:
            dev_fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.ENXIO, errno.ENOENT):  # (else: gone meanwhile)
                raise _NotHere(f"the free loop device {dev} could not be opened "
                               f"({e.strerror})") from None
        else:
            try:
                fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
                return dev
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.EAGAIN):  # (else: taken meanwhile)
                    raise _NotHere(f"LOOP_CONFIGURE on {dev} refused it ({e.strerror}: a kernel "
                                   "older than 5.8, or one that refuses this configuration)") \
                        from None
            finally:
                os.close(dev_fd)
        if time.monotonic() > deadline:
            raise _NotHere(f"the free loop devices offered were taken by others for "
                           f"{ATTACH_WAIT:g} s")


def _free_device() -> str:
    """A free loop device (the kernel makes one if none is), once its node is here."""
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise _NotHere(f"/dev/loop-control could not be opened ({e.strerror})") from None
    try:
        dev = f"/dev/loop{fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)}"
    except OSError as e:
        raise _NotHere(f"no free loop device ({e.strerror})") from None
    finally:
        os.close(ctl)
    devwait.until(lambda: devwait.block_device(dev, sized=False), ATTACH_WAIT, _NotHere(
        f"the free loop device {dev} had no device node here within {ATTACH_WAIT:g} s"),
        names=[os.path.basename(dev)])
    return dev


def _wait_attached(dev: str, path: Path, want: tuple[int, int]) -> None:
    """Wait for ``dev`` to be a block device node here, sized unless the file is smaller than
    a sector: on its uevents, polling where none arrive (devwait)."""
    try:
        sized = os.stat(path).st_size >= 4096
    except OSError:  # replaced meanwhile: attach's identity check says so
        sized = False
    try:
        devwait.until(lambda: devwait.block_device(dev, sized), ATTACH_WAIT, CommandFailed(
            f"{dev} was bound to {path}, but it was not a block device "
            f"{'of its size ' if sized else ''}here within {ATTACH_WAIT:g} s"),
            names=[os.path.basename(dev)])
    except CommandFailed:
        with contextlib.suppress(OSError, CommandFailed):  # never leave it bound for nothing
            clear(dev, want)  # (if its node is here to do it)
        raise


def detach(path: Path) -> None:
    """Detach every device bound to the file at ``path``; a file not attached is no error.

    Returns once each device is unbound, or is held by a mount or another exclusive user (it
    then unbinds when that lets go).
    """
    try:
        want = identity(path)
    except FileNotFoundError:
        return
    for dev, _ in _candidates(path):
        clear(dev, want)


def detach_all(paths: Iterable[str | Path]) -> dict[str | Path, str]:
    """detach() of each of ``paths``, reading the bound devices once for all of them: detach()
    scans every bound device, and start-up releases hundreds of files at once (each of which
    usually has none). Every device is tried; gives the paths that could not be, with why."""
    wanted = {}
    for path in paths:
        try:
            wanted[identity(path)] = path
        except FileNotFoundError:
            continue
    failed = {}
    for dev, st in bound().items() if wanted else ():
        key = (st.st_dev, st.st_ino)
        if key not in wanted:
            continue
        try:
            clear(dev, key)  # checked again on its own fd: it may have changed since
        except (CommandFailed, OSError) as e:
            failed[wanted[key]] = f"{dev}: {e}"
    return failed


def clear(dev: str, want: tuple[int, int]) -> None:
    """LOOP_CLR_FD on ``dev`` if, checked on the same fd, it is bound to ``want``."""
    fd = _open(dev)
    if fd is None:
        return
    try:
        info = _get_status(fd)
        if info is None or (info[0], info[1]) != want:
            return
        try:
            # Marks autoclear; the device unbinds at its last close, ours if nobody else has it.
            fcntl.ioctl(fd, LOOP_CLR_FD)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise CommandFailed(f"could not detach loop device {dev}: {e.strerror}") from None
    finally:
        os.close(fd)
    _wait_unbound(dev, want)


def _pending(dev: str) -> bool:
    """Still bound with a detach pending (sysfs: no open of the device)."""
    try:
        return (SYS_BLOCK / dev[len("/dev/"):] / "loop" / "autoclear").read_text().strip() == "1"
    except OSError:
        return False  # unbound


def _wait_unbound(dev: str, want: tuple[int, int]) -> None:
    if not _pending(dev):
        return
    # Someone still has it open. A mount (or device-mapper) holds it exclusively and may keep
    # it for long: it unbinds when that goes. Anything else is a passing opener: wait for it.
    try:
        fd = _open(dev, os.O_EXCL)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return
        raise
    if fd is None:
        return
    try:
        info = _get_status(fd)
    finally:
        os.close(fd)  # may be the last close, which unbinds it
    if info is None or (info[0], info[1]) != want:
        return  # unbound meanwhile (and perhaps bound again, to another file)
    deadline = time.monotonic() + DETACH_WAIT
    while _pending(dev) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _pending(dev):
        log.warning("loop device %s still bound after detach; it unbinds at its last close", dev)
