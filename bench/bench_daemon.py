"""Daemon benchmarks, printed as ratios against baselines measured in the same run.

    sudo .venv/bin/python bench/bench_daemon.py [--rounds N]

- Per-endpoint latency over the socket (p50, p99), against /Plugin.Activate, which does no
  work: the ratio is what each endpoint costs beyond HTTP on a Unix socket.
- `docker run --rm -v VOL:/d busybox true` with a pyvol volume against the same with Docker's
  built-in local driver, alternated in one run.
- The daemon's idle RSS (master + workers), and the same for a bare gunicorn+Flask app with
  the same worker settings serving one no-op route: what pyvol adds.
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
from helpers import Api, Daemon, Dockerd, release  # noqa: E402


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def timed(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def rss_of_tree(pid: int) -> int:
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total * 1024


BARE_APP = """
from flask import Flask
app = Flask("bare")
@app.post("/Plugin.Activate")
def a():
    return {"Implements": ["VolumeDriver"]}
"""


def bare_rss(base: Path) -> int:
    (base / "bare_app.py").write_text(BARE_APP)
    sock = base / "bare.sock"
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--chdir", str(base), "-w", "2",
                             "--threads", "8", "-k", "gthread", "--no-control-socket", "-b",
                             f"unix:{sock}", "bare_app:app"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.1)
        Api(sock).raw("/Plugin.Activate")
        time.sleep(2)
        return rss_of_tree(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--docker-rounds", type=int, default=10)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pyvol-bench-", dir="/tmp"))
    name = f"pyvol-bench-{os.getpid()}"
    daemon = Daemon(base / "root", Path("/run/docker/plugins") / f"{name}.sock").start()
    engine = None
    try:
        api = daemon.api
        time.sleep(2)
        print(f"daemon idle RSS: {rss_of_tree(daemon.proc.pid) / 2**20:.1f} MiB; "
              f"bare gunicorn+Flask, same workers: {bare_rss(base) / 2**20:.1f} MiB")

        api.ok("/VolumeDriver.Create", {"Name": "b", "Opts": {"size": "1G"}})
        n = args.rounds
        base_lat = timed(lambda: api.raw("/Plugin.Activate"), n)
        rows = {
            "Capabilities": timed(lambda: api.ok("/VolumeDriver.Capabilities", {}), n),
            "Get": timed(lambda: api.ok("/VolumeDriver.Get", {"Name": "b"}), n),
            "List": timed(lambda: api.ok("/VolumeDriver.List", {}), n),
            "Path": timed(lambda: api.ok("/VolumeDriver.Path", {"Name": "b"}), n),
            "Mount (first) + Unmount (last)": timed(lambda: (
                api.ok("/VolumeDriver.Mount", {"Name": "b", "ID": "x"}),
                api.ok("/VolumeDriver.Unmount", {"Name": "b", "ID": "x"})), max(n // 10, 5)),
        }
        api.ok("/VolumeDriver.Mount", {"Name": "b", "ID": "hold"})
        rows["Mount + Unmount (already mounted)"] = timed(lambda: (
            api.ok("/VolumeDriver.Mount", {"Name": "b", "ID": "y"}),
            api.ok("/VolumeDriver.Unmount", {"Name": "b", "ID": "y"})), n)
        api.ok("/VolumeDriver.Unmount", {"Name": "b", "ID": "hold"})
        rows["Create 1G + Remove"] = []
        for i in range(max(n // 20, 5)):
            t = time.perf_counter()
            api.ok("/VolumeDriver.Create", {"Name": f"c{i}", "Opts": {"size": "1G"}})
            api.ok("/VolumeDriver.Remove", {"Name": f"c{i}"})
            rows["Create 1G + Remove"].append(time.perf_counter() - t)
        b50, b99 = pct(base_lat, 50), pct(base_lat, 99)
        print(f"\nbaseline /Plugin.Activate: p50 {b50 * 1e3:.2f} ms, p99 {b99 * 1e3:.2f} ms")
        print(f"{'endpoint':40} {'p50 ratio':>10} {'p99 ratio':>10}")
        for label, lat in rows.items():
            print(f"{label:40} {pct(lat, 50) / b50:10.1f} {pct(lat, 99) / b99:10.1f}")

        engine = Dockerd(base / "docker").start()
        engine.run("volume", "create", "-d", name, "-o", "size=1G", "pv")
        engine.run("volume", "create", "local1")
        pv, local = [], []
        for _ in range(args.docker_rounds):  # alternate, so drift hits both alike
            for vol, acc in (("pv", pv), ("local1", local)):
                t = time.perf_counter()
                engine.run("run", "--rm", "-v", f"{vol}:/d", "busybox", "true")
                acc.append(time.perf_counter() - t)
        print(f"\ndocker run --rm -v VOL:/d busybox true, {args.docker_rounds} rounds each:")
        print(f"  pyvol / local driver, median: {statistics.median(pv) / statistics.median(local):.2f}"
              f"  (local median {statistics.median(local) * 1e3:.0f} ms)")
    finally:
        if engine:
            engine.stop()
        daemon.stop()
        daemon.socket.unlink(missing_ok=True)
        release(base)
        subprocess.run(["rm", "-rf", str(base)])


if __name__ == "__main__":
    main()
