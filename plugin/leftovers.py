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

from .errors import Conflict, PyvolError
from .host import Host

log = logging.getLogger(__name__)

PASSES = 600  # about ten minutes of passes before a device that will not resume is left


class Leftovers:
    """The master's: ``worker_died`` as gunicorn reaps a worker, ``undo`` on every pass of its
    loop, a no-op until a worker has died."""

    def __init__(self, host: Host):
        self.host = host
        self._passes = 0  # left to try; 0: nothing to do
        self._said: set[str] = set()  # volumes whose failed thaw was logged

    def worker_died(self) -> None:
        """A worker that exited cleanly left nothing, and costs one pass."""
        self._passes = PASSES

    def undo(self) -> None:
        if not self._passes:
            return
        self._passes -= 1
        try:
            done = self._undo()
        except Exception:  # never out into gunicorn's loop, which would stop the daemon
            log.exception("undoing what a killed worker left failed; trying again")
            done = False
        if done:
            self._passes = 0
            self._said.clear()
        elif not self._passes:
            log.error("a device or filesystem a killed worker left blocked could not be "
                      "released; restarting pyvol releases it")

    def _undo(self) -> bool:
        """True once nothing is left to undo."""
        busy = [b.name for b in self.host.backends.values() if not b.resume_io()]
        if busy:
            return False  # a live worker is inside a suspend, or a device would not resume
        left = False
        for marker in sorted(self.host.config.locks_dir.glob("vol.*.frozen")):
            name = marker.name[len("vol."):-len(".frozen")]
            try:
                with self.host.lock(name, wait=0):  # which thaws it (Host.lock)
                    pass
            except Conflict:
                left = True  # a live worker's lock: maybe its own freeze, which it ends
            except PyvolError as e:
                if name not in self._said:
                    log.error("could not thaw volume %s after a worker died: %s", name, e)
                    self._said.add(name)
                left = True
        return not left
