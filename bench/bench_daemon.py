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

Where the time went at 1,000 volumes (py-spy record --subprocesses -f raw on the daemon while
this bench's reads ran; issue 13):
- Get and List parsed all of /proc/self/mountinfo on every call, one character at a time
  (about 90% of Get's samples with 220 mounts on the host). The table is now read again only
  after the kernel signals a change (mountinfo.py).
- List built a Volume (JSON options included) and a Path per volume: now one row of names
  from an index, and the last answer while names and mount table are unchanged. What is left
  grows with the answer itself: JSON of 1,000 entries and its 44 KB on the socket.
- A restart spent nearly all its time in reconcile, which worked once per volume: where it
  goes now is in bench/README.md, "Where a daemon restart's time went".
- Idle memory: each of the three processes held rich and httpx (the CLI's, imported by the
  module `pyvol daemon` runs in), zstandard and cryptography (backup sealing). Flask,
  gunicorn, sqlite3 and ssl are what remains; RSS counts the pages the workers share with the
  master three times, PSS once.
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
from helpers import Api, Daemon, Dockerd, compile_pyvol, dispose  # noqa: E402


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


# Scale: two loop daemons hold the same first SCALE_BASE volumes (the first two mounted), and
# one of them 1,000 in all; Get asks for those alike in both, so the ratios compare the same
# calls at 10 and at 1,000 volumes.
SCALE_BASE = 10
SCALE_SIZE = "16M"  # ext4's minimum: the images stay small, the pool holds 1,000 of them
READS = ("Activate", "Get", "List", "Get after List")


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


def populate(daemon: Daemon, volumes: int, mounted: int) -> tuple[float, float, list[str]]:
    """Create ``volumes`` loop volumes and mount the first ``mounted``, 8 clients at once:
    (seconds creating, seconds mounting, errors of mounts that failed once and were retried)."""
    retried = []

    def create(a, i):
        a.ok("/VolumeDriver.Create", {"Name": vol_name(i), "Opts": {"size": SCALE_SIZE}})

    def mount(a, i):
        body = {"Name": vol_name(i), "ID": f"bench{i}"}
        err = a.post("/VolumeDriver.Mount", body).get("Err")
        if err:  # printed: a failure of the backend, not of what is measured here
            retried.append(err)
            a.ok("/VolumeDriver.Mount", body)

    t = time.perf_counter()
    in_parallel(daemon, create, range(volumes))
    created = time.perf_counter() - t
    t = time.perf_counter()
    in_parallel(daemon, mount, range(mounted))
    return created, time.perf_counter() - t, retried


def docker_reads(apis: dict[str, Api], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Docker's Get and List on each daemon, between /Plugin.Activate (the no-work baseline)
    and between the daemons, round by round and each daemon first every other round, so
    that drift on a shared machine hits every series alike. Get cycles over the volumes both
    daemons hold. Each call is timed until its whole answer has arrived; decoding and
    checking it (the client's work) is not.

    Get and List are timed in rounds of their own (Activate, Get; then List, Get), and the
    Get that follows a List is its own series, "Get after List": a call right after a List
    of 1,000 entries pays for some of that List's aftermath (the worker's caches), which is
    the List's cost, not the Get's."""
    out = {label: {k: [] for k in READS} for label in apis}
    order = list(apis)
    for sequence in (("Activate", "Get"), ("List", "Get after List")):
        for i in range(rounds + rounds // 10):
            get = json.dumps({"Name": vol_name(i % SCALE_BASE)}).encode()
            requests = {"Activate": ("/Plugin.Activate", b""), "Get": ("/VolumeDriver.Get", get),
                        "List": ("/VolumeDriver.List", b"{}"),
                        "Get after List": ("/VolumeDriver.Get", get)}
            for label in order if i % 2 else reversed(order):  # neither always goes first
                api = apis[label]
                for k in sequence:
                    path, body = requests[k]
                    t = time.perf_counter()
                    reply = api.raw(path, body)
                    took = time.perf_counter() - t
                    assert reply.status_code == 200 and not reply.json().get("Err"), reply.text
                    if i >= rounds // 10:  # the first tenth warms up
                        out[label][k].append(took)
    return out


def print_reads(label: str, lat: dict[str, list[float]]) -> None:
    print(f"  {label}: " + "; ".join(f"{k} p50 {pct(v, 50) * 1e3:.2f} ms p99 "
                                     f"{pct(v, 99) * 1e3:.2f} ms" for k, v in lat.items()))


def ratio(a: list[float], b: list[float]) -> str:
    return f"p50 {pct(a, 50) / pct(b, 50):.2f}x, p99 {pct(a, 99) / pct(b, 99):.2f}x"


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
    """List and Get at 10 and at ``volumes`` volumes, then a restart with ``volumes``.

    The 10-volume daemon is measured twice: alone, before the large one has any volume (the
    host's mount table then holds none of its mounts either), and alongside the large one,
    call for call. The first ratio is what a host sees as it grows; the second leaves out
    the machine's drift between the two phases."""
    assert volumes >= SCALE_BASE and mounted <= volumes
    env = {"PYVOL_BACKENDS": "loop", "PYVOL_LOOP_POOL_SIZE": "200G"}
    small = Daemon(base / "small", base / "small.sock", env=env).start()
    large = Daemon(base / "large", base / "large.sock", env=env).start()
    try:
        small_mounted = max(1, SCALE_BASE * mounted // volumes)
        print(f"\nscale: loop volumes of {SCALE_SIZE}, {rounds} calls of each per daemon")
        populate(small, SCALE_BASE, small_mounted)
        alone = docker_reads({"small": small.api}, rounds)["small"]
        print_reads(f"{SCALE_BASE} volumes, {small_mounted} mounted, alone", alone)

        created, mounting, retried = populate(large, volumes, mounted)
        print(f"  setup: {volumes} creates in {created:.1f} s, {mounted} mounts in "
              f"{mounting:.1f} s (8 clients)")
        for err in retried:
            print(f"  a mount failed once and was retried: {err}")
        assert len(large.api.ok("/VolumeDriver.List", {})["Volumes"]) == volumes
        both = docker_reads({"small": small.api, "large": large.api}, rounds)
        print_reads(f"{SCALE_BASE} volumes, {small_mounted} mounted, alongside", both["small"])
        print_reads(f"{volumes} volumes, {mounted} mounted", both["large"])
        for k in ("List", "Get", "Get after List"):
            print(f"  {k} {volumes}/{SCALE_BASE}: {ratio(both['large'][k], both['small'][k])}"
                  f" against the {SCALE_BASE} alongside; {ratio(both['large'][k], alone[k])} "
                  f"against the {SCALE_BASE} alone")
        print(f"  (/Plugin.Activate, which does no work: {volumes}/{SCALE_BASE} alongside "
              f"{ratio(both['large']['Activate'], both['small']['Activate'])}; the "
              f"{SCALE_BASE} alongside/alone {ratio(both['small']['Activate'], alone['Activate'])}"
              ": the machine's drift between the phases)")

        activate, get, ready = restart_timed(large, vol_name(0))
        print(f"  restart with {volumes} volumes ({mounted} mounted), from starting the process:"
              f" /Plugin.Activate answered in {activate:.2f} s, Get in {get:.2f} s "
              f"(Daemon.start returned in {ready:.2f} s)")
    finally:
        large.stop()
        small.stop()


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
    compile_pyvol()
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
        dispose(base, daemon)


if __name__ == "__main__":
    main()
