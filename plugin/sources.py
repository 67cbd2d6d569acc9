"""Where a new volume's data comes from: nothing, a snapshot, or a backup.

Each source says what the data needs (its size and filesystem, the backend it must go to,
other volumes to hold while it is copied) and fills a new volume. The next kind of source (a
URL, another host) is one more class here and one more line in ``source_for``.
"""

from __future__ import annotations

from .backends import Backend, VolumeSpec
from .catalogue import Catalogue
from .crashpoint import crashpoint
from .errors import InvalidInput, NotFound
from .host import Host
from .names import parse_snap_ref
from .state import Volume


class Source:
    size: int | None = None     # bytes the data needs; None: any size
    fs: str | None = None       # the filesystem the data is in; None: any
    backend: str | None = None  # the backend the data must go to; None: any
    locks: tuple[str, ...] = ()  # other volumes held while filling
    label = ""                   # how messages name the source

    def fill(self, host: Host, backend: Backend, spec: VolumeSpec, v: Volume, job) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what the source holds open (a backup's repository), filled or not."""


class Empty(Source):
    def fill(self, host, backend, spec, v, job):
        backend.create(spec)
        crashpoint("create.storage")
        host.kind(backend).prepare(backend, v)


class FromSnapshot(Source):
    def __init__(self, catalogue: Catalogue, ref):
        self.volume, self.snap = parse_snap_ref(ref)
        src = catalogue.ready(self.volume)
        s = catalogue.snapshot(src, self.snap)
        if s is None:
            raise NotFound(f"no such snapshot: {ref}")
        self.size, self.fs, self.backend = s.size, src.fs, src.backend
        self.locks, self.label = (self.volume,), ref

    def fill(self, host, backend, spec, v, job):
        backend.clone(self.volume, self.snap, spec)


class FromBackup(Source):
    def __init__(self, backups, url):
        self.restore = backups.prepare_restore(url)
        self.size, self.fs, self.label = self.restore.size, self.restore.fs, url

    def fill(self, host, backend, spec, v, job):
        self.restore.fill(host.kind(backend), backend, spec, v, host.mountpoint(v.name), job)

    def close(self) -> None:
        self.restore.close()


def source_for(opts: dict[str, str], catalogue: Catalogue, backups) -> Source:
    """The source a create's options name; sets the backend a snapshot's data must stay on."""
    if "from-snapshot" in opts and "from-backup" in opts:
        raise InvalidInput("from-snapshot and from-backup exclude each other: pick one")
    if "from-snapshot" in opts:
        source: Source = FromSnapshot(catalogue, opts["from-snapshot"])
    elif "from-backup" in opts:
        source = FromBackup(backups, opts["from-backup"])
    else:
        return Empty()
    if source.backend is not None:
        if opts.get("backend", source.backend) != source.backend:
            raise InvalidInput(f"from-snapshot needs the snapshot's backend "
                               f"({source.backend}), not {opts['backend']}")
        opts.setdefault("backend", source.backend)
    return source
