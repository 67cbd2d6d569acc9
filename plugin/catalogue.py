"""Which volumes exist, as Docker and the CLI see them.

On this host's backends, this host's records are the truth. On shared backends (scope
global: nfs, ebs) the shared storage's records are, and every host answers Get and List from
them alike: a volume another host made is listed here too, and one another host removed is
gone here too (unless it is still mounted here).

Lookups only read. A row for another host's volume is written (``adopt``) only when this
host is about to change something that refers to it (a mount count, a snapshot); a row left
for a volume removed elsewhere is hidden by lookups and deleted by the next change to that
name (``forget_if_removed``) or at start.

A record another host wrote is untrusted input: one that does not describe a usable volume
is left out with a warning, never raised to the caller.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from .backends import Backend
from .backends.shared import HeldElsewhere, SharedBackend
from .errors import Conflict, InvalidInput, NotFound, PyvolError
from .host import Host
from .log import event
from .names import check_name
from .state import Snapshot, Volume, now

log = logging.getLogger(__name__)


class Catalogue:
    def __init__(self, host: Host):
        self.host = host
        self.store = host.store

    # lookups
    def find(self, name: str) -> Volume | None:
        v = self.store.volume(name)
        if v is not None:
            return self._as_shared_storage_says(v) if v.status == "ready" else None
        for b in self.host.shared_backends():
            rec = b.record(name)
            if rec is not None:
                return self._volume_of(b, name, rec)
        return None

    def ready(self, name) -> Volume:
        v = self.find(check_name(name))
        if v is None:
            raise NotFound(f"no such volume: {name}")
        return v

    def all(self) -> list[Volume]:
        """Every volume, by name: this host's rows and the shared storage's records."""
        vols = {v.name: v for v in self.store.volumes("ready")}
        shared = self.host.shared_backends()
        mounted = self.store.mounts() if shared else {}
        for b in shared:
            try:
                recs = b.records()
            except PyvolError as e:
                log.warning("cannot list volumes of backend %s: %s", b.name, e)
                continue
            for name, v in list(vols.items()):
                if v.backend != b.name:
                    continue
                if name in recs:
                    vols[name] = self._sized(v, recs[name])
                elif not mounted.get(name):
                    del vols[name]  # removed by another host
            for name, rec in recs.items():
                if name not in vols and (v := self._volume_of(b, name, rec)) is not None:
                    vols[name] = v
        return [vols[n] for n in sorted(vols)]

    def names(self) -> tuple[str, ...]:
        """The names of ``all()``, in its order: Docker's List asks for nothing more, on
        every `docker volume ls` and often besides, so with no shared backend it costs one
        query of names and builds no volume."""
        if not self.host.shared_backends():
            return self.store.volume_names("ready")
        return tuple(v.name for v in self.all())

    def snapshot(self, v: Volume, snap: str) -> Snapshot | None:
        """The snapshot's record; on shared storage, also one another host took."""
        s = self.store.snapshot(v.name, snap)
        b = self.host.backends.get(v.backend)
        if s is None and isinstance(b, SharedBackend) and snap in b.snapshots(v.name):
            return Snapshot(v.name, snap, v.size, "ready", now())
        return s

    # changes
    def adopt(self, v: Volume) -> Volume:
        """Give a shared volume a row here before changing anything that refers to it, and
        bring the row's size up to the one ``v`` (a lookup) found on the shared storage: a
        snapshot records it, and a block backup reads that many bytes, so a row left at
        the size this host once saw would cut off what another host's resize added."""
        with self.store.tx():  # BEGIN IMMEDIATE: two workers cannot both insert
            row = self.store.volume(v.name)
            if row is None:
                self.store.add_volume(v)
            elif row.backend == v.backend and v.size > row.size:
                self.store.set_volume_size(v.name, v.size)
        return self.store.volume(v.name)

    def adopt_snapshot(self, s: Snapshot) -> Snapshot:
        with self.store.tx():
            if self.store.snapshot(s.volume, s.name) is None:
                self.store.add_snapshot(s)
        return self.store.snapshot(s.volume, s.name)

    def forget_if_removed(self, name: str) -> None:
        """Delete this host's row of a shared volume that another host removed."""
        v = self.store.volume(name)
        if v is not None and v.status == "ready" and self._removed_elsewhere(v):
            with self.store.tx():
                self.store.delete_volume(name)

    def refuse_if_used(self, v: Volume, backend: Backend, doing: str) -> None:
        """Refuse ``doing`` to ``v`` (remove, roll back: what changes it under whoever has it)
        while a container has it, here (a mount count) or on another host (a claim on shared
        storage); the caller holds its lock. Every mount ID is named, with since when, and
        how to drop a count no container holds any more."""
        users = self.store.mount_records(v.name)
        if users:
            ids = "; ".join(f"{m['ID'] or '(empty id)'} since {m['Since']}"
                            + (f" ({m['Count']} times)" if m["Count"] > 1 else "")
                            for m in users)
            raise Conflict(
                f"cannot {doing} volume {v.name}: it is in use, mounted for {len(users)} mount "
                f"ID(s): {ids}. Stop the containers using it first; a count no container holds "
                f"any more (Docker lost its Unmount) is dropped with `pyvol umount {v.name} "
                "--id ID`")
        others = backend.removal_blockers(v.name)
        if others:
            raise Conflict(f"cannot {doing} volume {v.name}: it is mounted on other hosts "
                           f"({', '.join(others)}): unmount it there first; if a host is dead, "
                           f"`pyvol claim clear {v.name} HOST` drops its claim")

    # claims: the hosts that hold a shared volume (mounted there), which removal respects
    def claims(self, name) -> list[dict]:
        return self._shared_backend_of(name).claims(name)

    def clear_claim(self, name: str, host) -> dict:
        """Drop a dead host's claim on a shared volume, so that it can be removed."""
        if not isinstance(host, str) or not host:
            raise InvalidInput("missing host: accepted is the hostname or instance id shown by "
                               "`pyvol claim ls`")
        b = self._shared_backend_of(name)
        with self.host.lock(name):
            n = b.clear_claim(name, host)
        if n == 0:
            raise NotFound(f"volume {name} has no claim of host {host}")
        event(log, "claim cleared", volume=name, host=host, claims=n)
        return {"cleared": n}

    def await_release(self, name: str, held: HeldElsewhere, since: float,
                      deadline: float | None) -> bool:
        """Wait for the hosts ``held`` names to release the volume, for the backend's
        ``release_wait`` from ``since`` (and never past ``deadline``); whether they did.

        The caller holds no lock meanwhile: this host's Unmount, Get and List of the volume
        go on, and so does the other host's release, which is what is waited for."""
        b = self.host.backends.get(getattr(self.find(name), "backend", None))
        if not isinstance(b, SharedBackend):
            return False
        until = since + b.release_wait
        if deadline is not None:
            until = min(until, deadline - b.release_margin)
        if time.monotonic() >= until:
            return False
        event(log, "mount waits for other hosts to release the volume", volume=name,
              holders=",".join(held.holders), wait=round(until - time.monotonic(), 1))
        return b.wait_released(name, held.holders, until)

    def _shared_backend_of(self, name) -> SharedBackend:
        b = self.host.backend(self.ready(name))
        if not isinstance(b, SharedBackend):
            raise InvalidInput(f"volume {name} is on backend {b.name}, which has no claims of "
                               "other hosts (only shared backends such as nfs and ebs do)")
        return b

    def _removed_elsewhere(self, v: Volume) -> bool:
        b = self.host.backends.get(v.backend)
        if not isinstance(b, SharedBackend) or self.store.mounts(v.name):
            return False
        return b.record(v.name) is None

    def _as_shared_storage_says(self, v: Volume) -> Volume | None:
        """This host's row of ``v``; for a shared volume, at the size the shared storage
        records (another host may have grown it), or None if another host removed it
        (unless it is still mounted here)."""
        b = self.host.backends.get(v.backend)
        if not isinstance(b, SharedBackend):
            return v
        rec = b.record(v.name)
        if rec is None:
            return v if self.store.mounts(v.name) else None
        return self._sized(v, rec)

    def _sized(self, v: Volume, rec: dict) -> Volume:
        """``v`` at the size of the shared record ``rec``, where it says a larger one (sizes
        only grow; a record that says less or nothing usable changes nothing)."""
        size = rec.get("size") if isinstance(rec, dict) else None
        if type(size) is not int or not v.size < size < 1 << 63:
            return v
        return dataclasses.replace(v, size=size)

    def _volume_of(self, b: Backend, name: str, rec: dict) -> Volume | None:
        try:
            opts = {str(k): str(val) for k, val in dict(rec.get("options") or {}).items()}
            size = int(rec["size"])
            fstype = self.host.kind(b).fstype(b, opts.get("fs"), None)
            if check_name(name) != name or size <= 0:
                raise ValueError(f"size {size}")
        except (PyvolError, KeyError, TypeError, ValueError) as e:
            log.warning("backend %s holds a record of %r that describes no usable volume "
                        "(%s); left out", b.name, name, e)
            return None
        return Volume(name, b.name, size, fstype, "ready", str(rec.get("created") or now()), opts)
