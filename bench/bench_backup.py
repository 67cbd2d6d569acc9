"""Backup benchmark: pyvol against restic on the same data, in the same run, as ratios.

    sudo .venv/bin/python bench/bench_backup.py [--gib 1] [--data mixed|random] [--no-encrypt]
        [--target file|s3]

Both tools back up the same volume's contents to a repository (pyvol: the block snapshot;
restic: the mounted files): with ``--target file`` (the default) a directory on the same
disk, with ``--target s3`` a bucket of a SeaweedFS server on this machine at nice 19 (a
stand-in for a remote service, kept off the cores Docker's calls need), with volume files of
8 GiB, over HTTP (restic through its own S3 backend). restic always encrypts, so pyvol runs with a key too
unless told otherwise. The page cache is dropped before every step. Printed, all from this
one run:
- this machine's rates on all cores for keyed hashing, zstd level 3 and AES-256-GCM on the
  benchmark's data, a cold disk read, and the pipeline limit they make;
- time ratios pyvol/restic for a full backup, an incremental after rewriting 1% of the data,
  and a restore, and both tools' rates for the full backup and the restore; pyvol's verify;
  pyvol's full-backup rate as a fraction of the limit;
- bytes pyvol read and uploaded for the incremental, against the 1% changed;
- two floors: the CLI's round trip from a cold cache (part of every incremental), and the
  time to write the data into a fresh volume and fsync it (a restore is durable when it
  returns; restic's is not);
- the least ratio to restic each time goal could reach in this run, from those floors and
  the pipeline limit;
- the daemon's RSS (every process of it, the job process too) idle before the first job and
  after the last, and at its peak during a backup, a restore and a verify, sampled every
  50 ms; restic's peak from wait4; the same for
  the daemon's PSS, which counts the pages its processes share (a forked worker's with its
  master) once rather than once per process;
- Docker Get latency (median, p99) on the daemon's one worker while a backup and a restore
  run, against idle, with the number of calls (under 100, the p99 is the slowest call).
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
from helpers import Daemon, compile_pyvol, release  # noqa: E402

MiB = 1 << 20


def restic(repo: str, *args, env) -> tuple[float, int, str]:
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


def tree_pids(root_pid: int) -> list[int]:
    """The daemon's processes: master, workers and any job process below them."""
    return [pid for pid, _ in tree(root_pid)]


def tree(root_pid: int) -> list[tuple[int, int]]:
    """The daemon's processes and their depths (0 the master, 1 a worker, 2 a job process),
    from each thread's /proc children list (a job process is the child of the worker thread
    that started it). Read, not asked of pgrep: three pgreps took 14 ms a sample, a quarter of
    a core at 20 samples a second, which loaded the machine during the measured steps only."""
    out, todo = [], [(root_pid, 0)]
    while todo:
        pid, depth = todo.pop()
        out.append((pid, depth))
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += [(int(k), depth + 1) for k in
                         Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass  # gone meanwhile, or a thread that ended
    return out


def memory(pids: list[int]) -> tuple[int, int]:
    """The processes' summed RSS and PSS, from one read of each one's smaps_rollup. PSS counts
    a page shared by n of the processes 1/n in each: a forked worker shares most of its pages
    with the master, and the summed RSS counts those twice."""
    each = [one_memory(pid) for pid in pids]
    return sum(r for r, _ in each), sum(p for _, p in each)


def one_memory(pid: int) -> tuple[int, int]:
    """A process's RSS and PSS (0, 0 once it is gone)."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, pss


class Sampler:
    """Runs ``sample()`` every ``every`` seconds in a thread while a step runs."""

    every = 0.05

    def __init__(self):
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self):
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join()


class PeakRss(Sampler):
    """The largest sums of the daemon's processes' RSS and PSS seen while a step runs (a
    job process's own peak is gone with it, so it is sampled, every 50 ms), and the RSS of
    each kind of process in the sample with the largest sum: what to look at first."""

    ROLES = ("master", "worker", "job")

    def __init__(self, root_pid: int):
        super().__init__()
        self.root_pid, self.peak, self.peak_pss = root_pid, 0, 0
        self.at_peak: dict[str, int] = {}

    def sample(self):
        each = [(depth, *one_memory(pid)) for pid, depth in tree(self.root_pid)]
        rss, pss = sum(r for _, r, _ in each), sum(p for _, _, p in each)
        if rss > self.peak:
            self.at_peak = {role: sum(r for d, r, _ in each if min(d, 2) == i)
                            for i, role in enumerate(self.ROLES)}
        self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)

    def parts(self) -> str:
        return ", ".join(f"{role} {self.at_peak.get(role, 0) / MiB:.0f}" for role in self.ROLES)


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(api) -> None:
    """One Get after the page cache was dropped: the daemon's worker reads its code and its
    state back in on an idle disk, as a daemon Docker calls is always warm. Without it the
    probe's first call in a step faulted them in behind the step's own I/O, and the p99 of
    about 50 calls measured that one call."""
    api.ok("/VolumeDriver.Get", {"Name": "db"})


def pipeline_limit(sample: bytes, key: bytes | None) -> dict:
    """What this machine's own libraries do per second on all cores, on the benchmark's data:
    hashing (keyed, as pyvol names chunks), zstd level 3 and AES-256-GCM, each alone; the
    pipeline's limit is the rate of doing all three in a row, spread over every core."""
    import hashlib
    import hmac
    from concurrent.futures import ThreadPoolExecutor

    import zstandard
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    chunk = 4 * MiB
    pieces = [sample[i:i + chunk] for i in range(0, len(sample) - chunk + 1, chunk)]
    aead = AESGCM(os.urandom(32))
    cores = os.cpu_count() or 1
    local = threading.local()

    def zc():
        if not hasattr(local, "c"):
            local.c = zstandard.ZstdCompressor(level=3)
        return local.c

    steps = {
        "hash": (lambda b: hmac.new(key, b, "sha256").digest()) if key else
                (lambda b: hashlib.sha256(b).digest()),
        "zstd": lambda b: zc().compress(b),
        "aes-gcm": lambda b: aead.encrypt(os.urandom(12), b, b"k"),
    }
    rates = {}
    for name, fn in steps.items():
        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(fn, pieces[:cores]))  # warm
            t = time.perf_counter()
            list(pool.map(fn, pieces * 2))
            rates[name] = 2 * len(pieces) * chunk / (time.perf_counter() - t)
    rates["all three"] = 1 / sum(1 / r for r in rates.values())
    return rates


def disk_read_rate(path: str) -> float:
    """A cold sequential read of ``path`` in 4 MiB requests, bytes per second."""
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    n, t = 0, time.perf_counter()
    try:
        while True:
            b = os.read(fd, 4 * MiB)
            if not b:
                break
            n += len(b)
    finally:
        os.close(fd)
    return n / (time.perf_counter() - t)


def write_data(mp: str, total: int, data: str = "mixed") -> None:
    """Files of 64 MiB (like a database's): "mixed" is half random, half compressible text;
    "random" all random."""
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
                f.write(os.urandom(k) if i % 2 == 0 or data == "random" else (text * 2)[:k])
                left -= k
            os.fsync(f.fileno())
        n += size
        i += 1


def durable_write(api, total: int) -> float:
    """Seconds to write ``total`` bytes into a fresh volume and fsync them: what a restore,
    which is on disk when it returns, cannot beat on this machine's storage (the loop
    backend's layers included). restic writes into the page cache and does not wait."""
    api.ok("/VolumeDriver.Create", {"Name": "floor", "Opts": {"size": str(total + 256 * MiB)}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "floor", "ID": "f"})["Mountpoint"]
    block = os.urandom(4 * MiB)
    t = time.perf_counter()
    with open(f"{mp}/data", "wb") as f:
        for _ in range(total // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t
    api.ok("/VolumeDriver.Unmount", {"Name": "floor", "ID": "f"})
    api.ok("/VolumeDriver.Remove", {"Name": "floor"})
    return elapsed


class Prober(Sampler):
    """Docker's Get, every 20 ms, while a step runs."""

    every = 0.02

    def __init__(self, api):
        super().__init__()
        self.api, self.times = api, []

    def sample(self):
        t = time.perf_counter()
        self.api.ok("/VolumeDriver.Get", {"Name": "db"})
        self.times.append(time.perf_counter() - t)


def repo_bytes(work: Path, s3, bucket: str) -> tuple[int, int]:
    """The bytes each tool's repository holds."""
    if s3 is None:
        return tuple(sum(f.stat().st_size for f in (work / d).rglob("*") if f.is_file())
                     for d in ("pyvol-repo", "restic-repo"))
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    sizes = {"pyvol/": 0, "restic/": 0}
    for page in pages:
        for o in page.get("Contents", []):
            for prefix in sizes:
                if o["Key"].startswith(prefix):
                    sizes[prefix] += o["Size"]
    return sizes["pyvol/"], sizes["restic/"]


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * .99))]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--no-encrypt", action="store_true")
    ap.add_argument("--data", choices=["mixed", "random"], default="mixed")
    ap.add_argument("--target", choices=["file", "s3"], default="file")
    args = ap.parse_args()
    compile_pyvol()
    if shutil.which("restic") is None:
        sys.exit("restic is not installed: apt-get install restic (scripts/test.sh does)")
    s3 = None
    if args.target == "s3":
        from s3servers import Seaweed, weed_binary

        if weed_binary() is None:
            sys.exit("SeaweedFS's weed is not installed (scripts/test.sh installs it)")
        # It stands in for a remote service: at normal priority its threads took both cores
        # in turn from the bench's own Get probe, which waited 16 ms for a CPU while the
        # worker sat idle (perf sched, bench/README "Docker's Get beside a co-located S3
        # server"); the niceness is its autogroup's too. Its volume files hold the whole
        # run: with weed mini's 128 MiB files, which fill and roll over to new ones, the
        # first writes after the other tool's full upload waited on the server (pyvol's
        # incremental 1.57 to 1.61 s in four runs, 0.57 and 0.64 s with 8 GiB; bench/README)
        s3 = Seaweed().start(nice=19, volume_mb=8192)
    total = int(args.gib * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="pyvol-bb-", dir="/var/tmp"))
    env = {"PYVOL_WORKERS": "1"}  # the worst case for Docker: one worker serves every call
    key = None
    if not args.no_encrypt:
        key = os.urandom(32)
        (work / "key").write_text(key.hex())
        env["PYVOL_BACKUP_KEY_FILE"] = str(work / "key")
    if s3 is not None:
        env.update(s3.env)
    d = Daemon(work / "root", work / "s.sock", env={**env, "PYVOL_LOOP_POOL_SIZE": "40G"})
    try:
        d.start()
    except BaseException:
        if s3 is not None:
            s3.stop()
        raise
    out = {}
    try:
        api = d.api
        size = total * 2 + (512 * MiB)
        api.ok("/VolumeDriver.Create", {"Name": "db", "Opts": {"size": str(size)}})
        mp = api.ok("/VolumeDriver.Mount", {"Name": "db", "ID": "b"})["Mountpoint"]
        write_data(mp, total, args.data)
        time.sleep(1)
        out["idle_rss"], out["idle_pss"] = memory(tree_pids(d.proc.pid))
        renv = {"RESTIC_PASSWORD": "bench"}
        if s3 is None:
            (work / "pyvol-repo").mkdir()
            repo = f"file://{work / 'pyvol-repo'}"
            rrepo = str(work / "restic-repo")
        else:
            bucket = s3.bucket()
            repo = f"s3://{bucket}/pyvol"
            rrepo = f"s3:{s3.endpoint}/{bucket}/restic"
            renv.update(s3.env)
        restic(rrepo, "init", env=renv)
        with open(f"{mp}/table000.ibd", "rb") as f:
            sample = f.read(64 * MiB)
        out["limit"] = pipeline_limit(sample, key)
        out["disk"] = disk_read_rate(f"{mp}/table000.ibd")
        drop_caches()
        out["durable_write"] = durable_write(api, total)

        # measured as the steps are, the memory sampler running beside the probe: only the
        # step differs between the two. Idle means idle: the floor volume's removal and the
        # write-back it left are over first (a 46 ms call once fell in them)
        os.sync()
        time.sleep(1.0)
        with Prober(api) as idle, PeakRss(d.proc.pid):
            time.sleep(2.0)
        out["idle"] = idle.times
        drop_caches()
        warm(api)
        with Prober(api) as during_backup, PeakRss(d.proc.pid) as backup_rss:
            out["full"], full = timed(lambda: json.loads(
                d.cli("backup", "create", "db", "--dest", repo, "--json").stdout))
        drop_caches()
        out["restic_full"], restic_rss, _ = restic(rrepo, "backup", mp, env=renv)

        # rewrite 1% of the data, in place, in one file
        change = total // 100
        with open(f"{mp}/table000.ibd", "r+b") as f:
            f.seek(8 * MiB)
            f.write(os.urandom(change))
            os.fsync(f.fileno())
        drop_caches()
        out["inc"], inc = timed(lambda: json.loads(
            d.cli("backup", "create", "db", "--dest", repo, "--json").stdout))
        drop_caches()
        out["restic_inc"], _, _ = restic(rrepo, "backup", mp, env=renv)

        drop_caches()  # the fixed cost in every call: a CLI process started from a cold cache
        out["cli"], _ = timed(lambda: d.cli("ls"))
        drop_caches()
        with PeakRss(d.proc.pid) as verify_rss:
            out["verify"], _ = timed(lambda: d.cli("backup", "verify", inc["url"]))
        drop_caches()
        warm(api)
        with Prober(api) as during_restore, PeakRss(d.proc.pid) as restore_rss:
            out["restore"], _ = timed(lambda: d.cli("restore", inc["url"], "restored"))
        drop_caches()
        out["restic_restore"], _, _ = restic(rrepo, "restore", "latest", "--target",
                                             str(work / "restic-restore"), env=renv)
        pyvol_bytes, restic_bytes = repo_bytes(work, s3, bucket if s3 else "")
        # the worker keeps what it imported to open the repository (cryptography, zstandard)
        out["after_rss"], out["after_pss"] = memory(tree_pids(d.proc.pid))
    finally:
        d.stop()
        release(work)
        shutil.rmtree(work, ignore_errors=True)
        if s3 is not None:
            s3.stop()

    enc = "encrypted" if not args.no_encrypt else "plain"
    where = ("a directory on the same disk" if s3 is None
             else "SeaweedFS on this machine at nice 19, 8 GiB volume files, over HTTP (S3)")
    print(f"data: {total / (1 << 30):.2f} GiB ({args.data}); pyvol {enc}, "
          f"{os.cpu_count()} cores; repositories in {where}; page cache dropped before every "
          "step")
    lim = out["limit"]
    print("this machine, all cores: " + ", ".join(f"{k} {v / MiB:.0f} MiB/s"
                                                  for k, v in lim.items())
          + f"; cold disk read {out['disk'] / MiB:.0f} MiB/s")
    limit = min(lim["all three"], out["disk"])
    print(f"pipeline limit (slower of the three in a row and the disk): {limit / MiB:.0f} MiB/s")
    for step, ours, theirs in (("full backup", out["full"], out["restic_full"]),
                               ("incremental (1%)", out["inc"], out["restic_inc"]),
                               ("restore", out["restore"], out["restic_restore"])):
        print(f"{step:17s} pyvol {ours:6.2f}s  restic {theirs:6.2f}s  ratio {ours / theirs:.2f}")
    for step, ours, theirs in (("full backup", out["full"], out["restic_full"]),
                               ("restore", out["restore"], out["restic_restore"])):
        print(f"{step} rate (data over the whole call): pyvol {total / ours / MiB:.0f} MiB/s, "
              f"restic {total / theirs / MiB:.0f} MiB/s")
    print(f"incremental's fixed cost: the CLI's round trip alone (pyvol ls, cold cache) "
          f"{out['cli']:.2f}s; restic's whole incremental is {out['restic_inc']:.2f}s")
    print(f"restore's floor: writing the data into a fresh volume and fsyncing it took "
          f"{out['durable_write']:.2f}s ({total / out['durable_write'] / MiB:.0f} MiB/s); "
          f"pyvol's restore is {out['restore'] / out['durable_write']:.2f} of that (restic's "
          "restore does not fsync)")
    print(f"verify            pyvol {out['verify']:6.2f}s  ratio to pyvol's restore "
          f"{out['verify'] / out['restore']:.2f}")
    read = full["stats"]["read"]
    # What no engine could beat in this run: every call is a CLI round trip, a full backup
    # must also move what it reads through the pipeline, and a restore must also write its
    # data durably. Where these floors are above a goal, the goal cannot be met here.
    floors = (("full", (out["cli"] + read / limit) / out["restic_full"], 0.35),
              ("incremental", out["cli"] / out["restic_inc"], 0.10),
              ("restore", (out["cli"] + out["durable_write"]) / out["restic_restore"], 0.35))
    print("the least ratio to restic this run allows (the CLI's round trip, plus the full "
          "backup's data at the pipeline limit, plus the restore's durable write): "
          + "; ".join(f"{step} {floor:.2f} (goal {goal:.2f})" for step, floor, goal in floors))
    print(f"full backup rate: {read / out['full'] / MiB:.0f} MiB/s read, "
          f"{read / out['full'] / limit:.2f} of the pipeline limit")
    print(f"incremental bytes: changed {change / MiB:.1f} MiB, read "
          f"{inc['stats']['read'] / MiB:.1f} MiB ({inc['stats']['read'] / change:.2f}x), "
          f"uploaded {inc['stats']['uploaded'] / MiB:.1f} MiB "
          f"({inc['stats']['uploaded'] / change:.2f}x); full read "
          f"{read / MiB:.0f} MiB of a {size / MiB:.0f} MiB volume")
    print(f"repository size: pyvol {pyvol_bytes / MiB:.0f} MiB, restic "
          f"{restic_bytes / MiB:.0f} MiB, ratio {pyvol_bytes / restic_bytes:.2f}")
    print(f"daemon RSS (master, 1 worker, job process): idle {out['idle_rss'] / MiB:.0f} MiB "
          f"before the first job, {out['after_rss'] / MiB:.0f} MiB after the last; "
          f"peak during backup {backup_rss.peak / MiB:.0f} MiB, restore "
          f"{restore_rss.peak / MiB:.0f} MiB, verify {verify_rss.peak / MiB:.0f} MiB; "
          f"restic's backup {restic_rss / MiB:.0f} MiB")
    print(f"daemon PSS (pages shared between its processes counted once): idle "
          f"{out['idle_pss'] / MiB:.0f} MiB, after {out['after_pss'] / MiB:.0f} MiB; peak during "
          f"backup {backup_rss.peak_pss / MiB:.0f} MiB, restore "
          f"{restore_rss.peak_pss / MiB:.0f} MiB, verify "
          f"{verify_rss.peak_pss / MiB:.0f} MiB")
    print("RSS by process at each peak (MiB): " + "; ".join(
        f"{step} {peak.parts()}" for step, peak in (("backup", backup_rss),
                                                    ("restore", restore_rss),
                                                    ("verify", verify_rss))))
    idle = out["idle"]
    for step, probe in (("backup", during_backup), ("restore", during_restore)):
        t = probe.times
        print(f"Docker Get during a {step}: median {statistics.median(t) * 1e3:.1f} ms, p99 "
              f"{p99(t) * 1e3:.1f} ms; idle median {statistics.median(idle) * 1e3:.1f} ms, p99 "
              f"{p99(idle) * 1e3:.1f} ms; p99 ratio {p99(t) / p99(idle):.2f} ({len(t)} calls, "
              f"the slowest {max(t) * 1e3:.1f} ms; idle {len(idle)})")


if __name__ == "__main__":
    main()
