"""Backups as the daemon offers them: the glue between this host's volumes and a repository.

The volumes' side owns volumes and snapshots, and this module reaches it only through the
narrow ``VolumeAccess`` (wired in server.py); the repository owns objects. This module decides
which snapshot a backup reads, which earlier backup it is incremental to, and what the
manifest says.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import datetime, timezone
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from .. import clock
from ..backends import Backend
from ..crashpoint import crashpoint
from ..errors import Conflict, InvalidInput, NotFound, PyvolError
from ..names import check_name, parse_snap_ref
from ..log import event
from ..state import Snapshot, Volume
from .blobs import CorruptObject, read_key_file
from .job import Job
from .leases import DEFAULT_LEASE, Lease, held_until, locked, stamp
from .retention import Policy, keep
from .repo import (OpenedManifest, host_id, manifest_head, new_backup_id, split_backup_url,
                   utcnow)
from .session import RemoteRepository
from .targets import parse_repo_url, s3_environment

log = logging.getLogger(__name__)

AUTO_PREFIX = "backup-"  # snapshots a backup took itself, and may remove once superseded
PENDING = "backup-snapshot:"  # meta key prefix: VOL@SNAP of a backup still running
BASE = "backup-base:"  # meta key prefix: VOL@SNAP kept as the base of REPO's next backup
PARENT_LOOKBACK = 20     # how many recent backups are tried as the incremental parent
GC_BATCH = 32  # chunks a gc deletes between two checks of its lease (seconds on S3, at most)


class VolumeAccess(Protocol):
    """All that backups need of the volumes: find one, snapshot it, read a snapshot, release
    it, and a few notes kept in the state (docs/state.md, meta keys ``backup-*``)."""

    def volume(self, name: str) -> Volume: ...
    def backend(self, v: Volume) -> Backend: ...
    def backend_named(self, name: str, what: str) -> Backend: ...
    def archive(self, backend: Backend) -> str: ...
    def take_snapshot(self, volume: str, snap: str, origin: str) -> None: ...
    def drop_snapshot(self, volume: str, snap: str, wait: float = ...) -> None: ...
    def snapshot(self, volume: str, snap: str) -> Snapshot | None: ...
    def reading(self, volume: str, snap: str) -> AbstractContextManager: ...
    def backup_running(self, volume: str) -> AbstractContextManager: ...
    def no_backup_running(self, volume: str) -> AbstractContextManager: ...
    def instance_id(self) -> str: ...
    def note(self, key: str) -> str | None: ...
    def set_note(self, key: str, value: str) -> None: ...
    def drop_note(self, key: str) -> None: ...
    def notes(self, prefix: str) -> list[str]: ...


@dataclass
class Restore:
    """A backup ready to be written into a new volume (its manifest already read)."""

    service: Backups
    repo: RemoteRepository  # open until ``close``
    manifest: dict  # its head: the whole one stays in the job process (``opened``)
    opened: OpenedManifest

    @property
    def size(self) -> int:
        return int(self.manifest["source"]["size"])

    @property
    def archive(self) -> str:
        """"block": written into a device; "tree": extracted into a directory."""
        return self.manifest["kind"]

    @property
    def url(self) -> str:
        return self.manifest["url"]

    @property
    def fs(self) -> str | None:
        """The filesystem a block backup holds; None for a tree, which goes into any."""
        return self.manifest["source"].get("fs", "ext4") if self.archive == "block" else None

    def fill(self, kind, backend, spec, v, mp, job) -> None:
        """Make the new volume's storage and write this backup into it (the kind knows how)."""
        kind.receive(backend, spec, v, mp, self, job)

    def run(self, target: str, job: Job | None) -> dict:
        """Write into ``target``: a device for a block backup, a directory for a tree."""
        job = job or Job("restore")
        with locked(self.repo, "shared", self.service.lease):
            result = self.service.engine(f"{self.archive}.restore", self.repo,
                                         self.opened, target, job=job)
        event(log, "backup restored", backup=self.manifest["url"], **result)
        return result

    def close(self) -> None:
        self.repo.close()


@dataclass
class EbsRestore:
    """An EBS-snapshot backup, restored by making an EBS volume from it (in this zone)."""

    ebs: object
    region: str
    snapshot_id: str
    description: dict

    @property
    def size(self) -> int:
        return int(self.description["source"]["size"])

    @property
    def fs(self) -> str:
        return self.description["source"]["fs"]

    def fill(self, kind, backend, spec, v, mp, job) -> None:
        if backend.name != "ebs":
            raise InvalidInput(f"an ebs:// backup restores into the ebs backend, not "
                               f"{backend.name} (back up into a pyvol repository to move "
                               "between backends)")
        self.ebs.restore(self.region, self.snapshot_id, spec)

    def close(self) -> None:
        pass


class Backups:
    def __init__(self, access: VolumeAccess, config):
        self.access = access
        self.settings = dict(config.backup_settings)
        self.key_file = self.settings.pop("key_file", None) or None
        try:
            self.threads = int(self.settings.pop("threads", max(4, 2 * (os.cpu_count() or 1))))
            self.lease = float(self.settings.pop("lock_lease", DEFAULT_LEASE))
        except ValueError as e:
            raise PyvolError(f"invalid PYVOL_BACKUP_ setting: {e}; accepted are numbers") from None

    def engine(self, fn: str, repo: RemoteRepository, *args, job: Job):
        """``pyvol.backup.<fn>(repo, *args, job, threads)``, run in the repository's job
        process (backup/engine.py): the data's work never holds the interpreter lock that
        Docker's requests wait on in this worker."""
        return repo.run(fn, args, job, self.threads)

    def _repo(self, url, how: str = "open", wait: bool = True) -> RemoteRepository:
        """The repository at ``url``, opened in a job process of its own: close it.
        ``wait=False``: still opening (RemoteRepository says when that is worth it)."""
        return RemoteRepository(url, how, self.key_file, self.settings, wait=wait)

    @staticmethod
    def _head(repo: RemoteRepository, volkey: str, bid: str) -> dict:
        """One backup's manifest without its chunk map (``repo.manifest_heads``)."""
        (_vk, _bid, head, error), = repo.manifest_heads([(volkey, bid)])
        if error is not None:
            raise error
        return head

    def _manifest(self, backup_url) -> tuple[RemoteRepository, dict, OpenedManifest]:
        """The repository a backup URL names, open (the caller closes it), the head of the
        backup's manifest, and the whole of it as the job process holds it for a job."""
        repo_url, volkey, bid = split_backup_url(backup_url)
        repo = self._repo(repo_url)
        try:
            return repo, repo.open_manifest(volkey, bid), OpenedManifest(volkey, bid)
        except BaseException:
            repo.close()
            raise

    # backup
    def create(self, ref, dest, job: Job | None = None, bid: str | None = None,
               schedule_of: str | None = None, lock_wait: float = 0.0) -> dict:
        """Back up ``VOLUME`` (from a new snapshot) or ``VOLUME@SNAPSHOT`` into ``dest``;
        ``bid``, the backup's id chosen by the caller (a schedule records it before the work,
        so that a backup whose daemon died after its manifest is still found as its own).
        ``schedule_of``: a shared volume's schedule marks its backup with the volume's
        incarnation, so that the schedule's retention on any host judges it, and no other.
        ``lock_wait``: how long to wait out a backup removal or gc that holds the repository
        (a person's call is refused at once; a schedule's run would otherwise wait a period)."""
        job = job or Job("backup")
        if not isinstance(ref, str):
            raise InvalidInput("invalid volume: accepted is VOLUME or VOLUME@SNAPSHOT")
        vol, snap = parse_snap_ref(ref) if "@" in ref else (check_name(ref), None)
        m = self.access
        v = m.volume(vol)
        backend = m.backend(v)
        bid = bid or new_backup_id()
        if isinstance(dest, str) and dest.startswith("ebs://"):
            return self._ebs_backup(v, backend, snap, dest, bid, schedule_of)
        parse_repo_url(dest)  # refused here, a URL costs no job process and no snapshot
        # An instant snapshot (loop, devicemapper) is taken while the job process starts and
        # opens the repository, and a repository that then cannot be used or is locked costs
        # it, dropped again. One that costs (a copy, a cloud snapshot) waits for the lock.
        instant = backend.instant_snapshots
        with self._repo(dest, "create", wait=not instant) as repo, \
                contextlib.ExitStack() as held:
            if not instant:
                lease = held.enter_context(self._leased(repo, lock_wait, job))
            auto = snap is None
            if auto:
                snap = AUTO_PREFIX + bid
                self._note_own(held, vol, snap, bid)
                try:
                    m.take_snapshot(vol, snap, origin="backup")
                except BaseException:
                    m.drop_note(f"{PENDING}{vol}@{snap}")
                    raise
                crashpoint("backup.snapshot")
            keep_note = False
            try:
                if instant:
                    repo.opened()
                    lease = held.enter_context(self._leased(repo, lock_wait, job))
                with m.reading(vol, snap):
                    url, manifest = self._written(repo, lease, v, backend, snap, bid, job,
                                                  schedule_of)
            except BaseException:
                # a snapshot that stays keeps its note, for recover() at the next start
                keep_note = auto
                if auto:
                    keep_note = not self._drop_own_snapshot(vol, snap, "of a failed backup")
                raise
            finally:
                if auto and not keep_note:
                    m.drop_note(f"{PENDING}{vol}@{snap}")
        event(log, "backup created", volume=vol, snapshot=snap, backup=url,
              incremental=manifest["incremental"], **manifest["stats"])
        if auto and manifest["kind"] == "tree":
            # a tree backup is never a base for the next: its snapshot is not kept
            self._drop_own_snapshot(vol, snap, "of a tree backup")
        elif auto:
            m.set_note(f"{BASE}{vol}@{snap}", repo.url)
        self._drop_superseded(vol, snap, repo.url, manifest.get("parent_snapshot"))
        manifest["url"] = url
        return manifest_head(manifest)

    @contextlib.contextmanager
    def _leased(self, repo: RemoteRepository, lock_wait: float, job: Job):
        """The repository's shared lock for a backup (a schedule's wait ends with its
        runner's stop: the job is cancelled); its loss stops the engine at its next step."""
        with locked(repo, "shared", self.lease, wait=lock_wait, check=job.check) as lease:
            lease.on_lost(job.cancel)
            yield lease

    def _written(self, repo: RemoteRepository, lease: Lease, v: Volume, backend: Backend,
                 snap: str, bid: str, job: Job, schedule_of: str | None) -> tuple[str, dict]:
        """The backup of snapshot ``snap`` written and its manifest stored, under ``lease``:
        its URL and manifest. Nothing is visible until the manifest is."""
        try:
            manifest = self._backup(repo, v, backend, snap, bid, job)
            if schedule_of is not None:
                manifest["schedule_of"] = schedule_of
            job.check()  # a client that went away gets no backup at all
        except PyvolError as e:
            if lease.lost is not None:  # the cause, not "the client went away"
                raise lease.lost_error() from e
            raise
        lease.check()  # renews first if this process was held up for long
        # chunks skipped as "already stored" were listed when the backup began: anything
        # that deleted one since (whatever honoured no lock) shows here
        missing = repo.missing_chunks(manifest["chunks"])
        if missing:
            raise PyvolError(
                f"backup of {v.name} not written: {len(missing)} chunks it reuses were "
                f"deleted from {repo.url} while it ran (first: {missing[0]}); retry: the "
                "rerun uploads them again")
        # between two renewals: if the lock was broken meanwhile (this process stalled past
        # its lease and a gc ran), the manifest is taken back
        volkey = repo.volume_key(v.name)
        url = lease.guarded(lambda: repo.put_manifest(manifest),
                            undo=lambda: repo.delete_manifest(volkey, bid))
        crashpoint("backup.manifest")
        return url, manifest

    def _note_own(self, held: contextlib.ExitStack, vol: str, snap: str, bid: str) -> None:
        """Note that ``vol@snap``, not taken yet, is this backup's own, before it exists, and
        hold ``backup_running(vol)`` until the note is dropped (or kept: the caller's
        ``held`` ends after that). If this process dies before the backup ends, the
        snapshot goes, however far it got: within seconds if the daemon stays up
        (abandoned.py), else at its next start (``recover``)."""
        held.enter_context(self.access.backup_running(vol))
        self.access.set_note(f"{PENDING}{vol}@{snap}", bid)

    def recover(self) -> None:
        """At start: a backup the daemon died in wrote no manifest (or one whose snapshot is
        no base any more); the snapshot it took for itself goes."""
        for volume in sorted(self.unended()):
            try:
                self.end_unended(volume)
            except Exception:
                log.exception("could not remove the snapshots of interrupted backups of "
                              "volume %s", volume)

    def unended(self) -> set[str]:
        """The volumes with a note of a backup's own snapshot: a running backup's, or one
        whose process died or that could not drop its snapshot."""
        return {key[len(PENDING):].partition("@")[0] for key in self.access.notes(PENDING)}

    def end_unended(self, volume: str) -> bool:
        """Remove the snapshots that backups of ``volume`` took for themselves and did not
        end with, unless a live process runs such a backup of it: False then. Nothing here
        waits for a lock (a new backup of the volume waits for this): a busy volume is a
        Conflict. Raises the first error a removal raised, after trying each; the notes of
        those not removed stay."""
        m = self.access
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(m.no_backup_running(volume))
            except Conflict:
                return False
            prefix, failed = f"{PENDING}{volume}@", None
            for key in m.notes(prefix):
                snap = key[len(prefix):]
                s = m.snapshot(volume, snap)
                try:
                    if s is not None and s.origin == "backup":  # never a user's of that name
                        event(log, "removing the snapshot of a backup that did not end",
                              volume=volume, snapshot=snap)
                        m.drop_snapshot(volume, snap, wait=0)
                    m.drop_note(key)
                except Exception as e:  # noqa: BLE001 - raised after the others are tried
                    failed = failed or e
            if failed is not None:
                raise failed
        return True

    def _drop_own_snapshot(self, vol: str, snap: str, why: str) -> bool:
        """Remove a snapshot pyvol took itself (never a user's); False if it stays."""
        s = self.access.snapshot(vol, snap)
        if s is None:
            return True
        if s.origin != "backup":
            return False
        try:
            self.access.drop_snapshot(vol, snap)
            return True
        except PyvolError as e:  # being read by another backup, say: it goes next time
            log.info("kept snapshot %s@%s %s: %s", vol, snap, why, e)
            return False

    def _drop_superseded(self, vol: str, snap: str, repo_url: str, parent: str | None) -> None:
        """The new backup's snapshot is the base of this repository's next backup: every
        earlier base for the same repository (and the parent read this time) can go."""
        m = self.access
        prefix = f"{BASE}{vol}@"
        olds = {k[len(prefix):] for k in m.notes(prefix) if m.note(k) == repo_url}
        if parent:
            olds.add(parent)
        for old in sorted(olds - {snap}):
            if self._drop_own_snapshot(vol, old, "superseded by a newer backup"):
                m.drop_note(f"{prefix}{old}")

    # EBS snapshots as backups (ebs://REGION): the ebs backend's own kind of backup
    def _ebs(self, what: str):
        from ..backends.ebs import EbsBackups

        return EbsBackups(self.access.backend_named("ebs", what))

    def _ebs_backup(self, v, backend, snap: str | None, dest: str, bid: str,
                    schedule_of: str | None) -> dict:
        """The copy carries ``bid`` in a tag, as a repository's manifest carries its id: a
        schedule that recorded it before the work finds its backup after a crash, even one
        whose copy was still pending. The snapshot taken for it is noted before it exists,
        as a repository backup's is, so that recover() removes it after a crash."""
        from ..backends.ebs import parse_ebs_url

        region, sid = parse_ebs_url(dest)
        if sid is not None or backend.name != "ebs":
            raise InvalidInput(f"an ebs:// destination takes ebs volumes, as ebs://REGION; "
                               f"volume {v.name} is on {backend.name}")
        m = self.access
        auto = snap is None
        with contextlib.ExitStack() as held:
            if auto:
                snap = AUTO_PREFIX + bid
                self._note_own(held, v.name, snap, bid)
            try:
                if auto:
                    m.take_snapshot(v.name, snap, origin="backup")
                result = self._ebs("an ebs:// backup").create(v.name, snap, region, v.fs,
                                                              v.size, bid, schedule_of)
            finally:
                if auto:  # the backup is an independent copy: the volume's snapshot can go
                    self._drop_own_snapshot(v.name, snap, "of an ebs:// backup")
                    m.drop_note(f"{PENDING}{v.name}@{snap}")
        event(log, "backup created", volume=v.name, backup=result["url"])
        return result

    def _parent(self, repo: RemoteRepository, volume: str, held: contextlib.ExitStack
                ) -> tuple[dict | None, OpenedManifest | None, str]:
        """The latest backup of ``volume`` whose snapshot this daemon still holds: the head
        of its manifest, and the whole of it as the job process holds it for the engine;
        else why there is none. That snapshot is held for reading in ``held``, so that
        nothing removes it while the changed ranges are read against it (a removal
        meanwhile is refused, naming the backup). The manifests are untrusted:
        check_manifest passes over malformed ones."""
        m = self.access
        recent = repo.backup_ids(volume)[-PARENT_LOOKBACK:]
        if not recent:
            return None, None, "first backup of this volume in this repository"
        for volkey, bid in reversed(recent):  # newest first: the first that is ours is it
            try:  # whole, and kept in the job process for the engine; its head comes here
                man = repo.open_manifest(volkey, bid)
            except (NotFound, CorruptObject):
                continue
            src = man.get("source", {})
            if man.get("kind") != "block" or src.get("instance") != m.instance_id():
                continue
            # the manifest is untrusted: its name is used only once it names one of ours
            s = m.snapshot(volume, src.get("snapshot", ""))
            if not _still_its_snapshot(s, src):
                continue
            reading = contextlib.ExitStack()
            try:
                reading.enter_context(m.reading(volume, s.name))
            except Conflict:  # being removed right now
                continue
            if _still_its_snapshot(m.snapshot(volume, s.name), src):
                held.enter_context(reading)
                return man, OpenedManifest(volkey, bid), ""
            reading.close()  # removed, or made again under its name, before the hold
        return None, None, ("the snapshot of the previous backup is gone from this host, so "
                            "every mapped range is read (only new chunks are uploaded)")

    def _backup(self, repo, v, backend, snap: str, bid: str, job: Job) -> dict:
        if self.access.archive(backend) == "tree":
            return self._tree_backup(repo, v, backend, snap, bid, job)
        with contextlib.ExitStack() as parent_held:
            return self._block_backup(repo, v, backend, snap, bid, job, parent_held)

    def _block_backup(self, repo, v, backend, snap: str, bid: str, job: Job,
                      parent_held: contextlib.ExitStack) -> dict:
        m = self.access
        srec = m.snapshot(v.name, snap)
        parent, opened, why_full = self._parent(repo, v.name, parent_held)
        mapped = backend.mapped_ranges(v.name, snap)
        changed = None
        if parent is not None:
            changed = backend.changed_ranges(v.name, parent["source"]["snapshot"], snap)
            if int(parent["chunk_size"]) != repo.chunk_size or \
                    int(parent["source"]["size"]) != srec.size:
                changed, why_full = None, "the volume's size changed since the previous backup"
        if why_full:
            event(log, "full read for backup", volume=v.name, reason=why_full)
        with backend.read_snapshot(v.name, snap) as dev:
            # the result's chunk map stays in the job process too (HeldChunks)
            result = self.engine("block.backup", repo, dev, srec.size, mapped, changed,
                                 opened if changed is not None else None, job=job)
        manifest = {
            "format": 1, "id": bid, "kind": "block", "volume": v.name, "created": utcnow(),
            "host": host_id(),
            "source": {"backend": backend.name, "snapshot": snap, "size": srec.size,
                       "fs": v.fs, "snapshot_created": srec.created_at,
                       "instance": m.instance_id()},
            "parent": parent["id"] if parent and changed is not None else None,
            "incremental": changed is not None,
            "chunk_size": repo.chunk_size,
            "chunks": result.chunks,
            "stats": result.stats,
        }
        if parent is not None:
            manifest["parent_snapshot"] = parent["source"]["snapshot"]
        if why_full:
            manifest["full_reason"] = why_full
        return manifest

    def _tree_backup(self, repo, v, backend, snap: str, bid: str, job: Job) -> dict:
        """A file backend's snapshot, archived; every backup reads it all and uploads only
        the chunks the repository lacks (unchanged files give unchanged chunks)."""
        m = self.access
        srec = m.snapshot(v.name, snap)
        with backend.read_snapshot(v.name, snap) as directory:
            result = self.engine("tree.backup", repo, directory, job=job)
        chunks, stats = result.chunks, result.stats
        return {
            "format": 1, "id": bid, "kind": "tree", "volume": v.name, "created": utcnow(),
            "host": host_id(),
            "source": {"backend": backend.name, "snapshot": snap, "size": srec.size,
                       "stream": stats.pop("stream", 0), "snapshot_created": srec.created_at,
                       "instance": m.instance_id()},
            "parent": None, "incremental": False, "chunk_size": repo.chunk_size,
            "chunks": chunks, "stats": stats,
        }

    # reading
    def list(self, url, volume=None, passing_over_bad: bool = False) -> list[dict]:
        """The backups in ``url`` (of ``volume``). A manifest that cannot be read fails the
        listing, unless ``passing_over_bad`` (a schedule's retention, which must not stop
        for good at one bad manifest another host or a person left)."""
        if volume is not None:
            check_name(volume)
        if isinstance(url, str) and url.startswith("ebs://"):
            from ..backends.ebs import parse_ebs_url

            return self._ebs("listing ebs:// backups").list(parse_ebs_url(url)[0], volume)
        out = []
        with self._repo(url) as repo:
            for vk, bid, head, error in repo.manifest_heads(repo.backup_ids(volume)):
                if error is None:
                    out.append(head)
                elif isinstance(error, CorruptObject | NotFound) and passing_over_bad:
                    log.warning("passed over backup %s/%s: %s", vk, bid, error)
                else:
                    raise error
        return out

    def inspect(self, backup_url) -> dict:
        if isinstance(backup_url, str) and backup_url.startswith("ebs://"):
            return self._ebs("an ebs:// backup").describe(*self._ebs_ref(backup_url))
        repo_url, volkey, bid = split_backup_url(backup_url)
        with self._repo(repo_url) as repo:
            return self._head(repo, volkey, bid)

    @staticmethod
    def _ebs_ref(url: str) -> tuple[str, str]:
        from ..backends.ebs import parse_ebs_url

        region, sid = parse_ebs_url(url)
        if sid is None:
            raise InvalidInput(f"invalid EBS backup URL {url!r}: accepted is ebs://REGION/snap-ID")
        return region, sid

    def prepare_restore(self, backup_url) -> Restore:
        if isinstance(backup_url, str) and backup_url.startswith("ebs://"):
            ebs = self._ebs("an ebs:// restore")
            region, sid = self._ebs_ref(backup_url)
            return EbsRestore(ebs, region, sid, ebs.describe(region, sid))
        repo, manifest, opened = self._manifest(backup_url)
        if manifest.get("kind") not in ("block", "tree"):
            repo.close()
            raise InvalidInput(f"backup {backup_url} is of kind {manifest.get('kind')!r}; "
                               "this pyvol restores block and tree backups")
        return Restore(self, repo, manifest, opened)

    def verify(self, backup_url, job: Job | None = None) -> dict:
        job = job or Job("verify")
        repo, manifest, opened = self._manifest(backup_url)
        with repo, locked(repo, "shared", self.lease):
            result = self.engine("block.verify", repo, opened, job=job)
        result["backup"] = manifest["url"]
        if result["bad"]:
            raise CorruptObject(f"backup {manifest['url']} failed verification: "
                                f"{len(result['bad'])} of {result['chunks']} chunks are bad: "
                                + "; ".join(result["bad"][:5]))
        return result

    def info(self) -> dict:
        """What backups use here, for ``pyvol info``: the S3 endpoint, region and credential
        provider of this daemon's environment, and its key file (never a key or secret)."""
        out = {"s3": s3_environment(), "key_file": self.key_file}
        if self.key_file:
            try:
                read_key_file(self.key_file)
            except PyvolError as e:
                out["key_file_error"] = str(e)
        return out

    # changing the repository
    def init(self, url) -> dict:
        """Create an empty repository at ``url`` (``pyvol backup init``)."""
        if isinstance(url, str) and url.startswith("ebs://"):
            raise InvalidInput("an ebs:// destination holds EBS snapshots, not a repository: "
                               "there is nothing to initialise; back up into it directly")
        repo = self._repo(url, "init")
        repo.close()  # its config is all that is answered
        event(log, "repository initialised", repo=repo.url, encrypted=repo.encrypted)
        return {"url": repo.url, "id": repo.config["id"], "created": repo.config["created"],
                "encrypted": repo.encrypted, "key_file": self.key_file if repo.encrypted else None}

    def remove(self, backup_url) -> dict:
        if isinstance(backup_url, str) and backup_url.startswith("ebs://"):
            self._ebs("an ebs:// backup").remove(*self._ebs_ref(backup_url))
            event(log, "backup removed", backup=backup_url)
            return {"removed": backup_url}
        repo_url, volkey, bid = split_backup_url(backup_url)
        with self._repo(repo_url) as repo, locked(repo, "exclusive", self.lease) as lease:
            manifest = self._head(repo, volkey, bid)  # NotFound, or unreadable with this key
            crashpoint("backup_rm.locked")
            lease.check()
            repo.delete_manifest(volkey, bid)
        event(log, "backup removed", backup=backup_url)
        self._drop_base_of(manifest, repo.url)
        return {"removed": backup_url}

    def _drop_base_of(self, manifest: dict, repo_url: str) -> None:
        """A removed backup's own snapshot, kept here as the base of the next backup, is a
        base of nothing any more (no manifest names it): it goes, or it holds space forever."""
        src = manifest["source"]
        vol, snap = manifest["volume"], src.get("snapshot")
        m = self.access
        if src.get("instance") != m.instance_id() or not snap:
            return
        key = f"{BASE}{vol}@{snap}"
        if m.note(key) == repo_url and self._drop_own_snapshot(
                vol, snap, "of a removed backup"):
            m.drop_note(key)

    def gc(self, url) -> dict:
        """Delete every chunk no manifest lists (docs/backup-repository.md, "What garbage
        collection may delete"): at once, unless a shared lock was broken by expiry less than
        two leases ago; then the unreferenced chunks are only counted, left for a later gc."""
        with self._repo(url) as repo, locked(repo, "exclusive", self.lease) as lease:
            hold = held_until(repo, self.lease)  # before the manifests: the order matters
            # found, and then deleted, in the job process: the list of what goes is as long
            # as the garbage (262,144 chunks after a 1 TiB volume's backups are forgotten)
            found = repo.unreferenced_chunks()
            deleted = freed = marked = marked_bytes = 0
            if hold is not None:
                marked, marked_bytes = found["unreferenced"], found["unreferenced_bytes"]
            else:
                while deleted < found["unreferenced"]:
                    lease.check()  # a gc that stalled past its lease deletes nothing more
                    # each delete there is made before the lease checked here could be broken
                    until = lease.checked_until()
                    n, size = repo.delete_unreferenced(GC_BATCH, until)
                    if not n and clock.steady() < until:
                        break  # none left (else: checked again, renewed, and on)
                    deleted += n
                    freed += size
        after = stamp(hold) if hold is not None and marked else None
        event(log, "repository garbage collected", repo=repo.url, deleted=deleted, freed=freed,
              marked=marked, delete_after=after)
        return {"backups": found["backups"], "chunks_kept": found["kept"],
                "chunks_deleted": deleted,
                "bytes_freed": freed, "chunks_marked": marked, "bytes_marked": marked_bytes,
                "delete_after": after}

    def forget(self, url, volume=None, options=None, dry_run: bool = False,
               gc: bool = False) -> dict:
        """Remove the backups a retention policy does not keep (backup/retention.py: restic's
        rules), each volume's backups from each host judged apart, as restic judges each
        host and paths apart: two hosts' volumes of one name are different data.

        Only manifests go, one delete each, under the exclusive lock and its lease check, as
        ``remove`` does. A manifest lists every chunk it needs (``parent`` is a note, never
        read by a restore), so removing any backup leaves the others whole, and a forget
        killed halfway leaves a repository of complete backups. Chunks go at a gc (``gc``:
        run one after). A manifest that cannot be read, or whose time cannot, is kept: what
        cannot be judged is not removed.
        """
        policy = Policy.parse(options if options is not None else {})
        if volume is not None:
            check_name(volume)
        if isinstance(url, str) and url.startswith("ebs://"):
            raise InvalidInput("backup forget works on pyvol repositories (s3://, file://); "
                               "ebs:// backups are EBS snapshots, removed one by one with "
                               "`pyvol backup rm`")
        removed: list[dict] = []
        with self._repo(url) as repo:
            if dry_run:  # changes nothing, so like `backup ls` it takes no lock
                groups, unreadable = self._retention_plan(repo, volume, policy)
            else:
                with locked(repo, "exclusive", self.lease) as lease:
                    groups, unreadable = self._retention_plan(repo, volume, policy)
                    for group in groups:
                        for row, manifest in group["_manifests"]:
                            if row["kept"]:
                                continue
                            lease.check()  # stalled past its lease: removes no more
                            repo.delete_manifest(manifest["_volkey"], row["id"])
                            crashpoint("forget.deleting")
                            removed.append(manifest)
                # a snapshot a kept backup also names stays (copied manifests share one)
                named = {(m["volume"], m["source"].get("snapshot")) for g in groups
                         for r, m in g["_manifests"] if r["kept"]}
                for manifest in removed:
                    if (manifest["volume"], manifest["source"].get("snapshot")) not in named:
                        self._drop_base_of(manifest, repo.url)
        for group in groups:
            group.pop("_manifests", None)
        kept = sum(g["kept"] for g in groups) + len(unreadable)
        would = sum(g["removed"] for g in groups)
        event(log, "backups forgotten" if not dry_run else "backups to forget",
              repo=repo.url, policy=str(policy), removed=would, kept=kept)
        result = {"repo": repo.url, "policy": str(policy), "policy_options": policy.as_dict(),
                  "dry_run": bool(dry_run), "kept": kept, "removed": would,
                  "groups": groups, "unreadable": unreadable, "gc": None}
        if gc and not dry_run:
            result["gc"] = self.gc(url)
        return result

    def _retention_plan(self, repo: RemoteRepository, volume: str | None,
                        policy: Policy) -> tuple[list[dict], list[dict]]:
        """Every backup (of ``volume``) read and judged: one group per (volume, host), rows
        newest first with their reasons; and the backups that could not be judged."""
        by_group: dict[tuple[str, str], list[tuple[dict, object]]] = {}
        unreadable = []
        for volkey, bid, manifest, error in repo.manifest_heads(repo.backup_ids(volume)):
            url = repo.backup_url(volkey, bid)
            if isinstance(error, NotFound):
                continue  # removed since the listing
            if error is not None:  # another key, garbage, a format this pyvol cannot read
                unreadable.append({"url": url, "id": bid, "why": f"kept: unreadable: {error}"})
                continue
            created = manifest.get("created")
            try:
                when = clock.parse(created)
            except (TypeError, ValueError):
                unreadable.append({"url": url, "id": bid, "why": (
                    f"kept: its created time {str(created)[:40]!r} is not YYYY-mm-ddTHH:MM:SSZ")})
                continue
            manifest["_volkey"] = volkey
            host = manifest.get("host")
            host = host[:255] if isinstance(host, str) and host else "(no host)"
            by_group.setdefault((manifest["volume"], host), []).append(
                (manifest, datetime.fromtimestamp(when, timezone.utc)))
        groups = []
        for (vol, host), items in sorted(by_group.items()):
            # judged by URL, unique even where a tampered manifest repeats another's id
            manifests = {m["url"]: m for m, _ in items}
            verdicts = keep([(m["url"], when) for m, when in items], policy)
            rows = [{"url": v.id, "id": manifests[v.id]["id"], "volume": vol, "host": host,
                     "created": clock.stamp(v.time), "kept": v.kept, "reasons": v.reasons}
                    for v in verdicts]
            groups.append({"volume": vol, "host": host, "backups": rows,
                           "kept": sum(r["kept"] for r in rows),
                           "removed": sum(not r["kept"] for r in rows),
                           "_manifests": [(r, manifests[r["url"]]) for r in rows]})
        return groups, unreadable


def _still_its_snapshot(s: Snapshot | None, source: dict) -> bool:
    """Whether ``s`` is the snapshot a backup's manifest says it read (the same name made
    again later is another snapshot)."""
    return s is not None and s.status == "ready" and s.created_at == source.get(
        "snapshot_created")
