"""The nfs backend: volumes are directories on NFS exports that every host mounts.

Each share (``PYVOL_NFS_SHARES="main=server:/export other=server2:/data,vers=3"``) is mounted
once per host under ROOT/nfs/NAME by the kernel client. Everything pyvol knows about a volume
lives on the export, so every host sees the same volumes:

    EXPORT/pyvol/volumes/NAME/             the volume's files (bind-mounted for containers)
    EXPORT/pyvol/meta/NAME.json            its record: size, options, created, status
    EXPORT/pyvol/leases/NAME/INSTANCE.json one per host that has it mounted
    EXPORT/pyvol/leases/NAME/runs/KIND@SLOT the host that claimed a schedule's slot
    EXPORT/pyvol/snapshots/NAME/SNAP/      point-in-time copies (reflink where the server can)
    EXPORT/pyvol/tmp/INSTANCE.*            copies in progress
    EXPORT/pyvol/trash/INSTANCE.*          removed trees, being deleted
    EXPORT/pyvol/records.lock              POSIX-locked while a record changes

Every quick touch of an export (a record, a lease, a rename) runs in a guarded thread with a
short timeout: a server that stops answering makes calls fail with a clear message in bounded
time, and a thread stuck in the kernel never stops the daemon. Work that takes as long as the
data (copying a tree, deleting one) first checks that the server answers, then runs as a
killable process bounded by the much longer copy timeout; what it leaves behind when it fails
or the daemon dies is named with this host's instance id and removed at the next start
(docs/nfs.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from pyvol import mountinfo
from pyvol.crashpoint import crashpoint
from pyvol.errors import (
    CommandFailed,
    Conflict,
    InvalidInput,
    NotFound,
    PoolFull,
    PyvolError,
)
from pyvol.files import write_whole
from pyvol.locks import take_within
from pyvol.log import event
from pyvol.run import run

from .base import DeactivateFailed, DirectoryBackend, Quiesce, VolumeSpec, release_each
from .settings import seconds
from .shared import SharedBackend

SHARE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
SOURCE_RE = re.compile(r"^[A-Za-z0-9_.:\[\]-]+:/[^\s,]*$")
VERSIONS = ("4.2", "4.1", "4", "3")
# mount options a share may carry: what changes behaviour a user may need, nothing that would
# let a setting smuggle in another filesystem or a security context
ALLOWED_OPTIONS = {"hard", "soft", "timeo", "retrans", "rsize", "wsize", "proto", "port",
                   "nolock", "noac", "actimeo", "sec", "nconnect", "noresvport", "lookupcache",
                   "vers", "async", "sync"}
DEFAULT_OPTIONS = ["hard", "timeo=100", "retrans=3"]
# another host's trash older than this is its leftover from a crash: any host may empty it
TRASH_AGE = 24 * 3600

log = logging.getLogger(__name__)


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
        self.base = mount_dir / "pyvol"
        self._laid_out = False
        self._local = threading.local()
        self._per_process()
        # the daemon sets shares up before gunicorn forks; a forked worker inherits the pool's
        # bookkeeping but none of its threads, and a lock a thread held stays held
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (share := ref()) and share._per_process())

    def _per_process(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._mounting = threading.Lock()

    def _threads(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(8, thread_name_prefix=f"nfs-{self.name}")
            return self._pool

    def call(self, fn, *args, what: str = "the operation"):
        """Run ``fn`` on the export in a guarded thread; give up after the share's timeout.
        The thread goes on (one stuck in the kernel cannot be stopped); ``fn`` can ask
        ``gave_up()`` before it changes anything, so that a change reported as failed does
        not land later."""
        gave_up = threading.Event()

        def guarded():
            self._local.gave_up = gave_up
            try:
                return fn(*args)
            except FileNotFoundError:
                # the export is other hosts' and people's too: pyvol's directories there can
                # go. Laid out again here (it is idempotent), for every process and host at
                # once; this call still fails, saying what was missing
                with contextlib.suppress(OSError):
                    self._layout()
                raise

        future = self._threads().submit(guarded)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            gave_up.set()
            raise ServerUnreachable(
                f"NFS server of share {self.name} ({self.source}) did not answer {what} within "
                f"{self.timeout:g} s; check the server and the network (other backends are "
                "unaffected)") from None
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            cls = PoolFull if e.errno in (errno.ENOSPC, errno.EDQUOT) else PyvolError
            raise cls(f"{what} on NFS share {self.name} ({self.source}) failed: "
                      f"{e.strerror or e}{where}") from None

    def gave_up(self) -> bool:
        """In ``fn`` of a ``call``: whether its caller has stopped waiting for it."""
        event = getattr(self._local, "gave_up", None)
        return event is not None and event.is_set()

    def mounted(self) -> bool:
        return mountinfo.is_mounted(self.mount_dir)

    def ensure_mounted(self) -> None:
        """Mounted and laid out. A mount is not enough: one can be there that pyvol never laid
        out (its mount command gave up at its timeout just as the server came back and the
        kernel finished the mount, or a person mounted it), and every call would then miss
        pyvol's directories. Serialised per share, so that two requests at a cold share neither
        stack two mounts nor use one before its layout is done."""
        if self._laid_out and self.mounted():
            return
        mounting = self._mounting
        if not mounting.acquire(timeout=self.timeout):
            # not ServerUnreachable: _find would take the share for absent, and a remove
            # would answer done without removing anything
            raise Conflict(f"NFS share {self.name} ({self.source}) is being mounted for another "
                           f"request that has not finished in {self.timeout:g} s; retry")
        try:
            if not self.mounted():
                self._laid_out = False
                self.mount_dir.mkdir(parents=True, exist_ok=True)
                try:
                    run(["mount", "-t", "nfs", "-o", ",".join(self.options), self.source,
                         str(self.mount_dir)], timeout=self.timeout + 5)
                except PyvolError as e:
                    raise ServerUnreachable(f"cannot mount NFS share {self.name} "
                                            f"({self.source}): {e}") from None
            if not self._laid_out:
                self.call(self._layout, what="setting up pyvol's directories")
                self._laid_out = True
        finally:
            mounting.release()

    def _layout(self) -> None:
        """Idempotent: it runs again at the next use when an earlier run did not finish."""
        for d in ("volumes", "meta", "leases", "snapshots", "tmp", "trash"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        probe = self.base / "tmp" / f".probe-{os.getpid()}-{threading.get_ident()}"
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


@contextlib.contextmanager
def _records_locked(share: Share, done: str):
    """One host at a time changes the share's volume records. A change reads a record,
    changes it and replaces it; two hosts doing that at once each still saw the inode they
    had read (their attribute caches), and the later replace dropped the other's change.

    The lock is a POSIX lock on ``pyvol/records.lock``, held at the server (NFSv4's locks,
    NFSv3's lock manager) and let go by it when the holder closes the file, or dies and its
    lease ends: no clock or takeover of pyvol's decides that a holder is dead. A lock held
    by another host is waited for at most half the share's timeout, then the change is
    refused. For a grace period after the server restarts it grants no lock at all (the
    kernel client waits it out): the guard's timeout ends the call, and the thread, once it
    has the lock, sees that its caller gave up and changes nothing. ``done``: what the caller
    does, for the refusal."""
    fd = os.open(share.base / "records.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        take_within(lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), share.timeout / 2,
                    f"the volume records of nfs share {share.name} are being changed by "
                    f"another host: not {done}; retry")
        if share.gave_up():
            raise Conflict(f"not {done}: the call gave up waiting for the records lock")
        yield
    finally:
        os.close(fd)  # lets the lock go


def _said(value) -> str:
    """A value from another host's record, as a message may quote it: short, whatever it is."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}..."


class NfsBackend(SharedBackend, DirectoryBackend):
    name = "nfs"
    scope = "global"
    options = {"share": "which configured NFS share holds the volume (default: the first)"}
    no_rollback = (
        "a rollback on nfs would copy the snapshot's whole tree over the volume's (time and "
        "space as large as the data, and other hosts would see its directory replaced under "
        "them), not swap it in constant time; make a new volume from the snapshot instead: "
        "docker volume create -d pyvol -o from-snapshot=VOLUME@SNAPSHOT NEW")

    def __init__(self, root: Path, settings: dict[str, str] | None = None):
        super().__init__(root, settings)
        self.shares: dict[str, Share] = {}
        self._instance: str | None = self.settings.get("instance")
        # copying or deleting a tree takes as long as the data: bounded by this, not by the
        # short guard that notices a dead server
        self.copy_timeout = seconds("nfs", self.settings, "copy_timeout", 3600)
        self._deleters: set[threading.Thread] = set()
        self._rm_procs: set[subprocess.Popen] = set()
        self._closed = False
        text = self.settings.get("shares", "")
        if text:
            version = self.settings.get("version", "4.2")
            if version not in VERSIONS:
                raise InvalidInput(f"invalid PYVOL_NFS_VERSION {version}: accepted are "
                                   f"{', '.join(VERSIONS)}")
            timeout = seconds("nfs", self.settings, "timeout", 10)
            for name, (source, opts) in parse_shares(text).items():
                self.shares[name] = Share(name, source, opts, self.root / "nfs" / name,
                                          version, timeout)

    @property
    def instance(self) -> str:
        """This daemon's id in claims: random, kept under its root (hostnames repeat)."""
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
        """Mount every share and start emptying what an earlier run left behind. A server
        that does not answer now is not fatal (its share is mounted at its next use, and its
        leftovers go at a later start); a share pyvol cannot work on (root squash) is."""
        for share in self.shares.values():
            try:
                share.ensure_mounted()
                old = share.call(self._leftovers, share, self.instance,
                                 what="a look for leftovers of an earlier run")
            except ServerUnreachable as e:
                log.warning("%s; retried at its next use", e)
                continue
            if old:
                event(log, "emptying leftovers of earlier runs from the nfs trash",
                      share=share.name, entries=len(old))
                self._empty_later(share, old)

    @staticmethod
    def _leftovers(share: Share, instance: str) -> list[Path]:
        """Trash entries to delete now: this host's, whatever their age (nothing of this
        host runs yet: setup comes before serving), and other hosts' older than TRASH_AGE
        (their owner died before emptying them). This host's copies that a crash
        interrupted are moved from tmp/ into the trash first; other hosts' tmp/ entries are
        theirs, possibly copies in progress, and are never touched."""
        tmp, trash = share.base / "tmp", share.base / "trash"
        trash.mkdir(exist_ok=True)
        mine = f"{instance}."
        for p in tmp.iterdir():
            if p.name.startswith(mine):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(p, trash / f"{mine}tmp-{p.name[len(mine):]}")
        out, old = [], time.time() - TRASH_AGE
        for p in trash.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if p.name.startswith(mine) or p.lstat().st_mtime < old:
                    out.append(p)
        return out

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
        """The share holding ``volume`` and its record (whatever its status). Not found
        while a share cannot be asked is not "not found": a remove would answer done and
        leave the volume on that share."""
        unreachable = None
        for share in self.shares.values():
            try:
                share.ensure_mounted()
            except ServerUnreachable as e:
                unreachable = e
                continue
            rec = share.call(self._read_meta, share, volume, what=f"a lookup of {volume}")
            if rec is not None:
                return share, rec
        if unreachable is not None:
            raise unreachable
        raise NotFound(f"volume {volume} not found on any nfs share")

    @staticmethod
    def _read_meta(share: Share, volume: str) -> dict | None:
        """A volume's record; another host (or a person) wrote it, so one that is no JSON
        object is refused by name rather than read (what List does: leaves it out)."""
        path = share.base / "meta" / f"{volume}.json"
        try:
            rec = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
            rec = None
        if not isinstance(rec, dict):
            raise Conflict(f"the record of volume {volume} on nfs share {share.name} ({path}) "
                           "is not a JSON object; repair it or move it away")
        return rec

    # the trash: a tree is renamed there at once (quick, under the guard), then deleted by a
    # killable process bounded by the copy timeout, off the caller's path
    @staticmethod
    def _to_trash(share: Share, instance: str, label: str, paths) -> Path | None:
        """Move ``paths`` (those that exist) into one new trash entry named for this host;
        None when there was nothing to move."""
        entry = share.base / "trash" / f"{instance}.{label}.{secrets.token_hex(4)}"
        entry.parent.mkdir(exist_ok=True)  # exports laid out by an older pyvol have none
        entry.mkdir()
        moved = False
        for i, p in enumerate(paths):
            with contextlib.suppress(FileNotFoundError):
                os.rename(p, entry / f"{i}-{p.parent.name}")
                moved = True
        if not moved:
            entry.rmdir()
            return None
        return entry

    def _discard(self, share: Share, label: str, *paths: Path) -> None:
        """Throw away what a failed copy left; never raises (if the server does not answer,
        the next start removes it: it is named for this host)."""
        try:
            entry = share.call(self._to_trash, share, self.instance, label, paths,
                               what="moving a failed copy to the trash")
        except (PyvolError, OSError) as e:
            log.warning("could not move %s to the trash of nfs share %s: %s; the next start "
                        "removes it", ", ".join(map(str, paths)), share.name, e)
            return
        if entry is not None:
            self._empty_later(share, [entry])

    def _empty_later(self, share: Share, entries: list[Path]) -> None:
        t = threading.Thread(target=self._empty, args=(share, entries), daemon=True,
                             name=f"nfs-trash-{share.name}")
        self._deleters.add(t)
        t.start()

    def _empty(self, share: Share, entries: list[Path]) -> None:
        # Popen rather than pyvol.run: teardown must be able to kill a deletion in progress
        proc = None
        try:
            if self._closed:
                return
            proc = subprocess.Popen(
                ["rm", "-rf", "--one-file-system", "--", *map(str, entries)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self._rm_procs.add(proc)
            try:
                _, err = proc.communicate(timeout=self.copy_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                log.warning("emptying the trash of nfs share %s did not finish within %g s "
                            "(PYVOL_NFS_COPY_TIMEOUT); the rest goes at the next start",
                            share.name, self.copy_timeout)
                return
            if proc.returncode != 0 and not self._closed:
                log.warning("emptying the trash of nfs share %s: rm failed: %s; the rest goes "
                            "at the next start", share.name,
                            err.decode(errors="replace").strip()[-500:])
        except Exception:
            log.exception("emptying the trash of nfs share %s failed", share.name)
        finally:
            self._rm_procs.discard(proc)
            self._deleters.discard(threading.current_thread())

    def wait_for_trash(self, timeout: float) -> bool:
        """Wait until no deletion runs (for tests and tools); False if one still does."""
        deadline = time.monotonic() + timeout
        for t in list(self._deleters):
            t.join(max(0.0, deadline - time.monotonic()))
        return not self._deleters

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
                rec = json.loads(p.read_text())  # UnicodeDecodeError is a ValueError
                if isinstance(rec, dict) and rec.get("status") == "ready":
                    out[p.stem] = rec
        return out

    # volumes
    def record(self, name: str) -> dict | None:
        """A ready volume's record: one another host is still creating or already removing
        is not there for Get (as for List)."""
        try:
            rec = self._find(name)[1]
        except NotFound:
            return None
        return rec if rec.get("status") == "ready" else None

    def incarnation(self, name: str) -> str | None:
        rec = self.record(name)
        if rec is None:
            return None
        # records from before the token: their maker and second of birth
        made = rec.get("incarnation") or f"{rec.get('created_by')}/{rec.get('created')}"
        return str(made)[:128]

    def created_here(self, name: str) -> bool:
        try:
            _, rec = self._find(name)
        except NotFound:
            return True  # nothing there: nothing another host could lose
        return rec.get("created_by") == self.instance

    def _new_record(self, share: Share, spec: VolumeSpec) -> dict:
        return {"name": spec.name, "share": share.name, "size": spec.size,
                "options": dict(spec.meta), "created": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "created_by": self.instance,
                "incarnation": secrets.token_hex(8), "status": "creating"}

    def create(self, spec: VolumeSpec) -> None:
        share = self._share(spec.options.get("share"))
        share.call(self._create, share, spec.name, self._new_record(share, spec), None,
                   what=f"creating {spec.name}")

    @staticmethod
    def _create(share: Share, name: str, rec: dict, filled: Path | None) -> None:
        """Claim ``name`` and make its directory: empty, or ``filled`` (a complete copy in
        tmp/) renamed into place, so a volume never shows half its data."""
        meta = share.base / "meta" / f"{name}.json"
        try:
            _write_json(meta, rec, exclusive=True)  # the claim: one host wins a name
        except FileExistsError:
            raise Conflict(f"volume {name} already exists on nfs share {share.name} "
                           "(made by another host)") from None
        target, placed = share.base / "volumes" / name, False
        try:
            if filled is None:
                target.mkdir()
            else:
                os.rename(filled, target)
            placed = True
            _write_json(meta, {**rec, "status": "ready"})
        except BaseException:
            if placed and filled is None:
                with contextlib.suppress(OSError):
                    target.rmdir()
            elif placed:  # back where the caller discards it
                with contextlib.suppress(OSError):
                    os.rename(target, filled)
            meta.unlink(missing_ok=True)
            raise

    def remove(self, name: str) -> None:
        """Quick whatever the volume holds: its trees are renamed into the trash and its
        record deleted under the guard, which frees the name at once; the trash is deleted
        afterwards, in the background."""
        try:
            share, _ = self._find(name)
        except NotFound:
            return
        entry = share.call(self._remove, share, name, self.instance, what=f"removing {name}")
        if entry is not None:
            self._empty_later(share, [entry])

    @staticmethod
    def _remove(share: Share, name: str, instance: str) -> Path | None:
        others = [p for p in (share.base / "leases" / name).glob("*.json")
                  if p.stem != instance]
        if others:
            holders = ", ".join(json.loads(p.read_text()).get("host", p.stem) for p in others)
            raise Conflict(f"volume {name} is mounted on other hosts ({holders}); unmount it "
                           f"there first, or if a host is dead: pyvol claim clear {name} HOST")
        meta = share.base / "meta" / f"{name}.json"
        with contextlib.suppress(FileNotFoundError), _records_locked(share, f"removing {name}"):
            rec = json.loads(meta.read_text())
            _write_json(meta, {**rec, "status": "removing"})  # other hosts stop seeing it
        entry = NfsBackend._to_trash(share, instance, f"volume-{name}", [
            share.base / "volumes" / name, share.base / "snapshots" / name,
            share.base / "leases" / name])
        meta.unlink(missing_ok=True)
        return entry

    def list(self) -> list[str]:
        return sorted(self.records())

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

    def deactivate_many(self, names: Collection[str]) -> None:
        """One listing of each share's records (deactivate() reads each volume's), then this
        host's lease dropped on the share that holds the volume, the first as in _find."""
        left, failures = set(names), {}
        for share in self.shares.values():
            if not left:
                break
            try:
                share.ensure_mounted()
            except ServerUnreachable:
                continue
            try:
                held = left & share.call(self._names, share, what="a volume listing")
            except ServerUnreachable as e:  # as deactivate() of each name left would fail
                failures.update((n, str(e)) for n in left)
                break
            left -= held
            try:
                release_each(self.name, held, lambda name, share=share: share.call(
                    lambda: (share.base / "leases" / name / f"{self.instance}.json").unlink(
                        missing_ok=True), what=f"releasing the mount of {name}"))
            except DeactivateFailed as e:
                failures.update(e.failures)
        if failures:
            raise DeactivateFailed(self.name, failures)

    @staticmethod
    def _names(share: Share) -> set[str]:
        """Every volume the share holds a record of, whatever its status (as _find)."""
        try:
            return {e.name[:-len(".json")] for e in os.scandir(share.base / "meta")
                    if e.name.endswith(".json")}
        except FileNotFoundError:  # a share pyvol has not laid out holds no volume
            return set()

    # claims: a host claims a volume with a file under leases/ (the export's layout keeps
    # that directory's name) while it has the volume active
    def claims(self, name: str) -> list[dict]:
        share, _ = self._find(name)
        return share.call(lambda: list(self._leases(share, name).values()),
                          what=f"reading claims on {name}")

    @staticmethod
    def _leases(share: Share, name: str) -> dict[Path, dict]:
        """The volume's lease files and what they say. Another host wrote them: one that is
        not a JSON object still claims the volume for the instance its name gives; one
        released while this looked is not there."""
        out = {}
        for p in sorted((share.base / "leases" / name).glob("*.json")):
            try:
                doc = json.loads(p.read_text())
            except FileNotFoundError:
                continue
            except ValueError:  # not JSON, or not UTF-8
                doc = None
            ok = isinstance(doc, dict) and isinstance(doc.get("instance"), str)
            out[p] = doc if ok else {"host": p.stem, "instance": p.stem, "since": None}
        return out

    def clear_claim(self, name: str, host: str) -> int:
        """Drop the claims of a dead ``host`` (its hostname or instance id)."""
        share, _ = self._find(name)

        def clear():
            n = 0
            for p, doc in self._leases(share, name).items():
                if host in (doc.get("host"), doc.get("instance")):
                    p.unlink(missing_ok=True)
                    n += 1
            return n
        return share.call(clear, what=f"clearing claims on {name}")

    # snapshots
    def _snapdir(self, share: Share, name: str, snap: str) -> Path:
        return share.base / "snapshots" / name / snap

    def snapshot(self, name: str, snap: str, quiesce: Quiesce = contextlib.nullcontext) -> None:
        # a directory copy takes as long as the data: nothing is frozen around it, so it is
        # consistent per file, not across files (docs/nfs.md)
        share, _ = self._find(name)
        tmp = self._copy(share, share.base / "volumes" / name, f"snapshotting {name}")
        try:
            share.call(self._place, tmp, self._snapdir(share, name, snap),
                       what=f"recording snapshot {name}@{snap}")
        except BaseException:
            self._discard(share, "copy", tmp)
            raise

    @staticmethod
    def _place(tmp: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            raise Conflict(f"{dst.parent.name}@{dst.name} already exists on the nfs share")
        os.rename(tmp, dst)

    def _copy(self, share: Share, src: Path, what: str) -> Path:
        """A complete copy of ``src`` in a new tmp/ directory named for this host, made with
        cp -a (reflinks where the server can; owners, modes, xattrs, links kept). The short
        guard only checks that the server answers; the copy itself is bounded by the copy
        timeout. On any failure the partial copy goes to the trash."""
        tmp = share.base / "tmp" / f"{self.instance}.{secrets.token_hex(6)}"
        share.call(self._copy_ready, share, src, what=f"{what} (a check that it answers)")
        try:
            run(["cp", "-a", "--reflink=auto", "--sparse=always", "--", f"{src}/.", str(tmp)],
                timeout=self.copy_timeout)
            crashpoint("nfs.copied")
        except CommandFailed as e:
            self._discard(share, "copy", tmp)
            raise PyvolError(f"{what} on nfs share {share.name} failed: {e} (a copy may take "
                             f"up to PYVOL_NFS_COPY_TIMEOUT, {self.copy_timeout:g} s)") from None
        except BaseException:
            self._discard(share, "copy", tmp)
            raise
        return tmp

    @staticmethod
    def _copy_ready(share: Share, src: Path) -> None:
        if not src.is_dir():
            raise NotFound(f"{src.parent.name}/{src.name} not found on nfs share {share.name}")
        (share.base / "tmp").mkdir(exist_ok=True)

    def remove_snapshot(self, name: str, snap: str) -> None:
        try:
            share, _ = self._find(name)
        except NotFound:
            return
        entry = share.call(self._to_trash, share, self.instance, f"snapshot-{name}@{snap}",
                           [self._snapdir(share, name, snap)],
                           what=f"removing snapshot {name}@{snap}")
        if entry is not None:
            self._empty_later(share, [entry])

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
        """The copy is made first, outside the short guard; the name is claimed and the
        complete copy renamed into place at the end, in one quick guarded call."""
        share, _ = self._find(name)
        src = self._need_snap(share, name, snap)
        if spec.options.get("share", share.name) != share.name:
            raise InvalidInput(f"from-snapshot makes the volume on the snapshot's share "
                               f"({share.name})")
        tmp = self._copy(share, src, f"copying {name}@{snap}")
        rec = self._new_record(share, VolumeSpec(
            spec.name, spec.size, {**spec.options, "share": share.name}, spec.meta))
        try:
            share.call(self._create, share, spec.name, rec, tmp, what=f"creating {spec.name}")
        except BaseException:
            self._discard(share, "copy", tmp)
            raise

    def grow(self, name: str, size: int) -> None:
        """The size in the volume's record, which every host reads: advisory, as at create
        (no quota on the export enforces it; docs/nfs.md)."""
        share, _ = self._find(name)
        share.call(self._set_size, share, name, size, what=f"resizing {name}")

    @staticmethod
    def _set_size(share: Share, name: str, size: int) -> None:
        """A size in the record that is not a whole number of bytes is overwritten; a larger
        one is kept (never smaller)."""
        def grown(rec: dict) -> dict:
            old = rec.get("size")
            return {**rec, "size": old if type(old) is int and size < old < 1 << 63 else size}

        NfsBackend._update_record(share, name, grown, "resized")

    def set_schedules(self, name: str, schedules: dict[str, dict | None]) -> None:
        def scheduled(rec: dict) -> dict:
            old = rec.get("schedules")
            return {**rec, "schedules": {**(old if isinstance(old, dict) else {}),
                                         **schedules}}

        share, _ = self._find(name)
        share.call(self._update_record, share, name, scheduled, "given its schedules",
                   what=f"writing the schedules of {name}")

    @staticmethod
    def _update_record(share: Share, name: str, change, done: str) -> None:
        """Replace the volume's record with ``change(record)``. The record is another host's,
        so untrusted: refused unless it is an object whose status is 'ready' (one another
        host is creating or removing is not to be written back: a remove writes 'removing',
        moves the trees away and unlinks the record, and a write after that would leave a
        record of a volume that no longer exists), and re-checked, the same file (inode),
        just before it is replaced (a writer without the records lock, an older pyvol, is seen
        there when the attribute cache allows). ``done``: what the caller does, for its
        errors."""
        with _records_locked(share, done):
            meta = share.base / "meta" / f"{name}.json"
            try:
                with open(meta, "rb") as f:
                    seen = os.fstat(f.fileno()).st_ino
                    text = f.read()
            except FileNotFoundError:
                raise NotFound(f"volume {name} not found on nfs share {share.name}") from None
            try:
                rec = json.loads(text)
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                raise Conflict(f"volume {name}'s record on nfs share {share.name} ({meta}) is not "
                               f"a JSON object pyvol can read: not {done}; fix or remove that "
                               "record")
            if rec.get("status") != "ready":
                raise Conflict(f"volume {name}'s record on nfs share {share.name} has status "
                               f"{_said(rec.get('status'))}, not 'ready' (another host is making "
                               f"or removing it): not {done}; retry once it is ready")
            rec = change(rec)
            try:
                same = os.stat(meta).st_ino == seen
            except FileNotFoundError:
                same = False
            if not same:
                raise Conflict(f"volume {name}'s record on nfs share {share.name} changed while "
                               f"it was being {done.split()[0]} (another host removed or changed "
                               f"it): not {done}; retry")
            _write_json(meta, rec)

    def claim_run(self, name: str, what: str, slot: str) -> str:
        """A file per claimed slot, made with O_EXCL (atomic on NFSv3 and v4): the one that
        made it holds the slot. Older slots' files go once a newer one is won; the volume's
        go with its leases when it is removed."""
        share, _ = self._find(name)
        return share.call(self._claim_run, share, name, what, slot, self.instance,
                          what=f"claiming the {what} run of {name}")

    @staticmethod
    def _claim_run(share: Share, name: str, what: str, slot: str, instance: str) -> str:
        runs = share.base / "leases" / name / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        mine = f"{what}@{slot}"
        taken = sorted(p.name for p in runs.iterdir() if p.name.startswith(f"{what}@"))
        if taken and taken[-1] > mine:  # a newer slot is claimed: this run is stale
            return NfsBackend._run_holder(runs / taken[-1])
        try:
            _write_json(runs / mine, {"instance": instance}, exclusive=True)
        except FileExistsError:
            return NfsBackend._run_holder(runs / mine)
        for old in taken:
            if old < mine:
                (runs / old).unlink(missing_ok=True)
        return instance

    @staticmethod
    def _run_holder(path: Path) -> str:
        """Who holds a claimed slot, as another host wrote it (untrusted: quoted short)."""
        try:
            held = json.loads(path.read_text())
        except (OSError, ValueError):
            held = None
        who = held.get("instance") if isinstance(held, dict) else None
        return who if isinstance(who, str) and len(who) <= 64 else "another host"

    def rollback(self, name: str, snap: str) -> None:
        raise InvalidInput(f"cannot roll back {name} to {snap}: {self.no_rollback}")

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
        """What Get shows, so it must stay cheap however many files the volume holds
        (Docker calls Get all the time): the share's free space from one statvfs, never a
        walk of the volume's tree. The size is advisory (docs/nfs.md)."""
        try:
            share, _ = self._find(name)
        except PyvolError as e:
            return {"error": str(e)}
        out = {"share": share.name, "size_enforced": False}
        try:
            st = share.call(os.statvfs, share.mount_dir, what="a space query")
            out["share_free"] = st.f_bavail * st.f_frsize
        except ServerUnreachable as e:
            out["error"] = str(e)
        return out
