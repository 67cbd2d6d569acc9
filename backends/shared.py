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

from abc import abstractmethod
from typing import ClassVar

from .base import Backend


class SharedBackend(Backend):
    scope: ClassVar[str] = "global"

    @abstractmethod
    def records(self) -> dict[str, dict]:
        """Every ready volume the shared storage holds, with its record: ``size``,
        ``options``, ``created`` (and ``created_by``, the host that made it)."""

    @abstractmethod
    def record(self, name: str) -> dict | None:
        """One ready volume's record, or None."""

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

    @property
    @abstractmethod
    def instance(self) -> str:
        """This host's id on the shared storage, as its claims name it."""
