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
