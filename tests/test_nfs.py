"""The nfs backend through two daemons (two hosts) sharing one export of the kernel NFS
server, inside the qemu lane."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import backend_probes as probe
import pytest
from helpers import Daemon, put_schedules, release, until
from pyvol.backends import VolumeSpec

pytestmark = pytest.mark.nfs


class Answers:
    """A check for ``until``: whether a call answers without an Err; ``last`` is the Err."""

    def __init__(self, d: Daemon, path: str, body: dict):
        self.d, self.path, self.body, self.err = d, path, body, None

    def __call__(self) -> bool:
        self.err = self.d.api.post(self.path, self.body).get("Err")
        return not self.err

    def last(self):
        return self.err


def host(workdir, name, export, **env) -> Daemon:
    # a generous start: under TCG, with the lane's CPUs shared, imports alone can take a minute
    return Daemon(workdir / name, workdir / f"{name}.sock", env={
        "PYVOL_NFS_SHARES": f"main=127.0.0.1:{export}", "PYVOL_BACKEND": "nfs",
        "PYVOL_NFS_TIMEOUT": "4", **env}).start(wait=180)


@pytest.fixture
def two_hosts(workdir, nfs_export):
    a = host(workdir, "a", nfs_export, PYVOL_BACKENDS="nfs")
    b = host(workdir, "b", nfs_export, PYVOL_BACKENDS="nfs")
    yield a, b
    for d in (a, b):
        d.stop()


def test_both_hosts_see_one_volume_and_its_data(two_hosts):
    a, b = two_hosts
    assert a.api.ok("/VolumeDriver.Capabilities")["Capabilities"]["Scope"] == "global"
    a.api.ok("/VolumeDriver.Create", {"Name": "shared", "Opts": {"size": "2G"}})
    got = b.api.ok("/VolumeDriver.Get", {"Name": "shared"})["Volume"]
    assert got["Status"]["backend"] == "nfs" and got["Status"]["size"] == 2 << 30
    # a directory volume holds no filesystem of pyvol's: on the host that made it and on the
    # host that adopted its record alike
    assert got["Status"]["fs"] is None
    assert a.api.ok("/VolumeDriver.Get", {"Name": "shared"})["Volume"]["Status"]["fs"] is None
    assert [v["Name"] for v in b.api.ok("/VolumeDriver.List")["Volumes"]] == ["shared"]
    err = b.api.err("/VolumeDriver.Create", {"Name": "shared"})
    assert "already exists" in err
    mp_a = a.api.ok("/VolumeDriver.Mount", {"Name": "shared", "ID": "c1"})["Mountpoint"]
    with open(os.path.join(mp_a, "page"), "w") as f:
        f.write("written on a\n")
    os.chown(os.path.join(mp_a, "page"), 999, 998)
    os.chmod(os.path.join(mp_a, "page"), 0o640)
    mp_b = b.api.ok("/VolumeDriver.Mount", {"Name": "shared", "ID": "c2"})["Mountpoint"]
    st = os.stat(os.path.join(mp_b, "page"))
    assert open(os.path.join(mp_b, "page")).read() == "written on a\n"
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (999, 998, 0o640)
    # remove is refused while the other host has it mounted, and names that host
    b.api.ok("/VolumeDriver.Unmount", {"Name": "shared", "ID": "c2"})
    err = b.api.err("/VolumeDriver.Remove", {"Name": "shared"})
    assert "mounted on other hosts" in err and "claim clear" in err
    a.api.ok("/VolumeDriver.Unmount", {"Name": "shared", "ID": "c1"})
    b.api.ok("/VolumeDriver.Remove", {"Name": "shared"})
    assert "no such volume" in a.api.err("/VolumeDriver.Get", {"Name": "shared"})
    assert a.api.ok("/VolumeDriver.List")["Volumes"] == []


def test_a_dead_hosts_lease_is_cleared_explicitly(two_hosts):
    a, b = two_hosts
    a.api.ok("/VolumeDriver.Create", {"Name": "orphan"})
    b.api.ok("/VolumeDriver.Mount", {"Name": "orphan", "ID": "x"})
    os.killpg(b.proc.pid, signal.SIGKILL)  # host b dies with the volume mounted
    err = a.api.err("/VolumeDriver.Remove", {"Name": "orphan"})
    assert "mounted on other hosts" in err
    leases = json.loads(a.cli("lease", "ls", "orphan", "--json").stdout)
    assert len(leases) == 1
    a.cli("lease", "clear", "orphan", leases[0]["instance"])
    a.api.ok("/VolumeDriver.Remove", {"Name": "orphan"})


def test_snapshot_keeps_the_past_while_the_origin_changes(two_hosts):
    a, b = two_hosts
    a.api.ok("/VolumeDriver.Create", {"Name": "docs"})
    mp = a.api.ok("/VolumeDriver.Mount", {"Name": "docs", "ID": "w"})["Mountpoint"]
    os.makedirs(os.path.join(mp, "d"))
    with open(os.path.join(mp, "d", "f"), "w") as f:
        f.write("v1")
    os.symlink("d/f", os.path.join(mp, "link"))
    a.cli("snapshot", "create", "docs", "--name", "s1")
    # a directory volume's snapshot has files, not block ranges: asked for them, it says so
    r = a.api.raw("/pyvol/v1/volumes/docs/changes?snap=s1", method="GET")
    assert r.status_code == 400 and "holds files, not blocks" in r.json()["Err"], r.text
    with open(os.path.join(mp, "d", "f"), "w") as f:
        f.write("v2")
    b.cli("create", "docs-then", "--from-snapshot", "docs@s1")
    mp2 = b.api.ok("/VolumeDriver.Mount", {"Name": "docs-then", "ID": "r"})["Mountpoint"]
    assert open(os.path.join(mp2, "d", "f")).read() == "v1"
    assert os.readlink(os.path.join(mp2, "link")) == "d/f"
    assert open(os.path.join(mp, "d", "f")).read() == "v2"


def test_a_root_squashed_export_is_refused_with_what_to_change(workdir, nfs_server):
    export = nfs_server.export("squashed", squash=True)
    os.chmod(export, 0o777)
    d = host(workdir, "s", export)
    try:
        info = json.loads(d.cli("info", "--json").stdout)["backends"]["nfs"]
        assert info["available"] is False and "squashes root" in info["reason"]
        assert "no_root_squash" in info["reason"]
        err = d.api.err("/VolumeDriver.Create", {"Name": "v", "Opts": {"backend": "nfs"}})
        assert "squashes root" in err
        d.api.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"backend": "loop",
                                                                "size": "64M"}})
    finally:
        d.stop()


def test_a_stopped_server_gives_bounded_clear_errors_and_other_backends_serve(
        workdir, nfs_export, nfs_server):
    d = host(workdir, "h", nfs_export)
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "remote"})
        nfs_server.stop_serving()
        try:
            started = time.monotonic()
            err = d.api.err("/VolumeDriver.Mount", {"Name": "remote", "ID": "m"})
            assert time.monotonic() - started < 20
            assert "did not answer" in err and "127.0.0.1" in err
            err = d.api.err("/VolumeDriver.Create", {"Name": "remote2"})
            assert "did not answer" in err
            # the daemon keeps serving everything else
            d.api.ok("/VolumeDriver.Create", {"Name": "local", "Opts": {"backend": "loop",
                                                                        "size": "64M"}})
            d.api.ok("/VolumeDriver.Mount", {"Name": "local", "ID": "m"})
            assert d.api.ok("/VolumeDriver.Capabilities")["Capabilities"]["Scope"] == "local"
        finally:
            nfs_server.resume()
        # the client reconnects once the server answers again
        answer = Answers(d, "/VolumeDriver.Mount", {"Name": "remote", "ID": "m"})
        until("nfs to recover after the server came back", answer, timeout=60, every=2,
              why=answer.last)
    finally:
        d.stop()


def tree_digest(root: str) -> list:
    """Everything a file-tree backup must keep: names, types, owners, modes, mtimes, xattrs,
    contents, symlink targets, hard-link groups, and which files are sparse."""
    import hashlib

    out, inodes = [], {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            entry = [rel, st.st_mode, st.st_uid, st.st_gid]
            if os.path.islink(p):
                entry.append(os.readlink(p))
            else:
                entry.append(int(st.st_mtime))
                # user xattrs: system.nfs4_acl is how NFS shows ACLs, absent on ext4
                entry.append(sorted((x, os.getxattr(p, x)) for x in os.listxattr(p)
                                    if x.startswith("user.")))
            if os.path.isfile(p) and not os.path.islink(p):
                entry.append(hashlib.sha256(open(p, "rb").read()).hexdigest())
                entry.append(st.st_blocks * 512 < st.st_size // 2)  # sparse
                entry.append(inodes.setdefault((st.st_dev, st.st_ino), rel))
            out.append(entry)
    return out


def populate(mp: str) -> None:
    os.makedirs(f"{mp}/etc/conf.d")
    with open(f"{mp}/etc/conf.d/app.conf", "w") as f:
        f.write("key = value\n" * 50)
    os.chown(f"{mp}/etc/conf.d/app.conf", 1001, 1002)
    os.chmod(f"{mp}/etc/conf.d/app.conf", 0o600)
    os.setxattr(f"{mp}/etc/conf.d/app.conf", "user.origin", b"pyvol-test")
    os.chmod(f"{mp}/etc", 0o2750)
    os.symlink("conf.d/app.conf", f"{mp}/etc/current")
    with open(f"{mp}/data.bin", "wb") as f:
        f.write(os.urandom(3 << 20))
    os.link(f"{mp}/data.bin", f"{mp}/data.hardlink")
    with open(f"{mp}/sparse.img", "wb") as f:
        f.seek(16 << 20)
        f.write(b"end")
    for i in range(20):
        with open(f"{mp}/log{i:02d}.txt", "wb") as f:
            f.write(os.urandom(200 << 10))


def test_a_tree_backup_restores_into_an_nfs_volume_identically(workdir, nfs_export):
    """The CI relative of the slow test below: a directory volume backed up as a tree and
    restored into another, everything tree_digest looks at kept."""
    url = f"file://{workdir / 'repo'}"
    (workdir / "repo").mkdir()
    d = host(workdir, "t", nfs_export, PYVOL_BACKENDS="nfs")
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "files"})
        mp = d.api.ok("/VolumeDriver.Mount", {"Name": "files", "ID": "w"})["Mountpoint"]
        populate(mp)
        backup = json.loads(d.cli("backup", "create", "files", "--dest", url, "--json").stdout)
        assert backup["kind"] == "tree" and backup["stats"]["chunks_new"] > 3
        d.cli("restore", backup["url"], "copy")
        got = d.api.ok("/VolumeDriver.Mount", {"Name": "copy", "ID": "r"})["Mountpoint"]
        assert tree_digest(got) == tree_digest(mp)
    finally:
        d.stop()


@pytest.mark.slow  # minutes under the qemu lane's CPU; relative: the test above
def test_tree_backup_restores_into_nfs_and_loop_volumes_identically(workdir, nfs_export):
    repo = workdir / "repo"
    repo.mkdir()
    url = f"file://{repo}"
    d = host(workdir, "h", nfs_export, PYVOL_BACKENDS="nfs,loop")
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "files", "Opts": {"size": "1G"}})
        mp = d.api.ok("/VolumeDriver.Mount", {"Name": "files", "ID": "w"})["Mountpoint"]
        populate(mp)
        expected = tree_digest(mp)
        first = json.loads(d.cli("backup", "create", "files", "--dest", url, "--json").stdout)
        assert first["kind"] == "tree" and first["stats"]["chunks_new"] > 3
        assert json.loads(d.cli("snapshot", "ls", "files", "--json").stdout) == []
        d.cli("backup", "verify", first["url"])
        for name, backend in (("on-nfs", "nfs"), ("on-loop", "loop")):
            d.cli("restore", first["url"], name, "--backend", backend)
            got = d.api.ok("/VolumeDriver.Mount", {"Name": name, "ID": "r"})["Mountpoint"]
            digest = tree_digest(got)
            if backend == "loop":  # a fresh ext4 has its own lost+found
                digest = [e for e in digest if not e[0].startswith("lost+found")]
            assert digest == expected, backend
        # one changed file: the next backup uploads about that file, not the tree
        with open(f"{mp}/log07.txt", "r+b") as f:
            f.write(b"changed")
        second = json.loads(d.cli("backup", "create", "files", "--dest", url, "--json").stdout)
        assert second["stats"]["chunks_new"] <= 3, second["stats"]
        assert second["stats"]["uploaded"] < 4 << 20, second["stats"]  # of ~7.5M stored
        # a block backup cannot go into a directory volume
        d.api.ok("/VolumeDriver.Create", {"Name": "blk", "Opts": {"backend": "loop",
                                                                  "size": "64M"}})
        blk = json.loads(d.cli("backup", "create", "blk", "--dest", url, "--json").stdout)
        r = d.cli("restore", blk["url"], "nope", "--backend", "nfs", check=False)
        assert r.returncode == 1 and "block backup" in r.stderr
    finally:
        d.stop()


def test_a_server_down_at_start_is_mounted_at_first_use_once_back(workdir, nfs_export,
                                                                  nfs_server):
    import threading

    nfs_server.stop_serving()
    back = threading.Timer(20, nfs_server.resume)  # while the daemon starts, or soon after
    back.start()
    try:
        d = host(workdir, "late", nfs_export, PYVOL_BACKENDS="nfs")
    finally:
        back.join()
    try:
        info = json.loads(d.cli("info", "--json").stdout)["backends"]["nfs"]
        assert info["available"] is True
        answer = Answers(d, "/VolumeDriver.Create", {"Name": "after"})
        until("the share to be mounted at first use", answer, timeout=60, every=2,
              why=answer.last)
        d.api.ok("/VolumeDriver.Get", {"Name": "after"})
    finally:
        d.stop()


def test_a_share_mounted_but_never_laid_out_is_laid_out_at_first_use(workdir, nfs_export):
    """A mount can be there without pyvol's directories: its mount command gave up at its
    timeout as the server came back and the kernel finished the mount anyway (a CI run's Create
    then failed with FileNotFoundError for a minute), or a person mounted the share by hand."""
    mnt = workdir / "early" / "nfs" / "main"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "nfs", "-o", "vers=4.2", f"127.0.0.1:{nfs_export}",
                    str(mnt)], check=True, timeout=60)
    d = host(workdir, "early", nfs_export, PYVOL_BACKENDS="nfs")
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "v"})
        mp = d.api.ok("/VolumeDriver.Mount", {"Name": "v", "ID": "m"})["Mountpoint"]
        with open(os.path.join(mp, "f"), "w") as f:
            f.write("there")
        assert (nfs_export / "pyvol" / "volumes" / "v" / "f").read_text() == "there"
        # pyvol's directories removed under a running daemon: a clear error, no internal
        # one, and the next call lays them out again
        d.api.ok("/VolumeDriver.Unmount", {"Name": "v", "ID": "m"})
        shutil.rmtree(mnt / "pyvol")
        err = d.api.err("/VolumeDriver.Create", {"Name": "w"})
        assert "NFS share main" in err and "No such file" in err, err
        d.api.ok("/VolumeDriver.Create", {"Name": "w"})
        assert (nfs_export / "pyvol" / "volumes" / "w").is_dir()
    finally:
        d.stop()


def test_a_volume_on_a_share_that_cannot_be_mounted_is_not_removed_as_gone(
        workdir, nfs_export, nfs_server):
    """A host starts while the server is down: its volumes there cannot be looked up, and
    that is no "not found". A Remove answered done would leave the volume on the share and
    drop it here."""
    d = host(workdir, "down", nfs_export, PYVOL_BACKENDS="nfs")
    d.api.ok("/VolumeDriver.Create", {"Name": "kept"})
    d.stop()
    release(workdir / "down")  # as a host shutdown would: the share is unmounted
    nfs_server.stop_serving()
    try:
        d = host(workdir, "down", nfs_export, PYVOL_BACKENDS="nfs")
        err = d.api.err("/VolumeDriver.Remove", {"Name": "kept"})
        assert "NFS share main" in err and "127.0.0.1" in err, err
    finally:
        nfs_server.resume()
    try:
        answer = Answers(d, "/VolumeDriver.Get", {"Name": "kept"})
        until("the volume once the server is back", answer, timeout=60, every=2,
              why=answer.last)
        assert (nfs_export / "pyvol" / "volumes" / "kept").is_dir()
    finally:
        d.stop()


@pytest.mark.slow  # faster relative: test_both_hosts_see_one_volume_and_its_data (NFSv4)
def test_nfsv3_share_works_the_same(workdir, nfs_export):
    a = host(workdir, "a3", nfs_export, PYVOL_BACKENDS="nfs", PYVOL_NFS_VERSION="3")
    b = host(workdir, "b3", nfs_export, PYVOL_BACKENDS="nfs", PYVOL_NFS_VERSION="3")
    try:
        opts = json.loads(a.cli("info", "--json").stdout)["backends"]["nfs"]["shares"]["main"]
        assert "vers=3" in opts["options"]
        a.api.ok("/VolumeDriver.Create", {"Name": "v3"})
        mp = a.api.ok("/VolumeDriver.Mount", {"Name": "v3", "ID": "a"})["Mountpoint"]
        with open(os.path.join(mp, "f"), "w") as f:
            f.write("over v3")
        mp_b = b.api.ok("/VolumeDriver.Mount", {"Name": "v3", "ID": "b"})["Mountpoint"]
        assert open(os.path.join(mp_b, "f")).read() == "over v3"
        import fcntl
        with open(os.path.join(mp_b, "f")) as f:  # locks work (statd/NLM)
            fcntl.lockf(f, fcntl.LOCK_SH)
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def plugin_env(nfs_export):
    """The dockerd-facing daemon (host a) uses the test's export."""
    return {"PYVOL_NFS_SHARES": f"main=127.0.0.1:{nfs_export}", "PYVOL_BACKENDS": "nfs"}


@pytest.mark.docker
def test_a_file_a_container_writes_on_host_a_is_read_on_host_b(workdir, nfs_export, dockerd,
                                                                plugin):
    drv = plugin.driver
    dockerd.run("run", "--rm", f"--volume-driver={drv}", "-v", "shared:/d", "busybox", "sh",
                "-c", "echo from-a > /d/f && chown 123:456 /d/f && chmod 640 /d/f")
    b = host(workdir, "b", nfs_export, PYVOL_BACKENDS="nfs")
    try:
        mp = b.api.ok("/VolumeDriver.Mount", {"Name": "shared", "ID": "b"})["Mountpoint"]
        st = os.stat(os.path.join(mp, "f"))
        assert open(os.path.join(mp, "f")).read() == "from-a\n"
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (123, 456, 0o640)
        with open(os.path.join(mp, "g"), "w") as f:
            f.write("from-b\n")
        out = dockerd.run("run", "--rm", f"--volume-driver={drv}", "-v", "shared:/d", "busybox",
                          "cat", "/d/g").stdout
        assert out == "from-b\n"
        b.api.ok("/VolumeDriver.Unmount", {"Name": "shared", "ID": "b"})
    finally:
        b.stop()


# issue 11: work as slow as the data is bounded by PYVOL_NFS_COPY_TIMEOUT, not by the short
# guard (PYVOL_NFS_TIMEOUT) that notices a dead server; what it leaves behind goes

def fill_on_server(export, volume: str, n: int) -> Path:
    """``n`` small files in the volume, written on the server's own filesystem (quick even
    under TCG); the client has never listed the directory, so it reads them from the server."""
    tree = Path(export) / "pyvol" / "volumes" / volume / "tree"
    for i in range(n):
        d = tree / f"d{i // 500:02d}"
        if i % 500 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:05d}").write_bytes(b"%05d" % i * 20)
    return tree


def count_files(path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def entries(export, area: str) -> list[str]:
    d = Path(export) / "pyvol" / area
    return sorted(os.listdir(d)) if d.exists() else []


def wait_until(what: str, ok, limit: float = 120) -> None:
    until(what, ok, limit, every=0.5)


@pytest.mark.slow  # faster relative: test_a_copy_over_its_time_fails_clearly_and_leaves_no_directory
def test_snapshot_clone_and_remove_of_a_volume_slower_to_copy_than_the_guard(
        workdir, nfs_export, report):
    # a 2 s guard: every quick call must fit in it even on the lane's loaded, emulated CPUs;
    # copying these files takes several times as long there
    n = 600
    d = host(workdir, "h", nfs_export, PYVOL_BACKENDS="nfs", PYVOL_NFS_TIMEOUT="2")
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "big"})
        fill_on_server(nfs_export, "big", n)
        started = time.monotonic()
        d.cli("snapshot", "create", "big", "--name", "s1")
        took = time.monotonic() - started
        # the premise: this copy takes longer than the guard, which used to cap it
        assert took > 2, f"the copy took {took:.1f} s: not slower than the 2 s guard"
        report(f"nfs: a snapshot of {n} files took {took:.1f} s, under a 2 s guard")
        snap = Path(nfs_export) / "pyvol" / "snapshots" / "big" / "s1"
        assert count_files(snap) == n
        d.cli("create", "big-copy", "--from-snapshot", "big@s1")
        copy = Path(nfs_export) / "pyvol" / "volumes" / "big-copy"
        assert count_files(copy) == n
        assert (copy / "tree" / "d01" / "f00517").read_bytes() == b"00517" * 20
        assert [e for e in entries(nfs_export, "tmp") if not e.startswith(".")] == []
        # remove: the trees go to the trash and the record goes under the guard; the name is
        # free at once, though deleting the files takes longer than the guard
        d.api.ok("/VolumeDriver.Remove", {"Name": "big"})
        d.api.ok("/VolumeDriver.Create", {"Name": "big"})
        mp = d.api.ok("/VolumeDriver.Mount", {"Name": "big", "ID": "m"})["Mountpoint"]
        assert os.listdir(mp) == []
        assert d.cli("snapshot", "ls", "big", "--json").stdout.strip() == "[]"
        d.api.ok("/VolumeDriver.Unmount", {"Name": "big", "ID": "m"})
        wait_until("the trash emptied", lambda: entries(nfs_export, "trash") == [])
    finally:
        d.stop()


@pytest.mark.slow  # faster relative: test_trash_and_copies_left_by_a_crash_are_emptied_at_the_next_start
def test_a_copy_killed_midway_leaves_nothing_after_a_restart(workdir, nfs_export):
    d = host(workdir, "h", nfs_export, PYVOL_BACKENDS="nfs")
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "big"})
        fill_on_server(nfs_export, "big", 1000)
        instance = (workdir / "h" / "nfs" / "instance-id").read_text().strip()
        tmp = Path(nfs_export) / "pyvol" / "tmp"
        cli = subprocess.Popen([sys.executable, "-m", "pyvol", "--socket", str(d.socket),
                                "snapshot", "create", "big", "--name", "s1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def copying():
                return [p for p in tmp.glob(f"{instance}.*") if count_files(p) > 100]
            wait_until("a copy in progress", copying, limit=60)
            os.killpg(d.proc.pid, signal.SIGKILL)  # the daemon and its cp die mid-copy
            d.proc.wait(timeout=30)
        finally:
            cli.wait(timeout=60)
        left = copying()
        assert left and count_files(left[0]) < 1000, "the copy was not killed midway"
        d = host(workdir, "h", nfs_export, PYVOL_BACKENDS="nfs")
        wait_until("the partial copy removed",
                   lambda: not list(tmp.glob(f"{instance}.*"))
                   and entries(nfs_export, "trash") == [])
        assert d.cli("snapshot", "ls", "big", "--json").stdout.strip() == "[]"
        assert entries(nfs_export, "snapshots/big") == []
        d.cli("snapshot", "create", "big", "--name", "s1")  # nothing in the way
        assert count_files(Path(nfs_export) / "pyvol" / "snapshots" / "big" / "s1") == 1000
    finally:
        d.stop()


def test_a_copy_over_its_time_fails_clearly_and_leaves_no_directory(workdir, nfs_export):
    d = host(workdir, "h", nfs_export, PYVOL_BACKENDS="nfs", PYVOL_NFS_COPY_TIMEOUT="0.5")
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "big"})
        fill_on_server(nfs_export, "big", 600)
        instance = (workdir / "h" / "nfs").joinpath("instance-id").read_text().strip()
        r = d.cli("snapshot", "create", "big", "--name", "s1", check=False)
        assert r.returncode != 0 and "PYVOL_NFS_COPY_TIMEOUT" in r.stderr, r.stderr
        # the partial copy left tmp/ before the error came back (its deletion may outlast
        # the same short bound: the next start finishes it)
        assert not list((Path(nfs_export) / "pyvol" / "tmp").glob(f"{instance}.*"))
        assert d.cli("snapshot", "ls", "big", "--json").stdout.strip() == "[]"
        assert entries(nfs_export, "snapshots/big") == []
    finally:
        d.stop()
    d = host(workdir, "h", nfs_export, PYVOL_BACKENDS="nfs")
    try:
        wait_until("the trash emptied", lambda: entries(nfs_export, "trash") == [])
    finally:
        d.stop()


def test_trash_and_copies_left_by_a_crash_are_emptied_at_the_next_start(workdir, nfs_export):
    # made on the server before this host first mounts the export (so no listing of it is
    # cached by the client): what a crashed earlier run of this host, and other hosts, left
    mine = "0123456789abcdef"
    (workdir / "h" / "nfs").mkdir(parents=True)
    (workdir / "h" / "nfs" / "instance-id").write_text(mine)
    base = Path(nfs_export) / "pyvol"
    left = {
        "trash": {f"{mine}.volume-a.00000001": True,  # this host's: gone whatever its age
                  "fedcba9876543210.volume-b.00000002": False,  # another host's, fresh: kept
                  "fedcba9876543210.volume-c.00000003": True},  # another host's, 2 days old
        "tmp": {f"{mine}.0000000000aa": True,  # this host's interrupted copy
                "fedcba9876543210.0000000000bb": False},  # another host's copy in progress
    }
    for area, names in left.items():
        for name in names:
            d2 = base / area / name / "0-volumes" / "sub"
            d2.mkdir(parents=True)
            (d2 / "file").write_text("left behind")
    two_days = time.time() - 2 * 86400
    os.utime(base / "trash" / "fedcba9876543210.volume-c.00000003", (two_days, two_days))
    d = host(workdir, "h", nfs_export, PYVOL_BACKENDS="nfs")
    try:
        wait_until("leftovers emptied", lambda: entries(nfs_export, "trash") == [
            "fedcba9876543210.volume-b.00000002"])
        assert [e for e in entries(nfs_export, "tmp") if not e.startswith(".")] == [
            "fedcba9876543210.0000000000bb"]
    finally:
        d.stop()


def test_get_never_walks_the_volume(workdir, nfs_export, monkeypatch):
    """Docker calls Get all the time: its usage figures must not cost a walk of the tree."""
    from pyvol.backends.nfs import NfsBackend

    b = NfsBackend(workdir / "root", {"shares": f"main=127.0.0.1:{nfs_export}"})
    b.setup()
    try:
        b.create(VolumeSpec("many", 1 << 30))
        fill_on_server(nfs_export, "many", 5000)
        vol = str(b.shares["main"].base / "volumes" / "many")
        touched = []

        def watch(fn):
            def wrapped(path=".", *a, **kw):
                if str(os.fspath(path) if not isinstance(path, int) else "").startswith(vol):
                    touched.append((fn.__name__, path))
                return fn(path, *a, **kw)
            return wrapped
        for fn in ("walk", "scandir", "listdir", "lstat", "stat"):
            monkeypatch.setattr(os, fn, watch(getattr(os, fn)))
        started = time.monotonic()
        usage = b.volume_usage("many")
        took = time.monotonic() - started
        monkeypatch.undo()
        assert touched == []
        assert "used" not in usage and "error" not in usage, usage
        assert usage["share"] == "main" and usage["share_free"] > 0
        assert usage["size_enforced"] is False
        assert took < 5, f"volume_usage took {took:.1f} s"
    finally:
        probe.teardown(b)


def test_records_that_are_no_json_object_are_left_out_of_list_and_named_by_get(workdir,
                                                                               nfs_export):
    """A volume's record on the export is another host's (or a person's) writing: one that
    is no JSON object is left out of List and refused by name at Get and Create, never a
    traceback, and the volumes beside it are served as before."""
    d = host(workdir, "h", nfs_export, PYVOL_BACKENDS="nfs")
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "good", "Opts": {"size": "1G"}})
        meta = Path(nfs_export) / "pyvol" / "meta"
        (meta / "alist.json").write_text("[1, 2]")
        (meta / "text.json").write_text("not json at all")
        (meta / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
        names = [v["Name"] for v in d.api.ok("/VolumeDriver.List")["Volumes"]]
        assert names == ["good"]
        for name in ("alist", "text", "binary"):
            r = d.api.raw("/VolumeDriver.Get", json.dumps({"Name": name}).encode())
            assert r.status_code != 500 and "is not a JSON object" in r.json()["Err"], r.text
            assert f"/pyvol/meta/{name}.json" in r.json()["Err"]  # as this host mounts it
            r = d.api.raw("/VolumeDriver.Create", json.dumps({"Name": name}).encode())
            assert r.status_code != 500 and r.json()["Err"], r.text
        assert d.api.ok("/VolumeDriver.Get", {"Name": "good"})["Volume"]["Name"] == "good"
    finally:
        d.stop()


def test_two_hosts_changing_one_record_at_once_lose_neither_change(two_hosts, workdir,
                                                                  nfs_export):
    """Host a sets the volume's snapshot schedule while b sets its backup schedule, both at
    once, round after round: each change that was answered as done is in the record. The
    record is read, changed and replaced; without one lock across the hosts the later
    replace drops the other's change (the inode check cannot see it: each host's attribute
    cache still holds the inode it just opened)."""
    import threading

    a, b = two_hosts
    a.api.ok("/VolumeDriver.Create", {"Name": "rec"})
    record = nfs_export / "pyvol" / "meta" / "rec.json"
    repo = f"file://{workdir}/repo"
    for i in range(15):
        opts = {a: {"snapshot-every": f"{100 + i}s", "snapshot-keep": "3"},
                b: {"backup-every": f"{200 + i}s", "backup-to": repo, "backup-keep": "2"}}
        answers = {}
        start = threading.Barrier(2)

        def put(d, opts, start, answers):
            start.wait()
            answers[d] = put_schedules(d, "rec", opts)

        threads = [threading.Thread(target=put, args=(d, opts[d], start, answers))
                   for d in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        schedules = json.loads(record.read_text()).get("schedules", {})
        for d, kind, every in ((a, "snapshot", 100 + i), (b, "backup", 200 + i)):
            code, body = answers[d]
            if code == 200:
                assert (schedules.get(kind) or {}).get("every") == every, (i, kind, schedules)
            else:  # refused, saying why: the other host's change came first
                assert code == 409 and "retry" in body["Err"], (code, body)


def test_a_records_lock_is_waited_for_and_let_go_when_its_holder_dies(workdir, nfs_export):
    """Another holder of the records lock: a change waits at most half the share's timeout,
    then is refused saying to retry; once the holder dies (its lock goes with it, at the
    server), the change goes through. Nothing of pyvol's decides that a holder is dead."""
    d = host(workdir, "h", nfs_export, PYVOL_BACKENDS="nfs")
    holder = None
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "r"})
        lock = nfs_export / "pyvol" / "records.lock"
        holder = subprocess.Popen(
            [sys.executable, "-c", ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                                    "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); "
                                    "time.sleep(600)"), str(lock)],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        opts = {"snapshot-every": "1h", "snapshot-keep": "2"}
        started = time.monotonic()
        code, body = put_schedules(d, "r", opts)
        assert code == 409 and "another host" in body["Err"] and "retry" in body["Err"], body
        assert time.monotonic() - started < 10  # half of PYVOL_NFS_TIMEOUT, and the call
        holder.kill()
        holder.wait()
        until("the change once the holder is gone",
              lambda: put_schedules(d, "r", opts)[0] == 200, timeout=30, every=1)
        record = json.loads((nfs_export / "pyvol" / "meta" / "r.json").read_text())
        assert record["schedules"]["snapshot"]["every"] == 3600
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        d.stop()
