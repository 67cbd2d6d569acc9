"""Loop devices: attach a file, find what a file is attached to, detach.

Lookups read sysfs (exact, no subprocess); attach and detach go through losetup, which knows
the kernel's races (LOOP_CTL_GET_FREE, LOOP_CONFIGURE) better than we would.
"""

import os
from pathlib import Path

from pyvol.run import run

SYS_BLOCK = Path("/sys/block")


def attached() -> dict[str, str]:
    """Map of /dev/loopN -> backing file, for every attached loop device.

    A device whose file was deleted keeps the path with " (deleted)" appended; it is listed
    as such, so that a new file at the same path is never mistaken for it.
    """
    result = {}
    for entry in SYS_BLOCK.glob("loop*"):
        try:
            result[f"/dev/{entry.name}"] = (entry / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:
            continue
    return result


def find(path: Path) -> str | None:
    """The device ``path`` is attached to, if any, ignoring devices on their way out.

    `losetup -d` of a device that anyone holds open (even another losetup scanning devices)
    only marks it autoclear and returns; it unbinds at the last close. Reusing such a device
    would see it vanish under the next mount, so it counts as gone.
    """
    target = os.path.realpath(path)
    for dev, backing in sorted(attached().items()):
        if backing == target and not _autoclear(dev):
            return dev
    return None


def _autoclear(dev: str) -> bool:
    try:
        return (SYS_BLOCK / dev[len("/dev/"):] / "loop" / "autoclear").read_text().strip() == "1"
    except OSError:
        return True  # unbound between the two reads: gone


def attach(path: Path, direct_io: bool = True) -> str:
    """Attach ``path`` (or return the device it is already attached to)."""
    existing = find(path)
    if existing:
        return existing
    # no --nooverlap: it opens every loop device to compare, holding others' detaches open
    argv = ["losetup", "--find", "--show"]
    if direct_io:
        # The filesystem above already caches; caching the image file again doubles memory use.
        # The sector size is pinned: with direct I/O the kernel would derive it from the image's
        # DIO alignment, which XFS raises from 512 to 4096 once the file shares extents with a
        # snapshot, and an xfs volume made on 512-byte sectors then refuses to mount.
        argv += ["--direct-io=on", "--sector-size", "4096"]
    return run(argv + [str(path)], timeout=60).strip()


def detach(path: Path) -> None:
    target = os.path.realpath(path)
    for dev, backing in attached().items():
        if backing in (target, target + " (deleted)"):
            run(["losetup", "--detach", dev], timeout=60)
