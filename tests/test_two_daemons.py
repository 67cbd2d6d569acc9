"""Two pyvol daemons on one host, with the same volume names, never touch each other's volumes.

Issue 11: loop devices were matched to their backing files by the path sysfs prints, which
depends on the reader's mount namespace; a managed plugin (its own namespace, its own state
dir at the same path string) took the host service's pool device for its own and mounted the
host service's images. And a root reached through a symlink was compared with
/proc/self/mountinfo unresolved, so mounts stacked and never went away.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import Daemon, in_mount_ns, loop_devices_under
from pyvol import config as pyvol_config
from pyvol import mountinfo
from pyvol.backends import loopdev

NAMES = ("test_volume", "db")


def private_ns(source, target) -> list[str]:
    """Wrap a daemon in a private mount namespace where ``source`` is bind-mounted over
    ``target``, as a managed plugin's state dir is: there, paths under ``target`` read exactly
    like the host's but are other files. The host's mounts under ``target`` are unmounted in
    there first (a plugin does not see them either), and none propagate in or out later."""
    script = (f"awk 'index($5, \"{target}/\") == 1 {{print $5}}' /proc/self/mountinfo "
              f'| sort -r | while read m; do umount "$m" || exit 1; done && '
              f'mount --bind "{source}" "{target}" && exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


class Side:
    """One daemon and how the test reaches its mounts (directly, or inside its namespace)."""

    def __init__(self, daemon: Daemon, tag: str, in_ns: bool = False):
        self.d, self.tag, self.in_ns = daemon, tag, in_ns

    def write(self, path: str, text: str) -> None:
        if self.in_ns:
            in_mount_ns(self.d.proc.pid, "sh", "-c", f'printf %s "{text}" > "{path}" && sync')
        else:
            with open(path, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

    def read(self, path: str) -> str:
        if self.in_ns:
            return in_mount_ns(self.d.proc.pid, "cat", path).stdout
        with open(path) as f:
            return f.read()

    def mounted(self, path) -> bool:
        if self.in_ns:
            entries = mountinfo.entries(f"/proc/{self.d.proc.pid}/mountinfo")
        else:
            entries = mountinfo.entries()
        return any(e.mount_point == str(path) for e in entries)

    def mount(self, name: str, mount_id: str = "t") -> str:
        return self.d.api.ok("/VolumeDriver.Mount", {"Name": name, "ID": mount_id})["Mountpoint"]

    def unmount(self, name: str, mount_id: str = "t") -> None:
        self.d.api.ok("/VolumeDriver.Unmount", {"Name": name, "ID": mount_id})

    def names(self) -> set[str]:
        return {v["Name"] for v in json.loads(self.d.cli("ls", "--json").stdout)}

    def populate(self) -> None:
        """Every shared name plus one of its own; data v1, a snapshot, then data v2."""
        api = self.d.api
        for name in (*NAMES, f"own_{self.tag}"):
            api.ok("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "64M"}})
        for name in NAMES:
            mp = self.mount(name)
            self.write(f"{mp}/data", f"{self.tag}:{name}:v1")
            self.d.cli("snapshot", "create", name, "--name", "s1")
            self.write(f"{mp}/data", f"{self.tag}:{name}:v2")
            self.unmount(name)
            assert not self.mounted(mp)

    def check(self) -> None:
        """Sees exactly its own volumes, snapshots and data."""
        assert self.names() == {*NAMES, f"own_{self.tag}"}
        for name in NAMES:
            snaps = json.loads(self.d.cli("snapshot", "ls", name, "--json").stdout)
            assert [s["Name"] for s in snaps] == ["s1"]
            mp = self.mount(name)
            assert self.read(f"{mp}/data") == f"{self.tag}:{name}:v2"
            self.unmount(name)
        # the snapshot holds this daemon's v1, not the other's
        self.d.cli("create", "from_s1", "--from-snapshot", "test_volume@s1")
        mp = self.mount("from_s1")
        assert self.read(f"{mp}/data") == f"{self.tag}:test_volume:v1"
        self.unmount("from_s1")
        self.d.cli("rm", "from_s1")

    def remove_all(self) -> None:
        for name in (*NAMES, f"own_{self.tag}"):
            self.d.cli("rm", name)
        assert self.names() == set()


def test_two_daemons_with_the_same_names_keep_to_their_own(workdir):
    """One daemon on a plain root, one on a root reached through a symlink; both make
    test_volume and db; kill -9 and restart; each sees, mounts and removes only its own."""
    (workdir / "real").mkdir()
    (workdir / "link").symlink_to(workdir / "real")
    a = Side(Daemon(workdir / "a" / "root", workdir / "a.sock").start(), "a")
    b = Side(Daemon(workdir / "link" / "root", workdir / "b.sock").start(), "b")
    try:
        a.populate()
        b.populate()
        assert not set(loop_devices_under(workdir / "a")) & set(loop_devices_under(workdir / "real"))
        # B answers with real paths: what mountinfo shows, and what it compares with
        mp = b.mount("db")
        assert mp == str(workdir / "real/root/mounts/db") and b.mounted(mp)
        b.unmount("db")
        b.d.kill()
        b.d.start()
        pool = str(workdir / "real/root/loop/pool")
        assert [e.mount_point for e in mountinfo.entries()].count(pool) == 1, "pool stacked"
        a.check()
        b.check()
        a.remove_all()
        b.check()  # the other's volumes, snapshots and data are intact
        b.remove_all()
    finally:
        a.d.stop()
        b.d.stop()


def test_symlinked_root_never_stacks_mounts(workdir):
    """A root and a mounts dir reached through symlinks: a restart finds the pool mounted,
    a second Mount finds the volume mounted, and the last Unmount takes the mount away."""
    (workdir / "real").mkdir()
    (workdir / "link").symlink_to(workdir / "real")
    (workdir / "mreal").mkdir()
    (workdir / "mlink").symlink_to(workdir / "mreal")
    d = Daemon(workdir / "link/root", workdir / "pyvol.sock",
               env={"PYVOL_MOUNTS": str(workdir / "mlink")})
    d.start()
    try:
        d.stop()  # the pool stays mounted, as across a daemon restart
        d.start()
        pool = str(workdir / "real/root/loop/pool")
        assert [e.mount_point for e in mountinfo.entries()].count(pool) == 1, "pool stacked"
        api = d.api
        api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "64M"}})
        mps = {api.ok("/VolumeDriver.Mount", {"Name": "v", "ID": i})["Mountpoint"] for i in "12"}
        assert mps == {str(workdir / "mreal/v")}
        assert [e.mount_point for e in mountinfo.entries()].count(str(workdir / "mreal/v")) == 1
        api.ok("/VolumeDriver.Unmount", {"Name": "v", "ID": "1"})
        api.ok("/VolumeDriver.Unmount", {"Name": "v", "ID": "2"})
        assert not mountinfo.is_mounted(workdir / "mreal/v"), "the mount never went away"
        api.ok("/VolumeDriver.Remove", {"Name": "v"})
    finally:
        d.stop()
    # resolved once, where the configuration is read
    cfg = pyvol_config.load(root=str(workdir / "link/root"),
                            env={"PYVOL_MOUNTS": str(workdir / "mlink"),
                                 "PYVOL_LOOP_POOL_FILE": str(workdir / "link/pool.img")})
    assert cfg.root == workdir / "real/root"
    assert cfg.mounts_dir == workdir / "mreal"
    assert cfg.backend_settings["loop"]["pool_file"] == str(workdir / "real/pool.img")


def test_find_goes_by_identity_not_by_the_path_sysfs_prints(workdir):
    """In another mount namespace, a device bound to the host's file prints the path of the
    namespace's own, different file there: it must not be taken for it."""
    (workdir / "host").mkdir()
    (workdir / "other").mkdir()
    theirs = workdir / "host/pool.img"
    theirs.write_bytes(b"\0" * (1 << 20))
    (workdir / "other/pool.img").write_bytes(b"\0" * (1 << 20))
    dev = loopdev.attach(theirs, direct_io=False)
    try:
        probe = ("import sys; from pyvol.backends import loopdev; "
                 f"print(open('/sys/block/{dev[5:]}/loop/backing_file').read().strip()); "
                 f"print(loopdev.find(sys.argv[1])); print(loopdev.find(sys.argv[2]))")
        out = subprocess.run(
            [*private_ns(workdir / "other", workdir / "host"), sys.executable, "-c", probe,
             str(theirs), str(workdir / "other/pool.img")],
            capture_output=True, text=True, check=True, timeout=60).stdout.split("\n")
        assert out[0] == str(theirs), "the trap: the device reads like this namespace's file"
        assert out[1] == "None", f"{dev}, bound to another file, was taken for {theirs}"
        assert out[2] == "None"
        assert loopdev.find(theirs) == dev  # where the path is the file, it is found
    finally:
        loopdev.detach(theirs)
    assert loopdev.find(theirs) is None


def test_daemon_in_a_namespace_never_takes_the_pool_of_one_whose_path_reads_the_same(workdir):
    """A host daemon on ROOT; a second daemon, in a private mount namespace where ROOT is
    another directory (a managed plugin's state dir at the host service's path). The host
    daemon's pool device prints ROOT/loop/pool.img there too; the second must make and use its
    own pool, and the two keep their same-named volumes apart across a kill -9."""
    root = workdir / "one"
    host = Side(Daemon(root, workdir / "host.sock").start(), "host")
    (workdir / "two").mkdir()
    ns_daemon = Daemon(root, workdir / "ns.sock", wrap=private_ns(workdir / "two", root))
    ns_daemon.log_path = workdir / "ns.daemon.log"
    ns = Side(ns_daemon, "ns", in_ns=True)
    try:
        host.populate()
        ns.d.start()
        host_pool_dev = loopdev.find(root / "loop/pool.img")
        pid = ns.d.proc.pid
        seen = in_mount_ns(pid, "cat", f"/sys/block/{host_pool_dev[5:]}/loop/backing_file")
        assert seen.stdout.strip() == str(root / "loop/pool.img"), "the trap is not armed"
        ns_pool_fs = int(in_mount_ns(pid, "stat", "-c", "%d", str(root / "loop/pool")).stdout)
        assert ns_pool_fs != os.stat(host_pool_dev).st_rdev, "took the host daemon's pool"
        assert loopdev.find(workdir / "two/loop/pool.img") not in (None, host_pool_dev)

        ns.populate()  # the same names: refused if it were looking at the host's pool
        ns.d.kill()
        ns.d.start()
        ns.check()
        host.check()
        ns.remove_all()
        host.check()
        host.remove_all()
    finally:
        ns.d.stop()
        host.d.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
