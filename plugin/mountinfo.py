"""What the kernel says is mounted, from /proc/self/mountinfo.

``os.path.ismount`` is wrong for a bind mount on the same filesystem, and pyvol's records are
only a claim: this file is the truth the daemon reconciles against.

Docker's Get and List ask it on every call, and on a host with hundreds of mounts the kernel
takes most of a millisecond just to print the table. So this process's table is read again
only when the kernel says it changed: a descriptor kept open on the file polls POLLPRI after
any mount, unmount or remount in this mount namespace (propagated ones included), as
libmount's monitor relies on. What a read returns is never older than the last change the
kernel had signalled, and a mount this process made has signalled before the call returned.
"""

import os
import re
import select
import threading
from pathlib import Path
from typing import NamedTuple

MOUNTINFO = "/proc/self/mountinfo"


class MountEntry(NamedTuple):
    mount_point: str
    source: str
    fstype: str
    options: str


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal \ooo.
    if "\\" not in field:
        return field
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _parse(lines: list[str]) -> list[MountEntry]:
    result = []
    for line in lines:
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 2:
            continue
        result.append(MountEntry(_unescape(lf[4]), _unescape(rf[1]), rf[0], lf[5]))
    return result


def _read(fd: int) -> list[str]:
    os.lseek(fd, 0, os.SEEK_SET)
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts).decode(errors="surrogateescape").splitlines()


class _Table:
    """This process's mount table, parsed once per change."""

    def __init__(self):
        self._lock = threading.Lock()
        self._fd = self._poll = None
        self._entries: list[MountEntry] | None = None
        self._points: frozenset[str] | None = None

    def after_fork(self) -> None:
        """In a forked child: the change mark belongs to the open file, which the fork
        shares, so one process's look would hide a change from the other; and the lock may
        have been held by a thread that does not exist here. Start afresh."""
        if self._fd is not None:
            os.close(self._fd)
        self.__init__()

    def _current(self) -> list[MountEntry]:
        """The table, read again if the kernel signalled a change since the last look.
        Called with the lock held."""
        if self._fd is None:
            self._fd = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLPRI)
        elif self._poll.poll(0):  # looking resets the mark; the read below comes after it
            self._entries = None
        if self._entries is None:
            self._entries, self._points = _parse(_read(self._fd)), None
        return self._entries

    def entries(self) -> list[MountEntry]:
        with self._lock:
            return self._current()

    def points(self) -> frozenset[str]:
        with self._lock:
            entries = self._current()
            if self._points is None:
                self._points = frozenset(e.mount_point for e in entries)
            return self._points


_table = _Table()
os.register_at_fork(after_in_child=_table.after_fork)


def entries(path: str = MOUNTINFO) -> list[MountEntry]:
    if path == MOUNTINFO:
        return list(_table.entries())
    with open(path) as f:
        return _parse(f.read().splitlines())


def mount_points() -> frozenset[str]:
    """Every mount point of this process's namespace: what ``is_mounted`` asks."""
    return _table.points()


def is_mounted(mount_point: str | Path) -> bool:
    return str(Path(mount_point)) in _table.points()


def under(directory: str | Path) -> list[MountEntry]:
    """Mounts at or below ``directory``, innermost last as the kernel lists them."""
    base = str(Path(directory))
    return [e for e in entries() if e.mount_point == base or e.mount_point.startswith(base + "/")]


def source_of(mount_point: str | Path) -> str | None:
    target = str(Path(mount_point))
    found = [e.source for e in entries() if e.mount_point == target]
    return found[-1] if found else None
