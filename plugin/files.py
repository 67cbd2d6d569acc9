"""Files that are either whole or absent: the one way pyvol writes a file others may read.

A backup repository on a directory (possibly NFS) and the nfs backend's records on an export
are read by other processes and other hosts at any moment, and either may crash mid-write.
"""

import errno
import mmap
import os
import secrets
import threading
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # readers that list a directory skip names starting with this
ALIGN = 4096  # offsets, lengths and buffer addresses O_DIRECT accepts on any device
DIRECT_MIN = 1 << 20  # a file at least this large may be written around the page cache

_local = threading.local()


def aligned_buffer(size: int, use: str = "write") -> mmap.mmap:
    """This thread's page-aligned buffer for ``use`` of at least ``size`` bytes, for
    O_DIRECT I/O (anonymous mmap memory is page-aligned); reused across calls, so what it
    holds is valid until the thread's next call for the same use."""
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(use)
    if buf is None or len(buf) < size:
        buf = buffers[use] = mmap.mmap(-1, -(-size // ALIGN) * ALIGN, flags=mmap.MAP_PRIVATE)
    return buf


def direct_view(data) -> memoryview:
    """``data`` as O_DIRECT takes it: itself when it starts at an ``ALIGN`` boundary of
    memory (a chunk sealed or decrypted into a thread's buffer does), else a copy in this
    thread's aligned buffer. Read-only data (bytes) is always copied."""
    import ctypes

    view = memoryview(data)
    if not view.readonly and view.contiguous and len(view) and \
            ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0:
        return view
    n = len(view)
    buf = aligned_buffer(n)
    buf[:n] = view
    return memoryview(buf)[:n]


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """All of ``view`` at ``offset`` (pwrite may write less than asked)."""
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _write_direct(fd: int, data) -> int:
    """Write the aligned head of ``data`` at the start of the open file ``fd`` with
    O_DIRECT; the bytes written (0 where the filesystem refuses O_DIRECT: tmpfs, some
    FUSE). The flag is set on the descriptor itself and cleared again for the tail: the
    file is never opened a second time by a name someone else could replace."""
    import fcntl

    n = len(data) // ALIGN * ALIGN
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return 0
    try:
        pwrite_all(fd, direct_view(memoryview(data)[:n]), 0)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: some filesystems take the flag, refuse the I/O
            raise
        return 0
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return n


def write_whole(path: Path, data: bytes, exclusive: bool = False, direct: bool = False) -> bool:
    """Write ``data`` to a temporary name, fsync, then rename it over ``path`` (or, when
    ``exclusive``, hard-link it, which never replaces: False if ``path`` existed), and fsync
    the directory so the name itself survives a crash.

    ``direct``: a large file nobody will read soon (a backup's chunk) goes to the disk with
    O_DIRECT but for its unaligned tail, so it neither waits behind the page cache's dirty
    limits nor evicts what the host's workloads keep cached."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            head = _write_direct(fd, data) if direct and len(data) >= DIRECT_MIN else 0
            pwrite_all(fd, memoryview(data)[head:], head)
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def fsync_dir(path: Path) -> None:
    """Make a rename or link in directory ``path`` durable: a power cut must not bring the
    old name back."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
