"""Hostile input at the daemon's edges (issue 10): who can connect, what a repository writer
can switch off, and names pyvol picks or removes on its own."""

import ctypes
import json
import os
import stat
import struct
import threading

from helpers import Daemon

IN_CREATE = 0x100


def _watch_first_mode(directory: str, name: str, found: dict, ready: threading.Event) -> None:
    """Record the mode of ``directory/name`` at the first instant inotify says it exists."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    assert fd >= 0
    try:
        assert libc.inotify_add_watch(fd, directory.encode(), IN_CREATE) >= 0
        ready.set()
        while True:
            buf = os.read(fd, 65536)
            off = 0
            while off < len(buf):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, off)
                entry = buf[off + 16:off + 16 + length].rstrip(b"\0").decode()
                off += 16 + length
                if entry == name:
                    found["mode"] = stat.S_IMODE(os.lstat(os.path.join(directory, name)).st_mode)
                    return
    finally:
        os.close(fd)


def test_the_socket_is_never_wider_than_0660(workdir):
    sockdir = workdir / "sockdir"
    sockdir.mkdir()
    found, ready = {}, threading.Event()
    watcher = threading.Thread(target=_watch_first_mode,
                               args=(str(sockdir), "pyvol.sock", found, ready), daemon=True)
    watcher.start()
    assert ready.wait(5)
    d = Daemon(workdir / "root", sockdir / "pyvol.sock").start()
    try:
        watcher.join(10)
        assert "mode" in found, "inotify never saw the socket appear"
        assert found["mode"] & 0o007 == 0, f"socket was {oct(found['mode'])} when it appeared"
        assert found["mode"] == 0o660, oct(found["mode"])
        assert stat.S_IMODE(os.stat(sockdir / "pyvol.sock").st_mode) == 0o660
    finally:
        d.stop()


def test_two_unnamed_snapshots_at_once_each_get_their_own_name(daemon):
    daemon.api.ok("/VolumeDriver.Create", {"Name": "snaps", "Opts": {"size": "64M"}})
    results: list = []

    def take():
        results.append(daemon.api.raw("/pyvol/v1/volumes/snaps/snapshots", b"{}").json())

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [r for r in results if "Err" in r], results
    names = {r["Name"] for r in results}
    assert len(names) == 4, results
    listed = json.loads(daemon.cli("snapshot", "ls", "snaps", "--json").stdout)
    assert {s["Name"] for s in listed} == names
    assert {s["Origin"] for s in listed} == {"user"}


def test_a_users_snapshot_used_as_a_backup_base_is_never_removed_by_pyvol(daemon, workdir):
    repo = workdir / "repo"
    repo.mkdir()
    url = f"file://{repo}"
    daemon.api.ok("/VolumeDriver.Create", {"Name": "keepme", "Opts": {"size": "64M"}})
    mp = daemon.api.ok("/VolumeDriver.Mount", {"Name": "keepme", "ID": "t"})["Mountpoint"]
    # a user's snapshot whose name looks like pyvol's own must be safe too
    for name in ("keep", "backup-mine"):
        with open(os.path.join(mp, "f"), "w") as f:
            f.write(name)
        daemon.cli("snapshot", "create", "keepme", "--name", name)
        daemon.cli("backup", "create", f"keepme@{name}", "--dest", url)
        for _ in range(2):  # each backup takes its own snapshot and drops the one before
            daemon.cli("backup", "create", "keepme", "--dest", url)
    snaps = {s["Name"]: s["Origin"]
             for s in json.loads(daemon.cli("snapshot", "ls", "keepme", "--json").stdout)}
    assert snaps["keep"] == "user" and snaps["backup-mine"] == "user", snaps
    own = [n for n, o in snaps.items() if o == "backup"]
    assert len(own) == 1, f"pyvol keeps exactly its newest backup's snapshot: {snaps}"
    daemon.api.ok("/VolumeDriver.Unmount", {"Name": "keepme", "ID": "t"})


def test_a_repository_downgraded_to_plaintext_is_refused_by_a_daemon_with_a_key(workdir):
    key = workdir / "key"
    key.write_bytes(os.urandom(32))
    repo = workdir / "repo"
    repo.mkdir()
    url = f"file://{repo}"
    d = Daemon(workdir / "root", workdir / "pyvol.sock",
               env={"PYVOL_BACKUP_KEY_FILE": str(key)}).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "enc", "Opts": {"size": "64M"}})
        d.cli("backup", "create", "enc", "--dest", url)
        config = json.loads((repo / "config").read_text())
        assert config["encryption"]["config_mac"]
        config["encryption"] = None
        (repo / "config").write_text(json.dumps(config))
        before = sorted(p for p in repo.rglob("*"))
        out = d.cli("backup", "create", "enc", "--dest", url, check=False)
        assert out.returncode == 1
        assert "not encrypted" in out.stderr and "PYVOL_BACKUP_KEY_FILE" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert sorted(p for p in repo.rglob("*")) == before, "something was written in plaintext"
    finally:
        d.stop()
