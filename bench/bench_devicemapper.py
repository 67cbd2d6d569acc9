"""devicemapper benchmarks, as ratios within one run. Needs dm-thin; on hosts without it:

    python tests/vm/run_in_vm.py --mem 6G -- python bench/bench_devicemapper.py

(figures from there are under software emulation: compare the ratios, not the times).

- Snapshot time of a volume with 10 MiB written against one with 2 GiB written: thin
  snapshots are metadata only, so the ratio should be about 1.
- create + mkfs + mount of a 100G thin volume against the same for a 1G one.
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import backend_probes
from pyvol import fs
from pyvol.backends import VolumeSpec
from pyvol.backends.devicemapper import DevicemapperBackend

MiB = 1 << 20


def fill(dev: str, nbytes: int) -> None:
    chunk = os.urandom(4 * MiB)
    fd = os.open(dev, os.O_WRONLY)
    try:
        for off in range(0, nbytes, len(chunk)):
            os.pwrite(fd, chunk, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    emulated = " (emulated kernel)" if os.environ.get("PYVOL_IN_VM") else ""
    root = Path(tempfile.mkdtemp(prefix="pyvol-bench-dm-"))
    b = DevicemapperBackend(root, {"data_size": "8G", "overcommit_ratio": "100"})
    b.setup()
    try:
        for name, written in (("small", 10 * MiB), ("large", 2048 * MiB)):
            b.create(VolumeSpec(name, 4 << 30))
            fill(b.activate(name), written)
        small, large = [], []
        for i in range(7):  # interleaved, so drift hits both alike
            small.append(timed(lambda: b.snapshot("small", f"s{i}")))
            large.append(timed(lambda: b.snapshot("large", f"s{i}")))
        ms, ml = statistics.median(small), statistics.median(large)
        print(f"snapshot{emulated}: 10 MiB written {ms * 1e3:.1f} ms, 2 GiB written "
              f"{ml * 1e3:.1f} ms; ratio large/small = {ml / ms:.2f}")

        def provision(name: str, size: int) -> None:
            b.create(VolumeSpec(name, size))
            dev = b.activate(name)
            fs.mkfs(dev, "ext4", label=name)
            mp = root / "mnt" / name
            fs.mount(dev, mp, "ext4", discard=True)
            fs.umount(mp)
            b.deactivate(name)

        t1 = [timed(lambda i=i: provision(f"g{i}", 1 << 30)) for i in range(3)]
        t100 = [timed(lambda i=i: provision(f"h{i}", 100 << 30)) for i in range(3)]
        print(f"create+mkfs+mount{emulated}: 1G {statistics.median(t1):.2f} s, 100G "
              f"{statistics.median(t100):.2f} s; ratio 100G/1G = "
              f"{statistics.median(t100) / statistics.median(t1):.2f}")
        print(f"pool after the run: {b.usage()}")
    finally:
        backend_probes.teardown(b)


if __name__ == "__main__":
    main()
