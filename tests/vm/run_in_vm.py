#!/usr/bin/env python3
"""Run a command inside a real Linux kernel under qemu, with this host's files.

These machines' kernel has no device-mapper and no NFS, so tests that need them boot
Debian's stock kernel (package linux-image-amd64) with software emulation and run there:

    python tests/vm/run_in_vm.py [--mem 3G] [--timeout 1800] -- python -m pytest -m devicemapper

The guest sees the host's / read-only over virtio-9p (top-level directories bind-mounted
into a tmpfs root), with tmpfs overlays on /etc, /var, /root, /home and the caller's
directory, so it can write anywhere and changes stay in the guest. /tmp, /run and /mnt are
guest-local tmpfs. The command runs in the caller's directory with the caller's PATH and
PYVOL_*/CI variables; its output is the guest console; its exit status is returned.
"""

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

GUEST_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]  # needed before switch_root
POWER_DOWN = re.compile(rb"^\[\s*[0-9.]+\] reboot: Power down")
CACHE = Path(os.environ.get("PYVOL_VM_CACHE", "/var/cache/pyvol-vm"))

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /mods/$m 2>/dev/null; done
mkdir -p /host /newroot /ovl
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host || {
    echo "run_in_vm: cannot mount the host's root over 9p"; poweroff -f; }
mkdir -p /job
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none job /job
mount -t tmpfs -o mode=0755 root /newroot
mount -t tmpfs ovl /ovl
for d in /host/* /host/.[!.]*; do
    [ -e "$d" ] || [ -L "$d" ] || continue
    n=${d#/host/}
    case "$n" in
        proc|sys|dev|run|tmp|mnt|media|lost+found|job) mkdir -p "/newroot/$n" ;;
        *) if [ -L "$d" ]; then cp -a "$d" /newroot/; elif [ -d "$d" ]; then
               mkdir -p "/newroot/$n"; mount --bind "$d" "/newroot/$n"; fi ;;
    esac
done
overlay() {  # overlay $1 (a path in the guest) with a tmpfs upper layer
    [ -d "/host$1" ] || return 0
    k=$(echo "$1" | tr / _)
    mkdir -p "/ovl/$k/u" "/ovl/$k/w" "/newroot$1"
    mount -t overlay overlay -o "lowerdir=/host$1,upperdir=/ovl/$k/u,workdir=/ovl/$k/w" "/newroot$1"
}
mount -t tmpfs -o mode=1777 tmp /newroot/tmp
mount -t tmpfs -o mode=0755 run /newroot/run
mount -t tmpfs mnt /newroot/mnt
# after /tmp: the caller's directory may be under it
for p in /etc /var /root /home $(cat /job/cwd); do overlay "$p"; done
mkdir -p /newroot/job
mount --move /job /newroot/job
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh -c '/bin/sh /job/guest.sh; echo o > /proc/sysrq-trigger; sleep 30'
"""

GUEST = r"""set +e
mkdir -p /dev/pts /dev/shm /run/lock /run/docker/plugins
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
ln -sf /proc/self/fd /dev/fd
busybox hostname pyvol-vm
ip link set lo up 2>/dev/null
for m in loop dm_mod dm_thin_pool overlay; do modprobe "$m" 2>/dev/null; done
export HOME=/root DM_DISABLE_UDEV=1 PYTHONDONTWRITEBYTECODE=1 PYVOL_IN_VM=1
{env}
cd {cwd} || exit 1
{cmd}
echo $? > /job/rc
sync
busybox poweroff -f
"""


def kernel() -> tuple[str, Path]:
    for vmlinuz in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        version = vmlinuz.name[len("vmlinuz-"):]
        if Path(f"/lib/modules/{version}/kernel/drivers/md/dm-thin-pool.ko").exists():
            return version, vmlinuz
    sys.exit("run_in_vm: no kernel with dm-thin under /boot: apt-get install linux-image-amd64")


def initramfs(version: str) -> Path:
    """A busybox initramfs that mounts the host over 9p; built once per kernel and cached."""
    digest = hashlib.sha256((INIT + " ".join(GUEST_MODULES)).encode()).hexdigest()[:12]
    out = CACHE / f"initramfs-{version}-{digest}.cpio"  # a changed init is a new image
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        sys.exit("run_in_vm: busybox is missing: apt-get install busybox-static")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        for d in ("bin", "mods", "proc", "sys", "dev"):
            (tree / d).mkdir()
        shutil.copy(busybox, tree / "bin/busybox")
        order = []
        for module in GUEST_MODULES:
            deps = subprocess.run(["modprobe", "-S", version, "--show-depends", module],
                                  capture_output=True, text=True, check=True, timeout=30).stdout
            for line in deps.splitlines():
                if line.startswith("insmod "):
                    path = Path(line.split()[1])
                    if path.name not in order:
                        order.append(path.name)
                        shutil.copy(path, tree / "mods" / path.name)
        (tree / "modules.order").write_text("\n".join(order) + "\n")
        (tree / "init").write_text(INIT)
        (tree / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True,
                               timeout=60).stdout
        cpio = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=tree, input=files,
                              capture_output=True, check=True, timeout=120).stdout
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(cpio)
        tmp_out.rename(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", default="3G")
    ap.add_argument("--cpus", default="2")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("command", nargs="+")
    args = ap.parse_args()

    version, vmlinuz = kernel()
    initrd = initramfs(version)
    cwd = os.getcwd()
    passed = {k: v for k, v in os.environ.items()
              if k in ("PATH", "CI", "VIRTUAL_ENV") or k.startswith("PYVOL_")}
    with tempfile.TemporaryDirectory(prefix="pyvol-vm-") as job:
        job = Path(job)
        (job / "guest.sh").write_text(GUEST.format(
            env="\n".join(f"export {k}={shlex.quote(v)}" for k, v in passed.items()),
            cwd=shlex.quote(cwd), cmd=shlex.join(args.command)))
        (job / "cwd").write_text(cwd + "\n")  # the init overlays it, so the guest may write there
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-cpu", "max",
                "-smp", args.cpus, "-m", args.mem, "-nodefaults", "-display", "none",
                "-serial", "stdio", "-no-reboot",
                "-kernel", str(vmlinuz), "-initrd", str(initrd),
                "-append", "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init",
                "-fsdev", "local,id=host,path=/,readonly=on,security_model=none,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=host,mount_tag=hostroot",
                "-fsdev", f"local,id=job,path={job},security_model=none",
                "-device", "virtio-9p-pci,fsdev=job,mount_tag=job"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        timer = threading.Timer(args.timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:  # the guest's console; its power-off notice is noise
                if not POWER_DOWN.search(line):
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
            proc.wait()
        finally:
            timer.cancel()
        if proc.returncode == -9:
            print(f"run_in_vm: the guest did not finish within {args.timeout:.0f}s", file=sys.stderr)
            return 124
        rc = job / "rc"
        if not rc.exists():
            print("run_in_vm: the guest stopped without an exit status", file=sys.stderr)
            return 1
        return int(rc.read_text().strip() or 1)


if __name__ == "__main__":
    sys.exit(main())
