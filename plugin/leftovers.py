"""What a worker killed on its own leaves blocking a container's I/O, undone by the master.

A daemon killed whole is restarted, and its start resumes suspended devices and thaws frozen
filesystems (the backends' ``setup``, reconcile.py). A worker killed alone (the OOM killer
takes one process; gunicorn kills a worker that stops answering; a ``kill -9``) is only
replaced: a filesystem it had frozen for a snapshot, or a device it had suspended, stayed so,
and every writer in the container hung until the whole daemon next restarted. The master,
which outlives its workers, undoes them as it replaces the worker.

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

log = logging.getLogger(__name__)

PATIENCE = 600.0  # seconds of passes before what will not be undone is left to a restart
EVERY = 1.0  # between two passes: each child a pass runs wakes the master's loop at once


class Leftovers:
    """The master's: ``worker_died`` as gunicorn reaps a worker, ``undo`` on every pass of its
    loop, a no-op until a worker has died."""

    def __init__(self, host: Host):
        self.host = host
        self._until = 0.0  # the time to give up at; 0: nothing to do
        self._next = 0.0
        self._said: set[str] = set()  # volumes whose failed thaw was logged, once each
        self._pass_failed = False  # a failed pass was logged

    def worker_died(self) -> None:
        """A worker that exited cleanly left nothing, and costs one pass."""
        self._until = time.monotonic() + PATIENCE
        self._next = 0.0

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
            log.error("a device or filesystem a killed worker left blocked could not be "
                      "released; restarting pyvol releases it")

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
                if name not in self._said:
                    log.error("could not thaw volume %s after a worker died: %s", name, e)
                    self._said.add(name)
                left = True
        return not left
