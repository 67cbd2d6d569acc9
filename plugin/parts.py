"""The daemon's parts, and how they are wired: one place that says who depends on whom.

    api ──► volumes (Docker's lifecycle) ──► sources ──► backups (through VolumeAccess)
        ├─► snapshots                    ├─► kinds (block or directory, once per backend)
        ├─► catalogue (shared volumes)   └─► backends
        └─► backups ──► VolumeAccess (snapshots.SnapshotAccess) ──► snapshots, catalogue
    ├─► schedules (the records) ;  scheduler.Runner (one per host) ──► snapshots, backups
    reconcile: at start, before any request, over volumes and host
"""

from __future__ import annotations

from dataclasses import dataclass

from .abandoned import Abandoned
from .backup.service import Backups
from .catalogue import Catalogue
from .host import Host
from .scheduler import Runner
from .schedules import Schedules
from .snapshots import SnapshotAccess, Snapshots
from .volumes import Volumes


@dataclass
class Parts:
    host: Host
    catalogue: Catalogue
    snapshots: Snapshots
    volumes: Volumes
    backups: Backups
    schedules: Schedules | None = None
    runner: Runner | None = None  # started in each worker (server.py); one runs at a time


def wire(host: Host) -> Parts:
    catalogue = Catalogue(host)
    snapshots = Snapshots(host, catalogue)
    backups = Backups(SnapshotAccess(host, catalogue, snapshots), host.config)
    volumes = Volumes(host, catalogue, snapshots, backups)
    abandoned = Abandoned(host, volumes, snapshots, backups)
    return Parts(host, catalogue, snapshots, volumes, backups, Schedules(host, catalogue),
                 Runner(host, snapshots, backups, catalogue, abandoned))
