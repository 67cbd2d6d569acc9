"""What a worker killed on its own leaves blocking a container's I/O, undone by the master.

A daemon killed whole is restarted, and its start resumes suspended devices and thaws frozen
filesystems (the backends' ``setup``, reconcile.py). A worker killed alone (the OOM killer
takes one process; gunicorn kills a worker that stops answering; a ``kill -9``) is only
replaced: a filesystem it had frozen for a snapshot, or a device it had suspended, stayed so,
and every writer in the container hung until the whole daemon next restarted. The master,
which outlives its workers, undoes them as it replaces the worker.

It must not undo a live worker's freeze: that worker thaws it itself, and a thaw in the
middle of its snapshot would leave the snapshot inconsistent. Freezes and suspends happen
only under the volume's lock (and the backend's own, for a suspend), which the kernel
released with the dead worker. So the master thaws a volume only while it holds the
volume's lock, taken without waiting; while a live worker holds it, the master asks again
on the next pass of its loop (about a second later). Devices are resumed first: a thaw
writes to its device, and one still suspended would block the master too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import fs, mountinfo
from .errors import Conflict, PyvolError
from .host import Host
from .log import event

log = logging.getLogger(__name__)


class Leftovers:
    """Owned by the master: ``worker_died`` as gunicorn reaps a worker, ``undo`` on every pass
    of its loop (a no-op until a worker has died)."""

    def __init__(self, host: Host):
        self.host = host
        self._devices = False  # the backends still to be asked to resume their devices
        self._volumes: dict[str, str] = {}  # volume -> mount point, still to thaw

    def worker_died(self) -> None:
        """Note what the dead worker may have left: every mounted volume whose filesystem a
        snapshot freezes. A worker that exited cleanly left nothing, and costs one pass."""
        self._devices = True
        base = str(self.host.config.mounts_dir)
        for e in mountinfo.under(base):
            if os.path.dirname(e.mount_point) == base and e.fstype in fs.FILESYSTEMS:
                self._volumes[os.path.basename(e.mount_point)] = e.mount_point

    def undo(self) -> None:
        if self._devices:
            busy = [b.name for b in self.host.backends.values() if not b.resume_io()]
            if busy:
                return  # a live worker is inside a backend's suspend: thaw nothing yet
            self._devices = False
        if not self._volumes:
            return
        mounted = mountinfo.mount_points()
        for name, mp in list(self._volumes.items()):
            if mp in mounted and not self._thawed(name, mp):
                continue  # its lock is a live worker's: the next pass asks again
            del self._volumes[name]

    def _thawed(self, name: str, mp: str) -> bool:
        """Thaw ``name`` under its lock; False if a live worker holds the lock."""
        try:
            with self.host.lock(name, wait=0):
                if fs.thaw(Path(mp)):
                    event(log, "thawed a filesystem left frozen by a killed worker",
                          volume=name)
        except Conflict:
            return False
        except PyvolError as e:  # said once: a thaw that fails is not asked again
            log.error("could not thaw volume %s at %s after a worker died: %s", name, mp, e)
        return True
