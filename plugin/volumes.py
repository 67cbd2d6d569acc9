"""The volume lifecycle Docker drives: create, remove, mount, unmount, path, get, list.

Every change to a volume happens under that volume's lock, so Docker's calls, the CLI's and
several gunicorn workers never interleave on one volume. Records go to ``state`` before and
after each step with a status ('creating', 'ready', 'removing'), so a crash at any point is
finished or undone at the next start (``reconcile``): nothing half-made is ever listed.

Mounts are counted per Docker mount ID, and the same ID may mount twice (``docker cp`` on a
running container does): the filesystem is mounted at the first Mount and unmounted when the
last count goes, never under a container that still uses it. What differs between block and
directory volumes is the volume's kind (``kinds``); where a new volume's data comes from is
its source (``sources``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

from . import fs, mountinfo
from .backends import Backend, VolumeSpec
from .backends.shared import HeldElsewhere, SharedBackend
from .catalogue import Catalogue
from .crashpoint import crashpoint
from .errors import Conflict, InvalidInput, PyvolError
from .host import Host
from .log import event
from .names import check_mount_id, check_name
from .schedules import OPTIONS as SCHEDULE_OPTIONS
from .schedules import describe as describe_schedule
from .schedules import parse_options as parse_schedules
from .schedules import publish as publish_schedules
from .schedules import schedule_options, store_rows
from .snapshots import Snapshots
from .sources import Source, source_for
from .state import Volume, now
from .units import format_size, parse_size

log = logging.getLogger(__name__)

DEFAULT_SIZE = 10 << 30
ALIGN = 1 << 20  # every volume's size is a whole number of MiB (see aligned)

COMMON_OPTIONS = {
    "size": "volume size, a number with a K/M/G/T suffix (default 10G)",
    "fs": "filesystem: ext4 (default) or xfs",
    "backend": "storage backend (default: the best this host offers)",
    "from-snapshot": "VOLUME@SNAPSHOT: start with that snapshot's data",
    "from-backup": "REPOSITORY#VOLUME/BACKUP-ID: start with that backup's data",
}


class Volumes:
    def __init__(self, host: Host, catalogue: Catalogue, snapshots: Snapshots, backups):
        self.host, self.catalogue, self.snapshots, self.backups = (
            host, catalogue, snapshots, backups)
        self.store = host.store
        # Docker's List as last answered: (mount table, names, answer); see mountpoints
        self._listed: tuple | None = None

    # create
    def create(self, name, opts=None, job=None) -> dict:
        """Create a volume; on any failure nothing of it remains, in records or storage.

        A source in the options (``from-snapshot``, ``from-backup``) fills it with that data
        and fixes its fs; ``job`` reports a restore's progress and can cancel it.
        """
        check_name(name)
        opts = dict(_check_options(opts))
        # schedule options are accepted here but live in the schedules table alone (as
        # `schedule set` changes them): a copy in the volume's options would go stale
        scheduled, volume_opts = schedule_options(opts)
        source = source_for(opts, self.catalogue, self.backups)
        try:
            return self._create(name, opts, scheduled, volume_opts, source, job)
        finally:
            source.close()

    def _create(self, name: str, opts: dict, scheduled: dict, volume_opts: dict,
                source: Source, job) -> dict:
        backend = self._pick_backend(opts)
        # refused before anything is made; an ebs:// backup-to needs the backend known
        schedules = parse_schedules(scheduled, backend=backend.name)
        if schedules and isinstance(backend, SharedBackend):  # and fit in its record
            backend.check_schedules(schedules)
        kind = self.host.kind(backend)
        accepted = {**COMMON_OPTIONS, **SCHEDULE_OPTIONS, **backend.options}
        unknown = sorted(set(opts) - set(accepted))
        if unknown:
            raise InvalidInput(f"unknown option {', '.join(unknown)}: accepted are "
                               f"{', '.join(sorted(accepted))}")
        if source.fs and opts.get("fs", source.fs) != source.fs:
            raise InvalidInput(f"a volume made from {source.fs} data keeps fs {source.fs}, "
                               f"not {opts['fs']}")
        fstype = kind.fstype(backend, opts.get("fs"), source.fs)
        size = self._size(opts, backend, source, kind.min_size(fstype), fstype)
        spec = VolumeSpec(name, size, {k: opts[k] for k in backend.options if k in opts},
                          {**volume_opts, "fs": fstype} if fstype else volume_opts)
        record = Volume(name, backend.name, size, fstype, "creating", now(), volume_opts)
        with self.host.lock(name, *source.locks):
            self.catalogue.forget_if_removed(name)
            if self.store.volume(name) is not None:
                raise Conflict(f"volume {name} already exists")
            held = name in backend.list()
            if held and isinstance(backend, SharedBackend):
                raise Conflict(f"volume {name} already exists on backend {backend.name} "
                               "(another host made it): use it by name")
            if held:
                # checked before the record exists, so the undo path can never delete it
                raise Conflict(f"backend {backend.name} already holds storage named {name}, "
                               "which pyvol has no record of; move it away to reuse the name")
            with self.store.tx():
                self.store.add_volume(record)
            crashpoint("create.recorded")
            try:
                source.fill(self.host, backend, spec, record, job)
                if source.size is not None and size > source.size and source.fs:
                    kind.fill_fs(backend, record, self.host.mountpoint(name))
                crashpoint("create.filled")
                if schedules:  # on shared storage, where every host's runner reads them
                    publish_schedules(self.host, record, schedules)
            except BaseException:
                self.undo_create(backend, name)
                raise
            with self.store.tx():
                self.store.set_volume_status(name, "ready")
                store_rows(self.store, name, schedules)
        event(log, "volume created", volume=name, backend=backend.name, size=size, fs=fstype,
              source=source.label or None)
        return self.get(name)

    def _size(self, opts, backend: Backend, source, min_size: int, fstype: str | None) -> int:
        size = parse_size(opts["size"]) if "size" in opts else None  # refuses 0 and less
        if source.size is not None:
            if size is not None and size < source.size:
                raise InvalidInput(f"size {format_size(size)} is smaller than {source.label} "
                                   f"({format_size(source.size)}); accepted: that size or "
                                   "larger")
            size = size or source.size
        if size is None and backend.default_size:
            size = parse_size(backend.default_size, f"{backend.name} default_size")
        size = aligned(size or DEFAULT_SIZE, backend, opts.get("size"))
        if size < min_size:
            raise InvalidInput(f"size {format_size(size)} is too small for {fstype}: "
                               f"accepted is at least {format_size(min_size)}")
        return size

    def _pick_backend(self, opts: dict[str, str]) -> Backend:
        name = opts.get("backend") or self.host.default_backend
        if name in self.host.backends:
            return self.host.backends[name]
        if name in self.host.unavailable:
            raise InvalidInput(f"backend {name} is not available on this host: "
                               f"{self.host.unavailable[name]}")
        raise InvalidInput(
            f"invalid backend {name!r}: accepted are "
            f"{', '.join(sorted(self.host.backends)) or 'none (no backend is available)'}")

    def undo_create(self, backend: Backend, name: str) -> None:
        """Remove what a failed or interrupted create made; the record goes last."""
        mp = self.host.mountpoint(name)
        try:
            if mountinfo.is_mounted(mp):
                fs.umount(mp)
            if backend.created_here(name):
                backend.remove(name)
            else:  # another host made a volume of this name since: it is theirs, keep it
                event(log, "interrupted create undone without touching the storage: another "
                      "host holds that name", volume=name, backend=backend.name)
        except Exception:
            log.exception("could not clean up failed create of %s", name)
            # leave the record as 'creating': the next start retries the cleanup
            return
        self.store.delete_volume(name)

    # remove
    def remove(self, name) -> None:
        check_name(name)
        with self.host.lock(name):
            v = self.catalogue.adopt(self.catalogue.ready(name))
            backend = self.host.backend(v)
            self.catalogue.refuse_if_used(v, backend, "remove")
            mp = self.host.mountpoint(name)
            if mountinfo.is_mounted(mp):
                try:
                    fs.umount(mp)
                except PyvolError as e:
                    raise Conflict(f"volume {name} is still mounted and busy: {e}") from None
            with self.snapshots.no_readers(name, [s.name for s in self.store.snapshots(name)]):
                self.store.set_volume_status(name, "removing")
                crashpoint("remove.marked")
                try:
                    self.finish_remove(backend, name)
                except Conflict:  # another host mounted it meanwhile: nothing was removed
                    self.store.set_volume_status(name, "ready")
                    raise
        event(log, "volume removed", volume=name)

    def finish_remove(self, backend: Backend, name: str) -> None:
        backend.remove(name)
        crashpoint("remove.storage")
        try:
            self.host.mountpoint(name).rmdir()
        except FileNotFoundError:
            pass
        self.store.delete_volume(name)

    # resize
    def resize(self, name, size_text) -> dict:
        """Grow a volume, also while containers use it: its storage, then the record, then
        its filesystem (the kind's), which grows to the recorded size and never past it.

        In this order a crash leaves at worst storage larger than its record, or a
        filesystem smaller than both: harmless, and the same resize again finishes it. The
        other order could leave a filesystem larger than its record, and a snapshot keeps
        the record's size, a block backup reads that many bytes: a backup of a cut-off
        filesystem, which would not mount once restored. Never shrinks (data past the new
        end would be lost): refused here, the one place for every backend."""
        check_name(name)
        if not isinstance(size_text, str) or not size_text:
            raise InvalidInput("missing size: accepted is a size with a K, M, G or T suffix, "
                               "e.g. 20G")
        requested = parse_size(size_text)  # refuses 0 and less
        with self.host.lock(name):
            v = self.catalogue.adopt(self.catalogue.ready(name))
            backend = self.host.backend(v)
            size = aligned(requested, backend, size_text)
            if size < v.size:
                raise InvalidInput(f"size {format_size(size)} is smaller than volume {name} "
                                   f"({format_size(v.size)}): a volume only grows (shrinking "
                                   "would cut off data); accepted is "
                                   f"{format_size(v.size)} or larger")
            kind, mp = self.host.kind(backend), self.host.mountpoint(name)
            kind.check_resizable(v, mp)
            backend.grow(name, size)
            crashpoint("resize.grown")
            self.store.set_volume_size(name, size)
            crashpoint("resize.recorded")
            kind.fill_fs(backend, dataclasses.replace(v, size=size), mp)
        event(log, "volume resized", volume=name, size=size, was=v.size)
        return self.get(name)

    # mount
    def mount(self, name, mount_id="", deadline: float | None = None) -> str:
        """Mount (at the first count) and count ``mount_id`` once more.

        ``deadline`` (time.monotonic()) is when the caller stops waiting: Docker gives up on
        a plugin call after its timeout and then never sends the Unmount, so a Mount that
        finishes later is undone instead of counted, and no count is left that nobody can
        release.

        A shared volume another host still holds (HeldElsewhere) is waited for, up to the
        backend's ``release_wait`` and never past ``deadline``, before the refusal naming it.
        """
        check_name(name)
        check_mount_id(mount_id)
        since = time.monotonic()
        while True:
            try:
                return self._mount(name, mount_id, deadline)
            except HeldElsewhere as held:
                # another host still has it (Swarm starts a moved task before the old one
                # has unmounted): wait for its release with the volume's lock let go
                if not self.catalogue.await_release(name, held, since, deadline):
                    raise Conflict(f"{held} (waited {time.monotonic() - since:.0f} s for "
                                   "it to be released)") from None

    def _mount(self, name: str, mount_id: str, deadline: float | None) -> str:
        with self.host.lock(name):
            v = self.catalogue.adopt(self.catalogue.ready(name))
            backend = self.host.backend(v)
            kind = self.host.kind(backend)
            mp = self.host.mountpoint(name)
            self._check_deadline(name, deadline)  # the wait for the lock may have used it up
            attached = not mountinfo.is_mounted(mp)
            if attached:
                kind.attach(backend, v, mp)
                crashpoint("mount.attached")
            try:
                self._check_deadline(name, deadline)
            except PyvolError:
                if attached:
                    kind.detach(backend, v, mp)
                raise
            with self.store.tx():
                self.store.add_mount(name, mount_id)
            crashpoint("mount.counted")
        event(log, "volume mounted", volume=name, mount_id=mount_id, mountpoint=str(mp))
        return str(mp)

    def _check_deadline(self, name: str, deadline: float | None) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise PyvolError(f"mounting volume {name} took longer than Docker waits for a "
                             f"plugin ({self.host.config.docker_timeout:g} s), so it was "
                             "undone rather than counted for a container that will never "
                             "unmount it; retry")

    def unmount(self, name, mount_id="", every: bool = False) -> None:
        """Drop one count of ``mount_id`` (every count of it with ``every``); unmount at the
        last. Unknown IDs succeed."""
        check_name(name)
        check_mount_id(mount_id)
        with self.host.lock(name):
            v = self.store.volume(name)
            if v is None:
                log.info("unmount of unknown volume %s ignored", name)
                return
            with self.store.tx():
                known = self.store.drop_mount(name, mount_id, every=every is True)
                remaining = sum(self.store.mounts(name).values())
            if not known:
                event(log, "unmount of unknown mount id ignored", volume=name, mount_id=mount_id)
                return
            crashpoint("unmount.uncounted")
            if remaining == 0:
                self.detach(v)
        event(log, "volume unmounted", volume=name, mount_id=mount_id, remaining=remaining)

    def detach(self, v: Volume) -> None:
        backend = self.host.backend(v)
        self.host.kind(backend).detach(backend, v, self.host.mountpoint(v.name))

    # what Docker and the CLI read
    def path(self, name) -> str:
        self.catalogue.ready(name)
        mp = self.host.mountpoint(name)
        return str(mp) if mountinfo.is_mounted(mp) else ""

    def get(self, name) -> dict:
        v = self.catalogue.ready(name)
        mp = str(self.host.mountpoint(v.name))
        return self._describe(v, mp if mountinfo.is_mounted(mp) else "",
                              self.store.mount_records(v.name),
                              self.store.snapshot_count(v.name, "ready"),
                              self.store.schedules(v.name))

    def mountpoints(self) -> list[dict]:
        """Name and Mountpoint of every volume: all Docker's List needs, so it costs one
        query of names and one look at the mount table (read again only when it changed),
        not a backend call or a query per volume. With the same names and the same table,
        the answer is the last one, shared: callers must not change it."""
        mounted = mountinfo.mount_points()  # the same object while the table is unchanged
        names = self.catalogue.names()
        last = self._listed
        if last is not None and last[0] is mounted and (last[1] is names or last[1] == names):
            return last[2]  # what this process answered last, still true
        prefix = os.path.join(str(self.host.config.mounts_dir), "")  # + name: its mountpoint
        listed = [{"Name": name, "Mountpoint": mp if (mp := prefix + name) in mounted else ""}
                  for name in names]
        self._listed = (mounted, names, listed)
        return listed

    def list(self) -> list[dict]:
        """Every volume in full, from one query of each table (and the backend's usage of
        each, which the CLI shows)."""
        mounted = mountinfo.mount_points()
        records = self.store.all_mount_records()
        snapshots = self.store.snapshot_counts("ready")
        schedules: dict[str, list] = {}
        for s in self.store.schedules():
            schedules.setdefault(s.volume, []).append(s)
        out = []
        for v in self.catalogue.all():
            mp = str(self.host.mountpoint(v.name))
            out.append(self._describe(v, mp if mp in mounted else "", records.get(v.name, []),
                                      snapshots.get(v.name, 0), schedules.get(v.name, ())))
        return out

    def _describe(self, v: Volume, mountpoint: str, mounts: list[dict], snapshots: int,
                  schedules=()) -> dict:
        """A volume as Get and the CLI show it; ``mountpoint`` is the path while mounted,
        else empty (what Docker must see)."""
        status = {
            "backend": v.backend,
            "size": v.size,
            "size_human": format_size(v.size),
            "fs": v.fs,
            "mounts": sum(m["Count"] for m in mounts),
            "mount_ids": mounts,
            "snapshots": snapshots,
        }
        if schedules:  # each run's outcome: a failing schedule shows here
            status["schedules"] = [{k: val for k, val in describe_schedule(s).items()
                                    if k != "volume"} for s in schedules]
        for key in ("from-snapshot", "from-backup"):
            if key in v.options:
                status["source"] = v.options[key]
        backend = self.host.backends.get(v.backend)
        if backend is not None:
            status.update(backend.volume_usage(v.name))
        return {"Name": v.name, "Mountpoint": mountpoint, "CreatedAt": v.created_at,
                "Status": status}


def aligned(size: int, backend: Backend, text) -> int:
    """``size`` rounded up to a whole MiB (and to the backend's unit: EBS counts whole GiB),
    the one rounding of every size a volume is made or resized to. A device holds whole
    sectors (devicemapper's table counts 512-byte ones, a loop device 4096-byte blocks), so
    a size between two would be recorded larger than the device, and a block backup, which
    reads the recorded size, would read past the device's end."""
    unit = math.lcm(ALIGN, backend.size_unit)
    size = -(-size // unit) * unit
    if size >= 1 << 63:
        raise InvalidInput(f"size {text!r} is too large: accepted is less than 8 EiB")
    return size


def _check_options(opts) -> dict[str, str]:
    if opts is None:
        return {}
    if not isinstance(opts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in opts.items()):
        raise InvalidInput("invalid options: accepted is a map of option names to strings")
    return opts
