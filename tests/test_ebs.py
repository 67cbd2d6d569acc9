"""The ebs backend through two daemons standing for two EC2 instances, on moto's EC2 over
real HTTP plus the data plane moto lacks (tests/ebsfake.py: a volume id is a loop device)."""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from helpers import Daemon, until


def ebs_host(workdir, rig, i: int, backends: str = "ebs") -> Daemon:
    return Daemon(workdir / f"i{i}", workdir / f"i{i}.sock",
                  env={**rig.env(i), "PYVOL_BACKENDS": backends}).start()


@pytest.fixture
def instances(workdir, ebs_rig):
    a, b = ebs_host(workdir, ebs_rig, 0), ebs_host(workdir, ebs_rig, 1)
    yield a, b
    for d in (a, b):
        d.stop()


def test_a_volume_moves_from_instance_a_to_b_and_is_never_attached_twice(instances, ebs_rig):
    a, b = instances
    assert a.api.ok("/VolumeDriver.Capabilities")["Capabilities"]["Scope"] == "global"
    a.api.ok("/VolumeDriver.Create", {"Name": "pg", "Opts": {"size": "1G", "type": "gp3"}})
    vol = b.api.ok("/VolumeDriver.Get", {"Name": "pg"})["Volume"]
    assert vol["Status"]["backend"] == "ebs" and vol["Status"]["size"] == 1 << 30
    assert vol["Status"]["zone"] == "us-east-1a" and vol["Status"]["type"] == "gp3"
    payload = os.urandom(5 << 20)
    mp = a.api.ok("/VolumeDriver.Mount", {"Name": "pg", "ID": "c1"})["Mountpoint"]
    with open(os.path.join(mp, "base"), "wb") as f:
        f.write(payload)
    # attached to a: b may not take it, and is told which instance has it
    err = b.api.err("/VolumeDriver.Mount", {"Name": "pg", "ID": "c2"})
    assert ebs_rig.instances[0] in err and "attached to instance" in err
    assert ebs_rig.instances[0] in b.api.err("/VolumeDriver.Remove", {"Name": "pg"})
    # nor grow it: its filesystem is a's, and EC2's size must not change under it
    r = b.api.raw("/pyvol/v1/volumes/pg/resize", b'{"Size": "2G"}')
    assert r.status_code == 409, r.text
    assert ebs_rig.instances[0] in r.json()["Err"] and "resize it on that host" in r.json()["Err"]
    assert ebs_rig.volumes("pg")[0]["Size"] == 1
    a.api.ok("/VolumeDriver.Unmount", {"Name": "pg", "ID": "c1"})  # last: detaches
    assert ebs_rig.volumes("pg")[0]["Attachments"] == []
    mp_b = b.api.ok("/VolumeDriver.Mount", {"Name": "pg", "ID": "c2"})["Mountpoint"]
    with open(os.path.join(mp_b, "base"), "rb") as f:
        assert f.read() == payload  # the same filesystem: found, not reformatted
    assert [x["InstanceId"] for x in ebs_rig.volumes("pg")[0]["Attachments"]] == \
        [ebs_rig.instances[1]]
    b.api.ok("/VolumeDriver.Unmount", {"Name": "pg", "ID": "c2"})
    a.api.ok("/VolumeDriver.Remove", {"Name": "pg"})
    assert ebs_rig.volumes("pg") == []



def test_a_volume_another_instance_grew_is_seen_and_snapshotted_at_its_new_size(instances,
                                                                                ebs_rig):
    """EC2's size is the truth on every host: b adopted the volume at 1 GiB (a row of its
    own, from its Mount); a grows it; b's Get, and b's snapshot (whose size a block backup
    reads), say 2 GiB, not what b's row once said."""
    a, b = instances
    a.api.ok("/VolumeDriver.Create", {"Name": "grown", "Opts": {"size": "1G"}})
    # b has no row of it yet: a schedule set there adopts it first (it was a foreign-key
    # error, a 500); ebs:// is a backup destination of ebs volumes, a snapshot id is not
    b.cli("schedule", "set", "grown", "--snapshot-every", "1h", "--snapshot-keep", "3",
          "--backup-every", "1d", "--backup-keep", "7", "--backup-to", "ebs://us-east-1")
    rows = json.loads(b.cli("schedule", "ls", "grown", "--json").stdout)
    assert sorted(r["what"] for r in rows) == ["backup", "snapshot"]
    r = b.cli("schedule", "set", "grown", "--backup-to", "ebs://us-east-1/snap-0123abcd",
              check=False)
    assert r.returncode == 1 and "ebs://REGION" in r.stderr
    b.api.ok("/VolumeDriver.Mount", {"Name": "grown", "ID": "c1"})
    b.api.ok("/VolumeDriver.Unmount", {"Name": "grown", "ID": "c1"})
    a.cli("resize", "grown", "2G")
    assert ebs_rig.volumes("grown")[0]["Size"] == 2
    got = b.api.ok("/VolumeDriver.Get", {"Name": "grown"})["Volume"]
    assert got["Status"]["size"] == 2 << 30
    listed = json.loads(b.cli("ls", "--json").stdout)
    assert [v["Status"]["size"] for v in listed if v["Name"] == "grown"] == [2 << 30]
    b.api.ok("/VolumeDriver.Mount", {"Name": "grown", "ID": "c2"})
    b.cli("snapshot", "create", "grown", "--name", "after")
    snaps = json.loads(b.cli("snapshot", "ls", "grown", "--json").stdout)
    assert [s["Size"] for s in snaps] == [2 << 30]
    b.api.ok("/VolumeDriver.Unmount", {"Name": "grown", "ID": "c2"})

def test_two_instances_racing_to_create_one_name_make_one_volume(instances, ebs_rig):
    results = {}

    def create(d, key):
        results[key] = d.api.post("/VolumeDriver.Create", {"Name": "race", "Opts": {"size": "1G"}})

    threads = [threading.Thread(target=create, args=(d, i)) for i, d in enumerate(instances)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ebs_rig.volumes("race")) == 1
    errs = [r["Err"] for r in results.values() if r.get("Err")]
    assert len(errs) <= 1 and all("already exists" in e or "same moment" in e for e in errs)
    for d in instances:
        d.api.ok("/VolumeDriver.Get", {"Name": "race"})


def test_a_dead_instances_attachment_is_force_detached_on_request(instances, ebs_rig):
    a, b = instances
    a.api.ok("/VolumeDriver.Create", {"Name": "web", "Opts": {"size": "1G"}})
    mp = a.api.ok("/VolumeDriver.Mount", {"Name": "web", "ID": "x"})["Mountpoint"]
    with open(os.path.join(mp, "index.html"), "w") as f:
        f.write("hello from a\n")
        f.flush()
        os.fsync(f.fileno())
    os.killpg(a.proc.pid, signal.SIGKILL)  # instance a dies holding the volume
    assert "attached to instance" in b.api.err("/VolumeDriver.Mount", {"Name": "web", "ID": "y"})
    leases = json.loads(b.cli("claim", "ls", "web", "--json").stdout)
    assert [x["instance"] for x in leases] == [ebs_rig.instances[0]]
    b.cli("lease", "clear", "web", ebs_rig.instances[0])  # the commands' earlier name
    mp_b = b.api.ok("/VolumeDriver.Mount", {"Name": "web", "ID": "y"})["Mountpoint"]
    assert open(os.path.join(mp_b, "index.html")).read() == "hello from a\n"


def test_snapshot_clone_and_backup_restore_into_loop(workdir, ebs_rig):
    repo = workdir / "repo"
    repo.mkdir()
    d = ebs_host(workdir, ebs_rig, 0, backends="ebs,loop")
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "db", "Opts": {"size": "1G", "backend": "ebs"}})
        mp = d.api.ok("/VolumeDriver.Mount", {"Name": "db", "ID": "w"})["Mountpoint"]
        payload = os.urandom(6 << 20)
        with open(os.path.join(mp, "table"), "wb") as f:
            f.write(payload)
            os.fsync(f.fileno())
        d.cli("snapshot", "create", "db", "--name", "s1")
        assert ebs_rig.ec2.describe_snapshots(Filters=[{"Name": "tag:pyvol-snapshot",
                                                        "Values": ["s1"]}])["Snapshots"]
        with open(os.path.join(mp, "table"), "wb") as f:
            f.write(b"changed later")
        d.cli("create", "db-copy", "--from-snapshot", "db@s1")
        mp2 = d.api.ok("/VolumeDriver.Mount", {"Name": "db-copy", "ID": "r"})["Mountpoint"]
        assert open(os.path.join(mp2, "table"), "rb").read() == payload
        made = json.loads(d.cli("backup", "create", "db@s1", "--dest", f"file://{repo}",
                                "--json").stdout)
        assert made["stats"]["read"] < 200 << 20  # only blocks holding data, of 1 GiB
        d.cli("restore", made["url"], "on-loop", "--backend", "loop")
        mp3 = d.api.ok("/VolumeDriver.Mount", {"Name": "on-loop", "ID": "l"})["Mountpoint"]
        got = open(os.path.join(mp3, "table"), "rb").read()
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    finally:
        d.stop()


def test_aws_errors_become_clear_errs_and_nothing_is_left(instances, ebs_rig):
    a, _ = instances
    err = a.api.err("/VolumeDriver.Create", {"Name": "bad", "Opts": {"type": "ssd"}})
    assert "invalid type 'ssd': accepted are gp3" in err
    err = a.api.err("/VolumeDriver.Create", {"Name": "bad", "Opts": {"iops": "lots"}})
    assert "invalid iops" in err
    assert ebs_rig.volumes("bad") == []
    assert "no such volume" in a.api.err("/VolumeDriver.Get", {"Name": "bad"})


def test_an_unreachable_ec2_endpoint_is_a_clear_err_in_bounded_time(workdir, ebs_rig):
    env = {**ebs_rig.env(0), "PYVOL_BACKENDS": "ebs", "PYVOL_EBS_CONNECT_TIMEOUT": "1",
           "PYVOL_EBS_MAX_ATTEMPTS": "2"}
    d = Daemon(workdir / "x", workdir / "x.sock", env=env).start()
    try:
        ebs_rig.plane.server.shutdown()
        ebs_rig.plane.server.server_close()
        err = d.api.err("/VolumeDriver.Create", {"Name": "offline", "Opts": {"size": "1G"}})
        assert "cannot reach EC2" in err
    finally:
        d.stop()


def test_ebs_snapshot_backups_go_to_another_region_and_restore_in_another_zone(workdir,
                                                                               ebs_rig):
    import boto3

    a = ebs_host(workdir, ebs_rig, 0)
    c = ebs_host(workdir, ebs_rig, 2)  # an instance in us-east-1b
    try:
        a.api.ok("/VolumeDriver.Create", {"Name": "ledger", "Opts": {"size": "1G"}})
        mp = a.api.ok("/VolumeDriver.Mount", {"Name": "ledger", "ID": "w"})["Mountpoint"]
        payload = os.urandom(2 << 20)
        with open(os.path.join(mp, "book"), "wb") as f:
            f.write(payload)
            os.fsync(f.fileno())
        made = json.loads(a.cli("backup", "create", "ledger", "--dest", "ebs://us-west-2",
                                "--json").stdout)
        assert made["url"].startswith("ebs://us-west-2/snap-") and made["volume"] == "ledger"
        west = boto3.client("ec2", region_name="us-west-2")
        assert west.describe_snapshots(SnapshotIds=[made["snapshot_id"]])["Snapshots"]
        listed = json.loads(c.cli("backup", "ls", "ebs://us-west-2", "--json").stdout)
        assert [x["url"] for x in listed] == [made["url"]]
        assert json.loads(a.cli("snapshot", "ls", "ledger", "--json").stdout) == []
        a.api.ok("/VolumeDriver.Unmount", {"Name": "ledger", "ID": "w"})
        a.api.ok("/VolumeDriver.Remove", {"Name": "ledger"})  # the backup outlives it
        c.cli("restore", made["url"], "ledger", "--size", "2G")
        vol = c.api.ok("/VolumeDriver.Get", {"Name": "ledger"})["Volume"]
        assert vol["Status"]["zone"] == "us-east-1b" and vol["Status"]["size"] == 2 << 30
        mp_c = c.api.ok("/VolumeDriver.Mount", {"Name": "ledger", "ID": "r"})["Mountpoint"]
        assert open(os.path.join(mp_c, "book"), "rb").read() == payload
        st = os.statvfs(mp_c)
        assert st.f_blocks * st.f_frsize > 1800 << 20  # grown to the new size
        err = c.cli("restore", made["url"], "elsewhere", "--backend", "loop", check=False)
        assert err.returncode == 1
        c.cli("backup", "rm", made["url"])
        assert json.loads(c.cli("backup", "ls", "ebs://us-west-2", "--json").stdout) == []
    finally:
        a.stop()
        c.stop()


def test_a_device_that_never_appears_fails_the_mount_clearly_and_detaches(workdir, ebs_rig):
    """moto attaches at once and a real attach takes seconds; what is tested here is the
    waiting itself: the data plane is told never to show the device."""
    d = Daemon(workdir / "slow", workdir / "slow.sock",
               env={**ebs_rig.env(0), "PYVOL_BACKENDS": "ebs",
                    "PYVOL_EBS_ATTACH_TIMEOUT": "3"}).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "stuck", "Opts": {"size": "1G"}})
        ebs_rig.plane.attach_delay = 3600
        err = d.api.err("/VolumeDriver.Mount", {"Name": "stuck", "ID": "m"})
        assert "timed out after 3 s waiting for the block device of stuck" in err
        assert ebs_rig.volumes("stuck")[0]["Attachments"] == []
    finally:
        ebs_rig.plane.attach_delay = 0.3
        d.stop()


def test_recovery_of_a_create_killed_midway_never_removes_another_hosts_volume(
        workdir, ebs_rig):
    """Host a dies just after recording a create; host b then makes the same name. a's
    start-up undoes its own half-made create without touching b's volume."""
    a = Daemon(workdir / "i0", workdir / "i0.sock",
               env={**ebs_rig.env(0), "PYVOL_BACKENDS": "ebs",
                    "PYVOL_CRASH_AT": "create.recorded"}).start()
    b = ebs_host(workdir, ebs_rig, 1)
    try:
        try:
            a.api.post("/VolumeDriver.Create", {"Name": "twin", "Opts": {"size": "1G"}})
        except Exception:  # noqa: BLE001 - the daemon dies mid-request: no answer
            pass
        a.proc.wait(timeout=30)
        a.stop()
        b.api.ok("/VolumeDriver.Create", {"Name": "twin", "Opts": {"size": "1G"}})
        [theirs] = ebs_rig.volumes("twin")
        a = ebs_host(workdir, ebs_rig, 0)  # recovery: undoes its own 'creating' record
        assert "undone without touching the storage" in a.log()
        assert [v["VolumeId"] for v in ebs_rig.volumes("twin")] == [theirs["VolumeId"]]
        assert b.api.ok("/VolumeDriver.Get", {"Name": "twin"})["Volume"]["Name"] == "twin"
        assert a.api.ok("/VolumeDriver.Get", {"Name": "twin"})["Volume"]["Name"] == "twin"
        b.api.ok("/VolumeDriver.Remove", {"Name": "twin"})
    finally:
        a.stop()
        b.stop()


# issue 11: temporary volumes and snapshots, and waiting for EC2's states

def _temp_volumes(ec2) -> list[dict]:
    return [v for v in ec2.describe_volumes(Filters=[{"Name": "tag-key", "Values": [
        "pyvol-temp"]}])["Volumes"] if v["State"] not in ("deleting", "deleted")]


def test_issue11_a_snapshot_being_read_is_no_volume_on_any_host(instances, ebs_rig, workdir):
    """A backup reads the snapshot through a temporary volume: while the read is held up
    (its device takes seconds to appear), host b lists only the user's volume, and the
    temporary one carries no name, only its temporary tags."""
    a, b = instances
    repo = workdir / "repo"
    repo.mkdir()
    a.api.ok("/VolumeDriver.Create", {"Name": "db", "Opts": {"size": "1G"}})
    a.cli("snapshot", "create", "db", "--name", "s1")
    ebs_rig.plane.attach_delay = 4
    done = {}
    reader = threading.Thread(target=lambda: done.update(proc=a.cli(
        "backup", "create", "db@s1", "--dest", f"file://{repo}", "--json", check=False)))
    reader.start()
    try:
        [temp] = until("the read's temporary volume", lambda: _temp_volumes(ebs_rig.ec2))
        tags = {t["Key"]: t["Value"] for t in temp["Tags"]}
        assert "pyvol-name" not in tags and tags["pyvol-creator"] == ebs_rig.instances[0]
        for d in (b, a):
            assert [v["Name"] for v in d.api.ok("/VolumeDriver.List")["Volumes"]] == ["db"]
    finally:
        reader.join()
        ebs_rig.plane.attach_delay = 0.3
    assert done["proc"].returncode == 0, done["proc"].stderr
    assert _temp_volumes(ebs_rig.ec2) == []  # each read removed its own


def test_issue11_a_crashed_daemons_temporary_volumes_go_at_its_next_start(workdir, ebs_rig):
    """Temporary volumes and snapshots of instance 0 whose daemon is gone (one still
    attached, with its device) are removed when instance 0's daemon starts; instance 1's, and
    those of a daemon of instance 0 that still runs, are left alone."""
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1")  # through the data plane
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    gone = subprocess.Popen(["true"])  # a pid that no longer runs
    gone.wait()
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    running = f"{boot}:{os.getpid()}:{stat[stat.rindex(')') + 2:].split()[19]}"
    dead = f"{boot}:{gone.pid}:1"

    def temp(instance: int, owner: str) -> str:
        return ec2.create_volume(AvailabilityZone="us-east-1a", Size=1, TagSpecifications=[{
            "ResourceType": "volume", "Tags": [
                {"Key": "pyvol-temp", "Value": os.urandom(4).hex()},
                {"Key": "pyvol-creator", "Value": ebs_rig.instances[instance]},
                {"Key": "pyvol-temp-owner", "Value": owner}]}])["VolumeId"]

    crashed, other, live = temp(0, dead), temp(1, dead), temp(0, running)
    ec2.attach_volume(VolumeId=crashed, InstanceId=ebs_rig.instances[0], Device="/dev/xvdf")
    device = ebs_rig.plane.device_dir(ebs_rig.instances[0]) / crashed
    until("the crashed read's device", device.exists)
    copy = ec2.create_snapshot(VolumeId=other, TagSpecifications=[{
        "ResourceType": "snapshot", "Tags": [
            {"Key": "pyvol-temp", "Value": "x"},
            {"Key": "pyvol-creator", "Value": ebs_rig.instances[0]},
            {"Key": "pyvol-temp-owner", "Value": dead}]}])["SnapshotId"]
    a = ebs_host(workdir, ebs_rig, 0)
    try:
        assert sorted(v["VolumeId"] for v in _temp_volumes(ec2)) == sorted([other, live])
        assert not device.exists()
        assert ec2.describe_snapshots(Filters=[{"Name": "tag-key", "Values": [
            "pyvol-temp"]}])["Snapshots"] == []
        log = a.log_path.read_text()
        assert crashed in log and copy in log and other not in log and live not in log
        assert a.api.ok("/VolumeDriver.List")["Volumes"] == []
    finally:
        a.stop()


def test_issue11_a_pending_snapshot_is_waited_for_and_a_stuck_one_fails_in_bounded_time(
        workdir, ebs_rig):
    repo = workdir / "repo"
    repo.mkdir()
    d = Daemon(workdir / "w", workdir / "w.sock",
               env={**ebs_rig.env(0), "PYVOL_BACKENDS": "ebs", "PYVOL_EBS_POLL_DELAY": "0.2",
                    "PYVOL_EBS_SNAPSHOT_TIMEOUT": "3"}).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "src", "Opts": {"size": "1G"}})

        def snap(name: str) -> str:
            d.cli("snapshot", "create", "src", "--name", name)
            return ebs_rig.ec2.describe_snapshots(Filters=[{"Name": "tag:pyvol-snapshot",
                                                            "Values": [name]}])[
                "Snapshots"][0]["SnapshotId"]

        sid = snap("s1")
        ebs_rig.plane.pending[sid] = 8  # about 1.5 s of "pending" at 0.2 s a look
        d.cli("create", "copy", "--from-snapshot", "src@s1")
        assert ebs_rig.plane.pending[sid] == 0 and len(ebs_rig.volumes("copy")) == 1
        ebs_rig.plane.pending[sid] = 8
        d.cli("backup", "create", "src@s1", "--dest", f"file://{repo}")
        assert ebs_rig.plane.pending[sid] == 0

        stuck = snap("s2")
        ebs_rig.plane.pending[stuck] = 10 ** 9
        for args in (("create", "never", "--from-snapshot", "src@s2"),
                     ("backup", "create", "src@s2", "--dest", f"file://{repo}")):
            started = time.monotonic()
            proc = d.cli(*args, check=False)
            assert proc.returncode != 0 and time.monotonic() - started < 20
            assert f"timed out after 3 s waiting for snapshot src@s2 ({stuck}) to complete " \
                   "(last state: pending)" in proc.stdout + proc.stderr
        assert ebs_rig.volumes("never") == [] and _temp_volumes(ebs_rig.ec2) == []
    finally:
        d.stop()


def test_issue11_a_cross_region_restore_leaves_no_copy_of_the_snapshot(workdir, ebs_rig):
    """The restore copies the backup into this region to make the volume; the copy goes once
    the volume is made, and when the restore fails after copying."""
    import boto3

    a = ebs_host(workdir, ebs_rig, 0)
    try:
        a.api.ok("/VolumeDriver.Create", {"Name": "ledger", "Opts": {"size": "1G"}})
        made = json.loads(a.cli("backup", "create", "ledger", "--dest", "ebs://us-west-2",
                                "--json").stdout)
        a.cli("restore", made["url"], "back")
        assert len(ebs_rig.volumes("back")) == 1
        # fails after the copy: the type is checked when the volume is made from it
        err = a.api.err("/VolumeDriver.Create", {"Name": "bad", "Opts": {
            "from-backup": made["url"], "type": "ssd"}})
        assert "invalid type 'ssd'" in err and ebs_rig.volumes("bad") == []
        for region in ("us-east-1", "us-west-2"):
            ec2 = boto3.client("ec2", region_name=region)
            assert ec2.describe_snapshots(OwnerIds=["self"], Filters=[{
                "Name": "tag-key", "Values": ["pyvol-temp"]}])["Snapshots"] == [], region
        west = boto3.client("ec2", region_name="us-west-2")
        assert west.describe_snapshots(SnapshotIds=[made["snapshot_id"]])["Snapshots"]
    finally:
        a.stop()


# issue 14: boto3's waiters and botocore's IMDS client instead of hand-made ones

def test_issue14_a_detach_that_never_happens_fails_in_bounded_time_with_its_state(
        workdir, ebs_rig):
    """EC2 accepts the detach and the attachment stays "detaching": the Unmount (and a
    force-detach of a dead instance's attachment) gives up after the attach timeout with the
    state EC2 last reported; once EC2 detaches, both go through."""
    d = Daemon(workdir / "d", workdir / "d.sock",
               env={**ebs_rig.env(0), "PYVOL_BACKENDS": "ebs", "PYVOL_EBS_POLL_DELAY": "0.2",
                    "PYVOL_EBS_ATTACH_TIMEOUT": "3"}).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "held", "Opts": {"size": "1G"}})
        d.api.ok("/VolumeDriver.Mount", {"Name": "held", "ID": "m"})
        [vol] = ebs_rig.volumes("held")
        ebs_rig.plane.stuck_detach.add(vol["VolumeId"])
        started = time.monotonic()
        err = d.api.err("/VolumeDriver.Unmount", {"Name": "held", "ID": "m"})
        assert time.monotonic() - started < 20
        assert f"timed out after 3 s waiting for held ({vol['VolumeId']}) to detach (last " \
               "state: detaching)" in err
        ebs_rig.plane.stuck_detach.clear()
        d.api.ok("/VolumeDriver.Remove", {"Name": "held"})  # detaches, then deletes
        assert ebs_rig.volumes("held") == []

        # another instance (dead) holds a volume; its force-detach hangs, then happens
        d.api.ok("/VolumeDriver.Create", {"Name": "orphan", "Opts": {"size": "1G"}})
        [vol] = ebs_rig.volumes("orphan")
        dead = ebs_rig.instances[1]
        ebs_rig.ec2.attach_volume(VolumeId=vol["VolumeId"], InstanceId=dead, Device="/dev/xvdf")
        ebs_rig.plane.stuck_detach.add(vol["VolumeId"])
        proc = d.cli("claim", "clear", "orphan", dead, check=False)
        assert proc.returncode != 0
        assert f"timed out after 3 s waiting for orphan to detach from {dead} (last state: " \
               "detaching)" in proc.stdout + proc.stderr
        ebs_rig.plane.stuck_detach.clear()
        d.cli("claim", "clear", "orphan", dead)
        assert ebs_rig.volumes("orphan")[0]["Attachments"] == []
    finally:
        ebs_rig.plane.stuck_detach.clear()
        d.stop()


def test_issue14_the_instance_is_found_through_botocores_imds_settings(ebs_rig, tmp_path,
                                                                       monkeypatch):
    """Without PYVOL_EBS_IMDS_URL, the metadata service is where botocore's settings say
    (AWS_EC2_METADATA_SERVICE_ENDPOINT); IMDSv2's token is used (the fake refuses reads
    without it)."""
    from pyvol.backends.ebs import EbsBackend

    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", ebs_rig.imds[2].url)
    b = EbsBackend(tmp_path, {"enable": "1"})
    assert b.not_configured() is None
    b.setup()
    assert (b.instance_id, b.zone, b.region) == (ebs_rig.instances[2], "us-east-1b",
                                                 "us-east-1")


@pytest.mark.parametrize("service", ["down", "stall"])
def test_issue14_a_metadata_service_that_does_not_answer_is_a_clear_err_in_bounded_time(
        ebs_rig, tmp_path, monkeypatch, service):
    """botocore's IMDS client with the session's timeout and attempts: a refused connection
    fails at once, a service that never answers after timeout × (the token, then each
    attempt of a read); either way the sentence says what to set."""
    import socket

    from pyvol.backends.ebs import EbsBackend
    from pyvol.errors import PyvolError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    if service == "stall":
        listener.listen(16)  # accepts, never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setenv("AWS_METADATA_SERVICE_TIMEOUT", "1")
    monkeypatch.setenv("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "2")
    started = time.monotonic()
    with pytest.raises(PyvolError) as e:
        EbsBackend(tmp_path, {"imds_url": url}).setup()
    took = time.monotonic() - started
    listener.close()
    assert f"the instance metadata service at {url} did not answer (2 attempt(s) of 1 s)" \
           in str(e.value) and "set PYVOL_EBS_IMDS_URL" in str(e.value)
    assert took < 10
    if service == "stall":
        assert took >= 2.5  # 1 s for the token, then 1 s for each of 2 attempts


def test_a_scheduled_ebs_backup_cut_off_by_a_crash_is_found_and_judged_by_retention(
        workdir, ebs_rig):
    """The daemon dies once its scheduled backup's copy has been asked for. The copy is
    tagged with the id the schedule recorded before the work, so the next run finds it as the
    schedule's and its retention (keep 1) removes it; the snapshot the backup took of the
    volume goes at the restart."""
    import boto3

    env = {**ebs_rig.env(0), "PYVOL_BACKENDS": "ebs"}
    d = Daemon(workdir / "i0", workdir / "i0.sock",
               env={**env, "PYVOL_CRASH_AT": "ebs.copying"}).start()
    d.api.ok("/VolumeDriver.Create", {"Name": "ledger", "Opts": {
        "size": "1G", "backup-every": "2s", "backup-keep": "1",
        "backup-to": "ebs://us-west-2"}})
    d.proc.wait(timeout=60)
    d.stop()
    west = boto3.client("ec2", region_name="us-west-2")

    def copies() -> list[str]:
        return [s["SnapshotId"] for s in west.describe_snapshots(OwnerIds=["self"], Filters=[
            {"Name": "tag:pyvol-backup", "Values": ["ledger"]}])["Snapshots"]]

    crashed = copies()
    assert len(crashed) == 1
    d = Daemon(workdir / "i0", workdir / "i0.sock", env=env).start()
    try:
        def ran() -> dict | None:
            rows = d.get("/schedules?volume=ledger")
            return rows[0] if rows[0]["runs"] >= 1 else None

        row = until("a scheduled backup after the restart", ran, timeout=60)
        assert row["error"] is None, row
        left = copies()
        assert len(left) == 1 and left != crashed and row["result"].endswith(left[0])
        assert json.loads(d.cli("snapshot", "ls", "ledger", "--json").stdout) == []
    finally:
        d.stop()


def test_a_shared_volumes_schedule_runs_once_per_slot_on_the_host_that_has_it_mounted(
        workdir, ebs_rig):
    """Set on instance a, the schedule is read from the volume's record by b too. While b
    has the volume mounted, b takes every snapshot (frozen there) and a records the slots as
    b's; once nobody has it mounted, each slot is claimed by one host. The retention set on a
    judges b's snapshots too, and a removal on b stops a's runner."""
    from pyvol.names import scheduled_snapshot_time

    env = {"PYVOL_BACKENDS": "ebs", "PYVOL_SCHEDULE_SYNC": "1", "PYVOL_EBS_RACE_SETTLE": "1"}
    a, b = (Daemon(workdir / f"i{i}", workdir / f"i{i}.sock",
                   env={**ebs_rig.env(i), **env}).start() for i in (0, 1))

    def row(d) -> dict | None:
        rows = d.get("/schedules")
        return rows[0] if rows else None

    def taken() -> list[str]:
        snaps = ebs_rig.ec2.describe_snapshots(OwnerIds=["self"], Filters=[
            {"Name": "tag:pyvol-volume", "Values": ["ledger"]}])["Snapshots"]
        return sorted(t["Value"] for s in snaps for t in s.get("Tags", [])
                      if t["Key"] == "pyvol-snapshot")

    try:
        a.api.ok("/VolumeDriver.Create", {"Name": "ledger", "Opts": {"size": "1G"}})
        b.api.ok("/VolumeDriver.Mount", {"Name": "ledger", "ID": "c1"})
        a.cli("schedule", "set", "ledger", "--snapshot-every", "5s", "--snapshot-keep", "100")
        until("two runs on b, which has it mounted",
               lambda: (row(b) or {}).get("runs", 0) >= 2, timeout=60)
        until("a to record a slot as b's", lambda: (row(a) or {}).get("by"), timeout=30)
        assert row(a)["by"] == ebs_rig.instances[1] and row(a)["runs"] == 0
        b.api.ok("/VolumeDriver.Unmount", {"Name": "ledger", "ID": "c1"})
        before = len(taken())
        until("four more slots", lambda: len(taken()) >= before + 4, timeout=60, every=0.5)
        names = taken()
        times = [scheduled_snapshot_time(n).timestamp() for n in names]
        # one snapshot per slot: two hosts running one slot take two within about a second
        # (both wait the same race_settle); runs of two slots are about 5 s apart
        assert all(t2 - t1 >= 2 for t1, t2 in zip(times, times[1:])), names
        # each snapshot is one counted run: a run is counted once its snapshot is taken, so
        # the two agree at the moments between a snapshot and its count (a slot each 5 s)
        until("every snapshot to be one counted run", lambda: row(a)["runs"] + row(b)["runs"]
              == len(taken()), timeout=20, every=0.25)

        a.cli("schedule", "set", "ledger", "--snapshot-keep", "2")
        until("the retention set on a to keep 2 of both hosts' snapshots",
               lambda: len(taken()) == 2, timeout=60, every=0.5)
        b.cli("schedule", "rm", "ledger")
        until("a to stop running it", lambda: row(a) is None, timeout=30)
        time.sleep(6)  # a run that had claimed its slot before the removal ends
        left = taken()
        time.sleep(6)
        assert taken() == left
    finally:
        for d in (a, b):
            d.stop()


def test_a_slot_the_holder_does_not_claim_is_run_by_another_host_after_the_grace(
        workdir, ebs_rig):
    """Instance b has two volumes mounted and its daemon is gone (stopped here; dead, or a
    pyvol without shared schedules, alike): a waits for b's claim, then claims each slot
    itself and runs it, saying once per slot that it ran without b's freeze. The waiting
    holds none of a's run slots (scheduler.SLOTS, two snapshots at once): a's schedule of a
    volume no host has mounted runs on throughout."""
    env = {"PYVOL_BACKENDS": "ebs", "PYVOL_SCHEDULE_SYNC": "1", "PYVOL_EBS_RACE_SETTLE": "1"}
    a, b = (Daemon(workdir / f"i{i}", workdir / f"i{i}.sock",
                   env={**ebs_rig.env(i), **env}).start() for i in (0, 1))
    orphans = ("orphaned", "orphaned2")
    try:
        for name in (*orphans, "free"):
            a.api.ok("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "1G"}})
        for name in orphans:
            b.api.ok("/VolumeDriver.Mount", {"Name": name, "ID": "c1"})
        b.stop()  # the volumes stay attached to instance b
        assert [x["InstanceId"] for x in ebs_rig.volumes("orphaned")[0]["Attachments"]] == \
            [ebs_rig.instances[1]]
        for name in orphans:
            a.cli("schedule", "set", name, "--snapshot-every", "5s", "--snapshot-keep", "3")
        a.cli("schedule", "set", "free", "--snapshot-every", "1s", "--snapshot-keep", "100")

        def rows() -> dict:
            return {r["volume"]: r for r in a.get("/schedules")}

        first = until("the orphaned volumes' first runs on a", lambda: (
            r := rows(), all(r[n]["runs"] >= 1 for n in orphans) and r)[1], timeout=60)
        done = until("one more run of each on a, after its grace", lambda: (
            r := rows(), all(r[n]["runs"] > first[n]["runs"] for n in orphans) and r)[1],
            timeout=60)
        for name in orphans:
            assert done[name]["by"] is None and done[name]["error"] is None, done[name]
            assert done[name]["result"], done[name]
        # each orphaned slot waited 10 s of grace, the two at once: with the waits in the run
        # slots, "free" ran only between them (gaps of 12-15 s seen); without, every second
        # or two (a claim and its 1 s settle, then the snapshot), 4-5 s on a busy machine
        times = sorted(datetime.fromisoformat(x["CreatedAt"].replace("Z", "+00:00")).timestamp()
                       for x in json.loads(a.cli("snapshot", "ls", "free", "--json").stdout))
        gaps = [later - t for t, later in zip(times, times[1:])]
        assert len(times) >= 5 and max(gaps) < 9, gaps
        assert "which has it mounted: run here, without the freeze" in a.log_path.read_text()
    finally:
        a.stop()
        b.stop()


def test_a_removed_volumes_schedules_go_with_it_and_never_pass_to_a_new_one_of_its_name(
        workdir, ebs_rig):
    """a set the schedule; b removes the volume and makes a new one of the same name: a
    forgets the old schedule, and does not write it into the new volume's record."""
    env = {"PYVOL_BACKENDS": "ebs", "PYVOL_SCHEDULE_SYNC": "1"}
    a, b = (Daemon(workdir / f"i{i}", workdir / f"i{i}.sock",
                   env={**ebs_rig.env(i), **env}).start() for i in (0, 1))

    def schedule_tags() -> list[str]:
        return sorted(t["Key"] for v in ebs_rig.volumes("reborn") for t in v.get("Tags", [])
                      if t["Key"].startswith("pyvol-schedule:"))

    try:
        a.api.ok("/VolumeDriver.Create", {"Name": "reborn", "Opts": {
            "size": "1G", "snapshot-every": "1h", "snapshot-keep": "3"}})
        assert schedule_tags() == ["pyvol-schedule:snapshot"]
        b.api.ok("/VolumeDriver.Remove", {"Name": "reborn"})
        until("a to forget the removed volume's schedule", lambda: a.get("/schedules") == [],
              timeout=30)
        b.api.ok("/VolumeDriver.Create", {"Name": "reborn", "Opts": {"size": "1G"}})
        time.sleep(4)  # several of a's syncs
        assert schedule_tags() == []
        assert json.loads(a.cli("schedule", "ls", "--json").stdout) == []
    finally:
        a.stop()
        b.stop()


def test_a_schedule_set_elsewhere_is_followed_under_the_volumes_lock(workdir, ebs_rig):
    """a's runner follows the schedule b sets only while a holds no lock on the volume: an
    operation of a's in progress (here the lock held by the test, as a ``schedule rm`` of
    a's holds it between writing the record and its row) is never undone by what a's sync
    read before it. Once the lock is free the next sync follows the record."""
    env = {"PYVOL_BACKENDS": "ebs", "PYVOL_SCHEDULE_SYNC": "1"}
    a, b = (Daemon(workdir / f"i{i}", workdir / f"i{i}.sock",
                   env={**ebs_rig.env(i), **env}).start() for i in (0, 1))

    def rows() -> list:
        return a.get("/schedules")

    try:
        a.api.ok("/VolumeDriver.Create", {"Name": "locked", "Opts": {"size": "1G"}})
        (workdir / "i0" / "locks").mkdir(exist_ok=True)
        fd = os.open(workdir / "i0" / "locks" / "vol.locked.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            b.cli("schedule", "set", "locked", "--snapshot-every", "1h", "--snapshot-keep", "3")
            time.sleep(4)  # several of a's syncs
            assert rows() == []
        finally:
            os.close(fd)
        got = until("a to follow the record", rows, timeout=20)
        assert [(r["volume"], r["every"]) for r in got] == [("locked", "1h")], got
    finally:
        a.stop()
        b.stop()


def test_after_a_shared_volume_moves_its_schedules_backups_are_judged_on_the_new_host(
        workdir, ebs_rig):
    """A backup schedule (keep 2) runs on a while a has the volume mounted; then a's daemon
    goes and the volume moves to b. Only b's retention can remove a's scheduled backups now,
    and it does (the manifests carry the volume's id): two are left of both hosts' runs, both
    b's. The backup made by hand, which no schedule marked, stays."""
    repo = workdir / "repo"
    repo.mkdir()
    url = f"file://{repo}"
    env = {"PYVOL_BACKENDS": "ebs", "PYVOL_SCHEDULE_SYNC": "1", "PYVOL_EBS_RACE_SETTLE": "1"}
    a, b = (Daemon(workdir / f"i{i}", workdir / f"i{i}.sock",
                   env={**ebs_rig.env(i), **env}).start() for i in (0, 1))

    def runs(d) -> int:
        rows = d.get("/schedules")
        assert not rows or rows[0]["error"] is None, rows
        return rows[0]["runs"] if rows else 0

    def backups(d) -> list[dict]:
        return json.loads(d.cli("backup", "ls", url, "--volume", "moving", "--json").stdout)

    try:
        a.api.ok("/VolumeDriver.Create", {"Name": "moving", "Opts": {"size": "1G"}})
        [vol] = ebs_rig.volumes("moving")
        a.api.ok("/VolumeDriver.Mount", {"Name": "moving", "ID": "c1"})
        by_hand = json.loads(a.cli("backup", "create", "moving", "--dest", url,
                                   "--json").stdout)["url"]
        a.cli("schedule", "set", "moving", "--backup-every", "5s", "--backup-keep", "2",
              "--backup-to", url)
        until("two scheduled backups on a", lambda: runs(a) >= 2, timeout=120)
        a.api.ok("/VolumeDriver.Unmount", {"Name": "moving", "ID": "c1"})
        a.stop()
        on_a = {x["url"] for x in backups(b) if x.get("schedule_of")}
        assert len(on_a) >= 2
        # b runs the slots from a's unmount on (nobody holds the volume): one of its runs
        # may have written its manifest, listed in on_a, and not be counted yet. Three runs
        # counted from here leave two backups newer than anything on_a lists (keep 2).
        before = runs(b)
        b.api.ok("/VolumeDriver.Mount", {"Name": "moving", "ID": "c2"})
        until("three scheduled backups on b after the move", lambda: runs(b) >= before + 3,
               timeout=120)
        got = backups(b)
        marked = [x for x in got if x.get("schedule_of")]
        assert {x["schedule_of"] for x in marked} == {vol["VolumeId"]}
        assert len(marked) == 2 and not on_a & {x["url"] for x in marked}, got
        assert [x["url"] for x in got if not x.get("schedule_of")] == [by_hand]
    finally:
        for d in (a, b):
            d.stop()
