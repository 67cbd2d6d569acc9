"""Waiting for a block device: a node appearing or going, a size becoming non-zero.

The kernel announces every block device it adds, resizes or removes on a netlink socket
(NETLINK_KOBJECT_UEVENT, group 1), and udevd announces each again once it has made the
device's nodes and links (group 2). A wait listens there (pyroute2's ``AsyncUeventSocket``)
and checks its condition again on each event of a block device, so it returns as the device
becomes ready rather than at the next look of a poll.

Uevents do not reach every process: a network namespace owned by a user namespace (a
rootless or userns-remapped container) receives none, and a seccomp profile may refuse the
socket. So the condition is also checked every ``fallback`` seconds, and a wait that cannot
open the socket polls only. Every wait is bounded by its caller's timeout and fails with its
caller's sentence.

Nothing that happens before the wait is missed: the condition is checked after the socket is
bound, so a change made before that is seen by the check, and one made after by an event.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from pyvol.errors import PyvolError

log = logging.getLogger(__name__)

T = TypeVar("T")

FALLBACK = 0.5  # s between two looks when no event comes
# One more look this long after an event that did not satisfy the condition: what follows a
# kernel event by moments (a link udevd makes, a node dmsetup makes) is seen without a poll.
AFTER_EVENT = 0.1


class Uevents:
    """Block devices' uevents as they come, from the kernel and from udevd."""

    sock = None

    async def __aenter__(self) -> Uevents:
        from pyroute2.netlink.uevent import (
            MONITOR_GROUP_KERNEL,
            MONITOR_GROUP_UDEV,
            AsyncUeventSocket,
        )

        sock = AsyncUeventSocket()
        try:
            await sock.bind(groups=MONITOR_GROUP_KERNEL | MONITOR_GROUP_UDEV)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        return self

    async def __aexit__(self, *exc) -> None:
        self.sock.close()

    async def next(self) -> list:
        """The messages of the next datagram (one uevent; an empty list if it did not parse)."""
        return [m async for m in self.sock.get()]


def _concerns(msg, names: set[str]) -> bool:
    """Whether a uevent may change a block device of ``names`` (any, if empty). A message
    without the fields (udevd's, which pyroute2 parses partly) counts: a look is cheap."""
    subsystem = msg.get("SUBSYSTEM")
    if subsystem is not None and subsystem != "block":
        return False
    dev = msg.get("DEVNAME") or msg.get("DEVPATH")
    return not names or dev is None or os.path.basename(dev) in names


def until(check: Callable[[], T], timeout: float, error: str | BaseException, *,
          names: Iterable[str] = (), fallback: float = FALLBACK,
          listen: Callable[[], Uevents] = Uevents) -> T:
    """Return ``check()``'s first true result, looked for at once, on every uevent of a block
    device (of kernel names ``names``, e.g. ``loop3``; of any, if none are given) and every
    ``fallback`` s, for at most ``timeout`` s; then raise ``error`` (a sentence becomes a
    PyvolError). ``listen`` gives the events (tests give one that never delivers).

    Runs its own event loop: call it from a thread that runs none (every caller does)."""
    deadline = time.monotonic() + timeout
    found = check()
    if not found:
        import asyncio  # here: a daemon that never waits for a device never loads it

        found = asyncio.run(_until(check, deadline, set(names), fallback, listen))
    if found:
        return found
    raise PyvolError(error) if isinstance(error, str) else error


async def _until(check, deadline: float, names: set[str], fallback: float, listen):
    import asyncio

    async with contextlib.AsyncExitStack() as stack:
        try:
            events = await stack.enter_async_context(listen())
        except Exception as e:  # no socket here (refused, no such protocol): poll
            _no_uevents(f"no uevents here ({e}); looking for devices every {fallback:g} s")
            events = None
        reader = None
        try:
            found = check()  # after subscribing: a change before it is seen here
            look = time.monotonic() + fallback
            while not found:
                now = time.monotonic()
                if now >= deadline:
                    break
                wake = min(look, deadline)
                done = ()
                if events is not None:
                    reader = reader or asyncio.ensure_future(events.next())
                    done, _ = await asyncio.wait({reader}, timeout=wake - now)
                else:
                    await asyncio.sleep(wake - now)
                if done:
                    try:
                        msgs = reader.result()
                        relevant = not msgs or any(_concerns(m, names) for m in msgs)
                    except Exception as e:  # the socket failed: poll from now on
                        _no_uevents(f"uevents stopped ({e}); looking for the device every "
                                    f"{fallback:g} s")
                        events, relevant = None, True
                    reader = None
                    if relevant:
                        found = check()
                        look = min(look, time.monotonic() + AFTER_EVENT)
                else:  # a look: the fallback's, the one after an event, or the last
                    found = check()
                    look = time.monotonic() + fallback
            return found
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader


_said = False


def _no_uevents(why: str) -> None:
    """Say once per process that waits poll (where it holds, it holds for every wait)."""
    global _said
    log.log(logging.DEBUG if _said else logging.INFO, why)
    _said = True


def block_device(path: str | os.PathLike, sized: bool = True) -> str | None:
    """``path``'s real path if it is (a link to) a block device node, of non-zero size
    unless not ``sized``; else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    if sized and not _size(path, st.st_rdev):
        return None
    return os.path.realpath(path)


def _size(path, rdev: int) -> int:
    """A block device's size in sectors: sysfs's, else (no sysfs here) by seeking its end."""
    try:
        return int(Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/size").read_text())
    except (OSError, ValueError):
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return os.lseek(fd, 0, os.SEEK_END) // 512
    finally:
        os.close(fd)
