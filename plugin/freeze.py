"""A snapshot's freeze of a mounted filesystem, and the thaw of one a killed holder left.

A frozen filesystem hangs every writer in its container, so no path may leave one frozen:
- the freezer thaws in a ``finally``, and a watchdog thaws after a limit if the work inside
  hangs;
- a freeze is made in this process (the FIFREEZE ioctl), not by a child tool: a process
  killed inside the ioctl ends only once it returns, and its volume lock is free only then.
  A ``fsfreeze`` child of a killed worker went on without it, and could freeze the
  filesystem after the master had looked and found it thawed. A freeze that takes too long
  is given up by the snapshot but keeps the volume's lock (a second descriptor of it) until
  it has landed and been thawed;
- every freeze is marked first (``Mark``: a file beside the volume's lock, naming the
  backend) and unmarked after its thaw. Whoever takes the volume's lock next and finds a
  mark thaws before anything else (``Host.lock``): a worker's Unmount, resize or snapshot,
  or the master, which looks after a worker dies (leftovers.py). At start, reconcile thaws
  every mounted volume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from . import locks, mountinfo
from .crashpoint import crashpoint
from .errors import CommandFailed, PyvolError
from .run import run

log = logging.getLogger(__name__)

LIMIT = 20.0  # seconds a container's filesystem may stay frozen for a snapshot
FREEZE_WAIT = 20.0  # for the freeze itself, which first writes out what is dirty
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int), linux/fs.h
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
THAW_TIMEOUT = 5.0  # a thaw takes moments; one that blocks is on a device still suspended


@dataclass(frozen=True)
class Mark:
    """Where one volume's freeze is marked (``path``), the lock its freezer holds
    (``locks_dir``, ``lock``: as locks.held names it), and the backend written into the mark:
    a thaw from outside waits until that backend has resumed its devices (leftovers.py)."""

    path: Path
    locks_dir: Path
    lock: str
    backend: str


def _ioctl(mount_point: Path, request: int) -> None:
    """``request`` on the filesystem mounted at ``mount_point``, and only there: if it was
    unmounted meanwhile, the directory left belongs to the filesystem around it, which a
    FIFREEZE would freeze instead."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_dev == os.stat(mount_point.parent).st_dev:
            raise PyvolError(f"nothing is mounted at {mount_point} any more")
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


def _thaw_here(mount_point: Path, marker: Path) -> None:
    """The freezer's own thaw, then its mark gone; a thaw that finds nothing frozen (the
    watchdog's came first) is no error."""
    try:
        _ioctl(mount_point, FITHAW)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise PyvolError(f"could not thaw the filesystem at {mount_point}: "
                             f"{e.strerror}") from None
    marker.unlink(missing_ok=True)


def _freeze(mount_point: Path, mark: Mark, wait: float) -> None:
    """FIFREEZE, waited for at most ``wait`` seconds in a thread of its own. One that lands
    later, after the caller gave up, is thawed by that thread, which keeps the volume's lock
    until then: no other holder may thaw or freeze in between."""
    lock = threading.Lock()
    landed = threading.Event()
    state: dict = {"error": None, "kept": None}

    def freeze():
        try:
            _ioctl(mount_point, FIFREEZE)
        except (OSError, PyvolError) as e:
            state["error"] = e
        with lock:
            landed.set()
            kept = state["kept"]
        if kept is None:
            return  # the caller goes on from here
        try:
            if state["error"] is None:
                _thaw_here(mount_point, mark.path)
                log.warning("a freeze of %s landed after its snapshot was given up; thawed",
                            mount_point)
            else:
                mark.path.unlink(missing_ok=True)
        finally:
            os.close(kept)  # the volume's lock, free once its holder has let go too

    threading.Thread(target=freeze, name="pyvol-freeze", daemon=True).start()
    landed.wait(wait)
    with lock:
        if not landed.is_set():
            state["kept"] = locks.kept(mark.locks_dir, mark.lock)
            raise PyvolError(f"the filesystem at {mount_point} did not freeze within {wait:g} s "
                             "(writing out what was dirty took too long); no snapshot was "
                             "taken; retry")
    e = state["error"]
    if e is not None:
        mark.path.unlink(missing_ok=True)
        if isinstance(e, PyvolError):
            raise e
        if e.errno == errno.EBUSY:
            raise PyvolError(f"the filesystem at {mount_point} is already frozen, by something "
                             "other than pyvol: thaw it (fsfreeze --unfreeze "
                             f"{mount_point}) and retry")
        raise PyvolError(f"could not freeze the filesystem at {mount_point}: {e.strerror}")


@contextlib.contextmanager
def frozen(mount_point: Path | None, mark: Mark, limit: float = LIMIT):
    """Freeze a mounted filesystem for the duration; a no-op when nothing is mounted. The
    caller holds the volume's lock (``mark.lock``), and every other lock it needs, before it
    freezes.

    Work that outlived the limit is failed: the watchdog thawed under it, so it no longer ran
    on a frozen filesystem."""
    if mount_point is None or not mountinfo.is_mounted(mount_point):
        yield
        return
    mark.path.write_text(mark.backend + "\n")
    _freeze(mount_point, mark, min(limit, FREEZE_WAIT))
    crashpoint("frozen")
    thawed = threading.Event()
    lock = threading.Lock()

    def release() -> bool:
        """Thaw, unless the other of the two (watchdog, ``finally``) has; True if this did."""
        with lock:
            if thawed.is_set():
                return False
            _thaw_here(mount_point, mark.path)
            thawed.set()
            return True

    watchdog = threading.Timer(limit, release)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        late = not release()
    if late:
        raise PyvolError(f"the filesystem at {mount_point} stayed frozen for the {limit:g} s "
                         "limit, so it was thawed and the snapshot abandoned; retry")


def thaw(mount_point: Path) -> bool:
    """Unfreeze ``mount_point`` from outside the freezer (a killed holder's freeze); True if it
    was frozen. A tool with a short timeout: on a device still suspended it would block, and
    the process asking (the master, a worker answering Docker) must not."""
    try:
        run(["fsfreeze", "--unfreeze", str(mount_point)], timeout=THAW_TIMEOUT,
            env={"LC_ALL": "C"})
    except CommandFailed as e:
        if "Invalid argument" in str(e):  # EINVAL: it was not frozen
            return False
        raise
    return True


def backend_of(marker: Path) -> str:
    """The backend a mark names ("" for one unreadable or from before it named one)."""
    try:
        return marker.read_text().strip()
    except OSError:
        return ""


def thaw_left(mount_point: Path, marker: Path) -> bool:
    """Thaw what a killed holder of the volume's lock left frozen, if it left a mark; the
    caller holds that lock now. True if a frozen filesystem was thawed."""
    if not marker.exists():
        return False
    thawed = mountinfo.is_mounted(mount_point) and thaw(mount_point)
    marker.unlink(missing_ok=True)
    return thawed
