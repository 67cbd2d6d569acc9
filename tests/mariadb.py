"""MariaDB on a volume, and a client that knows when each of its rows was committed.

Shared by tests/test_mariadb.py and bench/bench_mariadb.py. The image comes from Debian's
packages (scripts/make-mariadb-image.sh), since no registry is reachable where the tests run.

The client's record is what the guarantees are checked against, so its times must err on the
late side: a row's time is NOW(6) of a SELECT the client sends only after the row's INSERT
(autocommit: its COMMIT) has returned, so the COMMIT returned before that time. A row whose
time is before a snapshot was requested was durable before the request, and must be in it.
"""

import subprocess
import threading
import time
from pathlib import Path

from helpers import DOCKER, Dockerd

HERE = Path(__file__).resolve().parent.parent
SCRIPT = HERE / "scripts" / "make-mariadb-image.sh"
IMAGE = "pyvol-mariadb:bookworm"

SCHEMA = ("CREATE DATABASE IF NOT EXISTS pv; "
          "CREATE TABLE IF NOT EXISTS pv.t (id BIGINT PRIMARY KEY, sum CHAR(64) NOT NULL) "
          "ENGINE=InnoDB")

# One row per transaction, ids 1, 2, 3...: the row's content is a hash of its id, and the
# SELECT after it says when its COMMIT had returned. The loop runs until /tmp/stop-load
# exists; `mariadb` stops at the first failed statement and exits non-zero.
CLIENT = r"""
rm -f /tmp/stop-load
i=1
while [ ! -e /tmp/stop-load ]; do
    printf "INSERT INTO t VALUES (%d, SHA2('row-%d', 256));\nSELECT %d, UNIX_TIMESTAMP(NOW(6));\n" $i $i $i
    i=$((i+1))
done | mariadb --unbuffered --batch --skip-column-names pv
"""


def make_image(docker_sock: Path) -> float:
    """Import the image into the dockerd on ``docker_sock`` (building its tarball the first
    time, a few minutes); return the seconds it took."""
    import os

    started = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), IMAGE], cwd=HERE, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "DOCKER": DOCKER,
                                             "DOCKER_HOST": f"unix://{docker_sock}"})
    if proc.returncode != 0:
        raise RuntimeError(f"make-mariadb-image.sh failed ({proc.returncode}): {proc.stderr}")
    return time.monotonic() - started


class MariaDB:
    """One mariadbd container whose datadir is the volume ``volume`` of ``driver``."""

    def __init__(self, dockerd: Dockerd, name: str, volume: str, driver: str):
        self.dockerd, self.name, self.volume, self.driver = dockerd, name, volume, driver

    def start(self, timeout: float = 180) -> "MariaDB":
        self.dockerd.run("run", "-d", "--name", self.name, "--volume-driver", self.driver,
                         "-v", f"{self.volume}:/var/lib/mysql", IMAGE, timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exec("mariadb", "-e", "SELECT 1", check=False).returncode == 0:
                self.sql(SCHEMA, db="")
                return self
            state = self.dockerd.run("inspect", "-f", "{{.State.Running}}", self.name).stdout
            if state.strip() != "true":
                raise RuntimeError(f"mariadbd in {self.name} exited:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"mariadbd in {self.name} not ready in {timeout}s:\n{self.log()[-4000:]}")

    def exec(self, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.dockerd.run("exec", self.name, *argv, check=check, timeout=timeout)

    def sql(self, query: str, db: str = "pv") -> list[list[str]]:
        out = self.exec("mariadb", "--batch", "--skip-column-names", *([db] if db else []),
                        "-e", query).stdout
        return [line.split("\t") for line in out.splitlines()]

    def log(self) -> str:
        proc = self.dockerd.run("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def errors(self) -> list[str]:
        return [line for line in self.log().splitlines() if "[ERROR]" in line]

    def stop(self) -> None:
        """A clean shutdown, then the container goes (and with it Docker's mount of the volume)."""
        self.dockerd.run("stop", "-t", "60", self.name, timeout=120)
        self.dockerd.run("rm", self.name)

    # what the checks read

    def rows(self) -> dict:
        """count, lowest and highest id, and rows whose content is not the hash of their id."""
        count, low, high, bad = self.sql(
            "SELECT COUNT(*), COALESCE(MIN(id), 0), COALESCE(MAX(id), 0), "
            "COALESCE(SUM(sum <> SHA2(CONCAT('row-', id), 256)), 0) FROM t")[0]
        return {"count": int(count), "min": int(low), "max": int(high), "bad": int(bad)}

    def digest(self, upto: int) -> tuple[int, str]:
        """Count and a checksum of the rows with id <= ``upto``, to compare two databases."""
        count, xor = self.sql("SELECT COUNT(*), BIT_XOR(CRC32(CONCAT(id, ':', sum))) "
                              f"FROM t WHERE id <= {int(upto)}")[0]
        return int(count), xor

    def check_tables(self) -> list[str]:
        """What CHECK TABLE and mariadb-check report other than OK (empty: no corruption)."""
        bad = [" ".join(r) for r in self.sql("CHECK TABLE t EXTENDED")
               if r[2] in ("status", "error") and r[3] != "OK"]
        proc = self.exec("mariadb-check", "--all-databases", "--extended", check=False)
        lines = proc.stdout.splitlines()
        bad += [line for line in lines if not line.rstrip().endswith("OK")]
        if not any(line.split()[:1] == ["pv.t"] for line in lines):
            bad.append(f"mariadb-check did not check pv.t: {proc.stdout!r}")
        if proc.returncode != 0:
            bad.append(f"mariadb-check exited {proc.returncode}: {proc.stderr.strip()}")
        return bad


class InsertLoad:
    """The client: `mariadb` inside the database's container, inserting row after row until
    stopped; ``commits`` is [(id, time its COMMIT had returned by)], in order."""

    def __init__(self, db: MariaDB):
        self.db = db
        self.commits: list[tuple[int, float]] = []
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> "InsertLoad":
        self.proc = subprocess.Popen(
            [DOCKER, "-H", f"unix://{self.db.dockerd.sock}", "exec", self.db.name, "bash", "-c",
             CLIENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            ident, at = line.split("\t")
            self.commits.append((int(ident), float(at)))

    def wait_rows(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.commits) < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the client stopped at {len(self.commits)} rows "
                                     f"(waiting for {n}): {self.proc.stderr.read()}")
            time.sleep(0.05)

    def stop(self) -> tuple[int, str]:
        """Stop after the statements already queued; the client's exit code and stderr."""
        self.db.exec("touch", "/tmp/stop-load")
        try:
            self.proc.wait(timeout=300)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(timeout=30)
        return self.proc.returncode, self.proc.stderr.read()

    def committed_before(self, t: float) -> int:
        """The highest id whose COMMIT had returned before ``t`` (0: none)."""
        return max((i for i, at in self.commits if at < t), default=0)

    def first_after(self, t: float) -> int:
        """The first id recorded as committed after ``t``: the client sent the next INSERT
        only after that, so no later row can be in anything taken before ``t``."""
        return min(i for i, at in self.commits if at > t)

    def rate(self, start: float, end: float) -> float:
        """Rows committed per second between ``start`` and ``end``."""
        return sum(1 for _, at in self.commits if start <= at < end) / (end - start)
