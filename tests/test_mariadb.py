"""MariaDB with its datadir on a pyvol loop volume, under a steady insert load (issue 15).

A snapshot taken while it writes, a backup taken while it writes and restored on a second
host, and the daemon killed with SIGKILL under it: each copy starts a second MariaDB, which
recovers (InnoDB crash recovery) without corruption and holds every row whose COMMIT returned
before the snapshot was requested, ids contiguous; the live one never notices the kill.

The image is made from Debian's packages on the first run (scripts/make-mariadb-image.sh,
about two minutes here) and cached by the script's hash; later runs import it in seconds.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import Daemon, Dockerd, release
from mariadb import InsertLoad, MariaDB, make_image

pytestmark = pytest.mark.docker

VOLUME_OPTS = ("-o", "size=1G", "-o", "fs=xfs")


@pytest.fixture(scope="module")
def mariadb_image(dockerd, report):
    took = make_image(dockerd.sock)
    report(f"mariadb image: ready in {took:.0f} s (a first build from Debian's packages takes "
           "minutes, later runs import the cached tarball)")


def snapshot_request(d: Daemon, volume: str, name: str) -> tuple[float, float]:
    """`pyvol snapshot create`; when it was requested and when it returned (wall clock, as
    the client's commit times are)."""
    requested = time.time()
    d.cli("snapshot", "create", volume, "--name", name)
    return requested, time.time()


def assert_copy_holds(copy: MariaDB, source: MariaDB, load: InsertLoad,
                      requested: float, returned: float, report) -> int:
    """The copy recovered cleanly and holds exactly a prefix of the source's rows: every row
    committed before ``requested``, none sent after ``returned``. Returns its highest id."""
    assert copy.check_tables() == []
    rows = copy.rows()
    must = load.committed_before(requested)
    may = load.first_after(returned)
    assert must > 0, "no row was committed before the copy was requested"
    assert rows["bad"] == 0, rows
    assert rows["min"] == 1 and rows["count"] == rows["max"], f"ids not contiguous: {rows}"
    assert must <= rows["max"] <= may, (
        f"the copy holds rows 1..{rows['max']}; committed before the request: 1..{must}; "
        f"rows after {may} were sent after it returned")
    assert copy.digest(rows["max"]) == source.digest(rows["max"])
    log = copy.log()
    assert "crash recovery" in log, "the copy did not go through InnoDB crash recovery:\n" + log
    assert copy.errors() == []
    report(f"mariadb {copy.name}: rows 1..{rows['max']} of {len(load.commits)}; committed "
           f"before the request: 1..{must}; sent after it returned: from {may + 1}")
    return rows["max"]


def assert_client_clean(load: InsertLoad, db: MariaDB) -> None:
    """Every statement the client sent committed, in order, and the table holds them all."""
    rc, err = load.stop()
    assert (rc, err) == (0, ""), f"the client failed: exit {rc}: {err}"
    ids = [i for i, _ in load.commits]
    assert ids == list(range(1, len(ids) + 1))
    rows = db.rows()
    assert rows == {"count": len(ids), "min": 1, "max": len(ids), "bad": 0}, rows


def test_snapshot_clone_and_daemon_kill_under_inserts(dockerd, plugin, mariadb_image, report):
    """One MariaDB life: a snapshot under load, the daemon killed with SIGKILL and restarted
    under load; then the snapshot's clone starts a second MariaDB."""
    driver = plugin.driver
    dockerd.run("volume", "create", "-d", driver, *VOLUME_OPTS, "db")
    db = MariaDB(dockerd, "db", "db", driver).start()
    load = InsertLoad(db).start()
    load.wait_rows(200)
    requested, returned = snapshot_request(plugin, "db", "s1")
    load.wait_rows(len(load.commits) + 200)

    plugin.kill()
    killed = time.time()
    load.wait_rows(len(load.commits) + 50)  # the database does not notice
    plugin.start()
    restarted = time.time()
    count_at_restart = db.rows()["count"]
    load.wait_rows(len(load.commits) + 200)
    assert db.rows()["count"] > count_at_restart > load.committed_before(killed)
    assert_client_clean(load, db)
    assert sum(1 for _, at in load.commits if at > restarted) >= 200
    assert db.errors() == []

    dockerd.run("volume", "create", "-d", driver, "-o", "from-snapshot=db@s1", "clone")
    clone = MariaDB(dockerd, "clone", "clone", driver).start()
    high = assert_copy_holds(clone, db, load, requested, returned, report)
    assert high < len(load.commits), "the snapshot holds rows committed after it"
    clone.stop()
    db.stop()
    # Docker's mounts were counted across the kill: the last Unmount took the volume away
    inspect = json.loads(plugin.cli("inspect", "db", "--json").stdout)
    assert not inspect.get("mount_ids"), inspect
    mountpoint = str(plugin.root / "mounts" / "db")
    assert not any(line.split()[4] == mountpoint for line in
                   Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.fixture
def second_host(workdir):
    """A second dockerd and pyvol daemon, sharing nothing with the first but the disk."""
    base = Path(tempfile.mkdtemp(prefix="pyvol-docker2-", dir="/tmp"))
    engine = Dockerd(base)
    engine.netns += "b"
    name = f"pyvol-test-{os.getpid()}-b"
    sock = Path("/run/docker/plugins") / f"{name}.sock"
    d = None
    try:
        engine.start()
        d = Daemon(workdir / "root-b", sock).start()
        d.driver = name
        yield engine, d
    finally:
        engine.stop()
        if d is not None:
            d.stop()
        sock.unlink(missing_ok=True)
        release(workdir / "root-b")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_backup_under_inserts_restores_on_a_second_host(dockerd, plugin, mariadb_image,
                                                        second_host, workdir, report):
    """A backup taken while MariaDB writes, restored by another daemon for another dockerd:
    MariaDB there recovers and holds every row committed before the backup was requested."""
    other_docker, other = second_host
    make_image(other_docker.sock)
    repo = f"file://{workdir / 'backups'}"
    plugin.cli("backup", "init", repo)
    dockerd.run("volume", "create", "-d", plugin.driver, *VOLUME_OPTS, "db")
    db = MariaDB(dockerd, "db", "db", plugin.driver).start()
    load = InsertLoad(db).start()
    load.wait_rows(300)
    requested = time.time()
    url = plugin.cli("backup", "create", "db", "--dest", repo).stdout.strip().splitlines()[-1]
    returned = time.time()
    load.wait_rows(len(load.commits) + 200)
    assert_client_clean(load, db)

    restored = subprocess.run([sys.executable, "-m", "pyvol", "--socket", str(other.socket),
                               "restore", url, "db"], capture_output=True, text=True, timeout=600)
    assert restored.returncode == 0, restored.stderr
    copy = MariaDB(other_docker, "db", "db", other.driver).start()
    high = assert_copy_holds(copy, db, load, requested, returned, report)
    assert high < len(load.commits)
    copy.stop()
    db.stop()
