"""Snapshots of volumes: taken in constant time by the backend, with the volume's filesystem
frozen only for the instant that makes them consistent (the volume's kind says how).

A snapshot records who took it (``origin``): pyvol removes on its own only the snapshots it
took itself (a backup's), never a user's. A snapshot a backup is reading cannot be removed
until the backup ends (``reading``).
"""

from __future__ import annotations

import contextlib
import logging

from . import clock, locks, mountinfo
from .catalogue import Catalogue
from .crashpoint import crashpoint
from .errors import Conflict, InvalidInput, NotFound
from .host import Host
from .log import event
from .names import check_name, check_snap_name, check_user_snap_name
from .state import Snapshot, Volume, now

log = logging.getLogger(__name__)


class Snapshots:
    def __init__(self, host: Host, catalogue: Catalogue):
        self.host, self.catalogue, self.store = host, catalogue, host.store

    def create(self, volume, snap=None, origin: str = "user", prefix: str = "") -> dict:
        """Snapshot ``volume``; without a name, one made from the time (after ``prefix``: a
        schedule's ``sched-``), unique for the volume."""
        check_name(volume)
        if snap is not None and snap != "":
            (check_user_snap_name if origin == "user" else check_snap_name)(snap)
        with self.host.lock(volume):
            v = self.catalogue.adopt(self.catalogue.ready(volume))
            if snap is None or snap == "":
                # chosen under the volume's lock, so two unnamed snapshots never pick one name
                snap = self._free_name(volume, prefix + clock.compact())
            self._take(v, snap, origin)
        event(log, "snapshot created", volume=volume, snapshot=snap)
        return self.get(volume, snap)

    def _take(self, v: Volume, snap: str, origin: str) -> None:
        """Snapshot ``v`` as ``snap``; the caller holds the volume's lock."""
        volume = v.name
        backend = self.host.backend(v)
        if self.store.snapshot(volume, snap) is not None:
            raise Conflict(f"snapshot {volume}@{snap} already exists")
        with self.store.tx():
            self.store.add_snapshot(Snapshot(volume, snap, v.size, "creating", now(), origin))
        crashpoint("snapshot.recorded")
        quiesce = self.host.kind(backend).quiesce(self.host.mountpoint(volume),
                                                  self.host.freeze_mark(volume, backend))
        try:
            backend.snapshot(volume, snap, quiesce)
            crashpoint("snapshot.taken")
        except Conflict:  # the storage holds that name already (another host's, on
            self.store.delete_snapshot(volume, snap)  # shared storage): never ours to undo
            raise
        except BaseException:
            backend.remove_snapshot(volume, snap)
            self.store.delete_snapshot(volume, snap)
            raise
        self.store.set_snapshot_status(volume, snap, "ready")

    def rollback(self, volume, snap, discard_current: bool = False) -> dict:
        """Give ``volume`` the data of ``volume@snap``, in place.

        Only while nothing uses the volume: its data changes under no container. What it
        held before stays as a snapshot of the user's (``pre-rollback-TIME``, which pyvol
        never removes by itself) unless ``discard_current``. The swap is the backend's, whole
        or not at all; a crash before it leaves the old data (and perhaps that snapshot),
        after it the snapshot's data in a filesystem that may not fill a volume grown since
        (the next ``pyvol resize`` to its size fills it). ``discard_current`` is a bool: the
        API, where the request's field is known, refuses anything else.
        """
        check_name(volume)
        check_snap_name(snap)
        with self.host.lock(volume):
            v = self.catalogue.adopt(self.catalogue.ready(volume))
            s = self.catalogue.snapshot(v, snap)
            if s is None or s.status != "ready":
                raise NotFound(f"no such snapshot: {volume}@{snap}")
            backend = self.host.backend(v)
            if backend.no_rollback:
                raise InvalidInput(f"cannot roll back volume {volume} on backend "
                                   f"{backend.name}: {backend.no_rollback}")
            self._check_unused(v, backend)
            kept = None
            if not discard_current:
                kept = self._free_name(volume, f"pre-rollback-{clock.compact()}")
                self._take(v, kept, "user")
                crashpoint("rollback.kept")
            backend.rollback(volume, snap)
            crashpoint("rollback.swapped")
            if s.size < v.size:  # the snapshot's filesystem, in a volume grown since
                self.host.kind(backend).fill_fs(backend, v, self.host.mountpoint(volume))
        event(log, "volume rolled back", volume=volume, snapshot=snap, kept=kept)
        return {"Volume": volume, "Snapshot": f"{volume}@{snap}",
                "Kept": f"{volume}@{kept}" if kept else None}

    def _check_unused(self, v: Volume, backend) -> None:
        """A rollback never changes data under a running container."""
        self.catalogue.refuse_if_used(v, backend, "roll back")
        if mountinfo.is_mounted(self.host.mountpoint(v.name)):
            raise Conflict(f"cannot roll back volume {v.name}: it is mounted at "
                           f"{self.host.mountpoint(v.name)} with no mount counted (a killed "
                           "process's, unmounted within seconds): try again")

    def _free_name(self, volume: str, base: str) -> str:
        taken = {s.name for s in self.store.snapshots(volume)}
        snap, n = base, 1
        while snap in taken:
            n += 1
            snap = f"{base}-{n}"
        return snap

    def remove(self, volume, snap, wait: float = locks.DEFAULT_WAIT) -> None:
        """``wait``: how long to wait for the volume's lock (Conflict after)."""
        check_name(volume)
        check_snap_name(snap)
        with self.host.lock(volume, wait=wait):
            v = self.catalogue.adopt(self.catalogue.ready(volume))
            s = self.catalogue.snapshot(v, snap)
            if s is None:
                raise NotFound(f"no such snapshot: {volume}@{snap}")
            self.catalogue.adopt_snapshot(s)
            with self.no_readers(volume, [snap]):
                self.store.set_snapshot_status(volume, snap, "removing")
                self.host.backend(v).remove_snapshot(volume, snap)
                self.store.delete_snapshot(volume, snap)
        event(log, "snapshot removed", volume=volume, snapshot=snap)

    def record(self, volume: str, snap: str) -> Snapshot | None:
        return self.store.snapshot(volume, snap)

    def get(self, volume, snap) -> dict:
        check_name(volume)
        check_snap_name(snap)
        s = self.catalogue.snapshot(self.catalogue.ready(volume), snap)
        if s is None or s.status != "ready":
            raise NotFound(f"no such snapshot: {volume}@{snap}")
        return describe(s)

    def list(self, volume=None) -> list[dict]:
        if volume is not None:
            self.catalogue.ready(volume)
        return [describe(s) for s in self.store.snapshots(volume, status="ready")]

    def changed_ranges(self, volume, base, snap) -> list[tuple[int, int]]:
        v = self.catalogue.ready(volume)
        for s in [base, snap] if base else [snap]:
            self.get(volume, s)
        backend = self.host.backend(v)
        return self.host.kind(backend).ranges(backend, volume, base, snap)

    # a backup reading a snapshot
    @contextlib.contextmanager
    def reading(self, volume: str, snap: str):
        """Held while a backup reads ``volume@snap``: removing it meanwhile is refused. A
        snapshot with no record once the read ends (named wrong, or removed before the hold
        began) has no removal to take its lock's file away: the reader does, unless
        another holds it then."""
        try:
            with self._read_lock(volume, snap, shared=True):
                yield
        finally:
            if self.store.snapshot(volume, snap) is None:
                with contextlib.suppress(Conflict), self._read_lock(volume, snap):
                    pass

    def backup_running(self, volume: str):
        """Held (shared) by every backup of ``volume`` that takes a snapshot for itself and
        runs in a live process, for as long as it keeps a note of that snapshot
        (``backup.service.PENDING``)."""
        return locks.held(self.host.config.locks_dir, f"backups.{volume}", f"volume {volume}",
                          shared=True)

    def no_backup_running(self, volume: str):
        """Refuse, at once, while a live process runs a backup of ``volume`` that took a
        snapshot for itself: a note of such a snapshot found otherwise was left by a process
        that died, or kept by a backup that could not drop its snapshot (abandoned.py)."""
        return locks.held(self.host.config.locks_dir, f"backups.{volume}", "", wait=0,
                          busy=f"a backup of volume {volume} is running")

    def no_readers(self, volume: str, snaps: list[str]):
        """Refuse, at once, to remove snapshots a backup is reading. Their locks' files go
        as the removal ends (a backup's own snapshot's lock is used once)."""
        stack = contextlib.ExitStack()
        for snap in snaps:
            stack.enter_context(self._read_lock(
                volume, snap, busy=f"snapshot {volume}@{snap} is being read by a running "
                                   "backup; remove it when the backup ends"))
        return stack

    def _read_lock(self, volume: str, snap: str, shared: bool = False, busy: str | None = None):
        """``volume@snap``'s lock, taken without waiting: shared by its readers, exclusive
        (its file removed as it is let go) by whoever clears it away."""
        return locks.held(self.host.config.locks_dir, f"snap.{volume}@{snap}", "", wait=0,
                          shared=shared, busy=busy, discard=not shared)


def describe(s: Snapshot) -> dict:
    return {"Volume": s.volume, "Name": s.name, "Ref": f"{s.volume}@{s.name}",
            "CreatedAt": s.created_at, "Size": s.size, "Origin": s.origin}


class SnapshotAccess:
    """The volumes as the backup service sees them (``backup.service.VolumeAccess``): what it
    may do to a volume, and nothing more. Wired in server.py."""

    def __init__(self, host: Host, catalogue: Catalogue, snapshots: Snapshots):
        self.host, self.catalogue, self.snapshots = host, catalogue, snapshots

    def volume(self, name):
        return self.catalogue.ready(check_name(name))

    def backend(self, v):
        return self.host.backend(v)

    def backend_named(self, name: str, what: str):
        b = self.host.backends.get(name)
        if b is None:
            raise InvalidInput(f"{what} needs the {name} backend, which is not available on "
                               f"this host: {self.host.unavailable.get(name, 'not configured')}")
        return b

    def archive(self, backend) -> str:
        return self.host.kind(backend).archive

    def take_snapshot(self, volume, snap, origin):
        self.snapshots.create(volume, snap, origin=origin)

    def drop_snapshot(self, volume, snap, wait=locks.DEFAULT_WAIT):
        self.snapshots.remove(volume, snap, wait=wait)

    def snapshot(self, volume, snap):
        return self.snapshots.record(volume, snap)

    def reading(self, volume, snap):
        return self.snapshots.reading(volume, snap)

    def backup_running(self, volume):
        return self.snapshots.backup_running(volume)

    def no_backup_running(self, volume):
        return self.snapshots.no_backup_running(volume)

    def instance_id(self):
        return self.host.instance_id()

    def note(self, key):
        return self.host.store.meta(key)

    def set_note(self, key, value):
        self.host.store.set_meta(key, value)

    def drop_note(self, key):
        self.host.store.delete_meta(key)

    def notes(self, prefix):
        return self.host.store.meta_keys(prefix)
