"""The nine Docker VolumeDriver endpoints, over the socket, the way dockerd calls them."""

import os
import stat

from helpers import workers
from pyvol import mountinfo


def test_activate_and_capabilities(shared_daemon):
    api = shared_daemon.api
    assert api.post("/Plugin.Activate") == {"Implements": ["VolumeDriver"]}
    assert api.ok("/VolumeDriver.Capabilities", {})["Capabilities"] == {"Scope": "local"}


def test_socket_is_0660(shared_daemon):
    st = os.stat(shared_daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == 0


def test_workers_touch_their_heartbeat_on_tmpfs_not_on_the_disk(shared_daemon):
    """A gthread worker's accepting thread touches gunicorn's heartbeat file before every
    connection it takes. In a disk-backed /tmp that touch waited for the disk's journal behind
    a restore's writes, and Docker's calls with it (server.heartbeat_dir)."""
    for worker in workers(shared_daemon):
        fds = f"/proc/{worker}/fd"
        beats = [t for t in (os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds))
                 if "/wgunicorn-" in t]
        assert len(beats) == 1 and beats[0].startswith("/dev/shm/"), (worker, beats)


def test_create_get_list_path_remove(shared_daemon):
    api = shared_daemon.api
    assert "no such volume" in api.err("/VolumeDriver.Get", {"Name": "p1"})
    api.ok("/VolumeDriver.Create", {"Name": "p1", "Opts": None})
    api.ok("/VolumeDriver.Create", {"Name": "p2", "Opts": {"size": "320M", "fs": "xfs"}})
    vol = api.ok("/VolumeDriver.Get", {"Name": "p2"})["Volume"]
    assert vol["Name"] == "p2" and vol["Mountpoint"] == ""
    assert vol["Status"]["size"] == 320 << 20 and vol["Status"]["fs"] == "xfs"
    assert vol["CreatedAt"].endswith("Z")
    assert api.ok("/VolumeDriver.Get", {"Name": "p1"})["Volume"]["Status"]["size"] == 10 << 30
    names = [v["Name"] for v in api.ok("/VolumeDriver.List", {})["Volumes"]]
    assert {"p1", "p2"} <= set(names)
    assert api.ok("/VolumeDriver.Path", {"Name": "p1"})["Mountpoint"] == ""
    api.ok("/VolumeDriver.Remove", {"Name": "p1"})
    api.ok("/VolumeDriver.Remove", {"Name": "p2"})
    assert "no such volume" in api.err("/VolumeDriver.Get", {"Name": "p1"})


def test_mounts_are_counted_per_id_and_the_same_id_twice(shared_daemon):
    api = shared_daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "m1", "Opts": {"size": "64M"}})
    a, b = "a" * 64, "b" * 64
    mp = api.ok("/VolumeDriver.Mount", {"Name": "m1", "ID": a})["Mountpoint"]
    assert mountinfo.is_mounted(mp)
    assert api.ok("/VolumeDriver.Path", {"Name": "m1"})["Mountpoint"] == mp
    assert api.ok("/VolumeDriver.Mount", {"Name": "m1", "ID": a})["Mountpoint"] == mp  # docker cp
    api.ok("/VolumeDriver.Mount", {"Name": "m1", "ID": b})
    with open(os.path.join(mp, "f"), "w") as f:
        f.write("data")
    assert api.ok("/VolumeDriver.Get", {"Name": "m1"})["Volume"]["Status"]["mounts"] == 3
    assert api.ok("/VolumeDriver.List", {})["Volumes"][0]["Mountpoint"] == mp

    assert "in use" in api.err("/VolumeDriver.Remove", {"Name": "m1"})
    api.ok("/VolumeDriver.Unmount", {"Name": "m1", "ID": a})
    api.ok("/VolumeDriver.Unmount", {"Name": "m1", "ID": b})
    assert mountinfo.is_mounted(mp), "ID a still holds one count"
    api.ok("/VolumeDriver.Unmount", {"Name": "m1", "ID": "unknown-id"})  # leaked: fine
    assert mountinfo.is_mounted(mp)
    api.ok("/VolumeDriver.Unmount", {"Name": "m1", "ID": a})
    assert not mountinfo.is_mounted(mp)
    assert api.ok("/VolumeDriver.Path", {"Name": "m1"})["Mountpoint"] == ""
    api.ok("/VolumeDriver.Unmount", {"Name": "m1", "ID": a})  # one too many: fine

    # data survives the unmount; a new mount sees it
    mp = api.ok("/VolumeDriver.Mount", {"Name": "m1", "ID": "c"})["Mountpoint"]
    assert open(os.path.join(mp, "f")).read() == "data"
    api.ok("/VolumeDriver.Unmount", {"Name": "m1", "ID": "c"})
    api.ok("/VolumeDriver.Remove", {"Name": "m1"})


def test_unmount_of_unknown_volume_succeeds(shared_daemon):
    shared_daemon.api.ok("/VolumeDriver.Unmount", {"Name": "never-existed", "ID": "x"})


def test_clone_from_snapshot_through_docker_create(shared_daemon):
    api = shared_daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "orig", "Opts": {"size": "64M"}})
    mp = api.ok("/VolumeDriver.Mount", {"Name": "orig", "ID": "w"})["Mountpoint"]
    with open(os.path.join(mp, "f"), "w") as f:
        f.write("before")
    shared_daemon.cli("snapshot", "create", "orig", "--name", "s1")
    with open(os.path.join(mp, "f"), "w") as f:
        f.write("after")
    api.ok("/VolumeDriver.Create", {"Name": "copy", "Opts": {"from-snapshot": "orig@s1",
                                                             "size": "128M"}})
    cmp = api.ok("/VolumeDriver.Mount", {"Name": "copy", "ID": "r"})["Mountpoint"]
    assert open(os.path.join(cmp, "f")).read() == "before"
    st = os.statvfs(cmp)
    assert st.f_blocks * st.f_frsize > 100 << 20, "clone's filesystem grew to its new size"
    for name, mid in (("copy", "r"), ("orig", "w")):
        api.ok("/VolumeDriver.Unmount", {"Name": name, "ID": mid})
        api.ok("/VolumeDriver.Remove", {"Name": name})


def test_backend_defaults_for_size_and_fs(workdir):
    from helpers import Daemon

    d = Daemon(workdir / "root", workdir / "s.sock",
               env={"PYVOL_LOOP_DEFAULT_SIZE": "512M", "PYVOL_LOOP_DEFAULT_FS": "xfs"}).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "dflt", "Opts": None})
        status = d.api.ok("/VolumeDriver.Get", {"Name": "dflt"})["Volume"]["Status"]
        assert (status["size"], status["fs"]) == (512 << 20, "xfs")
        d.api.ok("/VolumeDriver.Create", {"Name": "given", "Opts": {"size": "64M", "fs": "ext4"}})
        status = d.api.ok("/VolumeDriver.Get", {"Name": "given"})["Volume"]["Status"]
        assert (status["size"], status["fs"]) == (64 << 20, "ext4")
    finally:
        d.stop()
