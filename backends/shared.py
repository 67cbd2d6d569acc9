"""The extension of the backend contract for shared storage (scope global: nfs, ebs).

Every host sees the same volumes, so such a backend owes the product more than the base
contract: the storage's own records (so every host answers Get and List alike, and a host
adopts what another made), the claims hosts hold on a volume (a host that has it mounted
claims it; removal is refused while another host does), a way to drop the claim of a dead
host, and whether a name's storage was made here (so an interrupted create never removes
another host's volume). tests/test_conformance_shared.py is this extension's suite, run
against every shared backend with two hosts on one storage.

"Claim" is a host's hold on a shared volume; a repository's "lock" is another thing
(plugin/backup/leases.py).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import ClassVar

from pyvol.errors import Conflict, NotFound

from .base import Backend


class HeldElsewhere(Conflict):
    """Mount refused because other hosts hold a volume that only one host may hold at a time
    (an EBS volume attaches to one instance). Its own type, so that Mount can tell it from
    every other refusal and wait for ``holders`` (their instance ids) to let go: Swarm may
    start a moved task before the old one has unmounted."""

    def __init__(self, message: str, holders: list[str]):
        super().__init__(message)
        self.holders = list(holders)


class SharedBackend(Backend):
    scope: ClassVar[str] = "global"
    # how long a Mount waits for the holders of a HeldElsewhere to release the volume, and
    # how often it looks; 0: refuse at once (a backend that never raises it needs none)
    release_wait: float = 0.0
    release_poll: float = 1.0
    # what a Mount keeps of Docker's time after the wait, for the attach and the mount
    # that follow it: a wait to the deadline would leave a Mount that must be undone
    release_margin: float = 8.0

    @abstractmethod
    def records(self) -> dict[str, dict]:
        """Every ready volume the shared storage holds, with its record: ``size``,
        ``options``, ``created`` (and ``created_by``, the host that made it)."""

    @abstractmethod
    def record(self, name: str) -> dict | None:
        """One ready volume's record, or None."""

    @abstractmethod
    def set_schedules(self, name: str, schedules: dict[str, dict | None]) -> None:
        """Write the volume's schedules into its record, by kind ("snapshot", "backup"): a
        spec ``{"every": SECONDS, "keep": POLICY, "target": URL or None, "cron": EXPR or
        None}``, or None for one
        removed. Kinds not given are left as they are. Every host reads them back from
        ``record()``/``records()`` as ``"schedules"``, with only the kinds ever written: a
        host runs a shared volume's schedule wherever it was set (docs/schedules.md)."""

    def check_schedules(self, schedules: dict[str, dict | None]) -> None:
        """Refuse (InvalidInput) schedules a record cannot hold, before anything is made for
        them: a create is checked before its volume exists. Every record holds any, unless
        the backend says otherwise."""

    @abstractmethod
    def claim_run(self, name: str, what: str, slot: str) -> str:
        """Claim the run of ``name``'s ``what`` schedule at ``slot`` (an RFC 3339 stamp) for
        this host; the instance that holds the claim (this one if it won). Of hosts that
        claim one slot, one wins and every one is told which; a slot older than one already
        claimed is the holder's of that newer one (a stale run is nobody's to start)."""

    @abstractmethod
    def incarnation(self, name: str) -> str | None:
        """What tells the volume now named ``name`` from any earlier or later one of that
        name, the same string on every host (None if there is none): a schedule marks its
        backups with it, and judges by it the backups that other hosts' runs made."""

    @abstractmethod
    def created_here(self, name: str) -> bool:
        """Whether this host made the storage now named ``name`` (True if there is none)."""

    @abstractmethod
    def claims(self, name: str) -> list[dict]:
        """The hosts that hold the volume (have it active): ``host`` (for people),
        ``instance`` (this backend's id of the host), ``since``."""

    @abstractmethod
    def clear_claim(self, name: str, host: str) -> int:
        """Drop the claims of a dead ``host`` (its name or instance id); how many went."""

    def removal_blockers(self, name: str) -> list[str]:
        """Other hosts that hold the volume: while any does, removal is refused."""
        return [f"{c.get('host')} ({c.get('instance')})" for c in self.claims(name)
                if c.get("instance") != self.instance]

    def wait_released(self, name: str, holders: list[str], until: float) -> bool:
        """Wait until none of ``holders`` claims the volume, or time.monotonic() reaches
        ``until``; whether they let go. It looks at the claims every ``release_poll`` s:
        another host's release is seen only in the shared storage's records, which offer
        nothing to wait on (EC2 has no notification a host can block on)."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self.release_poll, left))
            try:
                claims = self.claims(name)
            except NotFound:  # removed meanwhile: the Mount's next look says so
                return True
            if not set(holders) & {c.get("instance") for c in claims}:
                return True

    @property
    @abstractmethod
    def instance(self) -> str:
        """This host's id on the shared storage, as its claims name it."""
