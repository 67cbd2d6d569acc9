"""The loop backend: sparse image files in a reflink-capable XFS pool, on loop devices.

For kernels without dm-thin (like most CI and cloud VMs, and these machines). The pool is
itself a sparse file, formatted XFS with reflink and loop-mounted under the root dir, so
pyvol works out of the box with no spare disk and never touches the host filesystem's layout:

    ROOT/loop/pool.img                   sparse, formatted XFS (reflink=1)
    ROOT/loop/pool/volumes/NAME.img      one sparse image per volume
    ROOT/loop/pool/snapshots/NAME/S.img  reflink copies: constant time, shared blocks
    ROOT/loop/pool/tmp/                  work in progress; emptied at start: NAME.img (a
                                         create or clone), NAME@SNAP.img (a snapshot),
                                         NAME+rollback.img (a rollback); '@' and '+' are
                                         in no volume name, so no two of them collide

Snapshots are FICLONE copies, and the changed blocks between two snapshots are the logical
ranges whose physical extents differ (FIEMAP): exact, and read from metadata only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Collection
from pathlib import Path

from pyvol import fs
from pyvol.crashpoint import crashpoint
from pyvol.errors import CommandFailed, Conflict, InvalidInput, NotFound, PoolFull
from pyvol.files import fsync_dir
from pyvol.run import run
from pyvol.units import format_size, parse_size

from . import extents, loopdev
from .base import BlockBackend, DeactivateFailed, Quiesce, Range, VolumeSpec

MIN_POOL = 1 << 30
MAX_DEFAULT_POOL = 16 << 40
RESERVE = 64 << 20  # free space the pool keeps for metadata and in-flight copy-on-write
LOOP_SET_CAPACITY = 0x4C07  # <linux/loop.h>: re-read the backing file's size


class LoopBackend(BlockBackend):
    name = "loop"
    scope = "local"
    options = {}
    change_granularity = 4096
    instant_snapshots = True
    discard = True

    def __init__(self, root: Path, settings: dict[str, str] | None = None):
        super().__init__(root, settings)
        # Real paths, resolved once (as config.load does for the daemon): mountinfo and
        # sysfs only ever show real paths, so nothing compared with them may hold a symlink.
        self.root = Path(os.path.realpath(self.root))
        self.base = self.root / "loop"
        self.pool_file = Path(os.path.realpath(self.settings.get("pool_file")
                                               or self.base / "pool.img"))
        self.pool = self.base / "pool"
        self.volumes_dir = self.pool / "volumes"
        self.snaps_dir = self.pool / "snapshots"
        self.tmp_dir = self.pool / "tmp"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        missing = [t for t in ("losetup", "mkfs.xfs", "mount") if shutil.which(t) is None]
        if missing:
            return f"missing tools: {', '.join(missing)} (install util-linux and xfsprogs)"
        if not os.path.exists("/dev/loop-control"):
            return "no /dev/loop-control: this kernel or container has no loop devices"
        return None

    def _pool_size(self) -> int:
        if "pool_size" in self.settings:
            size = parse_size(self.settings["pool_size"], "loop pool_size")
        else:
            # Sparse: as large as the filesystem that holds it, so it never caps users early.
            st = os.statvfs(self.base)
            size = min(max(st.f_blocks * st.f_frsize, MIN_POOL), MAX_DEFAULT_POOL)
        if size < MIN_POOL // 4:
            raise InvalidInput(f"loop pool_size {format_size(size)} is too small: at least 256M")
        return size

    def setup(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if not self.pool_file.exists():
            # Format a temporary file and rename it: a crash never leaves a half-made pool.
            tmp = self.pool_file.with_suffix(".img.new")
            tmp.unlink(missing_ok=True)
            with open(tmp, "wb") as f:
                f.truncate(self._pool_size())
            # 4096-byte sectors: direct I/O at that size works on any disk under the file
            run(["mkfs.xfs", "-q", "-s", "size=4096", "-m", "reflink=1", "-L", "pyvol-pool",
                 str(tmp)], timeout=300)
            os.rename(tmp, self.pool_file)
        if self._mounted_pool() is None:
            self.pool.mkdir(parents=True, exist_ok=True)
            # Direct I/O: buffered, the pool file's pages were a second copy of what the
            # volumes' filesystems cache, and the loop device's kernel worker copied every
            # byte of a backup or restore through them, on the CPU Docker's calls wait for
            # (bench/README.md). Pools made before this have 512-byte sectors.
            dev = loopdev.attach(self.pool_file,
                                 sector_size=fs.sector_size(str(self.pool_file)) or 512)
            run(["mount", "-t", "xfs", "-o", "noatime", dev, str(self.pool)], timeout=120)
        for d in (self.volumes_dir, self.snaps_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink()

    def _mounted_pool(self) -> str | None:
        """The device of our pool file if its filesystem is what the pool directory shows;
        None if the directory shows no mount at all.

        Decided by device numbers, not by the paths in mountinfo: a mount namespace can list
        a mount at this very path that is hidden under another (a managed plugin's copy of the
        host's mounts), and an older pyvol could mount another daemon's pool here, having
        taken its loop device for ours. Someone else's filesystem here is refused: it holds
        someone else's images.
        """
        try:
            shown = os.stat(self.pool).st_dev
        except FileNotFoundError:
            return None
        if shown == os.stat(self.base).st_dev:
            return None
        dev = loopdev.find(self.pool_file)
        if dev is None or os.stat(dev).st_rdev != shown:
            raise Conflict(f"{self.pool} has a filesystem mounted that is not the one in "
                           f"{self.pool_file} (another daemon's pool?): unmount it "
                           f"(umount {self.pool}) and start again")
        return dev

    # paths
    def _image(self, name: str) -> Path:
        return self.volumes_dir / f"{name}.img"

    def _snap(self, name: str, snap: str) -> Path:
        return self.snaps_dir / name / f"{snap}.img"

    def _need(self, path: Path, what: str) -> Path:
        if not path.exists():
            raise NotFound(f"{what} not found in the loop pool")
        return path

    def _check_space(self, size: int) -> None:
        st = os.statvfs(self.pool)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        if size > total:
            raise InvalidInput(
                f"size {format_size(size)} is larger than the loop pool ({format_size(total)}); "
                f"accepted: up to {format_size(total)} (set PYVOL_LOOP_POOL_SIZE for a larger pool)")
        if free < RESERVE:
            raise PoolFull(f"the loop pool is full ({format_size(free)} free of "
                           f"{format_size(total)}): remove volumes or snapshots")

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        """Move a finished image into place; refuse to replace one (an orphan is still data)."""
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise Conflict(f"the loop pool already holds {final.name}, which pyvol has no "
                           f"record of; move {final} away to reuse the name") from None
        finally:
            tmp.unlink()

    # volumes
    def create(self, spec: VolumeSpec) -> None:
        self._check_space(spec.size)
        tmp = self.tmp_dir / f"{spec.name}.img"
        with open(tmp, "xb") as f:
            f.truncate(spec.size)
        self._publish(tmp, self._image(spec.name))

    def remove(self, name: str) -> None:
        self.deactivate(name)
        shutil.rmtree(self.snaps_dir / name, ignore_errors=True)
        self._image(name).unlink(missing_ok=True)

    def list(self) -> list[str]:
        # scandir, not Path.glob: no Path per image (start-up lists thousands), same names
        with os.scandir(self.volumes_dir) as entries:
            return sorted(e.name[:-4] for e in entries if e.name.endswith(".img"))

    def activate(self, name: str) -> str:
        # untimed: each flush on the volume would otherwise force the pool's log to record
        # the image's new mtime, which nothing reads (loopdev, xfshandle)
        return loopdev.attach(self._need(self._image(name), f"volume {name}"), untimed=True)

    def deactivate(self, name: str) -> None:
        loopdev.detach(self._image(name))

    def deactivate_many(self, names: Collection[str]) -> None:
        folder = os.path.join(self.volumes_dir, "")  # as _image(), without a Path per name
        images = {f"{folder}{n}.img": n for n in names}
        failed = loopdev.detach_all(images)
        if failed:
            raise DeactivateFailed(self.name, {images[p]: why for p, why in failed.items()})

    # snapshots
    def snapshot(self, name: str, snap: str, quiesce: Quiesce = contextlib.nullcontext) -> None:
        image = self._need(self._image(name), f"volume {name}")
        self._check_space(0)
        target = self._snap(name, snap)
        target.parent.mkdir(exist_ok=True)
        tmp = self.tmp_dir / f"{name}@{snap}.img"
        with quiesce():
            extents.reflink(image, tmp)
        os.rename(tmp, target)

    def remove_snapshot(self, name: str, snap: str) -> None:
        self._snap(name, snap).unlink(missing_ok=True)

    def snapshots(self, name: str) -> list[str]:
        return sorted(p.name[:-4] for p in (self.snaps_dir / name).glob("*.img"))

    def clone(self, name: str, snap: str, spec: VolumeSpec) -> None:
        source = self._need(self._snap(name, snap), f"snapshot {name}@{snap}")
        self._check_space(spec.size)
        tmp = self.tmp_dir / f"{spec.name}.img"
        extents.reflink(source, tmp)
        if spec.size > tmp.stat().st_size:
            os.truncate(tmp, spec.size)
        self._publish(tmp, self._image(spec.name))

    def grow(self, name: str, size: int) -> None:
        """A longer sparse image (no block is written), then the bound device, if any, is
        told to re-read its size: a mounted filesystem can be grown at once."""
        image = self._need(self._image(name), f"volume {name}")
        self._check_space(size)
        if size > image.stat().st_size:  # never shorter (base.py: the caller refuses a shrink)
            os.truncate(image, size)
        dev = loopdev.find(image)
        if dev is not None:
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
            except OSError as e:
                raise CommandFailed(f"loop device {dev} of volume {name} did not take its "
                                    f"new size: {e.strerror}") from None
            finally:
                os.close(fd)

    def rollback(self, name: str, snap: str) -> None:
        """A reflink copy of the snapshot (constant time: no data block is copied), made to
        the volume's size under a temporary name, then renamed over the volume's image: the
        rename is atomic, so a crash leaves the old image or the new one (and a temporary
        copy, which setup removes)."""
        image = self._need(self._image(name), f"volume {name}")
        source = self._need(self._snap(name, snap), f"snapshot {name}@{snap}")
        self._check_space(0)
        self.deactivate(name)
        held = loopdev.find(image)
        if held is not None:  # a holder outside pyvol keeps it bound
            raise Conflict(f"volume {name}'s image is still bound to a loop device in use "
                           f"({held}): release it, then retry")
        # '+': in no volume or snapshot name (names.py), so never the temporary name of
        # another volume's create or clone (NAME.img) or of a snapshot (NAME@SNAP.img),
        # whose lock is not this one
        tmp = self.tmp_dir / f"{name}+rollback.img"
        tmp.unlink(missing_ok=True)
        extents.reflink(source, tmp)
        try:
            size = image.stat().st_size
            if tmp.stat().st_size < size:
                os.truncate(tmp, size)
            crashpoint("loop.rollback.copied")
            os.rename(tmp, image)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.volumes_dir)

    def _extents(self, name: str, snap: str):
        return extents.extents(self._need(self._snap(name, snap), f"snapshot {name}@{snap}"))

    def mapped_ranges(self, name: str, snap: str) -> list[Range]:
        return extents.differing([], self._extents(name, snap))

    def changed_ranges(self, name: str, base: str, snap: str) -> list[Range]:
        return extents.differing(self._extents(name, base), self._extents(name, snap))

    @contextlib.contextmanager
    def read_snapshot(self, name: str, snap: str):
        yield self._need(self._snap(name, snap), f"snapshot {name}@{snap}")

    # space
    def usage(self) -> dict:
        st = os.statvfs(self.pool)
        return {
            "pool_file": str(self.pool_file),
            "pool_size": st.f_blocks * st.f_frsize,
            "pool_used": (st.f_blocks - st.f_bfree) * st.f_frsize,
            "pool_free": st.f_bavail * st.f_frsize,
        }

    def volume_usage(self, name: str) -> dict:
        try:
            return {"allocated": self._image(name).stat().st_blocks * 512}
        except FileNotFoundError:
            return {}
