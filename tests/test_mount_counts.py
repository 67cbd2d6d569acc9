"""Mount counts that nobody could release (issue 11): a Mount that finishes after Docker
gave up is undone, not counted; every count shows its full ID and since when; an operator can
drop one that Docker will never release."""

import fcntl
import json
import os
import threading
import time

from helpers import Daemon
from pyvol import mountinfo


def test_a_mount_docker_no_longer_waits_for_is_undone_not_counted(workdir):
    d = Daemon(workdir / "root", workdir / "pyvol.sock",
               env={"PYVOL_DOCKER_TIMEOUT": "4"}).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "slow", "Opts": {"size": "64M"}})
        # another operation holds the volume for longer than Docker waits
        fd = os.open(workdir / "root" / "locks" / "vol.slow.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        answer = {}
        t = threading.Thread(target=lambda: answer.update(
            d.api.post("/VolumeDriver.Mount", {"Name": "slow", "ID": "a" * 64})))
        t.start()
        time.sleep(5)
        os.close(fd)
        t.join(30)
        assert "took longer than Docker waits" in answer["Err"], answer
        status = json.loads(d.cli("inspect", "slow", "--json").stdout)["Status"]
        assert status["mounts"] == 0 and status["mount_ids"] == [], status
        assert not mountinfo.is_mounted(workdir / "root" / "mounts" / "slow")
        # and a Mount in time still works
        d.api.ok("/VolumeDriver.Mount", {"Name": "slow", "ID": "b" * 64})
        d.api.ok("/VolumeDriver.Unmount", {"Name": "slow", "ID": "b" * 64})
    finally:
        d.stop()


def test_a_leaked_count_is_shown_whole_and_cleared_by_the_operator(daemon):
    leaked = "f" * 64
    daemon.api.ok("/VolumeDriver.Create", {"Name": "leaky", "Opts": {"size": "64M"}})
    daemon.api.ok("/VolumeDriver.Mount", {"Name": "leaky", "ID": leaked})
    daemon.api.ok("/VolumeDriver.Mount", {"Name": "leaky", "ID": leaked})  # docker cp: twice
    status = json.loads(daemon.cli("inspect", "leaky", "--json").stdout)["Status"]
    assert status["mounts"] == 2
    [m] = status["mount_ids"]
    assert m["ID"] == leaked and m["Count"] == 2 and m["Since"].endswith("Z"), m
    shown = daemon.cli("inspect", "leaky").stdout
    assert leaked in shown and m["Since"] in shown, shown
    err = daemon.api.err("/VolumeDriver.Remove", {"Name": "leaky"})
    assert leaked in err and m["Since"] in err and "pyvol umount leaky --id" in err, err
    daemon.cli("umount", "leaky", "--id", leaked, "--all")
    status = json.loads(daemon.cli("inspect", "leaky", "--json").stdout)["Status"]
    assert status["mounts"] == 0 and status["mount_ids"] == []
    assert not mountinfo.is_mounted(daemon.root / "mounts" / "leaky")
    daemon.api.ok("/VolumeDriver.Remove", {"Name": "leaky"})
