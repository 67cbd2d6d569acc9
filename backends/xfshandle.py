"""Open a file on XFS so that writes through the open file leave its timestamps alone.

Why: a loop device's flush is a full fsync of its backing file. When that file's mtime has
moved since the last one (it moves on every write, at the clock tick's granularity), XFS must
commit and force its log to make the new time durable. A loop volume's image lies in the
pool's XFS, so a database committing on the volume made the pool's XFS force its log several
hundred times a second, for nothing: nobody reads an image's mtime. A file opened through
XFS's handle interface (XFS_IOC_OPEN_BY_HANDLE, "invisible I/O", made for backup and HSM
tools) has FMODE_NOCMTIME: writes through it update neither mtime nor ctime. Data and the
allocations that writes make are logged and forced as ever.

The handle comes from an fd opened by path and checked by the caller, so the file opened by
handle is that very inode, whatever the path names by then. Root only (CAP_SYS_ADMIN).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

# <xfs/xfs_fs.h>: struct xfs_fsop_handlereq { __u32 fd; void *path; __u32 oflags;
# void *ihandle; __u32 ihandlen; void *ohandle; __u32 *ohandlen; } (64-bit layout)
_HREQ = struct.Struct("=I4xQI4xQI4xQQ")
_IOWR = 3 << 30
XFS_IOC_FD_TO_HANDLE = _IOWR | (_HREQ.size << 16) | (ord("X") << 8) | 106
XFS_IOC_OPEN_BY_HANDLE = _IOWR | (_HREQ.size << 16) | (ord("X") << 8) | 107
_HANDLE_MAX = 64  # an XFS handle is 24 bytes; room to spare


def open_untimed(fd: int, directory: int, flags: int) -> int:
    """A new fd (close-on-exec) on the file open as ``fd``, with ``flags`` (os.O_*), through
    which writes update neither its mtime nor its ctime. ``directory``: an fd of a directory
    on the same filesystem, which XFS opens handles on. OSError where the file is not on XFS
    (ENOTTY, among others) or the caller is not root (EPERM)."""
    handle = ctypes.create_string_buffer(_HANDLE_MAX)
    length = ctypes.c_uint32(_HANDLE_MAX)
    fcntl.ioctl(fd, XFS_IOC_FD_TO_HANDLE, bytearray(_HREQ.pack(
        fd, 0, 0, 0, 0, ctypes.addressof(handle), ctypes.addressof(length))))
    # the ioctl's return value is the new fd (mutable buffer: fcntl passes the result back)
    new = fcntl.ioctl(directory, XFS_IOC_OPEN_BY_HANDLE, bytearray(_HREQ.pack(
        0, 0, flags | os.O_LARGEFILE, ctypes.addressof(handle), length.value, 0, 0)))
    try:
        os.set_inheritable(new, False)
    except OSError:
        os.close(new)
        raise
    return new
