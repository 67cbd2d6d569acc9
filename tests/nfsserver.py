"""The kernel NFS server, on 127.0.0.1, inside the qemu lane's guest (tests/vm/run_in_vm.py).

Exports live on an ext4 image (nfsd cannot export the guest's 9p or overlay directories, and
this kernel's tmpfs has no user xattrs, which NFSv4.2 passes through), each with its own fsid.
NFSv4's and the lock manager's grace and lease times are cut to 10 s so that a restarted server
serves again quickly, and starting or resuming the server waits until it grants locks.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

BASE = Path("/mnt/pyvol-nfs")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


class NfsServer:
    def __init__(self):
        self._fsid = itertools.count(1)

    @staticmethod
    def unavailable_reason() -> str | None:
        if os.environ.get("PYVOL_IN_VM") != "1":
            return "the NFS server runs only in the qemu lane's kernel"
        return None

    def start(self) -> NfsServer:
        BASE.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mountpoint", "-q", str(BASE)]).returncode != 0:
            image = Path("/mnt/pyvol-nfs.img")  # sparse, on the guest's tmpfs
            with open(image, "wb") as f:
                f.truncate(3 << 30)
            sh("mkfs.ext4", "-q", "-F", str(image))
            sh("mount", "-o", "loop", str(image), str(BASE))
        sh("modprobe", "nfsd", check=False)
        if subprocess.run(["mountpoint", "-q", "/proc/fs/nfsd"]).returncode != 0:
            sh("mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd")
        for knob in ("nfsv4gracetime", "nfsv4leasetime"):
            Path(f"/proc/fs/nfsd/{knob}").write_text("10")
        # the lock manager's own grace period (50 s by default) holds NFSv4 locks back too
        Path("/proc/sys/fs/nfs/nlm_grace_period").write_text("10")
        Path("/var/lib/nfs/rpc_pipefs").mkdir(parents=True, exist_ok=True)
        Path("/run/rpcbind").mkdir(parents=True, exist_ok=True)
        sh("rpcbind", "-w", check=False)
        sh("rpc.statd", check=False)  # NFSv3 locking (NLM), for the server and the client
        sh("rpc.mountd")
        sh("rpc.nfsd", "8")
        self.wait_for_locks()
        return self

    def wait_for_locks(self) -> None:
        """Until a client gets a lock: a started or restarted server grants none for its
        grace period, and the kernel client then backs off, so a test's first change of a
        volume record (pyvol's records lock) would otherwise wait out both."""
        mnt = Path("/mnt/pyvol-nfs-lock-probe")
        mnt.mkdir(exist_ok=True)
        if subprocess.run(["mountpoint", "-q", str(mnt)]).returncode != 0:
            probe = self.export("lock-probe")
            sh("mount", "-t", "nfs", "-o", "vers=4.2", f"127.0.0.1:{probe}", str(mnt))
        sh(sys.executable, "-c", "import fcntl, sys; fcntl.lockf(open(sys.argv[1], 'a'), "
           "fcntl.LOCK_EX)", str(mnt / "lock"))

    def export(self, name: str, squash: bool = False) -> Path:
        path = BASE / name
        path.mkdir(parents=True, exist_ok=True)
        opts = f"rw,{'root_squash' if squash else 'no_root_squash'},fsid={next(self._fsid)}," \
               "insecure,no_subtree_check,sync"
        sh("exportfs", "-o", opts, f"127.0.0.1:{path}")
        return path

    def stop_serving(self) -> None:
        """nfsd stops answering; clients with a hard mount wait for it."""
        sh("rpc.nfsd", "0")

    def resume(self) -> None:
        sh("rpc.nfsd", "8")
        self.wait_for_locks()
