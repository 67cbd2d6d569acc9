"""Backup benchmark: pyvol against restic on the same data, in the same run, as ratios.

    sudo .venv/bin/python bench/bench_backup.py [--gib 1] [--encrypt/--no-encrypt]

Both tools back up the same volume's contents to a local repository (pyvol: the block
snapshot, into file://; restic: the mounted files, into a local repo). restic always
encrypts, so pyvol runs with a key too unless told otherwise. Printed:
- time ratios pyvol/restic for a full backup, an incremental after rewriting 1% of the data,
  and a restore;
- bytes pyvol read and uploaded for the incremental, against the 1% changed;
- peak RSS of the process doing the backup (pyvol's one gunicorn worker, from its VmHWM;
  restic's from wait4), and Docker Get latency on the daemon while a backup runs against idle.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import Daemon, release  # noqa: E402

MiB = 1 << 20


def restic(repo: Path, *args, env) -> tuple[float, int, str]:
    t = time.perf_counter()
    proc = subprocess.Popen(["restic", "-r", str(repo), "--no-cache", "-q", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **env})
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    if status != 0:
        raise RuntimeError(f"restic {args[0]} failed: {err.decode()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024, out.decode()


def worker_hwm(daemon_pid: int) -> int:
    """Peak RSS of the daemon's (single) worker."""
    kids = subprocess.run(["pgrep", "-P", str(daemon_pid)], capture_output=True,
                          text=True).stdout.split()
    peak = 0
    for k in kids:
        for line in Path(f"/proc/{k}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) * 1024)
    return peak


def write_data(mp: str, total: int) -> None:
    """Half random, half compressible text, in files of 64 MiB (like a database's files)."""
    text = b"".join(b"row %08d: the quick brown fox jumps over the lazy dog\n" % i
                    for i in range(100_000))
    n = 0
    i = 0
    while n < total:
        size = min(64 * MiB, total - n)
        with open(f"{mp}/table{i:03d}.ibd", "wb") as f:
            left = size
            while left:
                k = min(left, 4 * MiB)
                f.write(os.urandom(k) if i % 2 == 0 else (text * 2)[:k])
                left -= k
            os.fsync(f.fileno())
        n += size
        i += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--no-encrypt", action="store_true")
    args = ap.parse_args()
    if shutil.which("restic") is None:
        sys.exit("restic is not installed: apt-get install restic (scripts/test.sh does)")
    total = int(args.gib * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="pyvol-bb-", dir="/var/tmp"))
    env = {"PYVOL_WORKERS": "1"}
    if not args.no_encrypt:
        (work / "key").write_text(os.urandom(32).hex())
        env["PYVOL_BACKUP_KEY_FILE"] = str(work / "key")
    d = Daemon(work / "root", work / "s.sock", env={**env, "PYVOL_LOOP_POOL_SIZE": "40G"})
    d.start()
    try:
        api = d.api
        size = total * 2 + (512 * MiB)
        api.ok("/VolumeDriver.Create", {"Name": "db", "Opts": {"size": str(size)}})
        mp = api.ok("/VolumeDriver.Mount", {"Name": "db", "ID": "b"})["Mountpoint"]
        write_data(mp, total)
        (work / "pyvol-repo").mkdir()
        repo = f"file://{work / 'pyvol-repo'}"
        rrepo = work / "restic-repo"
        renv = {"RESTIC_PASSWORD": "bench"}
        restic(rrepo, "init", env=renv)
        subprocess.run(["sync"], check=True)

        # Docker Get latency while idle, then while the full backup runs
        def get_latency(n=40):
            out = []
            for _ in range(n):
                t = time.perf_counter()
                api.ok("/VolumeDriver.Get", {"Name": "db"})
                out.append(time.perf_counter() - t)
                time.sleep(0.02)
            return statistics.median(out)

        idle = get_latency()
        busy = []
        stop = threading.Event()

        def prober():
            while not stop.is_set():
                t = time.perf_counter()
                api.ok("/VolumeDriver.Get", {"Name": "db"})
                busy.append(time.perf_counter() - t)
                time.sleep(0.02)

        th = threading.Thread(target=prober)
        th.start()
        t = time.perf_counter()
        full = json.loads(d.cli("backup", "create", "db", "--dest", repo, "--json").stdout)
        pyvol_full = time.perf_counter() - t
        stop.set()
        th.join()
        pyvol_rss = worker_hwm(d.proc.pid)
        restic_full, restic_rss, _ = restic(rrepo, "backup", mp, env=renv)

        # rewrite 1% of the data, in place, in one file
        change = total // 100
        with open(f"{mp}/table000.ibd", "r+b") as f:
            f.seek(8 * MiB)
            f.write(os.urandom(change))
            os.fsync(f.fileno())
        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        inc = json.loads(d.cli("backup", "create", "db", "--dest", repo, "--json").stdout)
        pyvol_inc = time.perf_counter() - t
        restic_inc, _, rout = restic(rrepo, "backup", "--json", mp, env=renv)

        t = time.perf_counter()
        d.cli("restore", inc["url"], "restored")
        pyvol_restore = time.perf_counter() - t
        restic_restore, _, _ = restic(rrepo, "restore", "latest", "--target",
                                      str(work / "restic-restore"), env=renv)
        pyvol_bytes = sum(f.stat().st_size for f in (work / "pyvol-repo").rglob("*")
                          if f.is_file())
        restic_bytes = sum(f.stat().st_size for f in rrepo.rglob("*") if f.is_file())
    finally:
        d.stop()
        release(work)
        shutil.rmtree(work, ignore_errors=True)

    enc = "encrypted" if not args.no_encrypt else "plain"
    print(f"data: {total / (1 << 30):.2f} GiB (half random, half text); pyvol {enc}, "
          f"{os.cpu_count()} cores")
    print(f"full backup      pyvol {pyvol_full:6.1f}s  restic {restic_full:6.1f}s  "
          f"ratio {pyvol_full / restic_full:.2f}")
    print(f"incremental (1%) pyvol {pyvol_inc:6.1f}s  restic {restic_inc:6.1f}s  "
          f"ratio {pyvol_inc / restic_inc:.2f}")
    print(f"restore          pyvol {pyvol_restore:6.1f}s  restic {restic_restore:6.1f}s  "
          f"ratio {pyvol_restore / restic_restore:.2f}")
    print(f"incremental bytes: changed {change / MiB:.1f} MiB, read "
          f"{inc['stats']['read'] / MiB:.1f} MiB ({inc['stats']['read'] / change:.2f}x), "
          f"uploaded {inc['stats']['uploaded'] / MiB:.1f} MiB "
          f"({inc['stats']['uploaded'] / change:.2f}x); full read "
          f"{full['stats']['read'] / MiB:.0f} MiB of a {size / MiB:.0f} MiB volume")
    print(f"repository size: pyvol {pyvol_bytes / MiB:.0f} MiB, restic "
          f"{restic_bytes / MiB:.0f} MiB, ratio {pyvol_bytes / restic_bytes:.2f}")
    print(f"peak RSS: pyvol worker {pyvol_rss / MiB:.0f} MiB, restic {restic_rss / MiB:.0f} MiB, "
          f"ratio {pyvol_rss / restic_rss:.2f}")
    print(f"Docker Get during a backup: median {statistics.median(busy) * 1e3:.1f} ms vs "
          f"{idle * 1e3:.1f} ms idle, ratio {statistics.median(busy) / idle:.2f}; "
          f"p99 {sorted(busy)[int(len(busy) * .99)] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
