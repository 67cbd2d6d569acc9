"""MariaDB's insert rate with its datadir on a pyvol loop volume, against Docker's local driver
on the same disk, in the same run (issue 15).

    sudo .venv/bin/python bench/bench_mariadb.py [--seconds 30] [--rounds 3] [--snapshot-every 10]

One client (`mariadb` in the database's container) inserts one row per transaction,
autocommit, each COMMIT flushed to the redo log (innodb_flush_log_at_trx_commit=1), for a fixed
number of seconds on a fresh database each time: on a volume of Docker's local driver, on a
pyvol loop volume (xfs), and on a pyvol loop volume with `pyvol snapshot create` every N
seconds while it writes. Rounds alternate the order. Printed: rows/s for each (median over the
rounds), the ratios, the longest wait between two commits (a snapshot freezes the filesystem
for its instant), how long each snapshot took, and what each commit cost the disk under
both: its write and cache-flush requests per row (the disk's own counters in /sys/block), which
show where the layers between a commit and the disk add I/O of their own.

The image is scripts/make-mariadb-image.sh's (a first build takes a few minutes).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import Daemon, Dockerd, compile_pyvol, dispose  # noqa: E402
from mariadb import InsertLoad, MariaDB, make_image  # noqa: E402

from pyvol import fs  # noqa: E402
from pyvol.backends import loopdev  # noqa: E402

CONFIGS = ("local", "loop", "pyvol", "pyvol+snapshots")


class BareLoop:
    """A filesystem on a loop device over a sparse file on the disk under dockerd's root,
    made, attached and mounted exactly as a pyvol loop volume's (fs.mkfs, loopdev.attach,
    fs.mount), with no pool and no pyvol: what any volume on a loop device reaches here, so
    that pyvol's own cost (its pool: XFS on a second loop device) shows apart from the loop
    device's."""

    def __init__(self, base: Path, name: str, fstype: str):
        self.image, self.mp, self.fstype = base / f"{name}.img", base / name, fstype

    def __enter__(self) -> Path:
        with open(self.image, "wb") as f:
            f.truncate(4 << 30)
        dev = loopdev.attach(self.image)
        fs.mkfs(dev, self.fstype)
        fs.mount(dev, self.mp, self.fstype, discard=True)
        return self.mp

    def __exit__(self, *exc) -> None:
        fs.umount(self.mp)
        loopdev.detach(self.image)
        self.image.unlink()
        self.mp.rmdir()


def disk_counters(path: Path):
    """A function giving (write requests, flush requests) so far of the disk holding ``path``
    (/sys/block's stat: fields 5 and 16; flushes are counted by kernels since 5.5)."""
    st = os.stat(path)
    dev = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if os.path.exists(os.path.join(dev, "partition")):
        dev = os.path.dirname(dev)

    def read() -> tuple[int, int]:
        with open(os.path.join(dev, "stat")) as f:
            fields = [int(x) for x in f.read().split()]
        return fields[4], (fields[15] if len(fields) > 15 else 0)
    return read


def one_run(engine: Dockerd, daemon: Daemon, config: str, n: int, seconds: float,
            every: float, disk, fstype: str, base: Path) -> dict:
    """A fresh database on a fresh volume, the load for ``seconds``; its rate and waits."""
    vol = f"bench-{config.replace('+', '-')}-{n}"
    if config == "loop":
        with BareLoop(base, vol, fstype) as mp:
            engine.run("volume", "create", "-o", "type=none", "-o", "o=bind", "-o",
                       f"device={mp}", vol)
            return load_run(engine, daemon, config, vol, "local", seconds, every, disk)
    if config == "local":
        engine.run("volume", "create", vol)
        driver = "local"
    else:
        engine.run("volume", "create", "-d", daemon.driver, "-o", "size=4G", "-o", f"fs={fstype}", vol)
        driver = daemon.driver
    return load_run(engine, daemon, config, vol, driver, seconds, every, disk)


def load_run(engine: Dockerd, daemon: Daemon, config: str, vol: str, driver: str,
             seconds: float, every: float, disk) -> dict:
    db = MariaDB(engine, vol, vol, driver).start()
    snaps = []
    try:
        load = InsertLoad(db).start()
        load.wait_rows(100)  # the client is running: the window starts now
        start = time.time()
        before = disk()
        end = start + seconds
        next_snap = start + every
        while time.time() < end:
            if config == "pyvol+snapshots" and time.time() >= next_snap:
                t = time.monotonic()
                daemon.cli("snapshot", "create", vol, "--name", f"s{len(snaps)}")
                snaps.append(time.monotonic() - t)
                next_snap += every
            time.sleep(0.05)
        after = disk()
        rc, err = load.stop()
        if rc != 0:
            raise RuntimeError(f"the client failed in {config}: {err}")
        times = [at for _, at in load.commits if start <= at < end]
        waits = [b - a for a, b in zip(times, times[1:])]
        return {"rate": len(times) / seconds, "max_wait": max(waits),
                "writes": (after[0] - before[0]) / len(times),
                "flushes": (after[1] - before[1]) / len(times),
                "p99_wait": sorted(waits)[int(len(waits) * 0.99)], "snaps": snaps}
    finally:
        db.stop()
        engine.run("volume", "rm", vol)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30, help="load per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--snapshot-every", type=float, default=10)
    ap.add_argument("--fs", choices=("ext4", "xfs"), default="ext4",
                    help="the pyvol volume's filesystem (ext4: what a volume gets by default)")
    args = ap.parse_args()
    compile_pyvol()
    if args.seconds <= 0 or args.rounds < 1 or args.snapshot_every <= 0:
        ap.error("--seconds and --snapshot-every must be positive, --rounds at least 1")
    base = Path(tempfile.mkdtemp(prefix="pyvol-bench-", dir="/tmp"))
    name = f"pyvol-bench-{os.getpid()}"
    engine = daemon = None
    try:
        engine = Dockerd(base / "docker").start()
        daemon = Daemon(base / "root", Path("/run/docker/plugins") / f"{name}.sock").start()
        daemon.driver = name
        took = make_image(engine.sock)
        same = os.stat(base / "docker").st_dev == os.stat(base / "root").st_dev
        where = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(base)],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        print(f"image ready in {took:.0f} s; dockerd's data root and pyvol's pool file are on "
              f"{'the same' if same else 'DIFFERENT'} filesystem ({where})")
        print(f"{args.rounds} rounds of {args.seconds:.0f} s each, one row per transaction, "
              f"snapshots every {args.snapshot_every:.0f} s in pyvol+snapshots")
        disk = disk_counters(base)
        results = {c: [] for c in CONFIGS}
        for r in range(args.rounds):
            order = CONFIGS if r % 2 == 0 else tuple(reversed(CONFIGS))
            for config in order:
                res = one_run(engine, daemon, config, r, args.seconds, args.snapshot_every,
                              disk, args.fs, base)
                results[config].append(res)
                snaps = ", ".join(f"{s:.2f}" for s in res["snaps"])
                print(f"  round {r + 1} {config:16} {res['rate']:8.0f} rows/s   longest wait "
                      f"between commits {res['max_wait'] * 1e3:6.1f} ms, p99 "
                      f"{res['p99_wait'] * 1e3:5.1f} ms   disk writes {res['writes']:.2f}, "
                      f"flushes {res['flushes']:.2f} per row"
                      + (f"   snapshots took {snaps} s" if snaps else ""), flush=True)
        med = {c: statistics.median(x["rate"] for x in results[c]) for c in CONFIGS}
        print("\nrows/s, median of the rounds:")
        for c in CONFIGS:
            print(f"  {c:16} {med[c]:8.0f}")
        print(f"  pyvol / local:                 {med['pyvol'] / med['local']:.2f}")
        print(f"  loop / local:                  {med['loop'] / med['local']:.2f}   "
              "(a bare loop device: the most a loop-backed volume reaches here)")
        print(f"  pyvol / loop:                  {med['pyvol'] / med['loop']:.2f}   "
              "(pyvol's own cost: its pool)")
        print(f"  pyvol+snapshots / local:       {med['pyvol+snapshots'] / med['local']:.2f}")
        print(f"  pyvol+snapshots / pyvol:       {med['pyvol+snapshots'] / med['pyvol']:.2f}")
        print("\nthe disk's write and flush requests per committed row, median of the rounds:")
        for c in CONFIGS:
            print(f"  {c:16} writes {statistics.median(x['writes'] for x in results[c]):5.2f}"
                  f"   flushes {statistics.median(x['flushes'] for x in results[c]):5.2f}")
    finally:
        if engine:
            engine.stop()
        dispose(base, daemon)


if __name__ == "__main__":
    main()
