"""Creates, removes and snapshots left half done by a worker killed alone, the snapshots its
backups took for themselves, and the mounts it made or kept without a count, ended without a
restart.

A daemon killed whole ends them at its next start (reconcile.py). A worker killed alone (the
OOM killer takes one process) is only replaced, and its ``creating`` row held the volume's
name until the next start: a rerun of the create failed "already exists". Likewise a remove's
row and half-removed storage, and a snapshot's row.

Every such row is written and ended under its volume's lock (docs/state.md), so a row whose
lock is free has no live owner: the worker that made it died, or its own undo failed and
left it for later. The schedule runner's worker, one per host, looks for such rows every two
seconds and ends each whose lock it takes without waiting, as a start would
(``reconcile.finish_interrupted``). That runs on a thread of its own, since ending a change
can wait on storage (an EBS detach, a device-mapper pool's lock), and in a worker, not in
gunicorn's master, whose loop must keep answering signals and replacing workers meanwhile.

A backup notes the snapshot it takes for itself before taking it, and holds its volume's
``backups`` lock, shared, until that note goes (backup/service.py): a note whose lock is
free is a dead process's (or a failed backup's, whose snapshot could not be dropped then),
and its snapshot goes as a start would remove it (``Backups.end_unended``).

A Mount mounts, then counts; an Unmount drops the last count, then unmounts; both under the
volume's lock. A worker killed between the two left a volume mounted with no count: no
container has it (Docker heard that its Mount failed), and a rollback was refused "mounted
with no mount counted". Each such volume whose lock is free is unmounted and released, as a
start would (``reconcile.detach_uncounted``). The mount table is parsed again only when the
kernel says it changed (mountinfo.py), so the look costs a poll and a query.

A volume with a freeze mark is left to the master first (leftovers.py): taking its lock
thaws it, and the master resumes a suspended device before it thaws. What fails to be ended
(a child of the dead worker still holding the device, say) is tried again later, less and
less often, and after about twenty minutes left to the next start, said once per volume.
"""

from __future__ import annotations

import logging
import threading
import time

from . import mountinfo
from .backup.service import Backups
from .errors import Conflict, PyvolError
from .host import Host
from .reconcile import detach_uncounted, finish_interrupted
from .snapshots import Snapshots
from .state import Volume
from .volumes import Volumes

log = logging.getLogger(__name__)

EVERY = 2.0  # seconds between two looks for abandoned rows, notes and mounts
RETRY_FIRST = 5.0  # seconds before a volume whose change could not be ended is tried again
RETRY_MOST = 600.0  # the retries' interval doubles up to this, then they stop
# a volume's row half done; a backup's own snapshot left; a mount with no count
CHANGE, BACKUP, MOUNT = "change", "backup", "mount"
LEFT = {CHANGE: "a change a killed process left half done",
        BACKUP: "a snapshot a backup took for itself and did not remove",
        MOUNT: "a mount a killed process left with no count"}


class Abandoned:
    def __init__(self, host: Host, volumes: Volumes, snapshots: Snapshots, backups: Backups):
        self.host, self.volumes, self.snapshots, self.backups = host, volumes, snapshots, backups
        self._thread: threading.Thread | None = None
        # (what, volume) -> (next try, interval); what: CHANGE, BACKUP or MOUNT
        self._retry: dict[tuple[str, str], tuple[float, float]] = {}
        self._left: set[tuple[str, str]] = set()  # left to the next start
        self._next = 0.0

    def check(self) -> None:
        """From the runner's loop: start ending what is abandoned, unless that still runs.
        Six small queries and a look at the mount table; a row, note or mount whose lock is
        held (a create, a backup or a Mount in progress, usually) costs a flock attempt."""
        now = time.monotonic()
        if now < self._next or (self._thread is not None and self._thread.is_alive()):
            return
        self._next = now + EVERY
        found = {CHANGE: self._unfinished(), BACKUP: self._noted(), MOUNT: self._uncounted()}
        self._forget(found)
        names = [n for n in sorted(found[CHANGE]) if self._due((CHANGE, n), now)
                 and self._free(n)]
        noted = [n for n in sorted(found[BACKUP]) if self._due((BACKUP, n), now)
                 and self._no_backup(n) and self._free(n)]
        uncounted = [n for n in sorted(found[MOUNT]) if self._due((MOUNT, n), now)
                     and self._free(n)]
        if names or noted or uncounted:
            self._thread = threading.Thread(target=self._end_all,
                                            args=(names, noted, uncounted), daemon=True,
                                            name="pyvol-abandoned")
            self._thread.start()

    def _noted(self) -> set[str]:
        """The volumes with a note of a backup's own snapshot, whose backend is set up here
        (or whose record is gone: the note alone goes)."""
        store = self.host.store
        return {n for n in self.backups.unended()
                if (v := store.volume(n)) is None or v.backend in self.host.backends}

    def _uncounted(self) -> set[str]:
        """The volumes mounted here with no count (the lock decides: a Mount in progress
        has mounted and not counted yet)."""
        prefix = f"{self.host.config.mounts_dir}/"
        mounted = {p[len(prefix):] for p in mountinfo.mount_points() if p.startswith(prefix)}
        if not mounted:
            return set()
        store = self.host.store
        counted = {n for n, count in store.mounts().items() if count}
        return {n for n in mounted - counted if self._ours(store.volume(n))}

    def _forget(self, found: dict[str, set[str]]) -> None:
        """Retries and give-ups of what is no longer there: the next one of a volume (a
        later backup's snapshot, say) starts afresh."""
        for key in [k for k in (*self._retry, *self._left) if k[1] not in found[k[0]]]:
            self._retry.pop(key, None)
            self._left.discard(key)

    def _ours(self, v: Volume | None) -> bool:
        """A ready volume of a backend set up here: one to unmount if it has no count."""
        return v is not None and v.status == "ready" and v.backend in self.host.backends

    def _due(self, key: tuple[str, str], now: float) -> bool:
        return key not in self._left and self._retry.get(key, (0.0, 0.0))[0] <= now

    def wait(self, timeout: float | None = None) -> None:
        """For an exiting worker: an undo cut off midway is a crash's, but its tools would
        go on beside the next runner's undo of the same volume."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _unfinished(self) -> set[str]:
        store, names = self.host.store, set()
        for status in ("creating", "removing"):
            names |= {v.name for v in store.volumes(status=status)}
            names |= {s.volume for s in store.snapshots(status=status)}
        return names

    def _free(self, name: str) -> bool:
        """Nobody holds ``name``'s lock this instant (the thread takes it again), and no
        freeze mark is beside it: that volume is the master's first (leftovers.py), and
        taking its lock would thaw it here, perhaps before its device is resumed."""
        return not self.host.freeze_marker(name).exists() \
            and _untaken(self.host.lock(name, wait=0))

    def _no_backup(self, name: str) -> bool:
        """No live process runs a backup of ``name`` this instant."""
        return _untaken(self.snapshots.no_backup_running(name))

    def _end_all(self, names: list[str], noted: list[str], uncounted: list[str]) -> None:
        # each outcome is what the attempt says, not a listing read again after it: a new
        # create or backup of the name since then is its live owner's, not a failure here
        for name in names:
            try:
                with self.host.lock(name, wait=0):
                    if not self._end(name):  # its backend is not set up on this host
                        self._left.add((CHANGE, name))
                        continue
                ended = True
            except Conflict:
                continue  # its owner lives (or ends it): not abandoned
            except Exception:
                log.exception("could not end what was interrupted of volume %s", name)
                ended = False
            self._tried((CHANGE, name), ended)
        for name in noted:
            try:
                if not self.backups.end_unended(name):
                    continue  # a backup of it started meanwhile
                ended = True
            except PyvolError as e:  # another backup reads the snapshot, say
                log.warning("could not remove a snapshot of volume %s that a backup left: %s",
                            name, e)
                ended = False
            except Exception:
                log.exception("could not remove the snapshots of volume %s that backups "
                              "left", name)
                ended = False
            self._tried((BACKUP, name), ended)
        for name in uncounted:
            try:
                with self.host.lock(name, wait=0):
                    self._detach(name)
                self._tried((MOUNT, name), True)
            except Conflict:
                continue  # a Mount or Unmount runs: it counts or unmounts as it ends
            except PyvolError as e:  # busy: a process still has files open in it, say
                log.warning("could not unmount volume %s, mounted with no count: %s", name, e)
                self._tried((MOUNT, name), False)
            except Exception:
                log.exception("could not unmount volume %s, mounted with no count", name)
                self._tried((MOUNT, name), False)

    def _tried(self, key: tuple[str, str], ended: bool) -> None:
        if ended:
            self._retry.pop(key, None)
        else:
            self._later(key)

    def _end(self, name: str) -> bool:
        """Under ``name``'s lock: its rows as they are now, not as the listing saw them.
        False if its backend is not set up here."""
        store = self.host.store
        v = store.volume(name)
        if v is None:
            return True
        if v.backend not in self.host.backends:
            return False
        snapshots = [s for s in store.snapshots(name) if s.status != "ready"]
        if v.status != "ready" or snapshots:
            finish_interrupted(self.host, self.volumes, self.host.backends[v.backend], v,
                               snapshots)
        return True

    def _detach(self, name: str) -> None:
        """Under ``name``'s lock: unmount it if it is still mounted with no count."""
        v = self.host.store.volume(name)
        if self._ours(v) and not self.host.store.mounts(name) \
                and mountinfo.is_mounted(self.host.mountpoint(name)):
            detach_uncounted(self.volumes, v)

    def _later(self, key: tuple[str, str]) -> None:
        what, name = key
        _, interval = self._retry.get(key, (0.0, 0.0))
        if interval >= RETRY_MOST:
            self._left.add(key)
            self._retry.pop(key, None)
            log.error("volume %s still has %s; the next start of pyvol ends it", name,
                      LEFT[what])
            return
        if not interval:
            log.warning("volume %s keeps %s; trying again later", name, LEFT[what])
        interval = min(RETRY_MOST, interval * 2 if interval else RETRY_FIRST)
        self._retry[key] = (time.monotonic() + interval, interval)


def _untaken(lock) -> bool:
    """Nobody holds ``lock`` (a lock taken without waiting) this instant."""
    try:
        with lock:
            return True
    except Conflict:
        return False
