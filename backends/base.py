"""The backend contract: what every storage backend must do, and nothing about Docker.

A backend keeps volumes (block devices or directories) and their snapshots, keyed by the
volume's name. It never mounts a filesystem (``pyvol.fs`` does, for every block backend) and
never keeps records of its own beyond what its storage itself holds: pyvol's state says which
volumes exist, the backend says what they contain. tests/test_conformance.py is the contract's
executable form; a backend is done when it passes that suite unchanged.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pyvol.errors import PyvolError

Range = tuple[int, int]  # (offset, length) in bytes
Quiesce = Callable[[], AbstractContextManager]  # see Backend.snapshot


class DeactivateFailed(PyvolError):
    """What deactivate_many could not release: volume name -> why."""

    def __init__(self, backend: str, failures: dict[str, str]):
        self.failures = dict(failures)
        super().__init__(f"backend {backend} could not release " + "; ".join(
            f"{name}: {why}" for name, why in sorted(self.failures.items())))


def release_each(backend: str, names: Collection[str], release: Callable[[str], None]) -> None:
    """``release(name)`` for each name, every one tried; then DeactivateFailed for those whose
    release failed (a storage error, not a bug: those propagate at once)."""
    failures = {}
    for name in sorted(names):
        try:
            release(name)
        except (PyvolError, OSError) as e:
            failures[name] = str(e) or type(e).__name__
    if failures:
        raise DeactivateFailed(backend, failures)


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    size: int
    options: dict[str, str] = field(default_factory=dict)  # this backend's own options
    meta: dict[str, str] = field(default_factory=dict)  # every option the user gave


class Backend(ABC):
    #: the name users pass as ``-o backend=``
    name: ClassVar[str]
    #: "block": activate() gives a block device (BlockBackend); "file": a directory
    #: (DirectoryBackend). plugin/kinds.py turns it into everything that differs.
    kind: ClassVar[str]
    #: Docker Capabilities scope: "local", or "global" when every host sees the same volumes
    scope: ClassVar[str] = "local"
    #: backend-specific create options, name -> one-line help
    options: ClassVar[dict[str, str]] = {}
    #: sizes are whole multiples of this (EBS: GiB); a create rounds requests up to it
    size_unit: ClassVar[int] = 1
    #: why rollback() refuses on this backend (None: it rolls back), asked before any work
    no_rollback: ClassVar[str | None] = None
    #: a snapshot takes a few milliseconds whatever the volume holds (a reflink, dm-thin): a
    #: backup takes it while its job process starts, before it knows the repository is usable
    instant_snapshots: ClassVar[bool] = False

    def __init__(self, root: Path, settings: dict[str, str] | None = None):
        self.root = Path(root)
        self.settings = dict(settings or {})
        # what a create that names no size or fs gets on this backend (None: pyvol's default)
        self.default_size: str | None = self.settings.get("default_size")
        self.default_fs: str | None = self.settings.get("default_fs")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this host can run the backend, else a sentence saying what is missing."""
        return None

    def not_configured(self) -> str | None:
        """None when the settings give the backend enough to run (e.g. nfs needs shares)."""
        return None

    def created_here(self, name: str) -> bool:
        """Whether storage named ``name`` was made by this host, so that an interrupted
        create of it may be undone. Local storage is only ever made here; a shared
        backend's (backends/shared.py) may meanwhile hold another host's volume."""
        return True

    def removal_blockers(self, name: str) -> list[str]:
        """Other hosts that have the volume mounted, so removal is refused; none for local
        storage (shared backends: backends/shared.py)."""
        return []

    @abstractmethod
    def setup(self) -> None:
        """Provision or re-attach the backend's storage; idempotent; run once at daemon start."""

    def resume_io(self) -> bool:
        """Undo what a worker killed inside one of this backend's steps left blocking a
        container's I/O (devicemapper: a device a snapshot suspended), unless a live worker
        is inside such a step now: then False, and the master asks again (plugin/leftovers.py).
        Most backends block no I/O of their own."""
        return True

    @abstractmethod
    def create(self, spec: VolumeSpec) -> None:
        """Make an empty volume of ``spec.size`` bytes; leave nothing behind if it fails."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Remove the volume and all its snapshots; a volume already gone is not an error."""

    @abstractmethod
    def list(self) -> list[str]:
        """Names of the volumes the storage holds (for recovery and reconciliation)."""

    @abstractmethod
    def activate(self, name: str) -> str:
        """Make the volume usable and return its device (or directory); twice gives the same."""

    @abstractmethod
    def deactivate(self, name: str) -> None:
        """Release what activate() took; idempotent."""

    @abstractmethod
    def deactivate_many(self, names: Collection[str]) -> None:
        """deactivate() of each of ``names``, looking at the backend's devices (or records)
        once for all of them: start-up releases every volume nothing has mounted, and one
        deactivate() per volume scanned every device once per volume. Names the storage does
        not hold are no error. Each name is tried even when another fails; the failures are
        raised together after (``DeactivateFailed``)."""

    @abstractmethod
    def snapshot(self, name: str, snap: str, quiesce: Quiesce = contextlib.nullcontext) -> None:
        """Take a crash-consistent snapshot.

        ``quiesce()`` is a context that freezes the volume's mounted filesystem (a no-op for
        a volume nobody has mounted). The backend takes every lock it needs first and enters
        it only around the instant that makes the snapshot: a container's writes stop for
        that instant, never while pyvol waits for a lock.
        """

    @abstractmethod
    def remove_snapshot(self, name: str, snap: str) -> None:
        """Remove one snapshot; one already gone is not an error."""

    @abstractmethod
    def snapshots(self, name: str) -> list[str]:
        """Names of the volume's snapshots held by the storage."""

    @abstractmethod
    def clone(self, name: str, snap: str, spec: VolumeSpec) -> None:
        """Make volume ``spec.name`` holding ``name@snap``'s data, at least as large as it."""

    @abstractmethod
    def read_snapshot(self, name: str, snap: str):
        """A context manager yielding a path from which the snapshot's bytes can be read:
        a block device, or a directory."""

    @abstractmethod
    def grow(self, name: str, size: int) -> None:
        """Make the volume at least ``size`` bytes, also while it is active and in use: an
        active device shows the new size when this returns, so that its filesystem can be
        grown at once.

        ``size`` is never below the volume's recorded size: the lifecycle (Volumes.resize)
        refuses a shrink, in that one place for every backend, so a backend does not check
        again. Storage already larger than ``size`` (a resize a crash cut short before its
        record) stays as large: a grow never makes anything smaller, and the filesystem
        grows to the record, not to the device (fs.grow). The same size again is not an
        error (a grow interrupted after this step is finished by repeating it). Refuses,
        with what is accepted, a size the storage cannot or may not hold (pool size,
        over-commit)."""

    @abstractmethod
    def rollback(self, name: str, snap: str) -> None:
        """Replace the volume's data with snapshot ``snap``'s, keeping the volume's size.

        The volume is not in use (callers refuse while it is mounted) and its snapshots stay.
        A crash at any point leaves the volume with its old data or the snapshot's, never
        neither or a mix. A backend that cannot do this honestly refuses with InvalidInput
        saying why and what to do instead."""

    def usage(self) -> dict:
        """Pool-level space figures for ``pyvol info``."""
        return {}

    def volume_usage(self, name: str) -> dict:
        """Space this volume takes in the pool, for its Status."""
        return {}


class BlockBackend(Backend):
    """A backend whose volumes are block devices: pyvol makes and mounts their filesystems,
    and backs them up by ranges of the device, reading only what holds data or changed."""

    kind: ClassVar[str] = "block"
    #: smallest unit the ranges below are reported in; writes are rounded out to it
    change_granularity: ClassVar[int] = 4096
    #: mount with online discard, so deleted files give space back to the pool
    discard: ClassVar[bool] = False
    #: a device may come without a filesystem (an EBS volume from a foreign snapshot); a
    #: mount makes one, only ever on a device that has none
    may_lack_fs: ClassVar[bool] = False

    @abstractmethod
    def mapped_ranges(self, name: str, snap: str) -> list[Range]:
        """Byte ranges of snapshot ``snap`` that hold data at all (what a full backup reads);
        sorted, merged and aligned to ``change_granularity``."""

    @abstractmethod
    def changed_ranges(self, name: str, base: str, snap: str) -> list[Range]:
        """Byte ranges whose data differ between snapshots ``base`` and ``snap`` (what an
        incremental backup reads); sorted, merged and aligned to ``change_granularity``."""


class DirectoryBackend(Backend):
    """A backend whose volumes are directories: pyvol bind-mounts them, and backs them up
    as archives of their trees."""

    kind: ClassVar[str] = "file"
