"""The devicemapper backend: thin volumes in a dm-thin pool, constant-time snapshots.

The pool's data and metadata are block devices given by the user or, by default, sparse
files under the root dir on loop devices (Convoy's setup, without the manual steps):

    ROOT/devicemapper/data.img       sparse, default 100G
    ROOT/devicemapper/metadata.img   sparse, default 1% of data (at least 64M, at most 16G)
    ROOT/devicemapper/devices.json   volume and snapshot names -> thin device ids

The pool and its devices are named after the root dir, so two daemons never collide, and a
thin device's dm name is its thin id (`PREFIX-tID`): unique, short, whatever the volume is
called. A volume is a thin device; a snapshot is `create_snap` of it (metadata only: constant
time); changed blocks between two snapshots come from `thin_delta` run on a reserved metadata
snapshot, never on live metadata. setup() repairs what a killed daemon leaves behind: suspended
devices, a reserved metadata snapshot, devices named by an older scheme. docs/devicemapper.md
explains the defaults, names and locks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Collection
from pathlib import Path

from pyvol import devwait, locks
from pyvol.crashpoint import crashpoint
from pyvol.errors import Conflict, InvalidInput, NotFound, PoolFull, PyvolError
from pyvol.files import write_whole
from pyvol.fs import device_size
from pyvol.log import event
from pyvol.run import run
from pyvol.units import format_size, parse_size

from . import loopdev
from .base import BlockBackend, DeactivateFailed, Quiesce, Range, VolumeSpec, release_each

log = logging.getLogger(__name__)

SECTOR = 512
# what a "delete" of a thin id says when the pool holds no such device (deleted already, or
# never made: a crash between allocating its id and create_snap); ENODATA from dm-thin
GONE = ("No data available", "No such file", "does not exist")
# A snapshot of a mounted volume runs inside its filesystem's freeze (pyvol.freeze.frozen thaws
# after its LIMIT, 20 s): each dm step in that window has a timeout well inside it (a tool
# that does not end when killed at its timeout adds run.KILLED_WAIT).
SUSPEND_TIMEOUT = 8.0
CREATE_SNAP_TIMEOUT = 8.0
RESUME_TIMEOUT = 10.0
# thin_dump/thin_delta may run up to DUMP_TIMEOUT under the metadata snapshot's lock; a second
# dump (another backup) waits for the first rather than failing
DUMP_TIMEOUT = 600.0
METASNAP_WAIT = DUMP_TIMEOUT + 60
POOL_LOCK = "devicemapper"
METASNAP_LOCK = "devicemapper-metasnap"
# How long an activated device's /dev/mapper node may take to be there (udevd makes it where
# it runs; without udev, dmsetup does, and mknodes once more if it is missing)
NODE_WAIT = 10.0
DEFAULTS = {
    "data_size": "100G",
    "block_size": "64K",        # see docs/devicemapper.md: small random writes after a snapshot
    "low_water_mark": "1G",
    "overcommit_ratio": "10",
}


def _udev_env() -> dict[str, str]:
    # Without a running udev, dmsetup must make /dev/mapper nodes itself or wait forever.
    return {} if os.path.exists("/run/udev/control") else {"DM_DISABLE_UDEV": "1"}


def dmsetup(*args: str, timeout: float = 60) -> str:
    return run(["dmsetup", *args], timeout=timeout, env=_udev_env())


class DevicemapperBackend(BlockBackend):
    name = "devicemapper"
    scope = "local"
    options = {}
    discard = True
    instant_snapshots = True

    def __init__(self, root: Path, settings: dict[str, str] | None = None):
        super().__init__(root, settings)
        s = {**DEFAULTS, **self.settings}
        self.base = self.root / "devicemapper"
        self.data_file = Path(s.get("data_file") or self.base / "data.img")
        self.metadata_file = Path(s.get("metadata_file") or self.base / "metadata.img")
        self.data_device = s.get("data_device")
        self.metadata_device = s.get("metadata_device")
        self.data_size = parse_size(s["data_size"], "devicemapper data_size")
        meta_default = min(max(self.data_size // 100, 64 << 20), 16 << 30)
        self.metadata_size = parse_size(s.get("metadata_size", str(meta_default)),
                                        "devicemapper metadata_size")
        self.block_size = parse_size(s["block_size"], "devicemapper block_size")
        if self.block_size % (64 << 10) or not (64 << 10) <= self.block_size <= (1 << 30):
            raise InvalidInput("devicemapper block_size must be a multiple of 64K between 64K "
                               f"and 1G, not {s['block_size']}")
        self.change_granularity = self.block_size
        self.low_water_mark = parse_size(s["low_water_mark"], "devicemapper low_water_mark")
        try:
            self.overcommit_ratio = float(s["overcommit_ratio"])
        except ValueError:
            raise InvalidInput("devicemapper overcommit_ratio must be a number, e.g. 10") from None
        tag = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]
        self.prefix = f"pyvol-{tag}"
        self.pool = f"{self.prefix}-pool"
        self.devices_file = self.base / "devices.json"
        self.locks_dir = self.root / "locks"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        missing = [t for t in ("dmsetup", "thin_check", "thin_delta", "thin_dump", "losetup")
                   if shutil.which(t) is None]
        if missing:
            return (f"missing tools: {', '.join(missing)} "
                    "(install dmsetup and thin-provisioning-tools)")
        if not os.path.exists("/dev/mapper/control"):
            return "this kernel has no device-mapper (/dev/mapper/control is missing)"
        try:
            targets = dmsetup("targets", timeout=10)
        except PyvolError as e:
            return f"device-mapper does not answer: {e}"
        if "thin-pool" not in targets:
            try:
                run(["modprobe", "dm_thin_pool"], timeout=30)
            except PyvolError:
                return "this kernel has no dm-thin (module dm_thin_pool)"
        return None

    # devices.json: our only records, next to the pool they describe
    def _load(self) -> dict:
        try:
            return json.loads(self.devices_file.read_text())
        except FileNotFoundError:
            return {"version": 1, "next_id": 1, "volumes": {}}

    def _save(self, devices: dict) -> None:
        write_whole(self.devices_file, json.dumps(devices, indent=1, sort_keys=True).encode())

    @contextlib.contextmanager
    def _devices(self):
        """Read-modify-write of devices.json under the pool lock, shared by all workers.

        Held for dm calls that take moments (create_thin, create_snap, dmsetup create), never
        for a thin_dump: every Create and Mount on the host waits for it.
        """
        with locks.held(self.locks_dir, POOL_LOCK, "the devicemapper pool"):
            devices = self._load()
            yield devices
            self._save(devices)

    def _vol(self, name: str, devices: dict | None = None) -> dict:
        vol = (devices or self._load())["volumes"].get(name)
        if vol is None:
            raise NotFound(f"volume {name} not found in the devicemapper pool")
        return vol

    def _snap_rec(self, name: str, snap: str, devices: dict | None = None) -> dict:
        rec = self._vol(name, devices)["snapshots"].get(snap)
        if rec is None:
            raise NotFound(f"snapshot {name}@{snap} not found in the devicemapper pool")
        return rec

    # the pool
    def _pool_devices(self) -> tuple[str, str]:
        if self.data_device and self.metadata_device:
            return self.data_device, self.metadata_device
        if bool(self.data_device) != bool(self.metadata_device):
            raise InvalidInput("devicemapper needs both data_device and metadata_device, "
                               "or neither (then it uses sparse files under the root dir)")
        for path, size in ((self.data_file, self.data_size),
                           (self.metadata_file, self.metadata_size)):
            if not path.exists():
                tmp = path.with_suffix(".new")
                with open(tmp, "wb") as f:
                    f.truncate(size)
                os.rename(tmp, path)
        return (loopdev.attach(self.data_file, direct_io=False),
                loopdev.attach(self.metadata_file, direct_io=False))

    def _exists(self, dm_name: str) -> bool:
        try:
            dmsetup("info", dm_name, timeout=10)
            return True
        except PyvolError:
            return False

    def setup(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        data, meta = self._pool_devices()
        if not self._exists(self.pool):
            fresh = not self.devices_file.exists() and _is_zero(meta, 4096)
            if not fresh:
                self._check_metadata(meta)
            data_sectors = device_size(data) // SECTOR
            table = (f"0 {data_sectors} thin-pool {meta} {data} {self.block_size // SECTOR} "
                     f"{max(self.low_water_mark // self.block_size, 1)} 1 error_if_no_space")
            dmsetup("create", self.pool, "--table", table)
            if fresh:
                self._save(self._load())
        self._node(self.pool)  # its thin devices' tables name it by path: it must be here
        # what a daemon killed mid-operation leaves behind, repaired before anything else
        # touches the pool (and before the manager thaws filesystems, which a suspended
        # device would block)
        self._resume_suspended()
        self._release_stale_metadata_snapshot()
        self._rename_old_devices()
        self._drop_retired()
        devices = self._load()
        for name, vol in devices["volumes"].items():
            if vol.get("active"):  # active before a reboot: active again
                self.activate(name)

    def _check_metadata(self, meta: str) -> None:
        try:
            run(["thin_check", "-q", meta], timeout=600)
        except PyvolError as e:
            raise PyvolError(
                f"the devicemapper pool's metadata ({meta}) failed thin_check ({e}); the pool "
                "was not activated. Repair it with: thin_repair -i METADATA -o NEW_METADATA "
                "(onto a spare device or file of the same size), check NEW_METADATA with "
                "thin_check, then put it in place of the old metadata and restart pyvol"
            ) from None

    def _dm_devices(self) -> dict[str, dict]:
        """This pool's active dm devices, the pool included: name -> suspended, open, devno."""
        out = dmsetup("info", "-c", "--noheadings", "-o", "suspended,open,major,minor,name",
                      "--separator", ":", timeout=10)
        found = {}
        for line in out.splitlines():
            parts = line.strip().split(":", 4)  # the name last: ':' is in no name we make
            if len(parts) != 5:
                continue  # "No devices found"
            suspended, opened, major, minor, name = parts
            if name == self.pool or name.startswith(self.prefix + "-"):
                found[name] = {"suspended": suspended.strip().lower() == "suspended",
                               "open": int(opened) if opened.strip().isdigit() else 0,
                               "devno": f"{major.strip()}:{minor.strip()}"}
        return found

    def resume_io(self) -> bool:
        # A snapshot suspends only while it holds the pool lock: free, no live one is. A
        # `dmsetup suspend` a killed worker started goes on without it, and may land after
        # this looked: wait until none is left.
        try:
            with locks.held(self.locks_dir, POOL_LOCK, "the devicemapper pool", wait=0):
                if self._suspends_in_flight():
                    return False
                return not self._resume_suspended()
        except Conflict:
            return False

    def _suspends_in_flight(self) -> list[int]:
        """Processes running `dmsetup suspend` on one of this pool's devices."""
        found = []
        ours = self.prefix.encode() + b"-"  # the pool's name and its devices' names
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                # comm first: reading cmdline takes the process's memory lock, which a
                # writer faulting on a frozen filesystem may hold until the thaw
                with open(f"/proc/{entry.name}/comm", "rb") as f:
                    if f.read().strip() != b"dmsetup":
                        continue
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            if (os.path.basename(argv[0]) == b"dmsetup" and b"suspend" in argv
                    and any(a.startswith(ours) for a in argv)):
                found.append(int(entry.name))
        return found

    def _resume_suspended(self) -> list[str]:
        """A daemon or worker killed between `dmsetup suspend` and `resume` (in snapshot) left
        a device suspended, and every writer in its container blocks until it is resumed:
        resume the pool first, then each of its devices. Those still suspended."""
        found, stuck = self._dm_devices(), []
        for dm_name in sorted(found, key=lambda n: (n != self.pool, n)):
            if not found[dm_name]["suspended"]:
                continue
            try:
                dmsetup("resume", dm_name, timeout=RESUME_TIMEOUT)
            except PyvolError as e:
                log.error("device %s is suspended and could not be resumed: %s", dm_name, e)
                stuck.append(dm_name)
                continue
            event(log, "resumed a device-mapper device left suspended by a killed daemon or "
                  "worker", device=dm_name)
        return stuck

    def _release_held_metadata_snapshot(self, why: str) -> None:
        """Release a metadata snapshot the pool holds. Only with METASNAP_LOCK held: then no
        one is reading it, so whoever reserved it died (a crash during thin_dump/thin_delta)
        and every later reserve would fail until it is released."""
        held = self._status()["held"]
        if held != "-":
            self._message("release_metadata_snap")
            event(log, "released a devicemapper metadata snapshot left reserved",
                  pool=self.pool, held=held, found=why)

    def _release_stale_metadata_snapshot(self) -> None:
        try:
            # not waiting: a holder (an old worker still dumping) is using it; its own
            # release follows
            with locks.held(self.locks_dir, METASNAP_LOCK, "", wait=0):
                self._release_held_metadata_snapshot("at start")
        except Conflict:
            pass
        except PyvolError as e:
            log.error("could not check the devicemapper pool's metadata snapshot: %s", e)

    def _rename_old_devices(self) -> None:
        """Devices activated by an older pyvol are named after volumes and snapshots
        (PREFIX-v-NAME, PREFIX-s-NAME--SNAP). Rename each to its thin-id name, so that this
        daemon never activates a second device for one thin id; `dmsetup rename` works on
        an open or mounted device, which keeps its device number."""
        found = self._dm_devices()
        pool_devno = found.get(self.pool, {}).get("devno")
        for dm_name in sorted(found):
            if dm_name == self.pool or _THIN_NAME.fullmatch(dm_name[len(self.prefix) + 1:]):
                continue
            try:
                table = dmsetup("table", dm_name, timeout=10).split()
                if len(table) < 5 or table[2] != "thin" or not table[4].isdigit() or (
                        pool_devno and table[3] != pool_devno):
                    log.warning("device %s is not a thin device of pool %s; left as it is",
                                dm_name, self.pool)
                    continue
                thin_id = int(table[4])
                new = self._thin_name(thin_id)
                if new in found:  # both names map the id: keep the one in use
                    if not found[dm_name]["open"]:
                        dmsetup("remove", "--retry", dm_name)
                        event(log, "removed an unused second device of a thin id",
                              device=dm_name, thin_id=thin_id)
                        continue
                    if found[new]["open"]:
                        log.error("devices %s and %s both map thin id %d and both are open; "
                                  "left as they are", dm_name, new, thin_id)
                        continue
                    dmsetup("remove", "--retry", new)
                dmsetup("rename", dm_name, new)
                found[new] = found[dm_name]
                event(log, "renamed a device-mapper device to its thin-id name",
                      device=dm_name, new_name=new, thin_id=thin_id)
            except PyvolError as e:
                log.error("could not rename device %s to its thin-id name: %s", dm_name, e)

    def _status(self) -> dict:
        # "0 LEN thin-pool TRANS USED_META/TOTAL_META USED_DATA/TOTAL_DATA HELD MODE ..."
        f = dmsetup("status", self.pool, timeout=10).split()
        if len(f) < 6 or "/" not in f[5]:
            raise PyvolError(f"the devicemapper pool reports: {' '.join(f[3:]) or 'nothing'}")
        um, tm = (int(x) for x in f[4].split("/"))
        ud, td = (int(x) for x in f[5].split("/"))
        return {"meta_used": um * 4096, "meta_size": tm * 4096, "data_used": ud * self.block_size,
                "data_size": td * self.block_size, "mode": f[7] if len(f) > 7 else "?",
                "held": f[6] if len(f) > 6 else "-",  # the metadata snapshot's root, or "-"
                "needs_check": "needs_check" in f}

    def _message(self, *words: str, timeout: float = 60) -> None:
        dmsetup("message", self.pool, "0", *words, timeout=timeout)

    def _check_space(self, devices: dict, extra: int) -> None:
        st = self._status()
        if st["mode"] != "rw" or st["data_used"] >= st["data_size"]:
            raise PoolFull(f"the devicemapper pool is out of space ({format_size(st['data_used'])} "
                           f"of {format_size(st['data_size'])} data used, mode {st['mode']}): "
                           "remove volumes or snapshots, or grow the pool")
        if st["meta_used"] >= st["meta_size"] * 0.95:
            raise PoolFull("the devicemapper pool's metadata is full: remove snapshots")
        committed = sum(v["size"] for v in devices["volumes"].values()) + extra
        limit = self.overcommit_ratio * st["data_size"]
        if extra and committed > limit:
            raise InvalidInput(
                f"size {format_size(extra)} would over-commit the devicemapper pool: volumes "
                f"would total {format_size(committed)}, above {self.overcommit_ratio:g} x "
                f"{format_size(st['data_size'])} of data; accepted: up to "
                f"{format_size(max(int(limit - committed + extra), 0))} "
                "(or raise PYVOL_DEVICEMAPPER_OVERCOMMIT_RATIO)")

    def _new_id(self, devices: dict, retire: bool = False) -> int:
        """Allocate a thin id and persist it before the pool hears of it: a crash in between
        leaks an id, never reuses one. ``retire``: listed under "retired" in that same write,
        for a device whose end a crash must not leak (setup deletes what is listed there)."""
        new = devices["next_id"]
        devices["next_id"] = new + 1
        if retire:
            devices.setdefault("retired", []).append(new)
        self._save(devices)
        return new

    # dm names: by thin id, unique per thin device and short whatever the volume's name
    # (names made of volume and snapshot names collided and could pass the kernel's 127 bytes)
    def _thin_name(self, thin_id: int) -> str:
        return f"{self.prefix}-t{thin_id}"

    # volumes
    def create(self, spec: VolumeSpec) -> None:
        with self._devices() as devices:
            if spec.name in devices["volumes"]:
                raise Conflict(f"the devicemapper pool already holds a volume {spec.name}")
            self._check_space(devices, spec.size)
            thin_id = self._new_id(devices)
            self._message("create_thin", str(thin_id))
            devices["volumes"][spec.name] = {"id": thin_id, "size": spec.size, "snapshots": {}}

    def remove(self, name: str) -> None:
        with self._devices() as devices:
            vol = devices["volumes"].get(name)
            if vol is None:
                return
            for snap, rec in list(vol["snapshots"].items()):
                self._drop(rec["id"])
                del vol["snapshots"][snap]
            self._drop(vol["id"])
            del devices["volumes"][name]

    def _drop(self, thin_id: int) -> None:
        """Deactivate and delete a thin device; one the pool no longer holds, or never made
        (a crash between allocating its id and create_snap), is already gone: no error."""
        dm_name = self._thin_name(thin_id)
        if self._exists(dm_name):
            dmsetup("remove", "--retry", dm_name)
        try:
            self._message("delete", str(thin_id))
        except PyvolError as e:
            if not any(gone in str(e) for gone in GONE):
                raise

    def list(self) -> list[str]:
        return sorted(self._load()["volumes"])

    def _activate(self, thin_id: int, size: int, readonly: bool = False) -> str:
        dm_name = self._thin_name(thin_id)
        if not self._exists(dm_name):
            args = ["create", dm_name] + (["--readonly"] if readonly else [])
            dmsetup(*args, "--table", f"0 {size // SECTOR} thin /dev/mapper/{self.pool} {thin_id}")
        return self._node(dm_name)

    def _node(self, dm_name: str) -> str:
        """/dev/mapper/DM_NAME once it is the active device's node here: made by `dmsetup
        mknodes` if missing (without udev nothing else makes it; a device activated from
        another mount namespace has none here), waited for on uevents (devwait)."""
        dev = f"/dev/mapper/{dm_name}"
        if not os.path.exists(dev):
            dmsetup("mknodes", dm_name)
        devwait.until(lambda: devwait.block_device(dev), NODE_WAIT, PyvolError(
            f"device-mapper device {dm_name} is active but {dev} was not its node here within "
            f"{NODE_WAIT:g} s (run `dmsetup mknodes {dm_name}`)"))
        return dev

    def activate(self, name: str) -> str:
        with self._devices() as devices:
            vol = self._vol(name, devices)
            dev = self._activate(vol["id"], vol["size"])
            vol["active"] = True
        return dev

    def deactivate(self, name: str) -> None:
        with self._devices() as devices:
            vol = devices["volumes"].get(name)
            if vol is None:
                return
            if self._exists(self._thin_name(vol["id"])):
                dmsetup("remove", "--retry", self._thin_name(vol["id"]))
            vol.pop("active", None)

    def deactivate_many(self, names: Collection[str]) -> None:
        """One look at the active devices (deactivate() asks dmsetup about each volume) and
        one write of devices.json, under one hold of the pool lock."""
        failed = None
        with self._devices() as devices:
            active = self._dm_devices()

            def release(name: str) -> None:
                vol = devices["volumes"].get(name)
                if vol is None:
                    return
                if self._thin_name(vol["id"]) in active:
                    dmsetup("remove", "--retry", self._thin_name(vol["id"]))
                vol.pop("active", None)

            try:
                release_each(self.name, names, release)
            except DeactivateFailed as e:
                failed = e  # raised once devices.json says what was released
        if failed is not None:
            raise failed

    # snapshots
    def snapshot(self, name: str, snap: str, quiesce: Quiesce = contextlib.nullcontext) -> None:
        with self._devices() as devices:
            vol = self._vol(name, devices)
            if snap in vol["snapshots"]:
                raise Conflict(f"snapshot {name}@{snap} already exists in the devicemapper pool")
            self._check_space(devices, 0)
            thin_id = self._new_id(devices)
            origin = self._thin_name(vol["id"])
            active = self._exists(origin)
            # The pool lock is held: freeze only now (a container's writes never wait for
            # a lock), and suspend (no I/O in flight while the mappings are shared) without
            # freezing again. Each step has a timeout inside the freeze's limit.
            try:
                with quiesce():
                    try:
                        if active:
                            dmsetup("suspend", "--nolockfs", origin, timeout=SUSPEND_TIMEOUT)
                            crashpoint("devicemapper.suspended")
                        self._message("create_snap", str(thin_id), str(vol["id"]),
                                      timeout=CREATE_SNAP_TIMEOUT)
                    finally:
                        if active:  # also after a suspend that timed out: it may have landed
                            self._resume(origin)
            except BaseException:
                self._forget(thin_id)  # never recorded: it would leak its shared blocks
                raise
            vol["snapshots"][snap] = {"id": thin_id, "size": vol["size"]}

    def _resume(self, dm_name: str) -> None:
        """Resume after a snapshot, once more if the first try fails: a device left
        suspended blocks every writer in its container (the next start resumes it too)."""
        try:
            dmsetup("resume", dm_name, timeout=RESUME_TIMEOUT)
        except PyvolError as e:
            log.warning("resume of %s failed (%s); trying again", dm_name, e)
            try:
                dmsetup("resume", dm_name, timeout=RESUME_TIMEOUT * 3)
            except PyvolError as e2:
                raise PyvolError(f"device {dm_name} could not be resumed after a snapshot "
                                 f"({e2}); its writers are blocked: run `dmsetup resume "
                                 f"{dm_name}` or restart pyvol") from None

    def _forget(self, thin_id: int) -> None:
        """Best effort: delete a thin device a failed snapshot may have made."""
        try:
            self._message("delete", str(thin_id), timeout=30)
        except PyvolError as e:
            log.debug("thin id %d of a failed snapshot not deleted: %s", thin_id, e)

    def remove_snapshot(self, name: str, snap: str) -> None:
        with self._devices() as devices:
            vol = devices["volumes"].get(name)
            rec = vol and vol["snapshots"].get(snap)
            if not rec:
                return
            self._drop(rec["id"])
            del vol["snapshots"][snap]

    def snapshots(self, name: str) -> list[str]:
        vol = self._load()["volumes"].get(name)
        return sorted(vol["snapshots"]) if vol else []

    def clone(self, name: str, snap: str, spec: VolumeSpec) -> None:
        with self._devices() as devices:
            rec = self._snap_rec(name, snap, devices)
            if spec.name in devices["volumes"]:
                raise Conflict(f"the devicemapper pool already holds a volume {spec.name}")
            self._check_space(devices, spec.size)
            thin_id = self._new_id(devices)
            self._message("create_snap", str(thin_id), str(rec["id"]))
            devices["volumes"][spec.name] = {"id": thin_id, "size": max(spec.size, rec["size"]),
                                             "snapshots": {}}

    def grow(self, name: str, size: int) -> None:
        """The record's size first (what the next activation uses), then an active device's
        table is reloaded at the new size: a crash between leaves a device that takes its
        new size at the next grow or activation, never a device larger than its record."""
        with self._devices() as devices:
            vol = self._vol(name, devices)
            size = max(size, vol["size"])  # never smaller (base.py: the caller refuses it)
            self._check_space(devices, size - vol["size"])
            vol["size"] = size
            self._save(devices)
            dm_name = self._thin_name(vol["id"])
            if self._exists(dm_name):
                table = f"0 {size // SECTOR} thin /dev/mapper/{self.pool} {vol['id']}"
                dmsetup("reload", dm_name, "--table", table)
                self._resume(dm_name)  # swaps in the larger table

    def rollback(self, name: str, snap: str) -> None:
        """A new thin device from the snapshot's (create_snap: metadata only, constant time
        whatever the volume holds) takes the volume's place in devices.json, in one atomic
        write; the old thin device is deleted after. Every id between its allocation and
        its end is listed under "retired", so a crash at any step leaks nothing: setup
        deletes what is listed there."""
        with self._devices() as devices:
            vol = self._vol(name, devices)
            rec = self._snap_rec(name, snap, devices)
            self._check_space(devices, 0)
            old, dm_old = vol["id"], self._thin_name(vol["id"])
            if self._exists(dm_old):
                if self._dm_devices().get(dm_old, {}).get("open"):
                    raise Conflict(f"volume {name}'s device {dm_old} is open (in use outside "
                                   "pyvol's mounts): close it, then retry")
                dmsetup("remove", "--retry", dm_old)
            new = self._new_id(devices, retire=True)
            self._message("create_snap", str(new), str(rec["id"]))
            crashpoint("devicemapper.rollback.made")
            vol["id"] = new
            vol.pop("active", None)
            retired = devices["retired"]
            retired.remove(new)
            retired.append(old)
            self._save(devices)  # the swap: the volume is the snapshot's data from here on
            crashpoint("devicemapper.rollback.swapped")
            try:
                self._drop(old)
            except Exception as e:  # rolled back all the same: the caller must hear success
                log.error("rollback of %s: could not delete its old thin device %d: %s; "
                          "left listed as retired, deleted at the next start", name, old, e)
                return
            retired.remove(old)

    def _drop_retired(self) -> None:
        """Delete the thin devices a killed rollback left listed (see rollback)."""
        with self._devices() as devices:
            for thin_id in list(devices.get("retired", [])):
                try:
                    self._drop(thin_id)
                except PyvolError as e:
                    log.error("could not delete retired thin device %d: %s; retried at the "
                              "next start", thin_id, e)
                    continue
                devices["retired"].remove(thin_id)
                event(log, "deleted a thin device a killed rollback left", thin_id=thin_id)

    @contextlib.contextmanager
    def _metadata_snapshot(self):
        """thin tools read a reserved snapshot of the metadata, never the live copy.

        The pool holds one metadata snapshot at most, so it has a lock of its own (not the
        pool's: a dump may take minutes). With that lock held nobody else uses a snapshot
        the pool still holds, so it is a dead holder's, and it is released first.
        """
        with locks.held(self.locks_dir, METASNAP_LOCK,
                        "the devicemapper pool's metadata snapshot", wait=METASNAP_WAIT):
            self._release_held_metadata_snapshot("before a reserve")
            self._message("reserve_metadata_snap")
            try:
                yield self._pool_devices()[1]
            finally:
                self._message("release_metadata_snap")

    def _thin_ids(self, name: str, *snaps: str) -> list[int]:
        with locks.held(self.locks_dir, POOL_LOCK, "the devicemapper pool"):  # moments only
            devices = self._load()
            return [self._snap_rec(name, s, devices)["id"] for s in snaps]

    def mapped_ranges(self, name: str, snap: str) -> list[Range]:
        (new,) = self._thin_ids(name, snap)
        with self._metadata_snapshot() as meta:
            xml = run(["thin_dump", "--metadata-snap", "--dev-id", str(new), meta],
                      timeout=DUMP_TIMEOUT)
        return _ranges_from_xml(xml, self.block_size, delta=False)

    def changed_ranges(self, name: str, base: str, snap: str) -> list[Range]:
        old, new = self._thin_ids(name, base, snap)
        with self._metadata_snapshot() as meta:
            xml = run(["thin_delta", "--metadata-snap", "--snap1", str(old), "--snap2",
                       str(new), meta], timeout=DUMP_TIMEOUT)
        return _ranges_from_xml(xml, self.block_size, delta=True)

    @contextlib.contextmanager
    def read_snapshot(self, name: str, snap: str):
        rec = self._snap_rec(name, snap)
        dev = self._activate(rec["id"], rec["size"], readonly=True)
        try:
            yield dev
        finally:
            dmsetup("remove", "--retry", self._thin_name(rec["id"]))

    # space
    def usage(self) -> dict:
        st = self._status()
        return {"pool": self.pool, "pool_size": st["data_size"], "pool_used": st["data_used"],
                "pool_free": st["data_size"] - st["data_used"],
                "metadata_size": st["meta_size"], "metadata_used": st["meta_used"],
                "block_size": self.block_size, "mode": st["mode"],
                "overcommit_ratio": self.overcommit_ratio}

    def volume_usage(self, name: str) -> dict:
        st = self._status()
        out = {"pool_used": st["data_used"], "pool_size": st["data_size"]}
        vol = self._load()["volumes"].get(name)
        if vol is not None and self._exists(self._thin_name(vol["id"])):
            f = dmsetup("status", self._thin_name(vol["id"]), timeout=10).split()
            if len(f) > 3 and f[3].isdigit():
                out["allocated"] = int(f[3]) * SECTOR
        return out


_THIN_NAME = re.compile(r"t[0-9]+")  # after PREFIX-: the name of a thin device


def _ranges_from_xml(xml: str, block: int, delta: bool) -> list[Range]:
    """Byte ranges from thin_delta (<different>/<left_only>/<right_only>) or thin_dump."""
    root = ET.fromstring(xml)
    blocks: list[tuple[int, int]] = []
    if delta:
        for el in root.iter():
            if el.tag in ("different", "left_only", "right_only"):
                blocks.append((int(el.get("begin")), int(el.get("length"))))
    else:
        for el in root.iter():
            if el.tag == "range_mapping":
                blocks.append((int(el.get("origin_begin")), int(el.get("length"))))
            elif el.tag == "single_mapping":
                blocks.append((int(el.get("origin_block")), 1))
    merged: list[Range] = []
    for start, length in sorted(blocks):
        off, n = start * block, length * block
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((off, n))
    return merged


def _is_zero(dev: str, n: int) -> bool:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.pread(fd, n, 0) == bytes(n)
    finally:
        os.close(fd)
