"""The shared-backend extension (backends/shared.py), as one suite every shared backend must
pass unchanged: two hosts on one storage, each a backend instance with its own root.

Each test speaks only the ``SharedBackend`` interface; a new shared backend joins by adding a
factory to FACTORIES (nfs runs in the qemu lane, ebs on moto's EC2 with tests/ebsfake.py).
"""

import backend_probes as probe
import pytest
from pyvol.backends import VolumeSpec
from pyvol.backends.ebs import EbsBackend
from pyvol.backends.nfs import NfsBackend
from pyvol.backends.shared import SharedBackend
from pyvol.errors import Conflict

GiB = 1 << 30

FACTORIES = {
    "nfs": lambda root, host, request: NfsBackend(
        root, {"shares": f"main=127.0.0.1:{request.getfixturevalue('nfs_export')}"}),
    "ebs": lambda root, host, request: EbsBackend(
        root, request.getfixturevalue("ebs_rig").settings(host)),
}
MARKS = {"nfs": [pytest.mark.nfs]}


@pytest.fixture(params=[pytest.param(n, marks=MARKS.get(n, [])) for n in sorted(FACTORIES)])
def hosts(request, workdir):
    """Host a and host b: two instances of one backend, on one shared storage."""
    made = []
    for i in (0, 1):
        b = FACTORIES[request.param](workdir / f"host{i}", i, request)
        b.setup()
        made.append(b)
    yield made
    for b in made:
        probe.quietly_teardown(b)


def spec(name: str) -> VolumeSpec:
    return VolumeSpec(name, GiB, {}, {"fs": "ext4"})


def test_it_is_a_shared_backend(hosts):
    a, b = hosts
    assert isinstance(a, SharedBackend) and a.scope == "global"
    assert a.instance and a.instance != b.instance


def test_a_volume_made_on_one_host_is_recorded_for_every_host(hosts):
    a, b = hosts
    a.create(spec("v"))
    rec = b.record("v")
    assert rec is not None and rec["size"] == GiB
    assert "v" in b.records() and b.list() == ["v"]
    assert b.record("nothing") is None


def test_only_the_host_that_made_a_volume_says_so(hosts):
    a, b = hosts
    a.create(spec("mine"))
    assert a.created_here("mine") is True
    assert b.created_here("mine") is False
    assert b.created_here("absent") is True  # nothing there: nothing another host could lose


def test_the_same_name_on_two_hosts_is_one_volume(hosts):
    a, b = hosts
    a.create(spec("one"))
    with pytest.raises(Conflict):
        b.create(spec("one"))
    assert b.list() == ["one"] and b.created_here("one") is False


def test_an_active_volume_is_claimed_and_blocks_removal_elsewhere(hosts):
    a, b = hosts
    a.create(spec("held"))
    assert a.claims("held") == []
    a.activate("held")
    [claim] = b.claims("held")
    assert claim["instance"] == a.instance and claim["since"].endswith("Z")
    blockers = b.removal_blockers("held")
    assert blockers and a.instance in blockers[0]
    assert a.removal_blockers("held") == []  # its own claim never blocks a host
    with pytest.raises(Conflict):
        b.remove("held")
    assert b.record("held") is not None
    a.deactivate("held")
    assert b.claims("held") == [] and b.removal_blockers("held") == []
    b.remove("held")
    assert a.record("held") is None and a.list() == []


def test_a_dead_hosts_claim_is_cleared_by_another(hosts):
    a, b = hosts
    a.create(spec("orphan"))
    a.activate("orphan")  # and host a dies with it active
    assert b.clear_claim("orphan", "no-such-host") == 0
    assert b.clear_claim("orphan", a.instance) == 1
    assert b.claims("orphan") == []
    b.remove("orphan")
    assert b.record("orphan") is None


def test_schedules_written_on_one_host_are_read_on_every_host(hosts):
    a, b = hosts
    a.create(spec("sched"))
    a.create(spec("plain"))
    assert "schedules" not in b.record("sched")  # never written: none to read
    snap = {"every": 3600, "keep": {"last": 24}, "target": None}
    backup = {"every": 86400, "keep": {"daily": 7, "weekly": 4}, "target": "s3://bucket/db"}
    a.set_schedules("sched", {"snapshot": snap, "backup": backup})
    assert b.record("sched")["schedules"] == {"snapshot": snap, "backup": backup}
    assert b.records()["sched"]["schedules"] == {"snapshot": snap, "backup": backup}
    b.set_schedules("sched", {"backup": None})  # removed on b; the snapshot one stays
    assert a.record("sched")["schedules"] == {"snapshot": snap, "backup": None}
    assert "schedules" not in a.records()["plain"]
    assert a.record("sched")["size"] == GiB  # the rest of the record is unchanged


def test_a_volumes_incarnation_is_the_same_on_every_host_and_new_when_made_again(hosts):
    """What marks a schedule's backups as this volume's: every host reads the same one, and
    a volume removed and made again under its name has another."""
    a, b = hosts
    assert a.incarnation("again") is None
    a.create(spec("again"))
    first = a.incarnation("again")
    assert isinstance(first, str) and first and b.incarnation("again") == first
    b.remove("again")
    assert a.incarnation("again") is None
    b.create(spec("again"))
    assert a.incarnation("again") == b.incarnation("again") != first


def test_one_host_wins_a_runs_claim_and_every_host_is_told_which(hosts):
    import threading

    a, b = hosts
    a.create(spec("claimed"))
    assert a.claim_run("claimed", "snapshot", "2026-11-27T10:00:00Z") == a.instance
    assert b.claim_run("claimed", "snapshot", "2026-11-27T10:00:00Z") == a.instance
    # each kind and slot is claimed on its own
    assert b.claim_run("claimed", "backup", "2026-11-27T10:00:00Z") == b.instance
    assert b.claim_run("claimed", "snapshot", "2026-11-27T11:00:00Z") == b.instance
    # a slot older than one claimed is stale: nobody's to start, and not the latecomer's
    assert a.claim_run("claimed", "snapshot", "2026-11-27T10:30:00Z") == b.instance
    won = {}

    def claim(host, key):
        won[key] = host.claim_run("claimed", "snapshot", "2026-11-27T12:00:00Z")

    threads = [threading.Thread(target=claim, args=(h, i)) for i, h in enumerate(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won[0] == won[1] and won[0] in (a.instance, b.instance)
