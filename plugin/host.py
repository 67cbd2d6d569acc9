"""This host's pyvol: the settings, the records, the backends that run here, and the few
facts every part asks of them (where a volume mounts, which backend and kind hold it, the
volume lock). Built once in server.py and handed to each part; it decides nothing itself."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from . import freeze, locks
from .backends import Backend
from .backends.shared import SharedBackend
from .config import Config
from .errors import PyvolError
from .kinds import VolumeKind, kind_of
from .log import event
from .state import Store, Volume

log = logging.getLogger(__name__)

FROZEN = ".frozen"  # a freeze mark's suffix, beside the volume's lock (docs/state.md)


@dataclass
class Host:
    config: Config
    store: Store
    backends: dict[str, Backend]
    default_backend: str | None
    unavailable: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        # the one place a backend's kind of volume (block or directory) is decided
        self.kinds: dict[str, VolumeKind] = {n: kind_of(b) for n, b in self.backends.items()}

    def mountpoint(self, name: str) -> Path:
        return self.config.mounts_dir / name

    def backend(self, v: Volume) -> Backend:
        b = self.backends.get(v.backend)
        if b is None:
            why = self.unavailable.get(v.backend, "it is not configured")
            raise PyvolError(f"volume {v.name} is on backend {v.backend}, which is not "
                             f"available on this host: {why}")
        return b

    def kind(self, backend: Backend) -> VolumeKind:
        return self.kinds[backend.name]

    def shared_backends(self) -> list[SharedBackend]:
        return [b for b in self.backends.values() if isinstance(b, SharedBackend)]

    @contextlib.contextmanager
    def lock(self, *names: str, wait: float = locks.DEFAULT_WAIT):
        """Every change to a volume holds its lock, across workers, threads and restarts.
        A holder killed inside a snapshot's freeze left its mark: taken, the lock thaws that
        filesystem first (freeze.py), whoever takes it."""
        with locks.all_held(self.config.locks_dir, [f"vol.{n}" for n in names],
                            what=f"volume {', '.join(names)}", wait=wait):
            for name in names:
                if freeze.thaw_left(self.mountpoint(name), self.freeze_marker(name)):
                    event(log, "thawed a filesystem a killed process left frozen", volume=name)
            yield

    def freeze_marker(self, name: str) -> Path:
        """Present while a snapshot may hold ``name``'s filesystem frozen (freeze.py)."""
        return self.config.locks_dir / f"vol.{name}{FROZEN}"

    def marked_frozen(self) -> list[tuple[str, Path]]:
        """Every volume with a freeze mark (``freeze_marker``), and the mark."""
        return [(p.name[len("vol."):-len(FROZEN)], p)
                for p in sorted(self.config.locks_dir.glob(f"vol.*{FROZEN}"))]

    def freeze_mark(self, name: str, backend: Backend) -> freeze.Mark:
        """How a snapshot of ``name`` on ``backend`` marks its freeze; under ``lock(name)``."""
        return freeze.Mark(self.freeze_marker(name), self.config.locks_dir, f"vol.{name}",
                           backend.name)

    def instance_id(self) -> str:
        """A random id for this root dir: tells this daemon's snapshots from another host's."""
        iid = self.store.meta("instance_id")
        if iid is None:
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
            "pid": int(os.environ.get("PYVOL_MASTER_PID", os.getpid())),  # the master's
            "root": str(self.config.root),
            "socket": str(self.config.socket),
            "default_backend": self.default_backend,
            "volumes": len(self.store.volumes("ready")),
            "mounted": sum(1 for n in self.store.mounts() if n),
            "backends": backends,
        }
