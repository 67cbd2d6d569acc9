"""Named locks that hold across gunicorn workers, threads and daemon restarts.

flock(2) locks belong to an open file description, so two opens in one process exclude each
other just as two processes do, and the kernel drops the lock when its holder dies: a killed
daemon never leaves a volume locked.
"""

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from .errors import Conflict

DEFAULT_WAIT = 25.0  # under Docker's 30 s plugin timeout, so Docker hears our message


@contextlib.contextmanager
def held(locks_dir: Path, name: str, what: str, wait: float = DEFAULT_WAIT,
         shared: bool = False, busy: str | None = None, discard: bool = False):
    """Hold the lock ``name``; raise Conflict naming ``what`` if it stays taken for ``wait`` s.

    ``shared`` holders (readers, such as backups of one snapshot) exclude only exclusive ones.
    ``discard``: an exclusive holder removes the lock's file before it lets go, for a lock
    named after something that may be gone by then (a snapshot): one file per backup's
    snapshot would otherwise stay in the directory for good.
    """
    locks_dir.mkdir(parents=True, exist_ok=True)
    path = str(locks_dir / f"{name}.lock")
    fd = _locked(path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, wait,
                 busy or f"{what} is busy with another operation; try again")
    try:
        if not shared:  # shared, the same file may be held twice in one process
            _HELD[path] = fd
        try:
            yield
        finally:
            if not shared:
                _HELD.pop(path, None)
                if discard:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
    finally:
        os.close(fd)


def _locked(path: str, how: int, wait: float, refusal: str) -> int:
    """A descriptor of ``path``, locked ``how``. A file its holder removed (``discard``) is
    no lock any more for whoever opened it before: that one opens the path again, within
    the same ``wait``."""
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            take_within(lambda fd=fd: fcntl.flock(fd, how | fcntl.LOCK_NB),
                        max(0.0, deadline - time.monotonic()), refusal)
            mine = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)


_HELD: dict[str, int] = {}  # lock file -> the descriptor holding it, in this process


def kept(locks_dir: Path, name: str) -> int:
    """A second descriptor of the lock ``name``, which this process holds (``held``): the lock
    stays taken until both are closed, after the holder's ``with`` if need be. For work that
    may outlive its caller's hold and must stay under the lock (a freeze that lands late)."""
    return os.dup(_HELD[str(locks_dir / f"{name}.lock")])


def take_within(take, wait: float, refusal: str) -> None:
    """Call ``take``, a lock call that fails at once when the lock is taken (``LOCK_NB``),
    until it succeeds, backing off up to 0.1 s between tries; Conflict(``refusal``) once
    ``wait`` seconds have passed. flock says "taken" with EAGAIN, a POSIX lock with EAGAIN or
    EACCES."""
    deadline = time.monotonic() + wait
    delay = 0.005
    while True:
        try:
            take()
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise Conflict(refusal) from None
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@contextlib.contextmanager
def all_held(locks_dir: Path, names: list[str], what: str, wait: float = DEFAULT_WAIT):
    """Hold several locks, taken in sorted order so two callers never deadlock."""
    with contextlib.ExitStack() as stack:
        for name in sorted(set(names)):
            stack.enter_context(held(locks_dir, name, what, wait))
        yield
