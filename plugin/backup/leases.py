"""Repository locks: objects under locks/ with a lease, so a dead holder never blocks for good.

Backups take shared locks (many at once, from any host); deleting a backup and gc take an
exclusive one. Taking a lock writes it first with a conditional put and then looks at the
others, so two takers that race both see each other and back off (docs/backup-repository.md,
"Locks"). A live holder renews its lease from a background thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import threading
import time
from datetime import datetime, timezone

from ..errors import Conflict, NotFound, PyvolError
from ..log import event
from .repo import LOCK_CAP, Repository, host_id

log = logging.getLogger(__name__)

DEFAULT_LEASE = 300.0


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


class Lease:
    def __init__(self, repo: Repository, kind: str, lease: float = DEFAULT_LEASE):
        assert kind in ("shared", "exclusive")
        self.repo, self.kind, self.lease = repo, kind, lease
        self.key = f"locks/{secrets.token_hex(16)}"
        self.created = time.time()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        doc = {"kind": self.kind, "host": host_id(), "pid": os.getpid(),
               "created": _ts(self.created), "expires": _ts(time.time() + self.lease)}
        return self.repo.codec.seal(self.key, json.dumps(doc).encode())

    def _others(self) -> list[dict]:
        """Live locks other than ours; dead ones are deleted on the way."""
        live = []
        for key, _ in self.repo.target.list("locks/"):
            if key == self.key:
                continue
            try:
                doc = json.loads(self.repo.read_object(key, LOCK_CAP))
                expired = _parse(doc["expires"]) < time.time()
            except NotFound:
                continue
            except (PyvolError, ValueError, KeyError):
                continue  # unreadable: not ours to judge; it expires or an admin removes it
            if expired:
                event(log, "removing expired repository lock", repo=self.repo.url, lock=key,
                      host=doc.get("host"))
                self.repo.target.delete(key)
                continue
            live.append(doc)
        return live

    def acquire(self, wait: float = 0.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            if not self.repo.target.put_if_absent(self.key, self._body()):
                raise PyvolError(f"lock id collision at {self.key}")  # 128 random bits
            blockers = [d for d in self._others()
                        if self.kind == "exclusive" or d.get("kind") == "exclusive"]
            if not blockers:
                break
            self.repo.target.delete(self.key)
            if time.monotonic() >= deadline:
                b = blockers[0]
                raise Conflict(
                    f"repository {self.repo.url} is locked ({b.get('kind')} lock held by host "
                    f"{b.get('host')} pid {b.get('pid')} since {b.get('created')}, lease until "
                    f"{b.get('expires')}); "
                    + ("a backup is running; retry when it ends" if self.kind == "exclusive"
                       else "a backup delete or gc is running; retry when it ends"))
            time.sleep(random.uniform(0.2, 1.0))
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="lease-renewer")
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self.repo.target.put(self.key, self._body())
            except PyvolError as e:
                log.warning("could not renew repository lock %s: %s", self.key, e)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        try:
            self.repo.target.delete(self.key)
        except PyvolError as e:
            log.warning("could not delete repository lock %s (it expires by itself): %s",
                        self.key, e)


@contextlib.contextmanager
def locked(repo: Repository, kind: str, lease: float = DEFAULT_LEASE, wait: float = 0.0):
    lock = Lease(repo, kind, lease)
    lock.acquire(wait)
    try:
        yield lock
    finally:
        lock.release()
