"""Times as pyvol writes them: UTC, to the second, in one of two spellings.

``stamp`` is RFC 3339 (``2026-11-25T21:00:00Z``): records, manifests, locks, Status.
``compact`` (``20261125T210000Z``) goes into names: snapshot names and backup ids, where it
sorts by time and holds no ':'.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

RFC3339 = "%Y-%m-%dT%H:%M:%SZ"
COMPACT = "%Y%m%dT%H%M%SZ"


def stamp(t: float | datetime | None = None) -> str:
    """``t`` (seconds since the epoch, an aware datetime, or now) as RFC 3339 UTC."""
    return _utc(t).strftime(RFC3339)


def compact(t: float | datetime | None = None) -> str:
    return _utc(t).strftime(COMPACT)


def parse(text: str) -> float:
    """An RFC 3339 UTC stamp back to seconds since the epoch; ValueError if it is not one."""
    return datetime.strptime(text, RFC3339).replace(tzinfo=timezone.utc).timestamp()


def _utc(t: float | datetime | None) -> datetime:
    if t is None:
        t = time.time()
    if isinstance(t, datetime):
        return t.astimezone(timezone.utc)
    return datetime.fromtimestamp(t, timezone.utc)


def steady() -> float:
    """A clock no one can set and that counts a suspended host's sleep, one for every
    process on this host: a lock holder measures its lease with it, and its job process
    reads the same time."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()
