"""The runner: one per host, whatever the number of gunicorn workers, doing what the
schedules (plugin/schedules.py) say when they say it, then applying their retention.

Every worker starts a runner thread; each tries a non-blocking flock on ROOT/scheduler.lock
once a second, and only the one holding it runs schedules. A worker that dies (killed, or
recycled by gunicorn) drops the lock with its process, and another worker's thread takes it
within a second: never two runners, never none for long, and no lock file to clean up.

Snapshots and backups have slots of their own (SLOTS): two long backups never hold up a
snapshot schedule. A due schedule is started only when a slot of its kind is free (until then
it stays due, most overdue first), and a run reads its schedule again as it starts: one
removed, changed or re-created meanwhile (the volume removed and made again) is not run with
the settings of the past.

A worker that exits (``systemctl stop``, a recycled worker) stops the runner from its
``worker_exit`` hook (server.py): no run starts any more, backups in flight are cancelled at
their next step, and the runs in flight are waited for, within the graceful timeout (18 s
of its 20, about freeze.LIMIT): a snapshot is not cut off inside its filesystem freeze by a
worker exiting on its own (only a SIGKILL still can, and then the master thaws after it:
leftovers.py); a run stopped by the exit is not recorded, and its slot, still due, runs at
the next start.

A shared volume's schedules (nfs, ebs) live in its record on the shared storage, where every
host's runner reads them every PYVOL_SCHEDULE_SYNC seconds into its own rows; each slot runs on
one host, the winner of the slot's claim (SharedBackend.claim_run). The host that has the
volume mounted claims at once (its filesystem is frozen there for the instant of a snapshot),
the others after HOLDER_GRACE, so a holder whose daemon is gone leaves the slot to them. The
others record the slot as run by the winner. The schedule's snapshot retention on a shared volume
judges every host's scheduled snapshots (named sched-TIME on the storage).

A run that fails is retried at the schedule's next slot; its error is shown in Status and
`pyvol schedule ls` for as long as it lasts, and logged once per streak of failures (and once
when it ends), not at every retry.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone

from . import clock
from .backup.job import Job
from .backup.repo import new_backup_id
from .backup.retention import Policy, keep
from .backends.shared import SharedBackend
from .errors import Conflict, InvalidInput, NotFound, PyvolError
from .log import event
from .names import check_name, scheduled_snapshot_time
from .schedules import (KINDS, MAX_PHASE, PHASE_FRACTION, check_published, next_after,
                        spec_of, store_rows)
from .state import PUBLISH_SCHEDULES, Schedule

log = logging.getLogger(__name__)

LOCK_POLL = 1.0  # how often a worker without the lock tries to take it
TICK = 0.5       # how often the runner looks for due schedules
# runs at once, by kind: a long backup must not hold up every other volume's snapshot
SLOTS = {"snapshot": 2, "backup": 2}
CLOCK_CHECK = 5.0  # how often the runner looks for slots set by a clock that was ahead
SNAPSHOT_PREFIX = "sched-"
# seconds a host that does not have a shared volume mounted leaves the host that does to
# claim a slot first: HOLDER_GRACE, or HOLDER_GRACE_FRACTION of the interval if longer, at
# most HOLDER_GRACE_MAX (the slot stays due meanwhile, holding none of the host's SLOTS)
HOLDER_GRACE, HOLDER_GRACE_FRACTION, HOLDER_GRACE_MAX = 10.0, 0.05, 30.0
# how long a scheduled backup waits out a removal or gc holding its repository (another
# host's retention of the same schedule, say) before its run counts as failed
BACKUP_LOCK_WAIT = 30
# a scheduled backup's row in scheduled_backups before its manifest exists: PENDING + its id
PENDING_BACKUP = "pending:"


class _NotYet(Exception):
    """A shared volume's slot that its holder may still claim: tried again after the grace."""


def _time(text: str) -> datetime:
    return datetime.fromtimestamp(clock.parse(text), timezone.utc)


def _settings(s: Schedule) -> tuple:
    return s.every, s.keep, s.target, s.cron, s.next_at


def _next(s: Schedule, after: float) -> str:
    return clock.stamp(next_after(after, s.volume, s.what, s.every, s.cron))


class Runner:
    def __init__(self, host, snapshots, backups, catalogue=None, abandoned=None):
        """``abandoned``: the host's half-done changes whose worker died (abandoned.py),
        looked for by this one-per-host thread beside the schedules."""
        self.host, self.snapshots, self.backups = host, snapshots, backups
        self.catalogue, self.abandoned = catalogue, abandoned
        self.store = host.store
        self._synced = float("-inf")
        self._refused: set[tuple] = set()  # records' schedules refused, said once each
        self.lock_path = host.config.root / "scheduler.lock"
        self._runs: dict[tuple[str, str], tuple[threading.Thread, Job | None]] = {}
        self._runs_lock = threading.Lock()
        # (volume, what) of a volume mounted on another host -> (the slot, when this runner
        # first found it due, monotonic): the holder's grace is counted from then
        self._due_since: dict[tuple[str, str], tuple[str, float]] = {}
        self._stopping = threading.Event()
        self._halted_at = 0.0
        self._checked_clock = float("-inf")

    def start(self, alive=lambda: True) -> threading.Thread:
        """Start the runner's thread; it stops dispatching as soon as ``alive()`` is false
        (gunicorn's worker.alive, false from the worker's SIGTERM on)."""
        t = threading.Thread(target=self._main, args=(alive,), name="schedule-runner",
                             daemon=True)
        t.start()
        return t

    def stop(self, timeout: float) -> int:
        """Start no run any more, cancel the backups in flight (they stop at their next
        step) and wait for the runs in flight until ``timeout`` seconds after the runner
        first saw the worker exiting (or from now); how many are still running then.
        Returns at once when none is in flight."""
        deadline = self._halt() + max(0.0, timeout)
        with self._runs_lock:
            runs = list(self._runs.values())
        for thread, _job in runs:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.abandoned is not None:
            self.abandoned.wait(max(0.0, deadline - time.monotonic()))
        left = sum(t.is_alive() for t, _ in runs)
        if runs:
            event(log, "schedule runner stopped", pid=os.getpid(), waited_for=len(runs),
                  still_running=left)
        return left

    def _halt(self) -> float:
        """No run starts after this; backups in flight are cancelled. When it first
        happened (monotonic)."""
        with self._runs_lock:
            if not self._stopping.is_set():
                self._halted_at = time.monotonic()
                self._stopping.set()
                for _thread, job in self._runs.values():
                    if job is not None:
                        job.cancel()
            return self._halted_at

    def _main(self, alive) -> None:
        try:
            if not self._take_lock(alive):
                return
            event(log, "schedule runner started", pid=os.getpid())
            broken = looking_broken = False
            while alive() and not self._stopping.is_set():
                try:
                    self._dispatch()
                    broken = False
                except Exception:  # the state unreadable for a moment: try again, say so once
                    if not broken:
                        log.exception("schedule runner could not read the schedules")
                    broken = True
                try:
                    if self.abandoned is not None:
                        self.abandoned.check()
                    looking_broken = False
                except Exception:
                    if not looking_broken:
                        log.exception("could not look for changes a killed worker left")
                    looking_broken = True
                self._stopping.wait(TICK)
            self._halt()  # the worker is exiting: no run starts after this
        except Exception:
            log.exception("schedule runner stopped")

    def _take_lock(self, alive) -> bool:
        """Block (politely) until this process holds ROOT/scheduler.lock (True), or the
        worker is stopping (False); it keeps the lock until it dies. The holder's pid is
        written in the file, for people and tests."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        while True:
            if not alive() or self._stopping.is_set():
                self._halt()
                os.close(fd)
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                self._stopping.wait(LOCK_POLL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd  # held for the life of the process
        return True

    def _dispatch(self) -> None:
        now = time.time()
        if time.monotonic() - self._checked_clock >= CLOCK_CHECK:
            self._checked_clock = time.monotonic()
            self._fix_far_future(now)
        if time.monotonic() - self._synced >= self.host.config.schedule_sync:
            self._synced = time.monotonic()
            self._sync_all()
        for s in self.store.due_schedules(clock.stamp(now)):
            key = (s.volume, s.what)
            with self._runs_lock:
                if self._stopping.is_set():
                    return
                if key in self._runs:  # still running from an earlier slot
                    continue
                if self._in_grace(s):
                    continue  # left to the host that has the volume mounted, for now
                if sum(k[1] == s.what for k in self._runs) >= SLOTS[s.what]:
                    continue  # stays due: started when a slot of its kind is free
                job = Job("scheduled backup") if s.what == "backup" else None
                t = threading.Thread(target=self._run, args=(s, job), daemon=True,
                                     name=f"schedule-{s.what}")
                self._runs[key] = (t, job)
                t.start()

    def _fix_far_future(self, now: float) -> None:
        """A slot further away than a whole interval and its phase (for a cron schedule:
        than its next time from now) was set while the clock was ahead, and then it was put
        right: without this the schedule would sit idle until the old time. Such a slot is
        moved to the next one from now."""
        for s in self.store.schedules():
            at = _next(s, now)
            bound = max(clock.parse(at), now + s.every + min(s.every * PHASE_FRACTION, MAX_PHASE))
            if clock.parse(s.next_at) <= bound + 1:
                continue
            with self._runs_lock:
                if (s.volume, s.what) in self._runs:
                    continue
            with self.store.tx():
                self.store.schedule_ran(replace(s, next_at=at))
            event(log, "schedule's next run was further than its interval (the clock was "
                  "ahead); moved", volume=s.volume, what=s.what, was=s.next_at, now=at)

    def sync_shared(self, b: SharedBackend, now: float) -> bool:
        """Bring this host's rows of ``b``'s volumes in line with their records: a schedule
        set, changed or removed on another host is so here, and the rows of a volume another
        host removed go with it. Once, after the upgrade that made schedules shared
        (state.PUBLISH_SCHEDULES), a kind a record has never had is written there from this
        host's row; never after, or the rows of a removed volume would give their schedules
        to a new volume of the same name. Whether every record was read."""
        try:
            records = b.records()
        except PyvolError as e:  # the storage unreachable: the rows stay as they are
            log.info("cannot read the schedules of backend %s: %s", b.name, e)
            return False
        publish_old = self.store.meta(PUBLISH_SCHEDULES) is not None
        complete = True
        for name in {s.volume for s in self.store.schedules()} - set(records):
            v = self.store.volume(name)
            if v is not None and v.backend == b.name and self.catalogue is not None:
                try:
                    self.catalogue.forget_if_removed(name)
                except PyvolError as e:
                    self._say_once(name, e)
        for name, rec in records.items():
            try:  # one volume's record that cannot be followed holds up no other's
                published = rec.get("schedules")
                published = published if isinstance(published, dict) else {}
                local = {s.what: s for s in self.store.schedules(name)}
                unpublished = {w: spec_of(s) for w, s in local.items()
                               if w not in published and s.keep}
                if unpublished and publish_old:
                    try:
                        b.set_schedules(name, unpublished)
                    except Exception:
                        complete = False  # the upgrade's publishing is not done: next sync
                        raise
                for what in KINDS:
                    if what in published and self._change(b, name, what, published[what],
                                                           local.get(what)):
                        self._sync_locked(b, name, what, now)
            except Exception as e:  # noqa: BLE001 -- said once per volume and error
                self._say_once(name, e)
        return complete

    def _say_once(self, name: str, e: Exception) -> None:
        key = (name, type(e).__name__, str(e))
        if key not in self._refused:
            self._refused.add(key)
            log.warning("cannot bring the schedules of %s in line with its record: %s", name, e)

    def _sync_all(self) -> None:
        now, read = time.time(), True
        for b in self.host.shared_backends():
            read = self.sync_shared(b, now) and read
        if read and self.store.meta(PUBLISH_SCHEDULES) is not None:
            with self.store.tx():
                self.store.delete_meta(PUBLISH_SCHEDULES)

    def _change(self, b: SharedBackend, name: str, what: str, value, have) -> tuple | None:
        """What the record's schedule ``value`` asks of this host's row ``have``: None
        (nothing), ("refused", error) (the row goes, the error is said once), ("remove",) or
        ("set", spec). The listing asks it to tell whether to take the lock; the change is
        then decided again from the record read under it."""
        try:
            spec = check_published(what, value, b.name)
        except InvalidInput as e:  # another host's record: said once, and not run
            if have is not None or (name, what, repr(value)) not in self._refused:
                return "refused", e
            return None
        if spec is None:
            return ("remove",) if have is not None else None
        return ("set", spec) if have is None or spec_of(have) != spec else None

    def _sync_locked(self, b: SharedBackend, name: str, what: str, now: float) -> None:
        """Follow the record under the volume's lock, read again there: a ``schedule set``
        or ``rm`` on this host since the listing (which holds the lock while it writes the
        record, then the row) is not undone with what the listing read before it. A lock
        busy with another operation leaves the change to the next sync; the runner's thread
        does not wait for it."""
        check_name(name)  # another host's record: its name reaches the locks directory
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.host.lock(name, wait=0))
            except Conflict:
                return  # busy with another operation
            rec = b.record(name)
            published = rec.get("schedules") if isinstance(rec, dict) else None
            if isinstance(published, dict) and what in published:
                self._sync_one(b, name, what, published[what],
                               self.store.schedule(name, what), now)

    def _sync_one(self, b: SharedBackend, name: str, what: str, value, have, now) -> None:
        change = self._change(b, name, what, value, have)
        if change is None:
            return
        if change[0] == "refused":
            if (name, what, repr(value)) not in self._refused:
                self._refused.add((name, what, repr(value)))
                log.warning("the %s schedule of %s in its record is refused, and not run "
                            "here: %s", what, name, change[1])
            if have is not None:  # nor with settings from before the record changed
                with self.store.tx():
                    self.store.delete_schedules(name, what)
        elif change[0] == "remove":
            with self.store.tx():
                self.store.delete_schedules(name, what)
            event(log, "schedule removed on another host", volume=name, what=what)
        else:
            spec = change[1]
            v = self.catalogue.find(name) if self.catalogue else None
            if v is None:
                return
            self.catalogue.adopt(v)
            with self.store.tx():
                store_rows(self.store, name, {what: spec}, now)
            event(log, "schedule set on another host", volume=name, what=what)

    def _run(self, s: Schedule, job: Job | None) -> None:
        try:
            self.run_once(s, job)
        except Exception:
            log.exception("schedule %s of %s could not record its run", s.what, s.volume)
        finally:
            with self._runs_lock:
                self._runs.pop((s.volume, s.what), None)

    def run_once(self, s: Schedule, job: Job | None = None) -> None:
        """One run of ``s``: the work, then retention, then the outcome and the next slot.

        ``s`` is the schedule as it was when found due; it is read again here, and a
        schedule removed, changed or made again since (another ``next_at``) is not run."""
        current = self.store.schedule(s.volume, s.what)
        if current is None or _settings(current) != _settings(s) or self._stopping.is_set():
            self._forget_wait(s)
            return
        s = current
        started = time.time()
        slot = clock.parse(s.next_at)
        error, result, retention_error, elsewhere, ident = None, None, None, None, None
        try:
            try:
                elsewhere = self._runs_elsewhere(s)
            except _NotYet:
                return  # still due: started again once the grace has passed
            again = self.store.schedule(s.volume, s.what)
            if elsewhere is None and (again is None or _settings(again) != _settings(s)):
                return  # removed or changed while its claim was settled: not this run's
            if elsewhere is None and s.what == "snapshot":
                result = self._snapshot(s)
            elif elsewhere is None:
                ident = self._incarnation(s.volume)  # marks the backup, then finds its peers
                result = self._backup(s, job or Job("scheduled backup"), ident)
        except PyvolError as e:
            error = str(e)
        except Exception as e:  # a bug: its traceback in the log, once per streak
            error = f"internal error ({type(e).__name__}); the pyvol daemon's log has the details"
            if s.failures == 0:
                log.exception("scheduled %s of %s failed", s.what, s.volume)
        if error is not None and self._stopping.is_set():
            return  # cut off by the worker exiting: not a failure; the slot stays due
        if elsewhere is not None:  # that host runs it, and applies the retention
            with self.store.tx():
                self.store.schedule_ran(replace(
                    s, next_at=_next(s, max(time.time(), slot)), last_at=clock.stamp(started),
                    last_result=None, last_error=None, failures=0, ran_by=elsewhere))
            return
        if error is None and s.keep:  # a row from before keep was required may have none
            try:
                self._retain(s, ident)
            except PyvolError as e:
                retention_error = f"retention: {e}"
            except Exception as e:
                log.exception("retention of the %s schedule of %s failed", s.what, s.volume)
                retention_error = f"retention: internal error ({type(e).__name__})"
        done = replace(s, next_at=_next(s, max(time.time(), slot)), last_at=clock.stamp(started))
        if error is None:
            if s.failures:
                event(log, "schedule works again", volume=s.volume, what=s.what,
                      after_failures=s.failures)
            done = replace(done, last_result=result, last_error=retention_error, failures=0,
                           runs=s.runs + 1, ran_by=None)
        else:
            if s.failures == 0:
                log.warning("scheduled %s of %s failed: %s (retried every %ss; logged again "
                            "when it works)", s.what, s.volume, error, s.every,
                            extra={"fields": {"volume": s.volume, "what": s.what}})
            done = replace(done, last_result=None, last_error=error, failures=s.failures + 1,
                           ran_by=None)
        with self.store.tx():
            self.store.schedule_ran(done)

    def _shared_backend(self, volume: str) -> SharedBackend | None:
        v = self.store.volume(volume)
        b = self.host.backends.get(v.backend) if v is not None else None
        return b if isinstance(b, SharedBackend) else None

    def _runs_elsewhere(self, s: Schedule) -> str | None:
        """The host that runs this slot of a shared volume's schedule, if not this one: the
        winner of the slot's claim. A host that has the volume mounted claims at once (a
        snapshot is consistent only where its filesystem can be frozen); the others claim
        after HOLDER_GRACE, so that a holder that does not run it (dead, or a pyvol without
        shared schedules) leaves the slot to them rather than to nobody. None: this host
        runs it."""
        b = self._shared_backend(s.volume)
        if b is None:
            return None
        try:
            claims = b.claims(s.volume)
            holders = {str(c["instance"])[:64] for c in claims}
        except (KeyError, TypeError, ValueError) as e:  # another host's lease, unreadable
            raise PyvolError(f"the claims on {s.volume} cannot be read ({type(e).__name__}); "
                             "see `pyvol claim ls`") from None
        if holders and b.instance not in holders:
            self._wait_for_holder(s)
        else:
            self._forget_wait(s)
        winner = b.claim_run(s.volume, s.what, s.next_at)
        if winner == b.instance and holders and b.instance not in holders:
            log.warning("the %s slot %s of %s was not claimed by %s, which has it mounted: "
                        "run here, without the freeze that host would have made", s.what,
                        s.next_at, s.volume, ", ".join(sorted(holders)))
        return None if winner == b.instance else winner

    def _wait_for_holder(self, s: Schedule) -> None:
        """Raise _NotYet until the holder's grace (HOLDER_GRACE, or its share of the
        interval) has passed since this runner first found the slot due. The waiting is the
        dispatcher's, which does not start the slot again before then; no thread and no run
        slot is held meanwhile."""
        key = (s.volume, s.what)
        with self._runs_lock:
            if self._due_since.get(key, ("",))[0] != s.next_at:  # an earlier slot's, or none
                self._due_since[key] = (s.next_at, time.monotonic())
            if self._in_grace(s):
                raise _NotYet
            del self._due_since[key]

    def _in_grace(self, s: Schedule) -> bool:
        """Whether ``s``'s slot is still in its holder's grace; under ``_runs_lock``."""
        slot, since = self._due_since.get((s.volume, s.what), ("", 0.0))
        grace = min(max(HOLDER_GRACE, s.every * HOLDER_GRACE_FRACTION), HOLDER_GRACE_MAX)
        return slot == s.next_at and time.monotonic() < since + grace

    def _forget_wait(self, s: Schedule) -> None:
        """Drop what _wait_for_holder kept of this schedule: no grace to wait any more."""
        with self._runs_lock:
            self._due_since.pop((s.volume, s.what), None)

    # the work
    def _snapshot(self, s: Schedule) -> str:
        # named by the Snapshots part, under the volume's lock: sched-TIME, or -2, -3 after it
        # for a run late enough to share a second with the last
        return self.snapshots.create(s.volume, origin="schedule", prefix=SNAPSHOT_PREFIX)["Ref"]

    def _backup(self, s: Schedule, job: Job, ident: str | None) -> str:
        """Back up into the schedule's repository. The backup is recorded as the schedule's
        (PENDING_BACKUP + its id) before it starts, so that one whose daemon died after its
        manifest was written (or, for ebs://, after its copy was asked for: the copy is tagged
        with the id) is still found, and judged by retention, at the next run."""
        self._settle(s)
        bid = new_backup_id()
        pending = PENDING_BACKUP + bid
        with self.store.tx():
            self.store.add_scheduled_backup(s.volume, pending, s.target, clock.stamp())
        try:
            result = self.backups.create(s.volume, s.target, job, bid=bid,
                                         schedule_of=ident,
                                         lock_wait=BACKUP_LOCK_WAIT)
        except PyvolError:  # refused or failed: the service wrote no manifest (or took it back)
            with self.store.tx():
                self.store.delete_scheduled_backup(s.volume, pending)
            raise
        url = result["url"]
        with self.store.tx():
            self.store.delete_scheduled_backup(s.volume, pending)
            self.store.add_scheduled_backup(s.volume, url, s.target,
                                            result.get("created") or clock.stamp())
        return url

    def _settle(self, s: Schedule) -> None:
        """Backups of this schedule left pending by a run that did not end (the daemon
        died): the one whose manifest exists is recorded as the schedule's, the others are
        forgotten. Only this schedule's runs write its pending rows, one at a time, and none
        is running now. Costs a listing of the volume's backups, only after such a death."""
        pending = {url[len(PENDING_BACKUP):]: url for url, _ in
                   self.store.scheduled_backups(s.volume, s.target)
                   if url.startswith(PENDING_BACKUP)}
        if not pending:
            return
        found = {b["id"]: b for b in self.backups.list(s.target, s.volume)
                 if b.get("id") in pending and b.get("state") != "error"}  # a failed ebs copy
        with self.store.tx():
            for bid, row in pending.items():
                self.store.delete_scheduled_backup(s.volume, row)
                if bid in found:
                    self.store.add_scheduled_backup(s.volume, found[bid]["url"], s.target,
                                                    found[bid].get("created") or clock.stamp())
        event(log, "backups of a schedule interrupted by a crash settled", volume=s.volume,
              found=len(found), forgotten=len(pending) - len(found))

    # retention: only what this schedule made
    def _retain(self, s: Schedule, ident: str | None) -> None:
        policy = Policy.parse(s.keep)
        if s.what == "snapshot":
            for v in keep(self._scheduled_snapshots(s.volume), policy):
                if not v.kept:
                    self._drop_snapshot(s.volume, v.id)
        else:
            for v in keep(self._scheduled_backups(s, ident), policy):
                if not v.kept:
                    self._drop_backup(s.volume, v.id)

    def _incarnation(self, volume: str) -> str | None:
        b = self._shared_backend(volume)
        return None if b is None else b.incarnation(volume)

    def _scheduled_backups(self, s: Schedule, ident: str | None) -> list[tuple[str, datetime]]:
        """The backups this schedule made: this host's rows, and for a shared volume every
        host's, found in the destination by the volume's incarnation ``ident``, which the schedule
        marks each of its backups with (a manifest's ``schedule_of``, an ebs:// copy's tag).
        A backup made by hand has no mark; one of an earlier volume of this name has another.
        What another host recorded is untrusted: a time that does not parse is passed over."""
        items = {url: _time(at) for url, at in self.store.scheduled_backups(s.volume, s.target)
                 if not url.startswith(PENDING_BACKUP)}
        if ident is not None:
            for b in self.backups.list(s.target, s.volume, passing_over_bad=True):
                url, at = b.get("url"), b.get("created")
                if b.get("schedule_of") != ident or not isinstance(url, str) or \
                        b.get("state") == "error" or url in items:
                    continue
                try:
                    items[url] = _time(at)
                except (TypeError, ValueError, OverflowError):
                    continue
        return list(items.items())

    def _scheduled_snapshots(self, volume: str) -> list[tuple[str, datetime]]:
        """The snapshots a schedule took, with their times: this host's rows of origin
        'schedule', and on shared storage every host's, told by their name (sched-TIME, a
        name no user may give: names.check_user_snap_name) unless a row here says a user
        took it."""
        rows = self.store.snapshots(volume)
        items = {x.name: _time(x.created_at) for x in rows
                 if x.origin == "schedule" and x.status == "ready"}
        b = self._shared_backend(volume)
        if b is not None:
            others = {x.name for x in rows}
            for name in b.snapshots(volume):
                at = scheduled_snapshot_time(name)
                if at is not None and name not in others:
                    items[name] = at
        return sorted(items.items(), key=lambda x: (x[1], x[0]))

    def _drop_snapshot(self, volume: str, snap: str) -> None:
        """Remove a schedule's snapshot past its policy. What protects the others is the
        origin filter above (only origin 'schedule' snapshots are judged: never a user's,
        never a backup's own, whose ``backup-base:``/``backup-snapshot:`` notes name only
        snapshots of origin 'backup') and the readers lock: a snapshot a backup is reading
        right now (``pyvol backup create VOL@sched-...``) is refused by Snapshots.remove, kept,
        and judged again after the next run. A backup made from a scheduled snapshot does not
        need it kept: the next backup's parent is chosen among snapshots still held (without
        it, that backup reads every mapped range)."""
        ref = f"{volume}@{snap}"
        try:
            self.snapshots.remove(volume, snap)
        except Conflict as e:  # being read by a backup
            log.info("kept snapshot %s past its schedule's policy for now: %s", ref, e)
            return
        except NotFound:
            return
        event(log, "snapshot removed by its schedule's retention", volume=volume, snapshot=snap)

    def _drop_backup(self, volume: str, url: str) -> None:
        """Remove a schedule's backup past its policy. A repository locked by a backup that
        is running (another host's run of this schedule, once the volume moved; anyone's
        backup into the same repository) keeps it for now: judged again after the next run."""
        try:
            self.backups.remove(url)
        except NotFound:  # removed by hand meanwhile
            pass
        except Conflict as e:
            log.info("kept backup %s past its schedule's policy for now: %s", url, e)
            return
        with self.store.tx():
            self.store.delete_scheduled_backup(volume, url)
        event(log, "backup removed by its schedule's retention", volume=volume, backup=url)
