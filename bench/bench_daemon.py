"""Daemon benchmarks, printed as ratios against baselines measured in the same run.

    sudo .venv/bin/python bench/bench_daemon.py [--rounds N]

- Per-endpoint latency over the socket (p50, p99), against /Plugin.Activate, which does no
  work: the ratio is what each endpoint costs beyond HTTP on a Unix socket.
- `docker run --rm -v VOL:/d busybox true` with a pyvol volume against the same with Docker's
  built-in local driver, alternated in one run.
- The daemon's idle memory (master + workers, the default worker count): the sum of RSS, and
  the sum of PSS (/proc/PID/smaps_rollup), which counts each page the workers share with the
  master after gunicorn's fork once: what the daemon really takes. The same for a bare
  gunicorn+Flask app with the same worker settings serving one no-op route: what pyvol adds.
- Scale: Docker's List and Get (p50, p99) on a loop daemon with 10 volumes, then with 1,000
  volumes of which 200 are mounted, and the ratios; then a restart with those 1,000 volumes:
  how long from starting the process until it answers /Plugin.Activate, and a Get.

Sections can be picked with --only (memory, endpoints, docker, scale).
"""

import argparse
import json
import os
import threading
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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


def memory_of_tree(pid: int) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, number of processes) of ``pid`` and its children: gunicorn's
    master and its workers."""
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]
    rss = pss = 0
    for p in pids:
        with open(f"/proc/{p}/smaps_rollup") as f:
            fields = dict(line.split()[:2] for line in f if line.split()[0].endswith(":"))
        rss += int(fields["Rss:"]) * 1024
        pss += int(fields["Pss:"]) * 1024
    return rss, pss, len(pids)


def memory_line(label: str, pid: int) -> str:
    rss, pss, n = memory_of_tree(pid)
    return f"{label} ({n} processes): RSS sum {rss / 2**20:.1f} MiB, PSS sum {pss / 2**20:.1f} MiB"


BARE_APP = """
from flask import Flask
app = Flask("bare")
@app.post("/Plugin.Activate")
def a():
    return {"Implements": ["VolumeDriver"]}
"""


def bare_memory(base: Path) -> str:
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
        return memory_line("bare gunicorn+Flask, same workers", proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def endpoints(api, n: int) -> None:
    api.ok("/VolumeDriver.Create", {"Name": "b", "Opts": {"size": "1G"}})
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


def docker_run(base: Path, name: str, rounds: int) -> None:
    engine = Dockerd(base / "docker").start()
    try:
        engine.run("volume", "create", "-d", name, "-o", "size=1G", "pv")
        engine.run("volume", "create", "local1")
        pv, local = [], []
        for _ in range(rounds):  # alternate, so drift hits both alike
            for vol, acc in (("pv", pv), ("local1", local)):
                t = time.perf_counter()
                engine.run("run", "--rm", "-v", f"{vol}:/d", "busybox", "true")
                acc.append(time.perf_counter() - t)
        print(f"\ndocker run --rm -v VOL:/d busybox true, {rounds} rounds each:")
        print(f"  pyvol / local driver, median: {statistics.median(pv) / statistics.median(local):.2f}"
              f"  (local median {statistics.median(local) * 1e3:.0f} ms)")
    finally:
        engine.stop()


# Scale: names sort in creation order; the first SCALE_BASE are the small set, measured alike
# in both phases, so the ratios compare the same calls at 10 and at 1,000 volumes.
SCALE_BASE = 10
SCALE_SIZE = "16M"  # ext4's minimum: the images stay small, the pool holds 1,000 of them


def vol_name(i: int) -> str:
    return f"s{i:04d}"


def in_parallel(daemon: Daemon, fn, items, threads: int = 8) -> None:
    """``fn(api, item)`` for every item, through the API from ``threads`` clients at once."""
    local = threading.local()

    def call(item):
        if not hasattr(local, "api"):
            local.api = daemon.api
        fn(local.api, item)

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(call, items):
            pass


def docker_reads(api: Api, rounds: int) -> dict[str, list[float]]:
    """Docker's List and Get, interleaved with /Plugin.Activate (the no-work baseline), so
    that drift on a shared machine hits all three alike. Get cycles over the small set, of
    which the first two are mounted, as 20% of the large set are. Each call is timed until
    its whole answer has arrived; decoding and checking it (the client's work) is not."""
    out = {"Activate": [], "List": [], "Get": []}
    calls = {"Activate": lambda i: ("/Plugin.Activate", b""),
             "List": lambda i: ("/VolumeDriver.List", b"{}"),
             "Get": lambda i: ("/VolumeDriver.Get",
                               json.dumps({"Name": vol_name(i % SCALE_BASE)}).encode())}
    for i in range(rounds + rounds // 10):
        for label, request in calls.items():
            path, body = request(i)
            t = time.perf_counter()
            reply = api.raw(path, body)
            took = time.perf_counter() - t
            assert reply.status_code == 200 and not reply.json().get("Err"), reply.text
            if i >= rounds // 10:  # the first tenth warms up
                out[label].append(took)
    return out


def print_reads(label: str, lat: dict[str, list[float]]) -> None:
    print(f"  {label}: " + "; ".join(f"{k} p50 {pct(v, 50) * 1e3:.2f} ms p99 "
                                     f"{pct(v, 99) * 1e3:.2f} ms" for k, v in lat.items()))


def restart_timed(daemon: Daemon, probe: str) -> tuple[float, float, float]:
    """Stop the daemon, start it again, and time from starting the process: until the socket
    answers /Plugin.Activate, until it answers a Get of ``probe``, until Daemon.start returns
    (its own readiness check)."""
    daemon.stop()
    daemon.socket.unlink(missing_ok=True)
    api = Api(daemon.socket, timeout=5)
    t0 = time.perf_counter()
    starter = threading.Thread(target=daemon.start, kwargs={"wait": 120})
    starter.start()
    activate = get = None
    while get is None and time.perf_counter() - t0 < 120:
        try:
            if activate is None:
                if api.raw("/Plugin.Activate").status_code == 200:
                    activate = time.perf_counter() - t0
            elif not api.post("/VolumeDriver.Get", {"Name": probe}).get("Err"):
                get = time.perf_counter() - t0
                break
        except Exception:  # not listening yet
            pass
        time.sleep(0.01)
    starter.join()
    return activate, get, time.perf_counter() - t0


def scale(base: Path, volumes: int, mounted: int, rounds: int) -> None:
    assert volumes >= SCALE_BASE and mounted <= volumes
    daemon = Daemon(base / "scale", base / "scale.sock",
                    env={"PYVOL_BACKENDS": "loop", "PYVOL_LOOP_POOL_SIZE": "200G"}).start()
    try:
        api = daemon.api
        retried = []

        def create(a, i):
            a.ok("/VolumeDriver.Create", {"Name": vol_name(i), "Opts": {"size": SCALE_SIZE}})

        def mount(a, i):
            body = {"Name": vol_name(i), "ID": f"bench{i}"}
            err = a.post("/VolumeDriver.Mount", body).get("Err")
            if err:  # printed below: a failure of the backend, not of what is measured here
                retried.append(err)
                a.ok("/VolumeDriver.Mount", body)

        print(f"\nscale: loop volumes of {SCALE_SIZE}, {rounds} calls of each")
        in_parallel(daemon, create, range(SCALE_BASE))
        small_mounted = max(1, SCALE_BASE * mounted // volumes)
        in_parallel(daemon, mount, range(small_mounted))
        small = docker_reads(api, rounds)
        print_reads(f"{SCALE_BASE} volumes, {small_mounted} mounted", small)

        t = time.perf_counter()
        in_parallel(daemon, create, range(SCALE_BASE, volumes))
        created = time.perf_counter() - t
        t = time.perf_counter()
        in_parallel(daemon, mount, range(small_mounted, mounted))
        print(f"  setup: {volumes - SCALE_BASE} creates in {created:.1f} s, "
              f"{mounted - small_mounted} mounts in {time.perf_counter() - t:.1f} s (8 clients)")
        for err in retried:
            print(f"  a mount failed once and was retried: {err}")
        large = docker_reads(api, rounds)
        print_reads(f"{volumes} volumes, {mounted} mounted", large)
        assert len(api.ok("/VolumeDriver.List", {})["Volumes"]) == volumes
        for label in ("List", "Get"):
            print(f"  {label} {volumes}/{SCALE_BASE}: p50 "
                  f"{pct(large[label], 50) / pct(small[label], 50):.2f}x, p99 "
                  f"{pct(large[label], 99) / pct(small[label], 99):.2f}x")
        base50 = pct(large["Activate"], 50) / pct(small["Activate"], 50)
        print(f"  (/Plugin.Activate {volumes}/{SCALE_BASE}: p50 {base50:.2f}x: the machine's "
              "drift)")

        activate, get, ready = restart_timed(daemon, vol_name(0))
        print(f"  restart with {volumes} volumes ({mounted} mounted), from starting the process:"
              f" /Plugin.Activate answered in {activate:.2f} s, Get in {get:.2f} s "
              f"(Daemon.start returned in {ready:.2f} s)")
    finally:
        daemon.stop()


SECTIONS = ("memory", "endpoints", "docker", "scale")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--docker-rounds", type=int, default=10)
    ap.add_argument("--scale-volumes", type=int, default=1000)
    ap.add_argument("--scale-mounted", type=int, default=200)
    ap.add_argument("--scale-rounds", type=int, default=1000)
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    args = ap.parse_args()
    only = set(args.only.split(","))
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {', '.join(sorted(unknown))}: accepted are "
                 f"{', '.join(SECTIONS)}")
    base = Path(tempfile.mkdtemp(prefix="pyvol-bench-", dir="/tmp"))
    name = f"pyvol-bench-{os.getpid()}"
    daemon = None
    try:
        if only & {"memory", "endpoints", "docker"}:
            daemon = Daemon(base / "root", Path("/run/docker/plugins") / f"{name}.sock").start()
        if "memory" in only:
            time.sleep(2)
            print(memory_line("daemon idle, master + workers", daemon.proc.pid))
            print(bare_memory(base))
        if "endpoints" in only:
            endpoints(daemon.api, args.rounds)
        if "docker" in only:
            docker_run(base, name, args.docker_rounds)
        if "scale" in only:
            scale(base, args.scale_volumes, args.scale_mounted, args.scale_rounds)
    finally:
        if daemon:
            daemon.stop()
            daemon.socket.unlink(missing_ok=True)
        release(base)
        subprocess.run(["rm", "-rf", str(base)])


if __name__ == "__main__":
    main()
