"""Start-up reconciliation: make records and reality agree before any request is served.

Runs once, in the daemon's master process, after every backend's ``setup`` (which resumes
devices a killed daemon left suspended). A crash can stop pyvol between any two steps of any
operation; this is where each interruption is finished or undone (docs/state.md, "Rules the
records follow"), and where nothing a container depends on is left frozen.

Docker waits for the socket while this runs, so it costs a few passes per backend, not a few
per volume: a backend lists its volumes once, and releases every volume nothing has mounted
in one call (``deactivate_many``), which looks at its devices once for all of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

from . import fs, mountinfo
from .backends import Backend
from .backends.base import DeactivateFailed
from .errors import PyvolError
from .host import Host
from .log import event
from .state import Snapshot, Volume
from .volumes import Volumes

log = logging.getLogger(__name__)

THAW_THREADS = 4


def reconcile(host: Host, volumes: Volumes) -> None:
    store = host.store
    host.instance_id()  # made here, in the master, before workers could race to make it
    boot_id = _boot_id()
    if store.meta("boot_id") != boot_id:
        if store.mounts():
            event(log, "host rebooted: clearing mount records", volumes=len(store.mounts()))
        store.clear_mounts()
        store.set_meta("boot_id", boot_id)
    rows = store.volumes()
    _thaw_all(host, rows)
    by_backend: dict[str, list[Volume]] = {}
    for v in rows:
        if v.backend not in host.backends:
            log.warning("volume %s is on backend %s, which is unavailable", v.name, v.backend)
            continue
        by_backend.setdefault(v.backend, []).append(v)
    unfinished: dict[str, list[Snapshot]] = {}
    for s in store.snapshots():
        if s.status != "ready":
            unfinished.setdefault(s.volume, []).append(s)
    listed = {name: _backend(host, volumes, host.backends[name], vs, unfinished)
              for name, vs in by_backend.items()}
    known = set(store.volume_names())
    for name, backend in host.backends.items():
        try:
            held = listed.get(name)
            orphans = (set(backend.list()) if held is None else held) - known
        except Exception:
            log.exception("backend %s could not list its volumes", name)
            continue
        for o in sorted(orphans):
            event(log, "backend holds a volume pyvol has no record of; left untouched",
                  backend=name, volume=o)


def _thaw_all(host: Host, rows: list[Volume]) -> None:
    """A daemon killed inside a snapshot's freeze left that filesystem frozen, and every
    writer in its container hangs until someone thaws it: thaw every mounted volume.

    Each thaw is an external tool that mostly waits (fork, exec, one ioctl): a few at a time,
    so that hundreds of mounted volumes do not keep Docker waiting for the socket."""
    mounted, prefix = mountinfo.mount_points(), _mounts_prefix(host)
    todo = [(v, backend) for v in rows if (backend := host.backends.get(v.backend)) is not None
            and prefix + v.name in mounted]
    with ThreadPoolExecutor(THAW_THREADS, thread_name_prefix="thaw") as pool:
        for v, backend in todo:
            pool.submit(_thaw, host, v, backend)


def _thaw(host: Host, v: Volume, backend: Backend) -> None:
    mp = host.mountpoint(v.name)
    try:
        if host.kind(backend).thaw(mp):
            event(log, "thawed a filesystem left frozen by a killed daemon", volume=v.name)
    except PyvolError as e:
        log.error("could not thaw volume %s at %s: %s", v.name, mp, e)
    except Exception:
        log.exception("could not thaw volume %s at %s", v.name, mp)


def _backend(host: Host, volumes: Volumes, backend: Backend, vs: list[Volume],
             unfinished: dict[str, list[Snapshot]]) -> set[str] | None:
    """Every volume of one backend: interrupted operations one by one (rare), then the mount
    state of the rest from one listing, and one release of all that nothing has mounted.
    The listing, for the search for storage without a record (a remote call on shared
    backends: made once), or None where none was made."""
    steady = []
    for v in vs:
        try:
            if not finish_interrupted(host, volumes, backend, v, unfinished.get(v.name, [])):
                steady.append(v)
        except Exception:
            log.exception("recovery of volume %s failed; it is left as it was", v.name)
    if not steady:
        return None
    try:
        held = set(backend.list())
    except Exception:
        log.exception("backend %s could not list its volumes; their mounts are left as they "
                      "were", backend.name)
        return None
    users = host.store.mounts()  # volume -> its counts' sum, for volumes that have any
    # One look at the mount table for all: read again on every change (mountinfo), it would
    # be parsed once per volume on a host whose other mounts come and go meanwhile. Nothing
    # else mounts pyvol's volumes while this runs, and what it unmounts is not looked at again.
    mounted = mountinfo.mount_points()
    prefix = _mounts_prefix(host)
    release = []
    for v in steady:
        try:
            if _unmounted(host, volumes, backend, v, held, bool(users.get(v.name)),
                          prefix + v.name in mounted):
                release.append(v.name)
        except Exception:
            log.exception("recovery of volume %s failed; it is left as it was", v.name)
    _release(backend, release)
    return held


def finish_interrupted(host: Host, volumes: Volumes, backend: Backend, v: Volume,
                       snapshots: list[Snapshot]) -> bool:
    """Finish or undo what a crash interrupted of ``v`` (a create, a remove, ``snapshots``
    not ready); True if the volume is gone. At start, when nothing else runs, and under the
    volume's lock for a row a worker killed alone left (abandoned.py)."""
    store = host.store
    if v.status == "creating":
        event(log, "undoing interrupted create", volume=v.name)
        volumes.undo_create(backend, v.name)
        return True
    if v.status == "removing":
        event(log, "finishing interrupted remove", volume=v.name)
        mp = host.mountpoint(v.name)
        if mountinfo.is_mounted(mp):
            fs.umount(mp)
        volumes.finish_remove(backend, v.name)
        return True
    for s in snapshots:
        event(log, "cleaning interrupted snapshot", volume=v.name, snapshot=s.name)
        backend.remove_snapshot(v.name, s.name)
        store.delete_snapshot(v.name, s.name)
    return False


def _unmounted(host: Host, volumes: Volumes, backend: Backend, v: Volume, held: set[str],
               has_users: bool, mounted: bool) -> bool:
    """Make ``v``'s mount records agree with the mount table; True if it is to be released
    (nothing has it mounted, but a crash may have left its device active)."""
    if v.name not in held:
        log.error("volume %s is recorded but its storage is missing from backend %s",
                  v.name, backend.name)
        return False
    if has_users and not mounted:
        event(log, "mount records without a mount: cleared", volume=v.name,
              ids=len(host.store.mounts(v.name)))
        host.store.clear_mounts(v.name)
        return True
    if mounted and not has_users:
        try:
            detach_uncounted(volumes, v)
        except PyvolError as e:
            log.warning("could not unmount %s: %s", v.name, e)
        return False
    return not mounted


def detach_uncounted(volumes: Volumes, v: Volume) -> None:
    """Unmount and release ``v``, mounted with no mount counted: a process died between its
    mount and the count (Docker heard that the Mount failed) or between dropping the last
    count and the unmount. At start, and under the volume's lock after a worker died alone
    (abandoned.py)."""
    event(log, "mounted with no user: unmounting", volume=v.name)
    volumes.detach(v)


def _release(backend: Backend, names: Collection[str]) -> None:
    if not names:
        return
    try:
        backend.deactivate_many(names)
    except DeactivateFailed as e:
        for name, why in sorted(e.failures.items()):
            log.error("recovery of volume %s failed: could not release it (%s); it is left "
                      "as it was", name, why)
    except Exception:
        log.exception("backend %s could not release its %d unmounted volumes; they are left "
                      "as they were", backend.name, len(names))


def _mounts_prefix(host: Host) -> str:
    """What a volume's name is appended to for its mountpoint as the mount table prints it
    (``host.mountpoint``, without a Path per volume)."""
    return os.path.join(str(host.config.mounts_dir), "")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
