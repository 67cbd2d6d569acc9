"""The backend contract, as one suite every backend must pass unchanged (Flocker's pattern).

Each test speaks only the ``Backend`` interface; a new backend joins by adding a factory to
FACTORIES. Block volumes are used as raw devices (filesystems are pyvol.fs's job, not the
backend's, and raw writes let "changed ranges" be checked exactly); a file backend's volume is
a directory, and the same bytes go to one file in it (``put``/``get``).
"""

import os

import backend_probes as probe
import pytest
from helpers import read_at, write_at
from pyvol.backends import BACKENDS, BlockBackend, VolumeSpec
from pyvol.backends.devicemapper import DevicemapperBackend
from pyvol.backends.ebs import EbsBackend
from pyvol.backends.loop import LoopBackend
from pyvol.backends.nfs import NfsBackend
from pyvol.errors import InvalidInput, NotFound
from pyvol.fs import device_size
from pyvol.units import parse_size

MiB = 1 << 20

FACTORIES = {
    "loop": lambda root, request: LoopBackend(root, {"pool_size": "4G"}),
    "devicemapper": lambda root, request: DevicemapperBackend(root, {"data_size": "4G"}),
    "nfs": lambda root, request: NfsBackend(
        root, {"shares": f"main=127.0.0.1:{request.getfixturevalue('nfs_export')}"}),
    "ebs": lambda root, request: EbsBackend(root, request.getfixturevalue("ebs_rig").settings(0)),
}
MARKS = {"devicemapper": [pytest.mark.devicemapper], "nfs": [pytest.mark.nfs]}


def sz(backend, n: int) -> int:
    """``n`` bytes, rounded up to what the backend can size (EBS: whole GiB)."""
    return -(-n // backend.size_unit) * backend.size_unit


def put(dev: str, offset: int, data: bytes) -> None:
    write_at(os.path.join(dev, "data") if os.path.isdir(dev) else dev, offset, data)


def get(path: str, offset: int, length: int) -> bytes:
    return read_at(os.path.join(path, "data") if os.path.isdir(path) else path, offset, length)


def _params(names):
    return [pytest.param(n, marks=MARKS.get(n, [])) for n in sorted(names)]


def _factory(request, workdir):
    """A factory of backend instances on one root, as successive daemon runs would make."""
    made = []

    def factory():
        b = FACTORIES[request.param](workdir / "root", request)
        b.setup()
        made.append(b)
        return b

    yield factory
    for b in made:
        probe.quietly_teardown(b)


@pytest.fixture(params=_params(FACTORIES))
def make(request, workdir):
    yield from _factory(request, workdir)


@pytest.fixture
def backend(make):
    return make()


@pytest.fixture(params=_params(n for n in FACTORIES if issubclass(BACKENDS[n], BlockBackend)))
def block_backend(request, workdir):
    """The block extension of the contract (BlockBackend: mapped and changed ranges), run
    against every block backend; a directory backend's volumes refuse range queries
    (plugin/kinds.py; test_nfs)."""
    for b in _factory(request, workdir):
        yield b()


def test_create_list_remove(backend):
    backend.create(VolumeSpec("a", sz(backend, 64 * MiB)))
    backend.create(VolumeSpec("b", sz(backend, 64 * MiB)))
    assert backend.list() == ["a", "b"]
    backend.remove("a")
    assert backend.list() == ["b"]
    backend.remove("a")  # already gone: not an error
    assert backend.list() == ["b"]


def test_size_is_exact(backend):
    backend.create(VolumeSpec("v", sz(backend, 80 * MiB)))
    assert probe.size(backend, "v") == sz(backend, 80 * MiB)
    dev = backend.activate("v")
    if backend.kind == "block":
        assert device_size(dev) == sz(backend, 80 * MiB)
    else:  # a directory: the size is the record (advisory where the server has no quota)
        assert os.path.isdir(dev) and os.listdir(dev) == []


def test_activate_twice_gives_the_same_device(backend):
    backend.create(VolumeSpec("v", sz(backend, 64 * MiB)))
    assert probe.active_device(backend, "v") is None
    first = backend.activate("v")
    assert backend.activate("v") == first
    assert probe.active_device(backend, "v") == first
    backend.deactivate("v")
    backend.deactivate("v")
    assert probe.active_device(backend, "v") is None


def test_deactivate_many_releases_the_named_volumes_and_only_those(make):
    """What start-up does with every volume nothing has mounted: one call releases them all,
    one that an earlier run left active included, and leaves every other volume active."""
    first = make()
    for n in ("left", "idle", "kept"):
        first.create(VolumeSpec(n, sz(first, 64 * MiB)))
    first.activate("left")  # an earlier daemon's, never released (it was killed)
    second = make()
    second.activate("idle")
    kept = second.activate("kept")  # a mounted volume's: start-up never names it
    assert probe.active_device(second, "left") is not None
    second.deactivate_many(["left", "idle", "absent"])
    assert probe.active_device(second, "left") is None
    assert probe.active_device(second, "idle") is None
    assert probe.active_device(second, "kept") == kept
    second.deactivate_many(["left", "idle"])  # idempotent, as deactivate()
    second.deactivate_many([])
    assert probe.active_device(second, "kept") == kept
    assert second.activate("idle") == probe.active_device(second, "idle")  # usable again


def test_snapshot_content_is_frozen_at_snapshot_time(backend):
    backend.create(VolumeSpec("v", sz(backend, 64 * MiB)))
    dev = backend.activate("v")
    put(dev, 0, b"A" * 65536)
    put(dev, 40 * MiB, b"a" * 4096)
    backend.snapshot("v", "s1")
    put(dev, 0, b"B" * 65536)
    put(dev, 40 * MiB, b"b" * 4096)
    assert backend.snapshots("v") == ["s1"]
    with backend.read_snapshot("v", "s1") as path:
        assert get(path, 0, 65536) == b"A" * 65536
        assert get(path, 40 * MiB, 4096) == b"a" * 4096
    assert get(dev, 0, 65536) == b"B" * 65536


def test_clone_from_snapshot_is_independent_and_may_be_larger(backend):
    backend.create(VolumeSpec("v", sz(backend, 64 * MiB)))
    dev = backend.activate("v")
    put(dev, 1 * MiB, b"origin" * 1000)
    backend.snapshot("v", "s")
    backend.clone("v", "s", VolumeSpec("c", sz(backend, 128 * MiB)))
    assert probe.size(backend, "c") == sz(backend, 128 * MiB)
    clone = backend.activate("c")
    assert clone != dev
    assert get(clone, 1 * MiB, 6000) == b"origin" * 1000
    put(clone, 1 * MiB, b"X" * 6000)
    assert get(dev, 1 * MiB, 6000) == b"origin" * 1000
    with backend.read_snapshot("v", "s") as path:
        assert get(path, 1 * MiB, 6000) == b"origin" * 1000


def test_remove_snapshot(backend):
    backend.create(VolumeSpec("v", sz(backend, 64 * MiB)))
    backend.snapshot("v", "s1")
    backend.snapshot("v", "s2")
    backend.remove_snapshot("v", "s1")
    assert backend.snapshots("v") == ["s2"]
    backend.remove_snapshot("v", "s1")  # already gone: not an error


def test_remove_takes_the_snapshots_with_it(backend):
    backend.create(VolumeSpec("v", sz(backend, 64 * MiB)))
    backend.activate("v")
    backend.snapshot("v", "s1")
    backend.remove("v")
    assert backend.list() == []
    assert backend.snapshots("v") == []
    assert probe.active_device(backend, "v") is None
    # the name is free again, and the new volume starts empty
    backend.create(VolumeSpec("v", sz(backend, 64 * MiB)))
    assert backend.snapshots("v") == []


def test_recovery_after_restart_and_reboot(make):
    first = make()
    first.create(VolumeSpec("v", sz(first, 64 * MiB)))
    put(first.activate("v"), 5 * MiB, b"durable" * 100)
    first.snapshot("v", "s")
    probe.teardown(first)  # devices and pool released, as at host shutdown
    second = make()
    assert second.list() == ["v"]
    assert second.snapshots("v") == ["s"]
    assert get(second.activate("v"), 5 * MiB, 700) == b"durable" * 100
    with second.read_snapshot("v", "s") as path:
        assert get(path, 5 * MiB, 700) == b"durable" * 100


def _round_out(ranges, unit):
    blocks = set()
    for off, length in ranges:
        blocks.update(range(off // unit, (off + length + unit - 1) // unit))
    return blocks


def test_changed_ranges_between_snapshots_are_exact(block_backend):
    backend = block_backend
    unit = backend.change_granularity
    backend.create(VolumeSpec("v", sz(backend, 64 * MiB)))
    dev = backend.activate("v")
    first = [(0, 8192), (20 * MiB, 3 * unit)]
    for off, n in first:
        put(dev, off, b"1" * n)
    backend.snapshot("v", "a")
    second = [(4096, 4096), (33 * MiB + unit, unit), (63 * MiB, 2 * unit)]
    for off, n in second:
        put(dev, off, b"2" * n)
    backend.snapshot("v", "b")

    changed = backend.changed_ranges("v", "a", "b")
    assert changed == sorted(changed)
    assert _round_out(changed, unit) == _round_out(second, unit)
    # what a full backup reads: everything that holds data, and only that
    assert _round_out(backend.mapped_ranges("v", "a"), unit) == _round_out(first, unit)
    assert _round_out(backend.mapped_ranges("v", "b"), unit) == _round_out(first + second, unit)
    # no writes between two snapshots: nothing changed
    backend.snapshot("v", "c")
    assert backend.changed_ranges("v", "b", "c") == []


def test_missing_volume_or_snapshot_is_not_found(backend):
    with pytest.raises(NotFound):
        backend.activate("nope")
    with pytest.raises(NotFound):
        backend.snapshot("nope", "s")
    backend.create(VolumeSpec("v", sz(backend, 64 * MiB)))
    with pytest.raises(NotFound):
        backend.clone("v", "nope", VolumeSpec("c", sz(backend, 64 * MiB)))
    if isinstance(backend, BlockBackend):
        backend.snapshot("v", "s")
        with pytest.raises(NotFound):
            backend.mapped_ranges("v", "nope")
        with pytest.raises(NotFound):
            backend.changed_ranges("v", "s", "nope")
        with pytest.raises(NotFound):
            backend.changed_ranges("v", "nope", "s")
    with pytest.raises(NotFound):
        with backend.read_snapshot("v", "nope"):
            pass


# grow and rollback (issue 16, parts 3 and 4)
POOL_LIMITED = {"loop": "5G", "devicemapper": "41G"}  # beyond 4G pool / 10 x 4G over-commit


def _can_roll_back(backend) -> bool:
    return backend.no_rollback is None


def test_grow_keeps_data_and_an_active_volume_shows_the_new_size(backend):
    small = sz(backend, 64 * MiB)
    large = small + sz(backend, 64 * MiB)
    backend.create(VolumeSpec("v", small))
    dev = backend.activate("v")
    put(dev, 1 * MiB, b"kept" * 1024)
    backend.grow("v", large)
    assert probe.size(backend, "v") == large
    assert get(dev, 1 * MiB, 4096) == b"kept" * 1024
    if backend.kind == "block":  # the active device itself, with no re-activation
        assert device_size(dev) == large
        put(dev, small + 1 * MiB, b"new room" * 512)
        assert get(dev, small + 1 * MiB, 4096) == b"new room" * 512
    backend.grow("v", large)  # the same size again: a repeated (interrupted) grow
    backend.deactivate("v")
    dev = backend.activate("v")
    assert probe.size(backend, "v") == large
    if backend.kind == "block":
        assert device_size(dev) == large
    assert get(dev, 1 * MiB, 4096) == b"kept" * 1024


def test_grow_never_shrinks(backend):
    """The lifecycle refuses a shrink (Volumes.resize, for every backend); storage already
    larger than asked (a resize a crash cut short before its record) is left as large, data
    and all: a grow never makes anything smaller."""
    size = 2 * sz(backend, 128 * MiB)
    backend.create(VolumeSpec("v", size))
    dev = backend.activate("v")
    put(dev, size - 1 * MiB, b"tail" * 1024)  # in the last MiB: a shrink would cut it off
    backend.grow("v", size - sz(backend, 64 * MiB))
    assert probe.size(backend, "v") == size
    if backend.kind == "block":
        assert device_size(dev) == size
    assert get(dev, size - 1 * MiB, 4096) == b"tail" * 1024
    backend.deactivate("v")
    with pytest.raises(NotFound):
        backend.grow("nosuch", size)


@pytest.fixture(params=_params(POOL_LIMITED))
def pool_backend(request, workdir):
    for b in _factory(request, workdir):
        yield b()


def test_grow_beyond_what_the_pool_may_hold_is_refused(pool_backend):
    b = pool_backend
    b.create(VolumeSpec("v", 64 * MiB))
    with pytest.raises(InvalidInput, match="loop pool|over-commit"):
        b.grow("v", parse_size(POOL_LIMITED[b.name]))
    assert probe.size(b, "v") == 64 * MiB


def test_rollback_gives_the_snapshots_data_in_place_or_is_refused_saying_why(backend):
    size = sz(backend, 64 * MiB)
    backend.create(VolumeSpec("v", size))
    dev = backend.activate("v")
    put(dev, 0, b"A" * 65536)
    backend.snapshot("v", "s1")
    put(dev, 0, b"B" * 65536)
    put(dev, 8 * MiB, b"b" * 4096)
    backend.deactivate("v")
    if not _can_roll_back(backend):
        with pytest.raises(InvalidInput, match="from-snapshot=VOLUME@SNAPSHOT"):
            backend.rollback("v", "s1")
        assert get(backend.activate("v"), 0, 65536) == b"B" * 65536  # untouched
        return
    backend.rollback("v", "s1")
    assert probe.size(backend, "v") == size
    assert backend.snapshots("v") == ["s1"]
    dev = backend.activate("v")
    assert get(dev, 0, 65536) == b"A" * 65536
    assert get(dev, 8 * MiB, 4096) == bytes(4096)  # written after the snapshot: gone
    put(dev, 0, b"C" * 65536)  # the volume and the snapshot are independent again
    with backend.read_snapshot("v", "s1") as path:
        assert get(path, 0, 65536) == b"A" * 65536
    with pytest.raises(NotFound):
        backend.rollback("v", "nosuch")


@pytest.fixture(params=_params(n for n in FACTORIES if BACKENDS[n].no_rollback is None))
def rollback_backend(request, workdir):
    for b in _factory(request, workdir):
        yield b()


def test_rollback_copies_no_data(rollback_backend):
    """Constant time, asserted on what the backend did: the pool's used space does not grow
    by the snapshot's data (a copy would add all of it)."""
    b = rollback_backend
    b.create(VolumeSpec("v", 256 * MiB))
    dev = b.activate("v")
    put(dev, 0, os.urandom(48 * MiB))
    b.snapshot("v", "s1")
    put(dev, 0, os.urandom(48 * MiB))
    b.deactivate("v")
    used = b.usage()["pool_used"]
    b.rollback("v", "s1")
    assert b.usage()["pool_used"] < used + 8 * MiB


def test_rollback_of_a_volume_grown_since_keeps_its_size(rollback_backend):
    b = rollback_backend
    b.create(VolumeSpec("v", 64 * MiB))
    put(b.activate("v"), 0, b"A" * 4096)
    b.snapshot("v", "s1")
    b.grow("v", 128 * MiB)
    b.deactivate("v")
    b.rollback("v", "s1")
    dev = b.activate("v")
    assert probe.size(b, "v") == 128 * MiB and device_size(dev) == 128 * MiB
    assert get(dev, 0, 4096) == b"A" * 4096
