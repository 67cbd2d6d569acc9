"""Repository locks: objects under locks/ with a lease, so a dead holder never blocks for good.

Backups, restores and verifies take shared locks (many at once, from any host); deleting a
backup and gc take an exclusive one. docs/backup-repository.md ("Locks", "What garbage
collection may delete") is the protocol and the argument that it is safe; in short:

- A holder renews by writing a new lock object (a generation) and then reading the older
  ones it kept: one that is gone was broken by someone who judged the lock expired or its
  holder dead, and the lease is LOST. So a holder learns of every break at its next renewal,
  whatever the clocks say; a failed renewal loses the lease too.
- A taker writes its own object, then reads every other lock: one whose holder is provably
  dead (this host, this boot, pid gone or reused) is deleted at once; one whose lease ended
  more than a lease ago (an allowance for clock skew) is deleted after recording the break
  under gc/broken/; a live conflicting one makes it back off. It proceeds only after a
  reading that follows its last deletion finds nothing in the way.
- Work that must not outlive the lock checks it (``check``), and a write that others rely
  on (a manifest) is bracketed by two renewals and undone if the second finds the lease lost
  (``guarded``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable

from .. import clock
from ..errors import Conflict, NotFound, PyvolError
from ..log import event
from .repo import LOCK_CAP, Repository, holder_dead, holder_identity, host_id
from .session import EngineDied

log = logging.getLogger(__name__)

DEFAULT_LEASE = 300.0
MAX_LEASE = 86400.0  # a lock object's "lease" beyond this is not believed
BROKEN = "gc/broken/"  # records of locks broken by expiry: gc deletes nothing while one is young
KEEP = 2  # generations a holder keeps: a reader listing locks/ always sees one of them


class LostLock(Conflict):
    """The lease ended under its holder: someone broke the lock, or it could not be renewed."""


_ts = clock.stamp


def _ts_up(t: float) -> str:
    """``t`` rounded up to the second: an "expires" never earlier than the real end."""
    return _ts(math.ceil(t))


stamp = _ts_up  # for callers that report a time from here


_parse = clock.parse


def _seconds(v, hi: float = MAX_LEASE) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v) if 0 < v <= hi else None


_clock = clock.steady  # a holder measures its own lease with it


def lock_lease(doc: dict, default: float) -> float:
    return _seconds(doc.get("lease")) or default


def breakable_after(doc: dict, default_lease: float) -> float:
    """When a reader may delete the lock as expired (its clock): the lease's end, as the
    holder's clock wrote it, plus the lease again as an allowance for clock skew.
    KeyError/ValueError/TypeError for a lock that says no time."""
    lease = lock_lease(doc, default_lease)
    renewed = doc.get("renewed")
    if _seconds(renewed, hi=math.inf) is not None:
        end = float(renewed) + lease
    else:  # written by an older pyvol: only "expires", to the second
        end = _parse(doc["expires"])
    return end + lease


class Lease:
    def __init__(self, repo: Repository, kind: str, lease: float = DEFAULT_LEASE):
        assert kind in ("shared", "exclusive")
        self.repo, self.kind, self.lease = repo, kind, float(lease)
        self.holder = secrets.token_hex(8)  # the same in every generation
        self.identity = repo.holder()  # the process named in the lock objects
        self.created = time.time()
        self.lost: str | None = None  # why, once the lease is lost
        self._keys: list[str] = []  # our generations, oldest first
        self._renewed = 0.0  # _clock() when the newest generation we verified was made
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # one renewal at a time: the renewer's or a check's
        self._renewer: threading.Thread | None = None
        self._on_lost: list[Callable[[], object]] = []

    @property
    def key(self) -> str | None:
        """Our newest lock object."""
        return self._keys[-1] if self._keys else None

    def on_lost(self, fn: Callable[[], object]) -> None:
        """Call ``fn`` (from the renewer's thread) when the lease is lost, e.g. to cancel the
        job that works under it."""
        self._on_lost.append(fn)

    # objects
    def _body(self, key: str, now: float) -> bytes:
        doc = {"kind": self.kind, **self.identity, "holder": self.holder,
               "created": _ts(self.created), "expires": _ts_up(now + self.lease),
               "renewed": math.floor(now * 1000) / 1000, "lease": self.lease}
        return self.repo.codec.seal(key, json.dumps(doc).encode())

    def _write_generation(self) -> float:
        """Write a new lock object; the _clock() reading taken before its time was."""
        key = f"locks/{secrets.token_hex(16)}"
        made = _clock()
        if not self.repo.target.put_if_absent(key, self._body(key, time.time())):
            raise PyvolError(f"lock id collision at {key}")  # 128 random bits
        self._keys.append(key)
        return made

    def _drop(self) -> None:
        """Delete every lock object of ours (best effort: one left expires by itself)."""
        for key in list(self._keys):
            try:
                self.repo.target.delete(key)
                self._keys.remove(key)
            except EngineDied:
                # they name the dead job process: the next taker breaks them at once
                log.info("the job process holding repository lock objects %s ended; the next "
                         "taker breaks them as a dead holder's", ", ".join(self._keys))
                return
            except PyvolError as e:
                log.warning("could not delete repository lock %s (it expires by itself): %s",
                            key, e)

    # taking
    def _scan(self) -> tuple[list[dict], int]:
        """(live locks that conflict with ours, how many locks were deleted as dead or
        expired on the way)."""
        blockers, broke = [], 0
        for key, _ in list(self.repo.target.list("locks/")):
            if key in self._keys:
                continue
            try:
                doc = json.loads(self.repo.read_object(key, LOCK_CAP))
                if not isinstance(doc, dict):
                    raise TypeError("not an object")
            except NotFound:
                continue
            except (PyvolError, ValueError, TypeError, RecursionError):
                continue  # unreadable: not ours to judge; it expires or an admin removes it
            who = {"lock": key, "kind": doc.get("kind"), "host": doc.get("host"),
                   "pid": doc.get("pid"), "machine": doc.get("machine")}
            dead = holder_dead(doc)
            if dead is not None:
                event(log, "breaking the repository lock of a dead holder", repo=self.repo.url,
                      reason=dead, **who)
                self.repo.target.delete(key)
                broke += 1
                continue
            try:
                after = breakable_after(doc, self.lease)
            except (KeyError, ValueError, TypeError, OverflowError):
                continue  # says no time: unreadable, as above
            if time.time() > after:
                if doc.get("kind") != "exclusive":
                    self._record_break(key, doc)  # before the lock goes: gc must see it
                event(log, "removing expired repository lock", repo=self.repo.url,
                      expires=doc.get("expires"), **who)
                self.repo.target.delete(key)
                broke += 1
                continue
            if self.kind == "exclusive" or doc.get("kind") == "exclusive":
                blockers.append(doc)
        return blockers, broke

    def _record_break(self, key: str, doc: dict) -> None:
        """gc/broken/LOCK-ID: its holder may be a backup that stalls and comes back, so gc
        deletes no chunk for two of its leases (docs/backup-repository.md)."""
        tkey = BROKEN + key.rpartition("/")[2]
        record = {"lock": key, "kind": doc.get("kind"), "host": doc.get("host"),
                  "pid": doc.get("pid"), "machine": doc.get("machine"),
                  "broken": time.time(), "lease": lock_lease(doc, self.lease),
                  "by": host_id()}
        self.repo.target.put(tkey, self.repo.codec.seal(tkey, json.dumps(record).encode()))

    def _settle(self) -> list[dict]:
        """Scan until a scan deletes nothing: only a reading made after our object was
        written and after our last deletion may let us in (a holder that renewed meanwhile
        shows up in it, or finds its broken object gone)."""
        for _ in range(20):
            blockers, broke = self._scan()
            if blockers or not broke:
                return blockers
        raise Conflict(f"repository {self.repo.url}: locks keep appearing and expiring; "
                       "retry later")

    def acquire(self, wait: float = 0.0, check=None) -> None:
        """Take the lock, waiting up to ``wait`` seconds for the locks that block it;
        ``check()`` is called between tries and may raise to give up (a job cancelled)."""
        deadline = time.monotonic() + wait
        said = False
        while True:
            try:
                self._renewed = self._write_generation()
                blockers = self._settle()
            except BaseException:
                self._drop()
                raise
            if not blockers:
                break
            self._drop()
            if time.monotonic() >= deadline:
                b = blockers[0]
                here = (" on this host" if b.get("machine") == holder_identity()["machine"]
                        else "")
                raise Conflict(
                    f"repository {self.repo.url} is locked ({b.get('kind')} lock held by host "
                    f"{b.get('host')} pid {b.get('pid')}{here} since {b.get('created')}, lease "
                    f"until {b.get('expires')}); "
                    + ("a backup is running; retry when it ends" if self.kind == "exclusive"
                       else "a backup delete or gc is running; retry when it ends"))
            if not said:  # a wait of up to a minute is not silent
                said = True
                b = blockers[0]
                event(log, "waiting for the repository lock", repo=self.repo.url,
                      kind=self.kind, held=b.get("kind"), by_host=b.get("host"),
                      pid=b.get("pid"), wait=wait)
            if check is not None:
                check()
            time.sleep(random.uniform(0.2, 1.0))
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                         name="lease-renewer")
        self._renewer.start()

    # holding
    def _renew_once(self) -> None:
        """Write a new generation, then check that the ones we kept are all still there;
        keep the newest KEEP. Holds the mutex; raises LostLock."""
        if self.lost is not None:
            raise self.lost_error()
        try:
            made = self._write_generation()
            for key in self._keys[:-1]:
                try:
                    self.repo.target.get(key, LOCK_CAP)
                except NotFound:
                    self._lose(f"its lock object {key} was deleted by another process, which "
                               "judged the lock expired or its holder dead")
                    raise self.lost_error() from None
            for key in self._keys[:-KEEP]:
                self.repo.target.delete(key)
                self._keys.remove(key)
        except LostLock:
            raise
        except PyvolError as e:
            self._lose(f"renewing it failed: {e}")
            raise self.lost_error() from None
        self._renewed = made

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 4):
            with self._mutex:
                if self._stop.is_set():
                    return
                try:
                    self._renew_once()
                except LostLock:
                    return

    def _lose(self, why: str) -> None:
        if self.lost is not None:
            return
        self.lost = why
        log.warning("lost repository lock", extra={"fields": {
            "repo": self.repo.url, "kind": self.kind, "reason": why}})
        self._drop()  # broken: ours would only mislead others until it expired
        for fn in self._on_lost:
            try:
                fn()
            except Exception:  # a callback's failure must not stop the others
                log.exception("lease-lost callback failed")

    def lost_error(self) -> LostLock:
        return LostLock(f"lost the repository lock on {self.repo.url}: {self.lost}; stopped "
                        "before writing anything that relies on it: retry")

    def check(self, renew: bool = False) -> None:
        """Raise LostLock if the lease is lost. A lease not renewed for half of it (the
        renewer was held up: a stopped process, a slow endpoint) is renewed first, and with
        ``renew`` always: after that, no one can break the lock for a full lease."""
        if self.lost is not None:
            raise self.lost_error()
        if not renew and _clock() - self._renewed <= self.lease / 2:
            return
        with self._mutex:
            if renew or _clock() - self._renewed > self.lease / 2:
                self._renew_once()

    def checked_until(self) -> float:
        """The ``clock.steady()`` reading until which ``check`` passes without renewing: work
        done elsewhere (the job process) before it is done under the lease, as if checked
        before each step."""
        return self._renewed + self.lease / 2

    def guarded(self, write: Callable[[], object], undo: Callable[[], object]):
        """``write()`` something others will rely on, between two renewals. If the second
        finds the lease lost, someone broke the lock, maybe before the write landed (a
        process stalled between the first renewal and its write), and may be deleting what
        the write names: ``undo()`` it and raise."""
        self.check(renew=True)
        result = write()
        try:
            self.check(renew=True)
        except LostLock:
            try:
                undo()
            except PyvolError as e:
                log.error("could not undo a write made under a lost repository lock: %s", e)
            raise
        return result

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        if self._mutex.acquire(timeout=30):
            try:
                self._drop()
            finally:
                self._mutex.release()
        else:
            self._drop()


def held_until(repo: Repository, lease: float) -> float | None:
    """Until when (this host's clock) gc must delete no chunk: two leases (the broken
    lock's) after the latest recorded break of an expired shared lock, or None. Records that
    have served their time are deleted. Called under the exclusive lock."""
    until = None
    now = time.time()
    for key, _ in list(repo.target.list(BROKEN)):
        try:
            doc = json.loads(repo.read_object(key, LOCK_CAP))
            end = float(doc["broken"]) + 2 * lock_lease(doc, lease)
            if not math.isfinite(end):
                raise ValueError("not a time")
        except NotFound:
            continue
        except (PyvolError, ValueError, KeyError, TypeError, RecursionError) as e:
            log.warning("ignoring unreadable lock-break record %s in %s: %s", key, repo.url, e)
            continue
        if end > now:
            until = max(until or end, end)
        else:
            repo.target.delete(key)
    return until


@contextlib.contextmanager
def locked(repo: Repository, kind: str, lease: float = DEFAULT_LEASE, wait: float = 0.0,
           check=None):
    lock = Lease(repo, kind, lease)
    lock.acquire(wait, check)
    try:
        yield lock
    finally:
        lock.release()
