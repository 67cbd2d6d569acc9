"""What a worker killed on its own leaves blocking a container's I/O, undone by the master.

A daemon killed whole is restarted, and its start resumes suspended devices and thaws frozen
filesystems (the backends' ``setup``, reconcile.py). A worker killed alone (the OOM killer
takes one process; gunicorn kills a worker that stops answering; a ``kill -9``) is only
replaced: a filesystem it had frozen for a snapshot, or a device it had suspended, stayed so,
and every writer in the container hung until the whole daemon next restarted. The master,
which outlives its workers, undoes them as it replaces the worker.

It also ends what the worker left half done in the records, as a start does (reconcile.py):
a volume being created, which held its name until the next start, or being removed, and a
snapshot being taken or removed. Each of these is begun and ended under the volume's lock,
so a row of the kind whose lock is free has no live owner.

It never undoes a live worker's freeze or suspend: a thaw in the middle of a snapshot would
leave the snapshot inconsistent. Every freeze is made under the volume's lock and marked
(freeze.py), and taking that lock thaws a marked filesystem (``Host.lock``); a suspend is
made under its backend's lock (``Backend.resume_io``). The kernel released the dead worker's
locks with it, so the master takes each without waiting, and where a live worker holds one,
asks again on the next pass of its loop, about a second later. Devices are resumed first:
a thaw writes to its device, and on one still suspended it would block.
"""

from __future__ import annotations

import logging
import time

from . import freeze
from .errors import Conflict, PyvolError
from .host import Host
from .reconcile import finish_interrupted
from .volumes import Volumes

log = logging.getLogger(__name__)

PATIENCE = 600.0  # seconds of passes before what will not be undone is left to a restart
EVERY = 1.0  # between two passes: each child a pass runs wakes the master's loop at once


class Leftovers:
    """The master's: ``worker_died`` as gunicorn reaps a worker, ``undo`` on every pass of its
    loop, a no-op until a worker has died."""

    def __init__(self, host: Host, volumes: Volumes | None):
        """``volumes`` None: freezes and suspends only (a host without records)."""
        self.host, self.volumes = host, volumes
        self._until = 0.0  # the time to give up at; 0: nothing to do
        self._next = 0.0
        self._said: set[tuple[str, str]] = set()  # (volume, what failed), logged once each
        self._finished: set[str] = set()  # volumes whose rows were ended (or tried) already
        self._pass_failed = False  # a failed pass was logged

    def worker_died(self) -> None:
        """A worker that exited cleanly left nothing, and costs one pass."""
        self._until = time.monotonic() + PATIENCE
        self._next = 0.0
        self._finished.clear()

    def last_pass(self) -> None:
        """At exit: one more pass if anything is left, waiting a few seconds for each lock,
        since a worker killed at the end of a stop may still be ending."""
        self._next = 0.0
        self.undo(wait=5.0)

    def undo(self, wait: float = 0.0) -> None:
        """One pass, if one is due; ``wait``: how long to wait for each lock."""
        now = time.monotonic()
        if not self._until or now < self._next:
            return
        self._next = now + EVERY
        try:
            done = self._undo(wait)
        except Exception:  # never out into gunicorn's loop, which would stop the daemon
            if not self._pass_failed:
                log.exception("undoing what a killed worker left failed; trying again")
                self._pass_failed = True
            done = False
        if done:
            self._until = 0.0
            self._said.clear()
            self._pass_failed = False
        elif now > self._until:
            self._until = 0.0
            log.error("what a killed worker left (a frozen filesystem, a suspended device, a "
                      "half-done create, remove or snapshot) could not all be ended; "
                      "restarting pyvol ends it")

    def _undo(self, wait: float) -> bool:
        """True once nothing is left to undo."""
        # devices first: a thaw writes to its device, and on one still suspended it blocks.
        # A backend whose devices are not all resumed keeps its volumes' marks for later.
        resumed = {name for name, b in self.host.backends.items() if b.resume_io()}
        every = len(resumed) == len(self.host.backends)
        left = not every
        for name, marker in self.host.marked_frozen():
            backend = freeze.backend_of(marker)  # one not set up here: once all are resumed
            if not (backend in resumed if backend in self.host.backends else every):
                left = True
                continue
            try:
                with self.host.lock(name, wait=wait):  # which thaws it (Host.lock)
                    pass
            except Conflict:
                left = True  # a live worker's lock: maybe its own freeze, which it ends
            except PyvolError as e:
                self._failed(name, "thaw", e)
                left = True
        if self.volumes is not None and every:  # a remove unmounts, which a freeze blocks
            left = self._unfinished(wait) or left
        return not left

    def _unfinished(self, wait: float) -> bool:
        """End each half-done create, remove or snapshot whose volume's lock is free; True
        if any is left (its lock held: a live worker's own, or one ending)."""
        store, left = self.host.store, False
        try:
            names = {v.name for v in store.volumes() if v.status != "ready"}
            names |= {s.volume for s in store.snapshots() if s.status != "ready"}
            for name in sorted(names - self._finished):
                try:
                    with self.host.lock(name, wait=wait):
                        # once: what fails to be undone (and logs why) is the next start's
                        self._finished.add(name)
                        self._finish(name)
                except Conflict:
                    left = True
                except PyvolError as e:
                    self._failed(name, "finish what was interrupted of", e)
                    left = True
        finally:
            store.close()  # the master forks the next worker: no connection of its to inherit
        return left

    def _finish(self, name: str) -> None:
        """Under ``name``'s lock: its rows as they are now, not as the listing saw them."""
        store = self.host.store
        v = store.volume(name)
        if v is None or v.backend not in self.host.backends:
            return
        snapshots = [s for s in store.snapshots(name) if s.status != "ready"]
        if v.status != "ready" or snapshots:
            finish_interrupted(self.host, self.volumes, self.host.backends[v.backend], v,
                               snapshots)

    def _failed(self, name: str, what: str, e: PyvolError) -> None:
        if (name, what) not in self._said:
            log.error("could not %s volume %s after a worker died: %s", what, name, e)
            self._said.add((name, what))
