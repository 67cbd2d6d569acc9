"""The nfs backend: volumes are directories on NFS exports that every host mounts.

Each share (``PYVOL_NFS_SHARES="main=server:/export other=server2:/data,vers=3"``) is mounted
once per host under ROOT/nfs/NAME by the kernel client. Everything pyvol knows about a volume
lives on the export, so every host sees the same volumes:

    EXPORT/pyvol/volumes/NAME/             the volume's files (bind-mounted for containers)
    EXPORT/pyvol/meta/NAME.json            its record: size, options, created, status
    EXPORT/pyvol/leases/NAME/INSTANCE.json one per host that has it mounted
    EXPORT/pyvol/snapshots/NAME/SNAP/      point-in-time copies (reflink where the server can)
    EXPORT/pyvol/tmp/                      work in progress

Every touch of an export runs in a guarded thread with a timeout: a server that stops
answering makes calls fail with a clear message in bounded time, and a thread stuck in the
kernel never stops the daemon (docs/nfs.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from pyvol import mountinfo
from pyvol.errors import Conflict, InvalidInput, NotFound, PyvolError
from pyvol.files import write_whole
from pyvol.run import run

from .base import Backend, Quiesce, Range, VolumeSpec

SHARE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
SOURCE_RE = re.compile(r"^[A-Za-z0-9_.:\[\]-]+:/[^\s,]*$")
VERSIONS = ("4.2", "4.1", "4", "3")
# mount options a share may carry: what changes behaviour a user may need, nothing that would
# let a setting smuggle in another filesystem or a security context
ALLOWED_OPTIONS = {"hard", "soft", "timeo", "retrans", "rsize", "wsize", "proto", "port",
                   "nolock", "noac", "actimeo", "sec", "nconnect", "noresvport", "lookupcache",
                   "vers", "async", "sync"}
DEFAULT_OPTIONS = ["hard", "timeo=100", "retrans=3"]


class ServerUnreachable(PyvolError):
    http_status = 504


def parse_shares(text: str) -> dict[str, tuple[str, list[str]]]:
    """``NAME=SERVER:/EXPORT[,OPTION...]`` separated by spaces or ';' -> {name: (source, opts)}."""
    shares = {}
    for item in re.split(r"[;\s]+", text.strip()):
        if not item:
            continue
        name, sep, rest = item.partition("=")
        source, *opts = rest.split(",")
        if not sep or not SHARE_NAME_RE.match(name) or not SOURCE_RE.match(source):
            raise InvalidInput(f"invalid nfs share {item!r}: accepted is NAME=SERVER:/EXPORT"
                               "[,OPTION...], e.g. main=10.0.0.5:/srv/volumes,vers=3")
        for opt in opts:
            key, _, value = opt.partition("=")
            if key not in ALLOWED_OPTIONS:
                raise InvalidInput(f"nfs share {name}: mount option {key!r} is not allowed: "
                                   f"accepted are {', '.join(sorted(ALLOWED_OPTIONS))}")
            if key == "vers" and value not in VERSIONS:
                raise InvalidInput(f"nfs share {name}: vers={value} is not supported: "
                                   f"accepted are {', '.join(VERSIONS)}")
        if name in shares:
            raise InvalidInput(f"nfs share {name} is named twice")
        shares[name] = (source, opts)
    return shares


class Share:
    """One export, mounted on this host, and the thread pool that guards every touch of it."""

    def __init__(self, name: str, source: str, opts: list[str], mount_dir: Path,
                 version: str, timeout: float):
        self.name, self.source, self.mount_dir, self.timeout = name, source, mount_dir, timeout
        keys = {o.partition("=")[0] for o in opts}
        self.options = [f"vers={version}"] if "vers" not in keys else []
        self.options += [o for o in DEFAULT_OPTIONS if o.partition("=")[0] not in keys
                         and not (o == "hard" and "soft" in keys)] + opts
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self.base = mount_dir / "pyvol"

    def _threads(self) -> ThreadPoolExecutor:
        # per process: the daemon sets shares up before gunicorn forks, and a forked worker
        # inherits the pool's bookkeeping but none of its threads
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(8, thread_name_prefix=f"nfs-{self.name}")
            self._pool_pid = os.getpid()
        return self._pool

    def call(self, fn, *args, what: str = "the operation"):
        """Run ``fn`` on the export in a guarded thread; give up after the share's timeout."""
        future = self._threads().submit(fn, *args)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            raise ServerUnreachable(
                f"NFS server of share {self.name} ({self.source}) did not answer {what} within "
                f"{self.timeout:g} s; check the server and the network (other backends are "
                "unaffected)") from None

    def mounted(self) -> bool:
        return mountinfo.is_mounted(self.mount_dir)

    def ensure_mounted(self) -> None:
        if self.mounted():
            return
        self.mount_dir.mkdir(parents=True, exist_ok=True)
        try:
            run(["mount", "-t", "nfs", "-o", ",".join(self.options), self.source,
                 str(self.mount_dir)], timeout=self.timeout + 5)
        except PyvolError as e:
            raise ServerUnreachable(f"cannot mount NFS share {self.name} ({self.source}): "
                                    f"{e}") from None
        self.call(self._layout, what="setting up pyvol's directories")

    def _layout(self) -> None:
        for d in ("volumes", "meta", "leases", "snapshots", "tmp"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        probe = self.base / "tmp" / f".probe-{os.getpid()}"
        probe.write_text("")
        owner = probe.stat().st_uid
        probe.unlink()
        if owner != 0:
            raise PyvolError(
                f"NFS share {self.name} ({self.source}) squashes root (files pyvol creates "
                f"belong to uid {owner}), so container files could not keep their owners: "
                "export it with no_root_squash to the docker hosts")


def _write_json(path: Path, doc: dict, exclusive: bool = False) -> None:
    """A record on the export, whole or absent; FileExistsError when ``exclusive`` loses."""
    if not write_whole(path, json.dumps(doc).encode(), exclusive):
        raise FileExistsError(path)


class NfsBackend(Backend):
    name = "nfs"
    kind = "file"
    scope = "global"
    options = {"share": "which configured NFS share holds the volume (default: the first)"}

    def __init__(self, root: Path, settings: dict[str, str] | None = None):
        super().__init__(root, settings)
        self.shares: dict[str, Share] = {}
        self._instance: str | None = self.settings.get("instance")
        text = self.settings.get("shares", "")
        if text:
            version = self.settings.get("version", "4.2")
            if version not in VERSIONS:
                raise InvalidInput(f"invalid PYVOL_NFS_VERSION {version}: accepted are "
                                   f"{', '.join(VERSIONS)}")
            timeout = float(self.settings.get("timeout", 10))
            for name, (source, opts) in parse_shares(text).items():
                self.shares[name] = Share(name, source, opts, self.root / "nfs" / name,
                                          version, timeout)

    @property
    def instance(self) -> str:
        """This daemon's id in leases: random, kept under its root (hostnames repeat)."""
        if self._instance is None:
            path = self.root / "nfs" / "instance-id"
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, os.urandom(8).hex().encode())
                os.close(fd)
            self._instance = path.read_text().strip()
        return self._instance

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if shutil.which("mount.nfs") is None:
            return "missing mount.nfs (install nfs-common)"
        return None

    def not_configured(self) -> str | None:
        if not self.shares:
            return "no shares configured (set PYVOL_NFS_SHARES=NAME=SERVER:/EXPORT)"
        return None

    # shares
    def setup(self) -> None:
        """Mount every share. A server that does not answer now is not fatal (its share is
        mounted at its next use); a share pyvol cannot work on (root squash) is."""
        import logging

        for share in self.shares.values():
            try:
                share.ensure_mounted()
            except ServerUnreachable as e:
                logging.getLogger(__name__).warning("%s; retried at its next use", e)

    def teardown(self) -> None:
        for share in self.shares.values():
            if share.mounted():
                run(["umount", "-f", str(share.mount_dir)], timeout=share.timeout + 5)

    def _share(self, name: str | None) -> Share:
        if name is None:
            return next(iter(self.shares.values()))
        if name not in self.shares:
            raise InvalidInput(f"invalid share {name!r}: accepted are "
                               f"{', '.join(self.shares)}")
        share = self.shares[name]
        share.ensure_mounted()
        return share

    def _find(self, volume: str) -> tuple[Share, dict]:
        """The share holding ``volume`` and its record."""
        for share in self.shares.values():
            try:
                share.ensure_mounted()
            except ServerUnreachable:
                continue
            rec = share.call(self._read_meta, share, volume, what=f"a lookup of {volume}")
            if rec is not None:
                return share, rec
        raise NotFound(f"volume {volume} not found on any nfs share")

    @staticmethod
    def _read_meta(share: Share, volume: str) -> dict | None:
        try:
            return json.loads((share.base / "meta" / f"{volume}.json").read_text())
        except FileNotFoundError:
            return None

    # records every host sees
    def records(self) -> dict[str, dict]:
        out = {}
        for share in self.shares.values():
            share.ensure_mounted()
            for name, rec in share.call(self._all_meta, share, what="a volume listing").items():
                out.setdefault(name, rec)
        return out

    @staticmethod
    def _all_meta(share: Share) -> dict[str, dict]:
        out = {}
        for p in (share.base / "meta").glob("*.json"):
            with contextlib.suppress(FileNotFoundError, ValueError):
                rec = json.loads(p.read_text())
                if rec.get("status") == "ready":
                    out[p.stem] = rec
        return out

    # volumes
    def record(self, name: str) -> dict | None:
        try:
            return self._find(name)[1]
        except NotFound:
            return None

    def created_here(self, name: str) -> bool:
        try:
            _, rec = self._find(name)
        except NotFound:
            return True  # nothing there: nothing another host could lose
        return rec.get("created_by") == self.instance

    def removal_blockers(self, name: str) -> list[str]:
        return [f"{lease.get('host')} ({lease.get('instance')})" for lease in self.leases(name)
                if lease.get("instance") != self.instance]

    def create(self, spec: VolumeSpec) -> None:
        share = self._share(spec.options.get("share"))
        rec = {"name": spec.name, "share": share.name, "size": spec.size,
               "options": dict(spec.meta), "created": time.strftime(
                   "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "created_by": self.instance,
               "status": "creating"}
        share.call(self._create, share, spec.name, rec, what=f"creating {spec.name}")

    @staticmethod
    def _create(share: Share, name: str, rec: dict) -> None:
        meta = share.base / "meta" / f"{name}.json"
        try:
            _write_json(meta, rec, exclusive=True)  # the claim: one host wins a name
        except FileExistsError:
            raise Conflict(f"volume {name} already exists on nfs share {share.name} "
                           "(made by another host)") from None
        try:
            (share.base / "volumes" / name).mkdir()
            _write_json(meta, {**rec, "status": "ready"})
        except BaseException:
            shutil.rmtree(share.base / "volumes" / name, ignore_errors=True)
            meta.unlink(missing_ok=True)
            raise

    def remove(self, name: str) -> None:
        try:
            share, _ = self._find(name)
        except NotFound:
            return
        share.call(self._remove, share, name, self.instance, what=f"removing {name}")

    @staticmethod
    def _remove(share: Share, name: str, instance: str) -> None:
        others = [p for p in (share.base / "leases" / name).glob("*.json")
                  if p.stem != instance]
        if others:
            holders = ", ".join(json.loads(p.read_text()).get("host", p.stem) for p in others)
            raise Conflict(f"volume {name} is mounted on other hosts ({holders}); unmount it "
                           f"there first, or if a host is dead: pyvol lease clear {name} HOST")
        meta = share.base / "meta" / f"{name}.json"
        with contextlib.suppress(FileNotFoundError):
            rec = json.loads(meta.read_text())
            _write_json(meta, {**rec, "status": "removing"})
        for d in (share.base / "snapshots" / name, share.base / "volumes" / name,
                  share.base / "leases" / name):
            shutil.rmtree(d, ignore_errors=True)
        meta.unlink(missing_ok=True)

    def list(self) -> list[str]:
        return sorted(self.records())

    def size(self, name: str) -> int:
        return int(self._find(name)[1]["size"])

    def activate(self, name: str) -> str:
        """The volume's directory; this host's lease says it has the volume mounted."""
        share, _ = self._find(name)
        lease = {"host": socket.gethostname(), "instance": self.instance,
                 "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        share.call(self._lease, share, name, lease, what=f"recording the mount of {name}")
        return str(share.base / "volumes" / name)

    def _lease(self, share: Share, name: str, lease: dict) -> None:
        d = share.base / "leases" / name
        d.mkdir(exist_ok=True)
        _write_json(d / f"{self.instance}.json", lease)

    def deactivate(self, name: str) -> None:
        try:
            share, _ = self._find(name)
        except NotFound:
            return
        share.call(lambda: (share.base / "leases" / name / f"{self.instance}.json").unlink(
            missing_ok=True), what=f"releasing the mount of {name}")

    def active_device(self, name: str) -> str | None:
        try:
            share, _ = self._find(name)
        except NotFound:
            return None
        if share.call((share.base / "leases" / name / f"{self.instance}.json").exists):
            return str(share.base / "volumes" / name)
        return None

    def leases(self, name: str) -> list[dict]:
        share, _ = self._find(name)
        return share.call(lambda: [json.loads(p.read_text()) for p in sorted(
            (share.base / "leases" / name).glob("*.json"))], what=f"reading leases of {name}")

    def clear_lease(self, name: str, host: str) -> int:
        """Drop the leases of a dead ``host`` (its hostname or instance id)."""
        share, _ = self._find(name)

        def clear():
            n = 0
            for p in (share.base / "leases" / name).glob("*.json"):
                doc = json.loads(p.read_text())
                if host in (doc.get("host"), doc.get("instance")):
                    p.unlink(missing_ok=True)
                    n += 1
            return n
        return share.call(clear, what=f"clearing leases of {name}")

    # snapshots
    def _snapdir(self, share: Share, name: str, snap: str) -> Path:
        return share.base / "snapshots" / name / snap

    def snapshot(self, name: str, snap: str, quiesce: Quiesce = contextlib.nullcontext) -> None:
        # a directory copy takes as long as the data: nothing is frozen around it, so it is
        # consistent per file, not across files (docs/nfs.md)
        share, _ = self._find(name)
        src, dst = share.base / "volumes" / name, self._snapdir(share, name, snap)
        share.call(self._copy_tree, share, src, dst, what=f"snapshotting {name}")

    @staticmethod
    def _copy_tree(share: Share, src: Path, dst: Path) -> None:
        """cp -a with reflinks where the server can: owners, modes, xattrs, links kept."""
        tmp = share.base / "tmp" / f"{dst.name}-{os.getpid()}-{time.monotonic_ns()}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            run(["cp", "-a", "--reflink=auto", "--sparse=always", f"{src}/.", str(tmp)],
                timeout=3600)
            os.rename(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove_snapshot(self, name: str, snap: str) -> None:
        try:
            share, _ = self._find(name)
        except NotFound:
            return
        share.call(shutil.rmtree, self._snapdir(share, name, snap), True,
                   what=f"removing snapshot {name}@{snap}")

    def snapshots(self, name: str) -> list[str]:
        try:
            share, _ = self._find(name)
        except NotFound:
            return []
        d = share.base / "snapshots" / name
        return share.call(lambda: sorted(p.name for p in d.iterdir()) if d.exists() else [],
                          what=f"listing snapshots of {name}")

    def _need_snap(self, share: Share, name: str, snap: str) -> Path:
        d = self._snapdir(share, name, snap)
        if not share.call(d.is_dir, what=f"a lookup of {name}@{snap}"):
            raise NotFound(f"snapshot {name}@{snap} not found on nfs share {share.name}")
        return d

    def clone(self, name: str, snap: str, spec: VolumeSpec) -> None:
        share, _ = self._find(name)
        self._need_snap(share, name, snap)
        if spec.options.get("share", share.name) != share.name:
            raise InvalidInput(f"from-snapshot makes the volume on the snapshot's share "
                               f"({share.name})")
        self.create(VolumeSpec(spec.name, spec.size, {**spec.options, "share": share.name},
                               spec.meta))
        target = share.base / "volumes" / spec.name

        def fill():
            os.rmdir(target)
            self._copy_tree(share, self._snapdir(share, name, snap), target)
        try:
            share.call(fill, what=f"copying {name}@{snap}")
        except BaseException:
            self.remove(spec.name)
            raise

    def changed_ranges(self, name: str, base: str | None, snap: str) -> list[Range]:
        raise InvalidInput("the nfs backend holds files, not blocks: it has no changed ranges")

    @contextlib.contextmanager
    def read_snapshot(self, name: str, snap: str):
        share, _ = self._find(name)
        yield str(self._need_snap(share, name, snap))

    # space
    def usage(self) -> dict:
        out = {}
        for share in self.shares.values():
            if not share.mounted():  # info must stay fast: the next real use mounts it
                out[share.name] = {"source": share.source, "mounted": False}
                continue
            try:
                st = share.call(os.statvfs, share.mount_dir, what="a space query")
                out[share.name] = {"source": share.source, "options": ",".join(share.options),
                                   "size": st.f_blocks * st.f_frsize,
                                   "free": st.f_bavail * st.f_frsize}
            except PyvolError as e:
                out[share.name] = {"source": share.source, "error": str(e)}
        return {"shares": out, "size_enforced": False}

    def volume_usage(self, name: str) -> dict:
        try:
            share, rec = self._find(name)
        except PyvolError as e:
            return {"error": str(e)}
        out = {"share": share.name, "size_enforced": False}
        try:
            out["used"] = share.call(_du, share.base / "volumes" / name, what="a space count")
        except ServerUnreachable as e:
            out["error"] = str(e)
        return out


def _du(path: Path) -> int:
    total = 0
    for dirpath, dirs, files in os.walk(path):
        for f in files + dirs:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total
