"""The two kinds of volume, decided once per backend (``kind_of``): every difference between
a volume that is a block device and one that is a directory lives here, not in ``if`` checks
wherever it matters.

- **Block volumes** (loop, devicemapper, ebs): the backend hands over a device; pyvol makes
  the filesystem, mounts it, freezes it for a snapshot, grows it, and backs it up as fixed
  pieces of the device (the block engine).
- **Directory volumes** (nfs): the backend hands over a directory; pyvol bind-mounts it, and
  backs it up as an archive of the tree (the tree engine). A directory copy cannot be frozen,
  so its snapshots are consistent per file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import freeze, fs, mountinfo
from .backends import Backend, VolumeSpec
from .backends.base import Quiesce
from .errors import InvalidInput
from .state import Volume

MIN_SIZE = {"ext4": 16 << 20, "xfs": 300 << 20}


class VolumeKind:
    #: the backup format this kind of volume is archived as ("block" or "tree")
    archive: str

    def fstype(self, backend: Backend, requested: str | None,
               source_fs: str | None) -> str | None:
        """The value of the volume's ``fs`` record for a create: None where the volume
        holds no filesystem of pyvol's making."""
        raise NotImplementedError

    def min_size(self, fstype: str | None) -> int:
        return 0

    def prepare(self, backend: Backend, v: Volume) -> None:
        """Make a new, empty volume usable (a filesystem on a device)."""

    def check_resizable(self, v: Volume, mp: Path) -> None:
        """Refuse, before anything changes, a resize whose filesystem step cannot be done
        now (so that no device is left grown under a filesystem that could not follow)."""

    def fill_fs(self, backend: Backend, v: Volume, mp: Path) -> None:
        """Grow the volume's filesystem, mounted or not, to ``v.size``: the recorded size,
        which its storage already holds (a volume made larger than its source, one resized,
        one rolled back to a snapshot taken before a resize). Never past the record; the
        size it has again does nothing, so a repeat finishes one a crash interrupted. A
        directory volume holds no filesystem of pyvol's: nothing to do."""

    def attach(self, backend: Backend, v: Volume, mp: Path) -> None:
        raise NotImplementedError

    def detach(self, backend: Backend, v: Volume, mp: Path) -> None:
        fs.umount(mp)
        backend.deactivate(v.name)

    def quiesce(self, mp: Path, mark: freeze.Mark) -> Quiesce:
        """What makes a snapshot of the mounted volume at ``mp`` consistent; ``mark``: where a
        freeze of it is marked (freeze.py)."""
        return contextlib.nullcontext

    def thaw(self, mp: Path) -> bool:
        """Undo a freeze a killed daemon left behind; True if there was one."""
        return False

    def receive(self, backend: Backend, spec: VolumeSpec, v: Volume, mp: Path, restore,
                job) -> None:
        """Create the volume's storage and write a backup (``backup.service.Restore``) in."""
        raise NotImplementedError

    def ranges(self, backend: Backend, volume: str, base: str | None, snap: str) -> list:
        """The byte ranges of ``snap`` that hold data (``base`` None) or that changed since
        ``base``: what a block backup reads."""
        raise InvalidInput(f"backend {backend.name} holds files, not blocks: its snapshots "
                           "have no changed ranges")


class BlockVolumes(VolumeKind):
    archive = "block"

    def fstype(self, backend, requested, source_fs):
        return fs.check_fstype(source_fs or requested or backend.default_fs or "ext4")

    def min_size(self, fstype):
        return MIN_SIZE.get(fstype, 0)

    def prepare(self, backend, v):
        dev = backend.activate(v.name)
        try:
            fs.mkfs(dev, v.fs, label=v.name)
        finally:
            backend.deactivate(v.name)

    def check_resizable(self, v, mp):
        if mountinfo.is_mounted(mp) and (why := fs.online_grow_refusal(v.fs)):
            raise InvalidInput(f"cannot resize volume {v.name} while it is mounted: {why}")

    def fill_fs(self, backend, v, mp):
        mounted = mountinfo.is_mounted(mp)  # then online, under the container's writes
        dev = backend.activate(v.name)
        try:
            fs.grow(dev, v.fs, mp, v.size)
        finally:
            if not mounted:  # a mounted volume's device stays with its mount
                backend.deactivate(v.name)

    def attach(self, backend, v, mp):
        dev = backend.activate(v.name)
        try:
            if backend.may_lack_fs and fs.detect(dev) is None:
                fs.mkfs(dev, v.fs, label=v.name)  # only ever on a device with no fs
            fs.mount(dev, mp, v.fs, discard=backend.discard)
        except BaseException:
            backend.deactivate(v.name)
            raise

    def quiesce(self, mp, mark):
        return lambda: freeze.frozen(mp, mark)

    def ranges(self, backend, volume, base, snap):
        if base is None:
            return backend.mapped_ranges(volume, snap)
        return backend.changed_ranges(volume, base, snap)

    def thaw(self, mp):
        return freeze.thaw(mp)

    def receive(self, backend, spec, v, mp, restore, job):
        backend.create(spec)
        if restore.archive == "tree":  # files into a fresh filesystem
            self.prepare(backend, v)
            self.attach(backend, v, mp)
            try:
                restore.run(str(mp), job)
            finally:
                self.detach(backend, v, mp)
            return
        dev = backend.activate(v.name)
        try:
            restore.run(dev, job)
        finally:
            backend.deactivate(v.name)


class DirectoryVolumes(VolumeKind):
    archive = "tree"

    def fstype(self, backend, requested, source_fs):
        # Before state version 3 a directory volume's records said fs=<backend name>; other
        # hosts' records on the share may still say so.
        if requested not in (None, backend.name):
            raise InvalidInput(f"backend {backend.name} holds files: it takes no fs option")
        return None

    def attach(self, backend, v, mp):
        directory = backend.activate(v.name)
        try:
            fs.bind(directory, mp)
        except BaseException:
            backend.deactivate(v.name)
            raise

    def receive(self, backend, spec, v, mp, restore, job):
        if restore.archive != "tree":
            raise InvalidInput(f"backup {restore.url} is a block backup; backend "
                               f"{backend.name} holds files: restore it into a block backend "
                               "(loop, devicemapper)")
        backend.create(spec)
        directory = backend.activate(v.name)
        try:
            restore.run(directory, job)
        finally:
            backend.deactivate(v.name)


KINDS: dict[str, VolumeKind] = {"block": BlockVolumes(), "file": DirectoryVolumes()}


def kind_of(backend: Backend) -> VolumeKind:
    """BlockBackend's volumes are block volumes, DirectoryBackend's directory volumes."""
    return KINDS[backend.kind]
