"""Through a real dockerd (Debian's docker.io, started by the tests) and a busybox image."""

import os

import pytest

from helpers import seed_demo
from pyvol import mountinfo

pytestmark = pytest.mark.docker


def test_seed_demo_two_containers_share_test_volume(dockerd, plugin):
    seed_demo(dockerd, plugin.driver)
    # between containers the volume is not mounted on the host
    assert plugin.api.ok("/VolumeDriver.Get", {"Name": "test_volume"})["Volume"]["Mountpoint"] == ""


def test_volume_create_ls_inspect_rm(dockerd, plugin):
    d = plugin.driver
    dockerd.run("volume", "create", "-d", d, "-o", "size=1G", "vol1")
    assert "vol1" in dockerd.run("volume", "ls", "-q").stdout.split()
    inspect = dockerd.run("volume", "inspect", "-f", "{{.Driver}} {{json .Status.size}}",
                          "vol1").stdout
    assert inspect.split() == [d, str(1 << 30)]
    # (a one-letter name would not do: the docker CLI reads "v:/d" as a Windows drive path)
    size = dockerd.run("run", "--rm", "-v", "vol1:/d", "busybox", "df", "-k", "/d").stdout
    assert 900_000 < int(size.splitlines()[1].split()[1]) <= 1 << 20
    dockerd.run("volume", "rm", "vol1")
    assert "vol1" not in dockerd.run("volume", "ls", "-q").stdout.split()


def test_bad_option_reaches_the_docker_user(dockerd, plugin):
    r = dockerd.run("volume", "create", "-d", plugin.driver, "-o", "colour=red", "bad", check=False)
    assert r.returncode != 0
    assert "unknown option colour: accepted are" in r.stderr
    assert "bad" not in dockerd.run("volume", "ls", "-q").stdout.split()


def test_two_containers_at_once_stopping_one_leaves_the_other_writable(dockerd, plugin):
    d = plugin.driver
    dockerd.run("volume", "create", "-d", d, "-o", "size=128M", "shared")
    for name in ("c1", "c2"):
        dockerd.run("run", "-d", "--name", name, "-v", "shared:/d", "busybox", "sleep", "600")
    dockerd.run("exec", "c1", "sh", "-c", "echo one > /d/one")
    dockerd.run("rm", "-f", "c1")
    dockerd.run("exec", "c2", "sh", "-c", "echo two > /d/two && sync")
    assert dockerd.run("exec", "c2", "cat", "/d/one", "/d/two").stdout == "one\ntwo\n"
    assert plugin.api.ok("/VolumeDriver.Get", {"Name": "shared"})["Volume"]["Status"]["mounts"] == 1
    assert "in use" in dockerd.run("volume", "rm", "shared", check=False).stderr
    dockerd.run("rm", "-f", "c2")
    assert plugin.api.ok("/VolumeDriver.Get", {"Name": "shared"})["Volume"]["Mountpoint"] == ""
    dockerd.run("volume", "rm", "shared")


def test_daemon_sigkill_and_restart_under_a_running_container(dockerd, plugin):
    d = plugin.driver
    dockerd.run("volume", "create", "-d", d, "-o", "size=128M", "live")
    dockerd.run("run", "-d", "--name", "writer", "-v", "live:/d", "busybox", "sh", "-c",
                "i=0; while true; do i=$((i+1)); echo $i > /d/counter; sleep 0.1; done")
    mp = plugin.api.ok("/VolumeDriver.Get", {"Name": "live"})["Volume"]["Mountpoint"]
    assert mp and mountinfo.is_mounted(mp)
    plugin.kill()
    before = dockerd.run("exec", "writer", "cat", "/d/counter").stdout
    dockerd.run("exec", "writer", "sh", "-c", "sleep 0.5")
    after = dockerd.run("exec", "writer", "cat", "/d/counter").stdout
    assert int(after) > int(before), "the container kept writing while pyvol was down"
    plugin.start()
    assert plugin.api.ok("/VolumeDriver.Get", {"Name": "live"})["Volume"]["Mountpoint"] == mp
    dockerd.run("rm", "-f", "writer")
    assert not mountinfo.is_mounted(mp), "the last Unmount after the restart unmounted it"
    dockerd.run("volume", "rm", "live")
    assert not os.path.exists(plugin.root / "loop/pool/volumes/live.img")


def test_database_style_usage_survives_container_replacement(dockerd, plugin):
    """The seed's database case: the data outlives the container that wrote it."""
    d = plugin.driver
    dockerd.run("run", "--rm", f"--volume-driver={d}", "-v", "dbdata:/var/lib/mysql", "busybox",
                "sh", "-c", "dd if=/dev/urandom of=/var/lib/mysql/ibdata1 bs=1M count=8 "
                "2>/dev/null && md5sum /var/lib/mysql/ibdata1 > /var/lib/mysql/sum")
    dockerd.run("run", "--rm", "-v", "dbdata:/var/lib/mysql", "busybox", "sh", "-c",
                "cd /var/lib/mysql && md5sum -c sum")
    dockerd.run("volume", "rm", "dbdata")
