"""How the engine reads and writes block devices: around the page cache, not through it.

A restored volume is written once and then read by the filesystem that mounts it, so the
page cache gains nothing from holding the bytes; going through it cost the most of a
restore here (each 4 MiB copied into the cache and written back again, throttled behind
the dirty limits, then once more by a loop device into its image file). With ``O_DIRECT``
the device takes the bytes straight from an aligned buffer of the writing thread's.

A backup reads a snapshot the same way: once, never again soon, so caching it would only
evict what the host's containers keep cached (and, through a loop device, cache it twice).

What ``O_DIRECT`` cannot take (a piece not aligned to ``ALIGN``, the tail of a volume whose
size is no multiple of it, a device that refuses the flag) goes through an ordinary
descriptor. The writer's ``close`` flushes both, so the restore is on the disk when it
returns.
"""

from __future__ import annotations

import errno
import os

from ..files import ALIGN, direct_view, pwrite_all


class _Device:
    """Two descriptors on one device: ``direct`` (O_DIRECT; None where refused) and ``fd``
    for what O_DIRECT cannot take."""

    def __init__(self, path: str, mode: int):
        self.path = path
        self.fd = os.open(path, mode | os.O_CLOEXEC)
        try:
            self.direct: int | None = os.open(path, mode | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            self.direct = None
        self._direct = self.direct  # to close, even once refused

    def close(self) -> None:
        os.close(self.fd)
        if self._direct is not None:
            os.close(self._direct)


class DeviceWriter(_Device):
    def __init__(self, path: str, buffer_size: int):
        super().__init__(path, os.O_WRONLY)
        self.buffer_size = buffer_size

    def write(self, offset: int, data) -> None:
        """Write ``data`` (bytes-like) at ``offset`` of the device, all of it."""
        n = len(data)
        if self.direct is not None and offset % ALIGN == 0 and n % ALIGN == 0 \
                and n <= self.buffer_size:
            try:
                pwrite_all(self.direct, direct_view(data), offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = None  # took the flag, refuses the I/O: buffered from now on
        pwrite_all(self.fd, memoryview(data), offset)

    def close(self) -> None:
        try:
            os.fsync(self.fd)  # the whole device's: buffered pieces, and its own cache
        finally:
            super().close()


class DeviceReader(_Device):
    def __init__(self, path: str, piece: int):
        super().__init__(path, os.O_RDONLY)
        self.zero = bytes(piece)

    def read_into(self, view: memoryview, start: int, ranges: list[tuple[int, int]]) -> None:
        """Fill ``view`` (page-aligned: a ``Room``'s plaintext) with the device's bytes from
        ``start`` on, reading only ``ranges`` (relative to ``start``, sorted) and zeroing the
        rest: the buffer holds the thread's previous piece."""
        length = len(view)
        pos = 0
        for off, n in ranges:
            if off > pos:
                view[pos:off] = self.zero[:off - pos]
            pos = max(pos, off + n)
        if pos < length:
            view[pos:] = self.zero[:length - pos]
        for off, n in ranges:
            got = self._pread(view[off:off + n], start + off)
            if got != n:
                raise OSError(f"short read at {start + off} of {self.path}: {got} of {n} "
                              "bytes")

    def _pread(self, view: memoryview, offset: int) -> int:
        direct = self.direct
        if direct is not None and offset % ALIGN == 0 and len(view) % ALIGN == 0:
            try:
                return os.preadv(direct, [view], offset)  # view's start is aligned too
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = None  # took the flag, refuses the I/O: buffered from now on
        return os.preadv(self.fd, [view], offset)

    def is_zero(self, view: memoryview) -> bool:
        return len(view) <= len(self.zero) and self.zero.startswith(view)  # a memcmp, no copy
