"""The runner: one per host, whatever the number of gunicorn workers, doing what the
schedules (plugin/schedules.py) say when they say it, then applying their retention.

Every worker starts a runner thread; each tries a non-blocking flock on ROOT/scheduler.lock
once a second, and only the one holding it runs schedules. A worker that dies (killed, or
recycled by gunicorn) drops the lock with its process, and another worker's thread takes it
within a second: never two runners, never none for long, and no lock file to clean up.

A run that fails is retried at the schedule's next slot; its error is shown in Status and
`pyvol schedule ls` for as long as it lasts, and logged once per streak of failures (and once
when it ends), not at every retry.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone

from . import clock
from .backup.job import Job
from .backup.retention import Policy, keep
from .backup.service import BASE, PENDING
from .errors import Conflict, NotFound, PyvolError
from .log import event
from .schedules import next_after
from .state import Schedule

log = logging.getLogger(__name__)

LOCK_POLL = 1.0  # how often a worker without the lock tries to take it
TICK = 0.5       # how often the runner looks for due schedules
RUNS_AT_ONCE = 2  # a long backup must not hold up every other volume's snapshot
SNAPSHOT_PREFIX = "sched-"


def _time(text: str) -> datetime:
    return datetime.fromtimestamp(clock.parse(text), timezone.utc)


class Runner:
    def __init__(self, host, snapshots, backups):
        self.host, self.snapshots, self.backups = host, snapshots, backups
        self.store = host.store
        self.lock_path = host.config.root / "scheduler.lock"
        self._busy: set[tuple[str, str]] = set()
        self._busy_lock = threading.Lock()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._main, name="schedule-runner", daemon=True)
        t.start()
        return t

    def _main(self) -> None:
        try:
            self._take_lock()
            event(log, "schedule runner started", pid=os.getpid())
            pool = ThreadPoolExecutor(RUNS_AT_ONCE, thread_name_prefix="schedule-run")
            broken = False
            while True:
                try:
                    self._dispatch(pool)
                    broken = False
                except Exception:  # the state unreadable for a moment: try again, say so once
                    if not broken:
                        log.exception("schedule runner could not read the schedules")
                    broken = True
                time.sleep(TICK)
        except Exception:
            log.exception("schedule runner stopped")

    def _take_lock(self) -> None:
        """Block (politely) until this process holds ROOT/scheduler.lock; it keeps it until
        it dies. The holder's pid is written in the file, for people and tests."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(LOCK_POLL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd  # held for the life of the process

    def _dispatch(self, pool: ThreadPoolExecutor) -> None:
        for s in self.store.due_schedules(clock.stamp()):
            key = (s.volume, s.what)
            with self._busy_lock:
                if key in self._busy:  # still running from an earlier slot
                    continue
                self._busy.add(key)
            pool.submit(self._run, s)

    def _run(self, s: Schedule) -> None:
        try:
            self.run_once(s)
        except Exception:
            log.exception("schedule %s of %s could not record its run", s.what, s.volume)
        finally:
            with self._busy_lock:
                self._busy.discard((s.volume, s.what))

    def run_once(self, s: Schedule) -> None:
        """One run of ``s``: the work, then retention, then the outcome and the next slot."""
        started = time.time()
        slot = clock.parse(s.next_at)
        error, result, retention_error = None, None, None
        try:
            result = (self._snapshot(s) if s.what == "snapshot" else self._backup(s))
        except PyvolError as e:
            error = str(e)
        except Exception as e:  # a bug: its traceback in the log, once per streak
            error = f"internal error ({type(e).__name__}); the pyvol daemon's log has the details"
            if s.failures == 0:
                log.exception("scheduled %s of %s failed", s.what, s.volume)
        if error is None and s.keep:
            try:
                self._retain(s)
            except PyvolError as e:
                retention_error = f"retention: {e}"
            except Exception as e:
                log.exception("retention of the %s schedule of %s failed", s.what, s.volume)
                retention_error = f"retention: internal error ({type(e).__name__})"
        done = replace(s, next_at=clock.stamp(next_after(max(time.time(), slot), s.volume,
                                                         s.what, s.every)),
                       last_at=clock.stamp(started))
        if error is None:
            if s.failures:
                event(log, "schedule works again", volume=s.volume, what=s.what,
                      after_failures=s.failures)
            done = replace(done, last_result=result, last_error=retention_error, failures=0,
                           runs=s.runs + 1)
        else:
            if s.failures == 0:
                log.warning("scheduled %s of %s failed: %s (retried every %ss; logged again "
                            "when it works)", s.what, s.volume, error, s.every,
                            extra={"fields": {"volume": s.volume, "what": s.what}})
            done = replace(done, last_result=None, last_error=error, failures=s.failures + 1)
        with self.store.tx():
            self.store.schedule_ran(done)

    # the work
    def _snapshot(self, s: Schedule) -> str:
        taken = {x.name for x in self.store.snapshots(s.volume)}
        name, n = SNAPSHOT_PREFIX + clock.compact(), 1
        while name in taken:  # a run late enough to share a second with the last
            n += 1
            name = f"{SNAPSHOT_PREFIX}{clock.compact()}-{n}"
        return self.snapshots.create(s.volume, name, origin="schedule")["Ref"]

    def _backup(self, s: Schedule) -> str:
        result = self.backups.create(s.volume, s.target, Job("scheduled backup"))
        url = result["url"]
        created = result.get("created") or clock.stamp()
        with self.store.tx():
            self.store.add_scheduled_backup(s.volume, url, s.target, created)
        return url

    # retention: only what this schedule made
    def _retain(self, s: Schedule) -> None:
        policy = Policy.parse(s.keep)
        if s.what == "snapshot":
            items = [(x.name, _time(x.created_at)) for x in
                     self.store.snapshots(s.volume, status="ready") if x.origin == "schedule"]
            for v in keep(items, policy):
                if not v.kept:
                    self._drop_snapshot(s.volume, v.id)
        else:
            items = [(url, _time(at)) for url, at in
                     self.store.scheduled_backups(s.volume, s.target)]
            for v in keep(items, policy):
                if not v.kept:
                    self._drop_backup(s.volume, v.id)

    def _drop_snapshot(self, volume: str, snap: str) -> None:
        """Remove a schedule's snapshot past its policy, unless a backup still needs it: as
        the base of its next incremental backup, or being read right now. Kept, it is
        judged again after the next run, and goes once nothing needs it."""
        ref = f"{volume}@{snap}"
        if self.store.meta(BASE + ref) is not None or self.store.meta(PENDING + ref) is not None:
            return
        try:
            self.snapshots.remove(volume, snap)
        except Conflict as e:  # being read by a backup
            log.info("kept snapshot %s past its schedule's policy for now: %s", ref, e)
            return
        except NotFound:
            return
        event(log, "snapshot removed by its schedule's retention", volume=volume, snapshot=snap)

    def _drop_backup(self, volume: str, url: str) -> None:
        try:
            self.backups.remove(url)
        except NotFound:  # removed by hand meanwhile
            pass
        with self.store.tx():
            self.store.delete_scheduled_backup(volume, url)
        event(log, "backup removed by its schedule's retention", volume=volume, backup=url)
