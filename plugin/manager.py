"""The volume lifecycle: the one place that decides what happens to a volume.

Every change to a volume happens under that volume's lock (``locks``), so Docker's calls, the
CLI's, and several gunicorn workers never interleave on one volume. Records go to ``state``
before and after each step with a status ('creating', 'ready', 'removing'), so a crash at any
point is finished or undone by ``recover()`` at the next start: nothing half-made survives.

Mounts are counted per Docker mount ID, and the same ID may mount twice (``docker cp`` on a
running container does): the filesystem is mounted at the first Mount and unmounted when the
last count goes, never under a container that still uses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path

from . import fs, locks, mountinfo
from .backends import Backend, VolumeSpec
from .config import Config
from .crashpoint import crashpoint
from .errors import Conflict, InvalidInput, NotFound, PyvolError
from .log import event
from .state import Snapshot, Store, Volume, now
from .units import format_size, parse_size

log = logging.getLogger(__name__)

# matched whole (fullmatch): '$' would also match before a trailing newline
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SNAP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MOUNT_ID_RE = re.compile(r"[\x21-\x7e]{0,256}")
DEFAULT_SIZE = 10 << 30
MIN_SIZE = {"ext4": 16 << 20, "xfs": 300 << 20}

COMMON_OPTIONS = {
    "size": "volume size, a number with a K/M/G/T suffix (default 10G)",
    "fs": "filesystem: ext4 (default) or xfs",
    "backend": "storage backend (default: the best this host offers)",
    "from-snapshot": "VOLUME@SNAPSHOT: start with that snapshot's data",
    "from-backup": "REPOSITORY#VOLUME/BACKUP-ID: start with that backup's data",
}


def check_name(name, what: str = "volume name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid {what} {name!r}: accepted are 1-128 characters of letters, digits, "
            "'_', '.' and '-', starting with a letter or digit")
    return name


def check_snap_name(name) -> str:
    if not isinstance(name, str) or not SNAP_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid snapshot name {name!r}: accepted are 1-64 characters of letters, "
            "digits, '_', '.' and '-', starting with a letter or digit")
    return name


def check_mount_id(mount_id) -> str:
    if not isinstance(mount_id, str) or not MOUNT_ID_RE.fullmatch(mount_id):
        raise InvalidInput("invalid mount ID: accepted is a string of up to 256 printable "
                           "ASCII characters without spaces (Docker sends 64 hex characters)")
    return mount_id


def parse_snap_ref(ref) -> tuple[str, str]:
    if not isinstance(ref, str) or ref.count("@") != 1:
        raise InvalidInput(f"invalid snapshot reference {ref!r}: accepted is VOLUME@SNAPSHOT")
    vol, snap = ref.split("@")
    return check_name(vol), check_snap_name(snap)


class Manager:
    def __init__(self, config: Config, backends: dict[str, Backend], store: Store,
                 default_backend: str | None, unavailable: dict[str, str] | None = None):
        self.config = config
        self.backends = backends
        self.store = store
        self.default_backend = default_backend
        self.unavailable = dict(unavailable or {})
        from .backup.service import Backups  # late: the backup service calls back into us

        self.backups = Backups(self, config)

    # helpers
    def snapshot_reading(self, volume: str, snap: str):
        """Held while a backup reads ``volume@snap``: removing it meanwhile is refused."""
        return locks.held(self.config.locks_dir, f"snap.{volume}@{snap}", "", wait=0,
                          shared=True)

    def _no_readers(self, volume: str, snaps: list[str]):
        """Refuse, at once, to remove snapshots a backup is reading."""
        stack = contextlib.ExitStack()
        for snap in snaps:
            stack.enter_context(locks.held(
                self.config.locks_dir, f"snap.{volume}@{snap}", "", wait=0,
                busy=f"snapshot {volume}@{snap} is being read by a running backup; "
                     "remove it when the backup ends"))
        return stack

    def _lock(self, *names: str):
        return locks.all_held(self.config.locks_dir, [f"vol.{n}" for n in names],
                              what=f"volume {', '.join(names)}")

    def mountpoint(self, name: str) -> Path:
        return self.config.mounts_dir / name

    def _ready(self, name: str) -> Volume:
        v = self.store.volume(check_name(name))
        if v is None:
            v = self._adopt(name)
        elif v.status == "ready" and self._gone_elsewhere(v):
            v = None
        if v is None or v.status != "ready":
            raise NotFound(f"no such volume: {name}")
        return v

    # volumes on shared storage (scope global): the storage's records are the truth, and this
    # host's state follows them, so every host answers Get and List alike
    def _global_backends(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.scope == "global"]

    def _adopt_record(self, backend: Backend, name: str, rec: dict) -> Volume:
        opts = dict(rec.get("options") or {})
        fstype = backend.name if backend.kind == "file" else opts.get("fs", "ext4")
        v = Volume(name, backend.name, int(rec["size"]), fstype, "ready",
                   rec.get("created") or now(), opts)
        try:
            with self.store.tx():
                if self.store.volume(name) is None:
                    self.store.add_volume(v)
        except Exception:  # another worker adopted it first
            pass
        return self.store.volume(name)

    def _adopt(self, name: str) -> Volume | None:
        for b in self._global_backends():
            rec = b.record(name)
            if rec is not None:
                return self._adopt_record(b, name, rec)
        return None

    def _gone_elsewhere(self, v: Volume) -> bool:
        """A global volume another host removed: forget it here (unless mounted here)."""
        b = self.backends.get(v.backend)
        if b is None or b.scope != "global" or self.store.mounts(v.name):
            return False
        if b.record(v.name) is not None:
            return False
        with self.store.tx():
            self.store.delete_volume(v.name)
        return True

    def _sync_global(self) -> None:
        for b in self._global_backends():
            try:
                recs = b.records()
            except PyvolError as e:
                log.warning("cannot list volumes of backend %s: %s", b.name, e)
                continue
            for name, rec in recs.items():
                if self.store.volume(name) is None:
                    self._adopt_record(b, name, rec)
            for v in self.store.volumes("ready"):
                if v.backend == b.name and v.name not in recs and not self.store.mounts(v.name):
                    with self.store.tx():
                        self.store.delete_volume(v.name)

    def _backend(self, v: Volume) -> Backend:
        b = self.backends.get(v.backend)
        if b is None:
            why = self.unavailable.get(v.backend, "it is not configured")
            raise PyvolError(f"volume {v.name} is on backend {v.backend}, which is not "
                             f"available on this host: {why}")
        return b

    def _check_options(self, opts) -> dict[str, str]:
        if opts is None:
            return {}
        if not isinstance(opts, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in opts.items()):
            raise InvalidInput("invalid options: accepted is a map of option names to strings")
        return opts

    def _pick_backend(self, opts: dict[str, str]) -> Backend:
        name = opts.get("backend") or self.default_backend
        if name in self.backends:
            return self.backends[name]
        if name in self.unavailable:
            raise InvalidInput(f"backend {name} is not available on this host: "
                               f"{self.unavailable[name]}")
        raise InvalidInput(f"invalid backend {name!r}: accepted are "
                           f"{', '.join(sorted(self.backends)) or 'none (no backend is available)'}")

    # volumes
    def create(self, name, opts=None, job=None) -> dict:
        """Create a volume; on any failure nothing of it remains, in records or storage.

        With ``from-snapshot`` or ``from-backup`` the volume starts with that data (and keeps
        its fs); ``job`` reports a restore's progress and can cancel it.
        """
        check_name(name)
        opts = dict(self._check_options(opts))
        if "from-snapshot" in opts and "from-backup" in opts:
            raise InvalidInput("from-snapshot and from-backup exclude each other: pick one")
        src_size, src_fs, lock_names, populate = None, None, [name], None
        if "from-snapshot" in opts:
            vol, snap = parse_snap_ref(opts["from-snapshot"])
            src_vol = self._ready(vol)
            src_snap = self._snapshot_record(src_vol, snap)
            if src_snap is None:
                raise NotFound(f"no such snapshot: {opts['from-snapshot']}")
            if "backend" in opts and opts["backend"] != src_vol.backend:
                raise InvalidInput(f"from-snapshot needs the snapshot's backend "
                                   f"({src_vol.backend}), not {opts['backend']}")
            opts.setdefault("backend", src_vol.backend)
            src_size, src_fs = src_snap.size, src_vol.fs
            lock_names.append(vol)

            def populate(backend, spec, record):
                backend.clone(vol, snap, spec)
        elif "from-backup" in opts:
            restore = self.backups.prepare_restore(opts["from-backup"])
            src_size, src_fs = restore.size, restore.fs

            def populate(backend, spec, record):
                if restore.kind == "ebs-snapshot":
                    restore.make_volume(backend, spec)
                    return
                if restore.kind == "block" and backend.kind != "block":
                    raise InvalidInput(f"backup {opts['from-backup']} is a block backup; "
                                       f"backend {backend.name} holds files: restore it into "
                                       "a block backend (loop, devicemapper)")
                backend.create(spec)
                if restore.kind == "tree" and backend.kind == "block":
                    self._mkfs(backend, record)
                    mp = self.mountpoint(spec.name)
                    self._attach(backend, record, mp)
                    try:
                        restore.run(str(mp), job)
                    finally:
                        self._detach(record)
                    return
                target = backend.activate(spec.name)
                try:
                    restore.run(target, job)
                finally:
                    backend.deactivate(spec.name)
        backend = self._pick_backend(opts)
        accepted = {**COMMON_OPTIONS, **backend.options}
        unknown = sorted(set(opts) - set(accepted))
        if unknown:
            raise InvalidInput(f"unknown option {', '.join(unknown)}: accepted are "
                               f"{', '.join(sorted(accepted))}")
        if src_fs and opts.get("fs", src_fs) != src_fs:
            raise InvalidInput(f"a volume made from {src_fs} data keeps fs {src_fs}, "
                               f"not {opts['fs']}")
        if backend.kind == "file":
            if opts.get("fs", backend.name) != backend.name:
                raise InvalidInput(f"backend {backend.name} holds files: it takes no fs option")
            fstype = backend.name
        else:
            fstype = fs.check_fstype(src_fs or opts.get("fs") or backend.default_fs or "ext4")
        size = parse_size(opts["size"]) if "size" in opts else None
        if size is not None and size <= 0:
            raise InvalidInput(f"invalid size {opts['size']!r}: accepted is a positive size, "
                               "e.g. 512M or 10G")
        if src_size is not None:
            if size is not None and size < src_size:
                what = opts.get("from-snapshot") or opts.get("from-backup")
                raise InvalidInput(f"size {format_size(size)} is smaller than {what} "
                                   f"({format_size(src_size)}); accepted: that size or larger")
            size = size or src_size
        if size is None and backend.default_size:
            size = parse_size(backend.default_size, f"{backend.name} default_size")
        size = size or DEFAULT_SIZE
        size = -(-size // backend.size_unit) * backend.size_unit  # EBS counts in GiB
        if size >= 1 << 63:
            raise InvalidInput(f"size {opts.get('size')!r} is too large: accepted is less than "
                               "8 EiB")
        if size < MIN_SIZE.get(fstype, 0):
            raise InvalidInput(f"size {format_size(size)} is too small for {fstype}: "
                               f"accepted is at least {format_size(MIN_SIZE[fstype])}")
        spec = VolumeSpec(name, size, {k: opts[k] for k in backend.options if k in opts},
                          {**opts, "fs": fstype})
        record = Volume(name, backend.name, size, fstype, "creating", now(), opts)
        with self._lock(*lock_names):
            if self.store.volume(name) is not None:
                raise Conflict(f"volume {name} already exists")
            held = name in backend.list()
            if held and backend.scope == "global":
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
                if populate is not None:
                    populate(backend, spec, record)
                    if size > src_size and backend.kind == "block" and src_fs:
                        self._grow(backend, record)
                else:
                    backend.create(spec)
                    crashpoint("create.storage")
                    self._mkfs(backend, record)
                crashpoint("create.filled")
            except Conflict:
                if backend.scope == "global":
                    # another host holds the name on shared storage: it is theirs, keep it
                    with self.store.tx():
                        self.store.delete_volume(name)
                else:
                    self._undo_create(backend, name)
                raise
            except BaseException:
                self._undo_create(backend, name)
                raise
            self.store.set_volume_status(name, "ready")
        event(log, "volume created", volume=name, backend=backend.name, size=size, fs=fstype,
              source=opts.get("from-snapshot") or opts.get("from-backup"))
        return self.get(name)

    def _mkfs(self, backend: Backend, v: Volume) -> None:
        if backend.kind != "block":
            return
        dev = backend.activate(v.name)
        try:
            fs.mkfs(dev, v.fs, label=v.name)
        finally:
            backend.deactivate(v.name)

    def _grow(self, backend: Backend, v: Volume) -> None:
        """Grow a clone's filesystem to its new, larger size."""
        if backend.kind != "block":
            return
        dev = backend.activate(v.name)
        try:
            fs.grow(dev, v.fs, self.mountpoint(v.name))
        finally:
            backend.deactivate(v.name)

    def _undo_create(self, backend: Backend, name: str) -> None:
        try:
            if mountinfo.is_mounted(self.mountpoint(name)):
                fs.umount(self.mountpoint(name))
            if backend.created_here(name):
                backend.remove(name)
            else:  # another host made a volume of this name since: it is theirs, keep it
                event(log, "interrupted create undone without touching the storage: another "
                      "host holds that name", volume=name, backend=backend.name)
        except Exception:
            log.exception("could not clean up failed create of %s", name)
            # leave the record as 'creating': recover() retries the cleanup at next start
            return
        self.store.delete_volume(name)

    def remove(self, name) -> None:
        check_name(name)
        with self._lock(name):
            v = self._ready(name)
            users = self.store.mount_records(name)
            if users:
                ids = "; ".join(f"{m['ID'] or '(empty id)'} since {m['Since']}"
                                + (f" ({m['Count']} times)" if m["Count"] > 1 else "")
                                for m in users)
                raise Conflict(
                    f"volume {name} is in use by {len(users)} mount ID(s): {ids}. Stop the "
                    "containers using it first; a count no container holds any more (Docker "
                    f"lost its Unmount) is dropped with `pyvol umount {name} --id ID`")
            backend = self._backend(v)
            others = backend.removal_blockers(name)
            if others:
                raise Conflict(f"volume {name} is mounted on other hosts ({', '.join(others)}):"
                               f" unmount it there first; if a host is dead, `pyvol lease "
                               f"clear {name} HOST` drops its claim")
            mp = self.mountpoint(name)
            if mountinfo.is_mounted(mp):
                try:
                    fs.umount(mp)
                except PyvolError as e:
                    raise Conflict(f"volume {name} is still mounted and busy: {e}") from None
            with self._no_readers(name, [sn.name for sn in self.store.snapshots(name)]):
                self.store.set_volume_status(name, "removing")
                crashpoint("remove.marked")
                try:
                    self._finish_remove(backend, name)
                except Conflict:  # another host mounted it meanwhile: nothing was removed
                    self.store.set_volume_status(name, "ready")
                    raise
        event(log, "volume removed", volume=name)

    def _finish_remove(self, backend: Backend, name: str) -> None:
        backend.remove(name)
        crashpoint("remove.storage")
        try:
            self.mountpoint(name).rmdir()
        except FileNotFoundError:
            pass
        self.store.delete_volume(name)

    def mount(self, name, mount_id="", deadline: float | None = None) -> str:
        """Mount (at the first count) and count ``mount_id`` once more.

        ``deadline`` (time.monotonic()) is when the caller stops waiting: Docker gives up on
        a plugin call after its timeout and then never sends the Unmount, so a Mount that
        finishes later is undone instead of counted, and no count is left that nobody can
        release.
        """
        check_name(name)
        check_mount_id(mount_id)
        with self._lock(name):
            v = self._ready(name)
            backend = self._backend(v)
            mp = self.mountpoint(name)
            self._check_deadline(name, deadline)  # the wait for the lock may have used it up
            attached = not mountinfo.is_mounted(mp)
            if attached:
                self._attach(backend, v, mp)
                crashpoint("mount.attached")
            try:
                self._check_deadline(name, deadline)
            except PyvolError:
                if attached:
                    self._detach(v)
                raise
            with self.store.tx():
                self.store.add_mount(name, mount_id)
            crashpoint("mount.counted")
        event(log, "volume mounted", volume=name, mount_id=mount_id, mountpoint=str(mp))
        return str(mp)

    def _check_deadline(self, name: str, deadline: float | None) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise PyvolError(f"mounting volume {name} took longer than Docker waits for a "
                             f"plugin ({self.config.docker_timeout:g} s), so it was undone "
                             "rather than counted for a container that will never unmount it; "
                             "retry")

    def _attach(self, backend: Backend, v: Volume, mp: Path) -> None:
        dev = backend.activate(v.name)
        try:
            if backend.kind == "block":
                if getattr(backend, "may_lack_fs", False) and fs.detect(dev) is None:
                    fs.mkfs(dev, v.fs, label=v.name)  # only ever on a device with no fs
                fs.mount(dev, mp, v.fs, discard=backend.discard)
            else:
                fs.bind(dev, mp)
        except BaseException:
            backend.deactivate(v.name)
            raise

    def unmount(self, name, mount_id="", every: bool = False) -> None:
        """Drop one count of ``mount_id`` (every count of it with ``every``); unmount at the
        last. Unknown IDs succeed."""
        check_name(name)
        check_mount_id(mount_id)
        with self._lock(name):
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
                self._detach(v)
        event(log, "volume unmounted", volume=name, mount_id=mount_id, remaining=remaining)

    def _detach(self, v: Volume) -> None:
        backend = self._backend(v)
        fs.umount(self.mountpoint(v.name))
        backend.deactivate(v.name)

    def path(self, name) -> str:
        self._ready(name)
        mp = self.mountpoint(name)
        return str(mp) if mountinfo.is_mounted(mp) else ""

    def get(self, name) -> dict:
        v = self._ready(name)
        return self._describe(v, {e.mount_point for e in mountinfo.entries()})

    def mountpoints(self) -> list[dict]:
        """Name and Mountpoint of every volume: all Docker's List needs, so it costs one query
        and one read of mountinfo, not a backend call per volume."""
        self._sync_global()
        mounted = {e.mount_point for e in mountinfo.entries()}
        return [{"Name": v.name, "Mountpoint": self._shown_mountpoint(v.name, mounted)}
                for v in self.store.volumes("ready")]

    def _shown_mountpoint(self, name: str, mounted: set[str]) -> str:
        """The mountpoint Docker should see: the path while mounted, else empty."""
        mp = str(self.mountpoint(name))
        return mp if mp in mounted else ""

    def list(self) -> list[dict]:
        self._sync_global()
        mounted = {e.mount_point for e in mountinfo.entries()}
        return [self._describe(v, mounted) for v in self.store.volumes("ready")]

    def _describe(self, v: Volume, mounted: set[str]) -> dict:
        mounts = self.store.mount_records(v.name)
        status = {
            "backend": v.backend,
            "size": v.size,
            "size_human": format_size(v.size),
            "fs": v.fs,
            "mounts": sum(m["Count"] for m in mounts),
            "mount_ids": mounts,
            "snapshots": len(self.store.snapshots(v.name, status="ready")),
        }
        for key in ("from-snapshot", "from-backup"):
            if key in v.options:
                status["source"] = v.options[key]
        backend = self.backends.get(v.backend)
        if backend is not None:
            status.update(backend.volume_usage(v.name))
        return {"Name": v.name, "Mountpoint": self._shown_mountpoint(v.name, mounted),
                "CreatedAt": v.created_at, "Status": status}

    # claims of other hosts on shared volumes
    def leases(self, name) -> list[dict]:
        v = self._ready(name)
        b = self._backend(v)
        if not hasattr(b, "leases"):
            raise InvalidInput(f"volume {name} is on backend {b.name}, which has no leases "
                               "(only shared backends such as nfs do)")
        return b.leases(name)

    def clear_lease(self, name, host) -> dict:
        """Drop a dead host's claim on a shared volume, so that it can be removed."""
        if not isinstance(host, str) or not host:
            raise InvalidInput("missing host: accepted is the hostname or instance id shown by "
                               "`pyvol lease ls`")
        self.leases(name)
        with self._lock(name):
            n = self._backend(self._ready(name)).clear_lease(name, host)
        if n == 0:
            raise NotFound(f"volume {name} has no lease of host {host}")
        event(log, "lease cleared", volume=name, host=host, leases=n)
        return {"cleared": n}

    # snapshots
    def snapshot_create(self, volume, snap=None, origin: str = "user") -> dict:
        """Snapshot ``volume``; without a name, one made from the time, unique for the volume.

        ``origin`` records who asked: pyvol later removes only snapshots it took itself.
        """
        check_name(volume)
        if snap is not None and snap != "":
            check_snap_name(snap)
        with self._lock(volume):
            v = self._ready(volume)
            backend = self._backend(v)
            if snap is None or snap == "":
                # chosen under the volume's lock, so two unnamed snapshots never pick one name
                snap = self._free_snap_name(volume, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
            if self.store.snapshot(volume, snap) is not None:
                raise Conflict(f"snapshot {volume}@{snap} already exists")
            with self.store.tx():
                self.store.add_snapshot(Snapshot(volume, snap, v.size, "creating", now(),
                                                 origin))
            crashpoint("snapshot.recorded")
            mp = self.mountpoint(volume)
            quiesce = (lambda: fs.frozen(mp)) if backend.kind == "block" else contextlib.nullcontext
            try:
                backend.snapshot(volume, snap, quiesce)
                crashpoint("snapshot.taken")
            except BaseException:
                backend.remove_snapshot(volume, snap)
                self.store.delete_snapshot(volume, snap)
                raise
            self.store.set_snapshot_status(volume, snap, "ready")
        event(log, "snapshot created", volume=volume, snapshot=snap)
        return self.snapshot_get(volume, snap)

    def _free_snap_name(self, volume: str, base: str) -> str:
        taken = {s.name for s in self.store.snapshots(volume)}
        snap, n = base, 1
        while snap in taken:
            n += 1
            snap = f"{base}-{n}"
        return snap

    def snapshot_remove(self, volume, snap) -> None:
        check_name(volume)
        check_snap_name(snap)
        with self._lock(volume):
            v = self._ready(volume)
            if self.store.snapshot(volume, snap) is None:
                raise NotFound(f"no such snapshot: {volume}@{snap}")
            with self._no_readers(volume, [snap]):
                self.store.set_snapshot_status(volume, snap, "removing")
                self._backend(v).remove_snapshot(volume, snap)
                self.store.delete_snapshot(volume, snap)
        event(log, "snapshot removed", volume=volume, snapshot=snap)

    def _snapshot_record(self, v: Volume, snap: str) -> Snapshot | None:
        """The snapshot's record; for a shared volume, one another host took is adopted."""
        s = self.store.snapshot(v.name, snap)
        b = self.backends.get(v.backend)
        if s is None and b is not None and b.scope == "global" and snap in b.snapshots(v.name):
            try:
                with self.store.tx():
                    self.store.add_snapshot(Snapshot(v.name, snap, v.size, "ready", now()))
            except Exception:  # another worker adopted it first
                pass
            s = self.store.snapshot(v.name, snap)
        return s

    def snapshot_get(self, volume, snap) -> dict:
        check_name(volume)
        check_snap_name(snap)
        s = self._snapshot_record(self._ready(volume), snap)
        if s is None or s.status != "ready":
            raise NotFound(f"no such snapshot: {volume}@{snap}")
        return _describe_snap(s)

    def snapshot_list(self, volume=None) -> list[dict]:
        if volume is not None:
            self._ready(volume)
        return [_describe_snap(s) for s in self.store.snapshots(volume, status="ready")]

    def changed_ranges(self, volume, base, snap) -> list[tuple[int, int]]:
        v = self._ready(volume)
        for s in [base, snap] if base else [snap]:
            self.snapshot_get(volume, s)
        return self._backend(v).changed_ranges(volume, base, snap)

    # the daemon
    def instance_id(self) -> str:
        """A random id for this root dir: tells this daemon's snapshots from another host's."""
        iid = self.store.meta("instance_id")
        if iid is None:
            import secrets

            self.store.set_meta("instance_id", secrets.token_hex(16))
            iid = self.store.meta("instance_id")
        return iid

    def info(self) -> dict:
        from . import __version__

        backends = {}
        for name, b in self.backends.items():
            try:
                usage = b.usage()
            except Exception as e:  # a sick backend must not hide the others
                usage = {"error": str(e)}
            backends[name] = {"available": True, "kind": b.kind, "scope": b.scope,
                              "options": sorted(b.options), **usage}
        for name, why in self.unavailable.items():
            backends[name] = {"available": False, "reason": why}
        return {
            "version": __version__,
            "pid": int(os.environ.get("PYVOL_MASTER_PID", os.getpid())),  # the daemon, not a worker
            "root": str(self.config.root),
            "socket": str(self.config.socket),
            "default_backend": self.default_backend,
            "volumes": len(self.store.volumes("ready")),
            "mounted": sum(1 for n in self.store.mounts() if n),
            "backends": backends,
        }

    def recover(self) -> None:
        """Make records and reality agree at start: finish or undo what a crash interrupted.

        Runs once, in the daemon's master process, before any request is served.
        """
        self.instance_id()  # made here, in the master, before workers could race to make it
        boot_id = _boot_id()
        if self.store.meta("boot_id") != boot_id:
            if self.store.mounts():
                event(log, "host rebooted: clearing mount records", volumes=len(self.store.mounts()))
            self.store.clear_mounts()
            self.store.set_meta("boot_id", boot_id)
        self._thaw_all()
        for v in self.store.volumes():
            backend = self.backends.get(v.backend)
            if backend is None:
                log.warning("volume %s is on backend %s, which is unavailable", v.name, v.backend)
                continue
            try:
                self._recover_volume(backend, v)
            except Exception:
                log.exception("recovery of volume %s failed; it is left as it was", v.name)
        self._recover_backup_snapshots()
        known = {v.name for v in self.store.volumes()}
        for name, backend in self.backends.items():
            try:
                orphans = set(backend.list()) - known
            except Exception:
                log.exception("backend %s could not list its volumes", name)
                continue
            for o in sorted(orphans):
                event(log, "backend holds a volume pyvol has no record of; left untouched",
                      backend=name, volume=o)

    def _thaw_all(self) -> None:
        """A daemon killed inside a snapshot's freeze left that filesystem frozen, and every
        writer in its container hangs until someone thaws it: thaw every mounted block
        volume (backends resumed their suspended devices in setup, so thawing cannot block)."""
        mounted = {e.mount_point for e in mountinfo.entries()}
        for v in self.store.volumes():
            mp = self.mountpoint(v.name)
            if v.fs not in fs.FILESYSTEMS or str(mp) not in mounted:
                continue
            try:
                if fs.thaw(mp):
                    event(log, "thawed a filesystem left frozen by a killed daemon",
                          volume=v.name)
            except PyvolError as e:
                log.error("could not thaw volume %s at %s: %s", v.name, mp, e)

    def _recover_backup_snapshots(self) -> None:
        """A backup the daemon died in wrote no manifest; its own snapshot goes too."""
        from .backup.service import PENDING

        for key in self.store.meta_keys(PENDING):
            volume, _, snap = key[len(PENDING):].partition("@")
            v = self.store.volume(volume)
            backend = self.backends.get(v.backend) if v else None
            try:
                if backend is not None and self.store.snapshot(volume, snap) is not None:
                    event(log, "removing the snapshot of a backup interrupted by a crash",
                          volume=volume, snapshot=snap)
                    backend.remove_snapshot(volume, snap)
                    self.store.delete_snapshot(volume, snap)
                self.store.delete_meta(key)
            except Exception:
                log.exception("could not remove snapshot %s@%s of an interrupted backup",
                              volume, snap)

    def _recover_volume(self, backend: Backend, v: Volume) -> None:
        mp = self.mountpoint(v.name)
        if v.status == "creating":
            event(log, "undoing interrupted create", volume=v.name)
            self._undo_create(backend, v.name)
            return
        if v.status == "removing":
            event(log, "finishing interrupted remove", volume=v.name)
            if mountinfo.is_mounted(mp):
                fs.umount(mp)
            self._finish_remove(backend, v.name)
            return
        for s in self.store.snapshots(v.name):
            if s.status != "ready":
                event(log, "cleaning interrupted snapshot", volume=v.name, snapshot=s.name)
                backend.remove_snapshot(v.name, s.name)
                self.store.delete_snapshot(v.name, s.name)
        if v.name not in backend.list():
            log.error("volume %s is recorded but its storage is missing from backend %s",
                      v.name, backend.name)
            return
        users = self.store.mounts(v.name)
        mounted = mountinfo.is_mounted(mp)
        if users and not mounted:
            event(log, "mount records without a mount: cleared", volume=v.name, ids=len(users))
            self.store.clear_mounts(v.name)
            backend.deactivate(v.name)
        elif mounted and not users:
            event(log, "mounted with no user: unmounting", volume=v.name)
            try:
                self._detach(v)
            except PyvolError as e:
                log.warning("could not unmount %s: %s", v.name, e)
        elif not mounted:
            backend.deactivate(v.name)


def _describe_snap(s: Snapshot) -> dict:
    return {"Volume": s.volume, "Name": s.name, "Ref": f"{s.volume}@{s.name}",
            "CreatedAt": s.created_at, "Size": s.size, "Origin": s.origin}


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
