"""Start-up reconciliation: make records and reality agree before any request is served.

Runs once, in the daemon's master process, after every backend's ``setup`` (which resumes
devices a killed daemon left suspended). A crash can stop pyvol between any two steps of any
operation; this is where each interruption is finished or undone (docs/state.md, "Rules the
records follow"), and where nothing a container depends on is left frozen.
"""

from __future__ import annotations

import logging

from . import fs, mountinfo
from .backends import Backend
from .errors import PyvolError
from .host import Host
from .log import event
from .state import Volume
from .volumes import Volumes

log = logging.getLogger(__name__)


def reconcile(host: Host, volumes: Volumes) -> None:
    store = host.store
    host.instance_id()  # made here, in the master, before workers could race to make it
    boot_id = _boot_id()
    if store.meta("boot_id") != boot_id:
        if store.mounts():
            event(log, "host rebooted: clearing mount records", volumes=len(store.mounts()))
        store.clear_mounts()
        store.set_meta("boot_id", boot_id)
    _thaw_all(host)
    for v in store.volumes():
        backend = host.backends.get(v.backend)
        if backend is None:
            log.warning("volume %s is on backend %s, which is unavailable", v.name, v.backend)
            continue
        try:
            _volume(host, volumes, backend, v)
        except Exception:
            log.exception("recovery of volume %s failed; it is left as it was", v.name)
    known = {v.name for v in store.volumes()}
    for name, backend in host.backends.items():
        try:
            orphans = set(backend.list()) - known
        except Exception:
            log.exception("backend %s could not list its volumes", name)
            continue
        for o in sorted(orphans):
            event(log, "backend holds a volume pyvol has no record of; left untouched",
                  backend=name, volume=o)


def _thaw_all(host: Host) -> None:
    """A daemon killed inside a snapshot's freeze left that filesystem frozen, and every
    writer in its container hangs until someone thaws it: thaw every mounted volume."""
    mounted = {e.mount_point for e in mountinfo.entries()}
    for v in host.store.volumes():
        mp = host.mountpoint(v.name)
        backend = host.backends.get(v.backend)
        if backend is None or str(mp) not in mounted:
            continue
        try:
            if host.kind(backend).thaw(mp):
                event(log, "thawed a filesystem left frozen by a killed daemon", volume=v.name)
        except PyvolError as e:
            log.error("could not thaw volume %s at %s: %s", v.name, mp, e)


def _volume(host: Host, volumes: Volumes, backend: Backend, v: Volume) -> None:
    store = host.store
    mp = host.mountpoint(v.name)
    if v.status == "creating":
        event(log, "undoing interrupted create", volume=v.name)
        volumes.undo_create(backend, v.name)
        return
    if v.status == "removing":
        event(log, "finishing interrupted remove", volume=v.name)
        if mountinfo.is_mounted(mp):
            fs.umount(mp)
        volumes.finish_remove(backend, v.name)
        return
    for s in store.snapshots(v.name):
        if s.status != "ready":
            event(log, "cleaning interrupted snapshot", volume=v.name, snapshot=s.name)
            backend.remove_snapshot(v.name, s.name)
            store.delete_snapshot(v.name, s.name)
    if v.name not in backend.list():
        log.error("volume %s is recorded but its storage is missing from backend %s",
                  v.name, backend.name)
        return
    users = store.mounts(v.name)
    mounted = mountinfo.is_mounted(mp)
    if users and not mounted:
        event(log, "mount records without a mount: cleared", volume=v.name, ids=len(users))
        store.clear_mounts(v.name)
        backend.deactivate(v.name)
    elif mounted and not users:
        event(log, "mounted with no user: unmounting", volume=v.name)
        try:
            volumes.detach(v)
        except PyvolError as e:
            log.warning("could not unmount %s: %s", v.name, e)
    elif not mounted:
        backend.deactivate(v.name)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
