"""The ebs backend: AWS EBS volumes that follow containers from instance to instance.

A volume is an EBS volume tagged ``pyvol-name=NAME`` (options in ``pyvol-opt:KEY`` tags), made
in this instance's zone. Every call looks the name up by tag, from any host, so no host keeps
a stale idea of what exists. Mount attaches the volume here and waits for its block device;
a volume attached to another instance is refused with that instance's id (``pyvol lease
clear`` force-detaches a dead one). Snapshots are EBS snapshots, tagged. A snapshot is read
through a temporary volume that carries only temporary tags (never a name), so no host ever
lists it; a daemon's start removes the ones its dead predecessors on this instance left.
docs/ebs.md has the details, and what is emulated in the tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Collection
from pathlib import Path

from pyvol import clock, devwait
from pyvol.crashpoint import crashpoint
from pyvol.errors import Conflict, InvalidInput, NotFound, PoolFull, PyvolError
from pyvol.fs import device_size

from .base import BlockBackend, Quiesce, Range, VolumeSpec, release_each
from .settings import seconds
from .shared import HeldElsewhere, SharedBackend

GiB = 1 << 30
NAME_TAG, OPT_TAG, SNAP_VOL_TAG, SNAP_TAG, TEMP_TAG = (
    "pyvol-name", "pyvol-opt:", "pyvol-volume", "pyvol-snapshot", "pyvol-temp")
CREATOR_TAG = "pyvol-creator"  # the instance that made the volume
# a volume's schedule of one kind, as compact JSON (or "null": removed); and its last claimed
# run, "SLOT INSTANCE" (docs/schedules.md)
SCHEDULE_TAG, RUN_TAG = "pyvol-schedule:", "pyvol-run:"
TAG_VALUE_MAX = 256  # EC2's limit on a tag's value
# A temporary volume (a snapshot being read) or snapshot (a restore's copy from another
# region) carries TEMP_TAG=a token of its own, CREATOR_TAG and OWNER_TAG (the daemon that
# made it, see _process_token) and never NAME_TAG: no host lists it as a volume.
OWNER_TAG = "pyvol-temp-owner"
TYPES = ("gp3", "gp2", "io1", "io2", "st1", "sc1", "standard")
DEVICE_LETTERS = "fghijklmnop"
NVME_BY_ID = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{}"
GONE_STATES = ("deleting", "deleted", "error")

log = logging.getLogger(__name__)


def _tags(resource: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _process_token(pid: int) -> str | None:
    """``BOOT-ID:PID:START-TICKS`` of a running process, or None: names one process for as
    long as it lives, so neither a reboot nor a reused pid can pass for it."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}:{pid}:{stat[stat.rindex(')') + 2:].split()[19]}"


def _owner_alive(owner: str) -> bool:
    pid = owner.split(":")[1] if owner.count(":") == 2 else ""
    return pid.isdigit() and _process_token(int(pid)) == owner


def _aws_session():
    """A botocore session for EC2 and IMDS: the usual AWS settings (env, config files), but
    IMDS's timeout defaults to pyvol's 2 s, not botocore's 1."""
    import botocore.session

    name, env, _, cast = botocore.session.Session.SESSION_VARIABLES["metadata_service_timeout"]
    return botocore.session.Session(session_vars={"metadata_service_timeout": (
        name, env, 2, cast)})


def _identity(url: str | None, session) -> tuple[str, str]:
    """This instance's id and availability zone, through botocore's IMDS client (IMDSv2: a
    session token first). ``url`` (PYVOL_EBS_IMDS_URL) says where the service is; unset, the
    session's settings do (AWS_EC2_METADATA_SERVICE_ENDPOINT or its IPv6 mode, else
    169.254.169.254), as they say the timeout (AWS_METADATA_SERVICE_TIMEOUT, 2 s), the
    attempts (AWS_METADATA_SERVICE_NUM_ATTEMPTS, 1) and whether IMDSv1 may be the fallback
    of a refused token (AWS_EC2_METADATA_V1_DISABLED)."""
    import botocore.exceptions as bx
    from botocore import utils

    class Fetcher(utils.IMDSFetcher):  # as botocore's own fetchers extend it
        def read(self, *paths: str) -> list[str]:
            token = self._fetch_metadata_token()
            return [self._get_request(f"latest/meta-data/{p}", None, token).text.strip()
                    for p in paths]

    timeout = session.get_config_variable("metadata_service_timeout")
    attempts = session.get_config_variable("metadata_service_num_attempts")
    where = url or "169.254.169.254"
    try:
        fetcher = Fetcher(
            timeout=timeout, num_attempts=attempts, base_url=url or utils.METADATA_BASE_URL,
            config={"ec2_metadata_service_endpoint": session.get_config_variable(
                        "ec2_metadata_service_endpoint"),
                    "ec2_metadata_service_endpoint_mode": utils.resolve_imds_endpoint_mode(
                        session),
                    "ec2_metadata_v1_disabled": session.get_config_variable(
                        "ec2_metadata_v1_disabled")})
        where = fetcher.get_base_url().rstrip("/")
        instance_id, zone = fetcher.read("instance-id", "placement/availability-zone")
    except (utils._RetriesExceededError, utils.BadIMDSRequestError, bx.BotoCoreError) as e:
        why = str(e) if isinstance(e, bx.BotoCoreError) else f"{attempts} attempt(s) of " \
            f"{timeout:g} s"
        raise PyvolError(f"the instance metadata service at {where} did not answer ({why}): "
                         "is this an EC2 instance? (set PYVOL_EBS_IMDS_URL if it lives "
                         "elsewhere)") from None
    return instance_id, zone


class EbsBackend(SharedBackend, BlockBackend):
    name = "ebs"
    scope = "global"
    no_rollback = (
        "EC2 cannot revert a volume in place: it would make a new EBS volume from the "
        "snapshot (its blocks loaded lazily from S3, slow at first read) and give it the "
        "volume's name, which no EC2 call does atomically; make a new volume from the "
        "snapshot instead: docker volume create -d pyvol -o from-snapshot=VOLUME@SNAPSHOT NEW")
    may_lack_fs = True  # a volume from a foreign snapshot may hold no filesystem yet
    size_unit = GiB
    options = {
        "type": f"EBS volume type: {', '.join(TYPES)} (default gp3)",
        "iops": "provisioned IOPS (gp3, io1, io2)",
        "throughput": "provisioned throughput in MiB/s (gp3)",
        "encrypted": "true or false (default: the account's default)",
        "kms-key-id": "KMS key for an encrypted volume",
    }

    def __init__(self, root: Path, settings: dict[str, str] | None = None):
        super().__init__(root, settings)
        s = self.settings
        self.imds_url = s.get("imds_url")  # unset: botocore's IMDS settings, see _identity
        self.device_dir = s.get("device_dir")  # a test rig's stand-in for the device names
        self.attach_timeout = seconds("ebs", s, "attach_timeout", 120)
        self.race_settle = seconds("ebs", s, "race_settle", 2, zero=True)
        self.snapshot_timeout = seconds("ebs", s, "snapshot_timeout", 3600)
        self.poll_delay = seconds("ebs", s, "poll_delay", 2)  # between two looks of a waiter
        # a Mount waits this long for another instance to detach (Swarm starts a moved task
        # before the old one has unmounted), well inside Docker's 30 s for the call
        self.release_wait = seconds("ebs", s, "release_wait", 20, zero=True)
        self.release_poll = min(self.poll_delay, 1.0)
        self.instance_id = self.zone = self.region = None
        self.owner = None  # this daemon (its master process), for its temporary resources
        self._ec2 = None

    def not_configured(self) -> str | None:
        if self.settings.get("enable") != "1" and "imds_url" not in self.settings:
            return "not enabled (on an EC2 instance, set PYVOL_EBS_ENABLE=1)"
        return None

    # AWS plumbing
    def setup(self) -> None:
        import boto3
        import botocore.config

        session = _aws_session()
        self.instance_id, self.zone = _identity(self.imds_url, session)
        self.region = os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION") or self.zone[:-1]
        cfg = botocore.config.Config(
            region_name=self.region, connect_timeout=float(self.settings.get("connect_timeout", 5)),
            read_timeout=float(self.settings.get("read_timeout", 30)),
            retries={"max_attempts": int(self.settings.get("max_attempts", 6)),
                     "mode": "standard"})  # standard mode retries throttling with backoff
        self._ec2 = boto3.session.Session(botocore_session=session).client("ec2", config=cfg)
        # the daemon's master, whose workers inherit this: every read it runs is tagged with it
        self.owner = _process_token(int(os.environ.get("PYVOL_MASTER_PID", os.getpid())))
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Remove the temporary volumes and snapshots that daemons on this instance made and
        left when they died (a crash in the middle of a read or a restore). Those of a daemon
        still running (another root, or this process) are in use; other instances' are not
        ours. A failure is logged: the daemon still starts, and the next start tries again."""
        mine = [{"Name": f"tag:{CREATOR_TAG}", "Values": [self.instance_id]},
                {"Name": "tag-key", "Values": [TEMP_TAG]}]
        try:
            vols = self._volumes(mine)
            snaps = self._aws("describe_snapshots", OwnerIds=["self"], Filters=mine)["Snapshots"]
        except PyvolError as e:
            log.warning("cannot look for temporary EBS volumes left by a crash: %s", e)
            return
        for res, kind, rid in [(v, "volume", v["VolumeId"]) for v in vols] + [
                (s, "snapshot", s["SnapshotId"]) for s in snaps]:
            owner = _tags(res).get(OWNER_TAG, "")
            if owner == self.owner or _owner_alive(owner):
                continue
            try:
                if kind == "volume":
                    self._remove_temp(res)
                else:
                    self._aws("delete_snapshot", SnapshotId=rid)
                log.info("removed temporary EBS %s %s left by a daemon that is gone (%s)",
                         kind, rid, owner or "no owner")
            except PyvolError as e:
                log.warning("cannot remove temporary EBS %s %s left by a crash: %s", kind, rid, e)

    def _temp_tags(self, token: str) -> list[dict]:
        return [{"Key": TEMP_TAG, "Value": token}, {"Key": CREATOR_TAG, "Value": self.instance_id},
                {"Key": OWNER_TAG, "Value": self.owner or "?"}]

    def _aws(self, op: str, client=None, **kw):
        """One EC2 call (on this region's client unless another is given), errors as Errs."""
        import botocore.exceptions as bx

        try:
            return getattr(client or self._ec2, op)(**kw)
        except (bx.ClientError, bx.BotoCoreError) as e:
            raise self._translate(op, e) from None

    @staticmethod
    def _translate(op: str, e: Exception) -> PyvolError:
        """An AWS failure as a sentence: what was refused, and what to do about it."""
        import botocore.exceptions as bx

        if isinstance(e, bx.ClientError):
            code = e.response.get("Error", {}).get("Code", "?")
            msg = e.response.get("Error", {}).get("Message", "")
            if code.endswith(".NotFound"):
                return NotFound(f"EC2 {op}: {msg or code}")
            if code in ("InvalidParameterValue", "InvalidParameterCombination",
                        "InvalidParameter", "MissingParameter", "InvalidVolume.ZoneMismatch"):
                return InvalidInput(f"EC2 refused {op}: {msg or code}")
            if "LimitExceeded" in code or code == "InsufficientVolumeCapacity":
                return PoolFull(f"EC2 refused {op}: {code}: {msg}; raise the account's limit "
                                "or remove volumes and snapshots")
            if code in ("UnauthorizedOperation", "AuthFailure", "AccessDenied",
                        "InvalidClientTokenId"):
                return PyvolError(f"EC2 refused {op} ({code}): the instance role or AWS "
                                  "credentials lack permission for it")
            if code in ("IncorrectState", "VolumeInUse"):
                return Conflict(f"EC2 refused {op}: {msg or code}")
            return PyvolError(f"EC2 {op} failed: {code}: {msg}")
        return PyvolError(f"cannot reach EC2 for {op} ({type(e).__name__}); check the network "
                          "and AWS_ENDPOINT_URL_EC2")

    def _volumes(self, filters: list[dict]) -> list[dict]:
        import botocore.exceptions as bx

        out = []
        try:
            for page in self._ec2.get_paginator("describe_volumes").paginate(Filters=filters):
                out += [v for v in page["Volumes"] if v["State"] not in GONE_STATES]
        except (bx.ClientError, bx.BotoCoreError) as e:
            raise self._translate("describe_volumes", e) from None
        return out

    def _named(self, filters: list[dict]) -> list[dict]:
        """The users' volumes among those matching, oldest first: never a temporary one
        (older pyvol versions gave those a name too)."""
        return sorted((v for v in self._volumes(filters) if TEMP_TAG not in _tags(v)),
                      key=lambda v: (v["CreateTime"], v["VolumeId"]))

    def _by_name(self, name: str) -> list[dict]:
        return self._named([{"Name": f"tag:{NAME_TAG}", "Values": [name]}])

    def _find(self, name: str) -> dict:
        found = self._by_name(name)
        if not found:
            raise NotFound(f"no EBS volume is tagged {NAME_TAG}={name}")
        return found[0]

    def _wait(self, what: str, check, timeout: float):
        """Wait until ``check`` gives something, for at most ``timeout`` s: for a device node
        appearing or going, which this host's kernel shows, not EC2. Looked for on every
        block device's uevent, polling where none arrive (devwait); the device's kernel name
        (nvmeN, xvdX) is not known before it appears."""
        return devwait.until(check, timeout, PyvolError(
            f"timed out after {timeout:g} s waiting for {what}"))

    def _detached_waiter(self, instance: str):
        """A boto3 waiter for a volume to have no attachment to ``instance`` (a volume that
        is gone has none). boto3 has none of its own: volume_available reads the volume's
        state, which stays in-use while any other instance holds it, so it would wait for
        (or time out on) another host that attached the volume the moment it was free."""
        import botocore.waiter

        literal = "'" + instance.replace("\\", "\\\\").replace("'", "\\'") + "'"
        model = botocore.waiter.WaiterModel({"version": 2, "waiters": {"Detached": {
            "operation": "DescribeVolumes", "delay": 15, "maxAttempts": 40, "acceptors": [
                {"state": "success", "matcher": "path", "expected": 0, "argument":
                 f"length(Volumes[].Attachments[] | [?InstanceId == {literal}])"},
                {"state": "success", "matcher": "error", "expected": "InvalidVolume.NotFound"},
            ]}}})
        return botocore.waiter.create_waiter_with_client("Detached", model, self._ec2)

    def _await(self, waiter, what: str, timeout: float, client=None, attachment_of=None,
               **kw) -> None:
        """A boto3 EC2 waiter (by name: ``snapshot_completed``, ``volume_available``; or one
        of ours), looking every ``poll_delay`` s for at most ``timeout`` s. Giving up is an
        Err that says what was waited for, how long, and the state EC2 last reported: the
        attachment's to instance ``attachment_of`` if given, else the volume's or
        snapshot's."""
        import botocore.exceptions as bx

        delay = max(self.poll_delay, 0.01)
        config = {"Delay": delay, "MaxAttempts": max(1, math.ceil(timeout / delay)) + 1}
        if isinstance(waiter, str):
            waiter = (client or self._ec2).get_waiter(waiter)
        op = "describe_snapshots" if waiter.name.startswith("Snapshot") else "describe_volumes"
        try:
            waiter.wait(WaiterConfig=config, **kw)
        except bx.WaiterError as e:
            last = e.last_response or {}
            if "Error" in last:  # the look itself was refused (gone, no permission)
                raise self._translate(op, bx.ClientError(last, op)) from None
            found = last.get("Snapshots", []) + last.get("Volumes", [])
            states = sorted({x.get("State", "?") for x in found} if attachment_of is None else
                            {a.get("State", "?") for x in found for a in x["Attachments"]
                             if a.get("InstanceId") == attachment_of}) or ["unknown"]
            state = ", ".join(states)
            if "terminal failure" in (e.kwargs.get("reason") or ""):
                raise PyvolError(f"gave up waiting for {what}: EC2 reports it {state}") from None
            raise PyvolError(f"timed out after {timeout:g} s waiting for {what} (last state: "
                             f"{state})") from None
        except bx.BotoCoreError as e:
            raise self._translate(op, e) from None

    # records every host sees
    def record(self, name: str) -> dict | None:
        try:
            return self._record(self._find(name))
        except NotFound:
            return None

    def _record(self, v: dict) -> dict:
        tags = {t["Key"]: t["Value"] for t in v.get("Tags", [])}
        opts = {k[len(OPT_TAG):]: val for k, val in tags.items() if k.startswith(OPT_TAG)}
        rec = {"size": v["Size"] * GiB, "options": opts, "volume_id": v["VolumeId"],
               "created": clock.stamp(v["CreateTime"])}
        schedules = {}
        for k, val in tags.items():
            if k.startswith(SCHEDULE_TAG):
                try:  # another host's: checked by the reader (plugin/schedules.py)
                    schedules[k[len(SCHEDULE_TAG):]] = json.loads(val)
                except ValueError:
                    schedules[k[len(SCHEDULE_TAG):]] = val
        if schedules:
            rec["schedules"] = schedules
        return rec

    @staticmethod
    def _schedule_tags(schedules: dict[str, dict | None]) -> list[dict]:
        tags = []
        for what, spec in schedules.items():
            value = json.dumps(spec, separators=(",", ":"), sort_keys=True)
            if len(value) > TAG_VALUE_MAX:
                raise InvalidInput(f"the {what} schedule does not fit in an EBS tag "
                                   f"({len(value)} characters written, {TAG_VALUE_MAX} "
                                   "accepted): use a shorter backup-to or keep policy")
            tags.append({"Key": SCHEDULE_TAG + what, "Value": value})
        return tags

    def check_schedules(self, schedules: dict[str, dict | None]) -> None:
        self._schedule_tags(schedules)

    def set_schedules(self, name: str, schedules: dict[str, dict | None]) -> None:
        tags = self._schedule_tags(schedules)
        self._aws("create_tags", Resources=[self._find(name)["VolumeId"]], Tags=tags)

    def claim_run(self, name: str, what: str, slot: str) -> str:
        """EC2 tags have no compare-and-swap, so a claim is settled as a create is: written,
        then read again after ``race_settle``; of hosts that claimed together, every one
        reads the last write, and that host runs the slot."""
        def holder(v: dict) -> tuple[str, str]:
            slot_, _, who = _tags(v).get(RUN_TAG + what, "").partition(" ")
            return slot_, who

        v = self._find(name)
        held, who = holder(v)
        if held >= slot and who:  # claimed already, or a newer slot is: not this host's
            return who
        self._aws("create_tags", Resources=[v["VolumeId"]],
                  Tags=[{"Key": RUN_TAG + what, "Value": f"{slot} {self.instance_id}"}])
        time.sleep(self.race_settle)
        held, who = holder(self._find(name))
        return who if held >= slot and who else self.instance_id

    def incarnation(self, name: str) -> str | None:
        rec = self.record(name)
        return None if rec is None else rec["volume_id"]

    def created_here(self, name: str) -> bool:
        return all(_tags(v).get(CREATOR_TAG) == self.instance_id for v in self._by_name(name))

    def records(self) -> dict[str, dict]:
        out = {}
        for v in self._named([{"Name": "tag-key", "Values": [NAME_TAG]}]):
            name = _tags(v).get(NAME_TAG)
            if name and name not in out:
                out[name] = self._record(v)
        return out

    def list(self) -> list[str]:
        return sorted(self.records())

    # volumes
    def _create_params(self, spec: VolumeSpec) -> dict:
        o = spec.options
        vtype = o.get("type", "gp3")
        if vtype not in TYPES:
            raise InvalidInput(f"invalid type {vtype!r}: accepted are {', '.join(TYPES)}")
        params = {"AvailabilityZone": self.zone, "VolumeType": vtype,
                  "Size": max(1, math.ceil(spec.size / GiB))}
        for key, arg in (("iops", "Iops"), ("throughput", "Throughput")):
            if key in o:
                if not o[key].isdigit():
                    raise InvalidInput(f"invalid {key} {o[key]!r}: accepted is a whole number")
                params[arg] = int(o[key])
        if "encrypted" in o:
            if o["encrypted"] not in ("true", "false"):
                raise InvalidInput(f"invalid encrypted {o['encrypted']!r}: accepted are true, "
                                   "false")
            params["Encrypted"] = o["encrypted"] == "true"
        if "kms-key-id" in o:
            params["KmsKeyId"] = o["kms-key-id"]
            params["Encrypted"] = True
        tags = [{"Key": NAME_TAG, "Value": spec.name},
                {"Key": CREATOR_TAG, "Value": self.instance_id}] + [
            {"Key": OPT_TAG + k, "Value": str(v)[:255]} for k, v in sorted(spec.meta.items())]
        # tagged in the same call: a volume never exists untagged, so never orphaned
        params["TagSpecifications"] = [{"ResourceType": "volume", "Tags": tags}]
        return params

    def _create_unique(self, spec: VolumeSpec, **extra) -> None:
        """Create, then settle a race by name: of all volumes with the name, the oldest
        (then lowest id) is the volume; any other host's later one deletes itself."""
        if self._by_name(spec.name):
            raise Conflict(f"volume {spec.name} already exists in EBS (another host made it)")
        vol = self._aws("create_volume", **self._create_params(spec), **extra)
        # Another host's create that passed the check above finishes within a moment: look
        # again after it, so both hosts see both volumes and agree on the same winner.
        time.sleep(self.race_settle)
        winner = self._by_name(spec.name)[0]
        if winner["VolumeId"] != vol["VolumeId"]:
            self._aws("delete_volume", VolumeId=vol["VolumeId"])
            raise Conflict(f"volume {spec.name} was created at the same moment by another host "
                           f"({winner['VolumeId']}); use it by name")
        self._await("volume_available", f"volume {spec.name} ({vol['VolumeId']}) to become "
                    "available", self.attach_timeout, VolumeIds=[vol["VolumeId"]])

    def create(self, spec: VolumeSpec) -> None:
        self._create_unique(spec)

    def remove(self, name: str) -> None:
        try:
            v = self._find(name)
        except NotFound:
            return
        others = [a["InstanceId"] for a in v["Attachments"] if a["InstanceId"] != self.instance_id]
        if others:
            raise Conflict(f"volume {name} is attached to instance {', '.join(others)}")
        self.deactivate(name)
        for snap in self._snapshots(name):
            self._aws("delete_snapshot", SnapshotId=snap["SnapshotId"])
        self._aws("delete_volume", VolumeId=v["VolumeId"])

    # attachment
    def _device(self, volume_id: str, device_name: str) -> str | None:
        candidates = ([os.path.join(self.device_dir, volume_id)] if self.device_dir else [
            NVME_BY_ID.format(volume_id.replace("-", "")), device_name,
            device_name.replace("/dev/xvd", "/dev/sd")])
        for c in candidates:
            if os.path.exists(c):
                return os.path.realpath(c)
        return None

    def _attachment(self, v: dict) -> dict | None:
        return next((a for a in v["Attachments"] if a["InstanceId"] == self.instance_id), None)

    def activate(self, name: str) -> str:
        v = self._find(name)
        others = [a["InstanceId"] for a in v["Attachments"] if a["InstanceId"] != self.instance_id]
        if others:
            raise HeldElsewhere(f"volume {name} ({v['VolumeId']}) is attached to instance "
                                f"{', '.join(others)}; unmount it there first (if that "
                                f"instance is dead: pyvol claim clear {name} {others[0]})",
                                others)
        return self._attach(v, f"{name} ({v['VolumeId']})")

    def _attach(self, v: dict, what: str) -> str:
        """Attach volume ``v`` here (unless it is) and wait for its block device."""
        mine = self._attachment(v)
        if mine is None:
            used = {a["Device"] for vol in self._volumes([{
                "Name": "attachment.instance-id", "Values": [self.instance_id]}])
                for a in vol["Attachments"]}
            free = next((f"/dev/xvd{c}" for c in DEVICE_LETTERS if f"/dev/xvd{c}" not in used),
                        None)
            if free is None:
                raise PoolFull(f"instance {self.instance_id} has no free device name for "
                               f"{what}: unmount other ebs volumes first")
            self._aws("attach_volume", VolumeId=v["VolumeId"], InstanceId=self.instance_id,
                      Device=free)
            mine = {"Device": free}
        try:
            return self._wait(f"the block device of {what} to appear on this instance",
                              lambda: self._device(v["VolumeId"], mine["Device"]),
                              self.attach_timeout)
        except PyvolError:
            with contextlib.suppress(PyvolError):  # never leave it attached for nothing
                self._detach(self._aws("describe_volumes", VolumeIds=[v["VolumeId"]])[
                    "Volumes"][0], what)
            raise

    def deactivate(self, name: str) -> None:
        try:
            v = self._find(name)
        except NotFound:
            return
        self._detach(v, f"{name} ({v['VolumeId']})")

    def deactivate_many(self, names: Collection[str]) -> None:
        """One listing of the named volumes (deactivate() asks EC2 about each), then a
        detach of each attached here; a name's volume is the one deactivate() would find."""
        first: dict[str, dict] = {}
        for v in self._named([{"Name": "tag-key", "Values": [NAME_TAG]}]):
            first.setdefault(_tags(v).get(NAME_TAG), v)

        def release(name: str) -> None:
            v = first.get(name)
            if v is not None:
                self._detach(v, f"{name} ({v['VolumeId']})")

        release_each(self.name, names, release)

    def _detach(self, v: dict, what: str) -> None:
        """Detach volume ``v`` from this instance (if it is attached here) and wait until
        EC2 lists no attachment here and the block device is gone."""
        mine = self._attachment(v)
        if mine is None:
            return
        self._aws("detach_volume", VolumeId=v["VolumeId"], InstanceId=self.instance_id)
        self._await(self._detached_waiter(self.instance_id), f"{what} to detach",
                    self.attach_timeout, attachment_of=self.instance_id,
                    VolumeIds=[v["VolumeId"]])
        self._wait(f"the block device of {what} to go", lambda: self._device(
            v["VolumeId"], mine["Device"]) is None, self.attach_timeout)

    # claims: an instance claims a volume by having it attached
    @property
    def instance(self) -> str:
        return self.instance_id

    def claims(self, name: str) -> list[dict]:
        return [{"host": a["InstanceId"], "instance": a["InstanceId"],
                 "since": clock.stamp(a["AttachTime"])}
                for a in self._find(name)["Attachments"]]

    def removal_blockers(self, name: str) -> list[str]:
        return [x["instance"] for x in self.claims(name) if x["instance"] != self.instance_id]

    def clear_claim(self, name: str, host: str) -> int:
        """Force-detach the volume from a dead instance."""
        v = self._find(name)
        if not any(a["InstanceId"] == host for a in v["Attachments"]):
            return 0
        self._aws("detach_volume", VolumeId=v["VolumeId"], InstanceId=host, Force=True)
        self._await(self._detached_waiter(host), f"{name} to detach from {host}",
                    self.attach_timeout, attachment_of=host, VolumeIds=[v["VolumeId"]])
        return 1

    # snapshots
    def _snapshots(self, name: str, snap: str | None = None) -> list[dict]:
        filters = [{"Name": f"tag:{SNAP_VOL_TAG}", "Values": [name]}]
        if snap:
            filters.append({"Name": f"tag:{SNAP_TAG}", "Values": [snap]})
        return self._aws("describe_snapshots", OwnerIds=["self"], Filters=filters)["Snapshots"]

    def _snapshot_id(self, name: str, snap: str) -> dict:
        found = self._snapshots(name, snap)
        if not found:
            raise NotFound(f"snapshot {name}@{snap} not found in EBS")
        return found[0]

    def snapshot(self, name: str, snap: str, quiesce: Quiesce = contextlib.nullcontext) -> None:
        v = self._find(name)
        with quiesce():  # an EBS snapshot is point-in-time at the call
            self._aws("create_snapshot", VolumeId=v["VolumeId"],
                      Description=f"pyvol {name}@{snap}",
                      TagSpecifications=[{"ResourceType": "snapshot", "Tags": [
                          {"Key": SNAP_VOL_TAG, "Value": name}, {"Key": SNAP_TAG, "Value": snap}]}])

    def remove_snapshot(self, name: str, snap: str) -> None:
        for s in self._snapshots(name, snap):
            self._aws("delete_snapshot", SnapshotId=s["SnapshotId"])

    def snapshots(self, name: str) -> list[str]:
        return sorted({t["Value"] for s in self._snapshots(name) for t in s.get("Tags", [])
                       if t["Key"] == SNAP_TAG})

    def _completed(self, name: str, snap: str) -> str:
        """The snapshot's id, once EC2 reports it completed (a volume made from a pending
        snapshot is refused, or would be read before its data is all there)."""
        sid = self._snapshot_id(name, snap)["SnapshotId"]
        self._await("snapshot_completed", f"snapshot {name}@{snap} ({sid}) to complete",
                    self.snapshot_timeout, SnapshotIds=[sid])
        return sid

    def clone(self, name: str, snap: str, spec: VolumeSpec) -> None:
        self._create_unique(spec, SnapshotId=self._completed(name, snap))

    @contextlib.contextmanager
    def read_snapshot(self, name: str, snap: str):
        """A temporary volume from the snapshot, attached here while it is read.

        It carries only the temporary tags (found by its token, never by a name, so no host
        lists it as a volume), and goes when the read ends; if this daemon dies first, its
        next start removes it (_remove_leftovers)."""
        sid = self._completed(name, snap)
        token = f"{sid}-{secrets.token_hex(6)}"
        try:
            vid = self._aws("create_volume", AvailabilityZone=self.zone, SnapshotId=sid,
                            VolumeType="gp3", TagSpecifications=[{
                                "ResourceType": "volume", "Tags": self._temp_tags(token)}])[
                "VolumeId"]
            what = f"the temporary volume {vid} reading {name}@{snap}"
            self._await("volume_available", f"{what} to become available",
                        self.attach_timeout, VolumeIds=[vid])
            yield self._attach({"VolumeId": vid, "Attachments": []}, what)
        finally:
            self._drop_temp(token)

    def _drop_temp(self, token: str) -> None:
        """Remove every temporary volume tagged with ``token`` (even one whose create call
        failed after EC2 made it). Never raises: a read's own error matters more, and a
        volume left here is removed at the daemon's next start."""
        try:
            for v in self._volumes([{"Name": f"tag:{TEMP_TAG}", "Values": [token]}]):
                try:
                    self._remove_temp(v)
                except PyvolError as e:
                    log.warning("cannot remove temporary EBS volume %s (removed at the "
                                "daemon's next start, or remove it by hand): %s",
                                v["VolumeId"], e)
        except PyvolError as e:
            log.warning("cannot look for temporary EBS volume %s: %s", token, e)

    def _remove_temp(self, v: dict) -> None:
        what = f"the temporary volume {v['VolumeId']}"
        if v["State"] == "creating":  # EC2 deletes only an available volume
            self._await("volume_available", f"{what} to become available", self.attach_timeout,
                        VolumeIds=[v["VolumeId"]])
        self._detach(v, what)
        self._aws("delete_volume", VolumeId=v["VolumeId"])

    def grow(self, name: str, size: int) -> None:
        """ModifyVolume to the new size in GiB, then wait until EC2 reports the change
        under way (the size is usable from "optimizing" on) and, if the volume is attached
        here, until its block device shows the new size."""
        v = self._find(name)
        others = [a["InstanceId"] for a in v["Attachments"] if a["InstanceId"] != self.instance_id]
        if others:
            # its filesystem can only grow where it is attached: refused before ModifyVolume,
            # so that no size changes underneath a filesystem another host has mounted
            raise Conflict(f"volume {name} ({v['VolumeId']}) is attached to instance "
                           f"{', '.join(others)}: resize it on that host")
        gib = max(1, math.ceil(size / GiB))
        if gib > v["Size"]:  # never smaller (base.py: the caller refuses a shrink)
            self._aws("modify_volume", VolumeId=v["VolumeId"], Size=gib)
        self._wait(f"EC2 to resize {name} ({v['VolumeId']}) to {gib} GiB",
                   lambda: self._modified(v["VolumeId"], gib), self.attach_timeout)
        mine = self._attachment(v)
        if mine is not None:
            self._wait(f"the block device of {name} ({v['VolumeId']}) to show {gib} GiB",
                       lambda: self._device_shows(v["VolumeId"], mine["Device"], gib * GiB),
                       self.attach_timeout)

    def _modified(self, volume_id: str, gib: int) -> bool:
        mods = [m for m in self._aws("describe_volumes_modifications", VolumeIds=[volume_id])
                .get("VolumesModifications", []) if m.get("TargetSize") == gib]
        states = {m.get("ModificationState") for m in mods}
        if "failed" in states:
            raise PyvolError(f"EC2 failed to resize {volume_id} to {gib} GiB: "
                             f"{mods[0].get('StatusMessage') or 'no reason given'}")
        if states & {"optimizing", "completed"}:
            return True
        # no modification toward that size: it was that size already (a repeated grow)
        return not states and self._aws("describe_volumes", VolumeIds=[volume_id])[
            "Volumes"][0]["Size"] >= gib

    def _device_shows(self, volume_id: str, device_name: str, size: int) -> bool:
        dev = self._device(volume_id, device_name)
        return dev is not None and device_size(dev) >= size

    def rollback(self, name: str, snap: str) -> None:
        raise InvalidInput(f"cannot roll back {name} to {snap}: {self.no_rollback}")

    def mapped_ranges(self, name: str, snap: str) -> list[Range]:
        """Exact, by reading: the blocks that are not all zero (see changed_ranges)."""
        with self.read_snapshot(name, snap) as new:
            return _differing(new, None, self.change_granularity)

    def changed_ranges(self, name: str, base: str, snap: str) -> list[Range]:
        """Exact, by reading: the blocks whose bytes differ.

        EBS direct APIs (ListChangedBlocks) would answer from metadata; they are not wired
        yet (docs/ebs.md), so this reads both snapshots in full.
        """
        with self.read_snapshot(name, snap) as new, self.read_snapshot(name, base) as old:
            return _differing(new, old, self.change_granularity)

    # space
    def usage(self) -> dict:
        return {"instance": self.instance_id, "zone": self.zone, "region": self.region}

    def volume_usage(self, name: str) -> dict:
        try:
            v = self._find(name)
        except PyvolError as e:
            return {"error": str(e)}
        return {"volume_id": v["VolumeId"], "type": v["VolumeType"], "zone":
                v["AvailabilityZone"], "attached_to": [a["InstanceId"] for a in v["Attachments"]]}


def _differing(new: str, old: str | None, unit: int) -> list[Range]:
    ranges: list[list[int]] = []
    step = 1 << 20
    with open(new, "rb") as fn, (open(old, "rb") if old else contextlib.nullcontext()) as fo:
        offset = 0
        zero = bytes(step)
        while True:
            a = fn.read(step)
            if not a:
                break
            b = fo.read(len(a)) if fo else zero[:len(a)]
            if a != b:
                for off in range(0, len(a), unit):
                    if a[off:off + unit] != b[off:off + unit]:
                        start = offset + off
                        if ranges and ranges[-1][0] + ranges[-1][1] == start:
                            ranges[-1][1] += unit
                        else:
                            ranges.append([start, unit])
            offset += len(a)
    return [(o, n) for o, n in ranges]


# Backups as EBS snapshots: ebs://REGION/snap-ID. An independent copy (CopySnapshot), tagged
# pyvol-backup, so that it outlives the volume and its own snapshots; in another region on
# request. A restore makes a volume from it in this instance's zone (any zone of the region),
# copying it into this region first when it lives elsewhere.
BACKUP_TAG = "pyvol-backup"
BACKUP_ID_TAG = "pyvol-backup-id"  # pyvol's id of the backup, chosen before the copy exists
SCHEDULE_OF_TAG = "pyvol-schedule-of"  # a schedule's copy: the incarnation of its volume


def parse_ebs_url(url: str) -> tuple[str, str | None]:
    import re as _re

    m = _re.match(r"^ebs://([a-z]{2}(?:-[a-z]+)+-\d)(?:/(snap-[0-9a-f]+))?/?$", url or "")
    if not m:
        raise InvalidInput(f"invalid EBS backup URL {url!r}: accepted are ebs://REGION (as a "
                           "destination) and ebs://REGION/snap-ID")
    return m.group(1), m.group(2)


class EbsBackups:
    """EBS-snapshot backups of the ebs backend's volumes."""

    def __init__(self, backend: EbsBackend):
        self.b = backend

    def _client(self, region: str):
        if region == self.b.region:
            return self.b._ec2
        import boto3

        return boto3.session.Session().client("ec2", region_name=region,
                                              config=self.b._ec2.meta.config)

    def _call(self, region: str, op: str, **kw):
        return self.b._aws(op, client=self._client(region), **kw)

    def _copy(self, src_region: str, snap_id: str, region: str, tags: list[dict],
              what: str) -> str:
        new = self._call(region, "copy_snapshot", SourceRegion=src_region,
                         SourceSnapshotId=snap_id, Description=what,
                         TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}])
        sid = new["SnapshotId"]
        crashpoint("ebs.copying")
        try:
            self.b._await("snapshot_completed", f"the copy {sid} of snapshot {snap_id} to "
                          f"complete in {region}", self.b.snapshot_timeout,
                          client=self._client(region), SnapshotIds=[sid])
        except PyvolError:
            with contextlib.suppress(PyvolError):  # a copy that never completed is no backup
                self._call(region, "delete_snapshot", SnapshotId=sid)
            raise
        return sid

    def create(self, name: str, snap: str, region: str, fs: str, size: int,
               bid: str, schedule_of: str | None = None) -> dict:
        src = self.b._completed(name, snap)
        tags = [{"Key": BACKUP_TAG, "Value": name}, {"Key": "pyvol-fs", "Value": fs},
                {"Key": "pyvol-size", "Value": str(size)}, {"Key": BACKUP_ID_TAG, "Value": bid}]
        if schedule_of is not None:
            tags.append({"Key": SCHEDULE_OF_TAG, "Value": schedule_of})
        sid = self._copy(self.b.region, src, region, tags, f"pyvol backup of {name}@{snap}")
        return self.describe(region, sid)

    def describe(self, region: str, sid: str) -> dict:
        found = self._call(region, "describe_snapshots", SnapshotIds=[sid])["Snapshots"]
        if not found:
            raise NotFound(f"no EBS snapshot {sid} in {region}")
        s = found[0]
        tags = {t["Key"]: t["Value"] for t in s.get("Tags", [])}
        return {"url": f"ebs://{region}/{sid}", "kind": "ebs-snapshot",
                "id": tags.get(BACKUP_ID_TAG), "schedule_of": tags.get(SCHEDULE_OF_TAG),
                "volume": tags.get(BACKUP_TAG), "region": region, "snapshot_id": sid,
                "state": s["State"], "created": clock.stamp(s["StartTime"]),
                "source": {"backend": "ebs", "fs": tags.get("pyvol-fs", "ext4"),
                           "size": int(tags.get("pyvol-size", s["VolumeSize"] * GiB))}}

    def list(self, region: str, volume: str | None = None) -> list[dict]:
        filters = [{"Name": f"tag:{BACKUP_TAG}", "Values": [volume]}] if volume else [
            {"Name": "tag-key", "Values": [BACKUP_TAG]}]
        snaps = self._call(region, "describe_snapshots", OwnerIds=["self"],
                           Filters=filters)["Snapshots"]
        return [self.describe(region, s["SnapshotId"]) for s in
                sorted(snaps, key=lambda s: (s["StartTime"], s["SnapshotId"]))]

    def remove(self, region: str, sid: str) -> None:
        self.describe(region, sid)
        self._call(region, "delete_snapshot", SnapshotId=sid)

    def restore(self, region: str, sid: str, spec: VolumeSpec) -> None:
        if region == self.b.region:
            self.b._await("snapshot_completed", f"backup snapshot {sid} to complete",
                          self.b.snapshot_timeout, SnapshotIds=[sid])
            self.b._create_unique(spec, SnapshotId=sid)
            return
        # Snapshots are regional: bring it here first, as a temporary copy that goes once
        # the volume made from it is available (a volume needs its snapshot no longer), or
        # the restore failed. A daemon that dies meanwhile leaves it to its successor.
        copy = self._copy(region, sid, self.b.region,
                          self.b._temp_tags(f"{sid}-{secrets.token_hex(6)}"),
                          f"pyvol restore of {sid} from {region}")
        try:
            self.b._create_unique(spec, SnapshotId=copy)
        finally:
            try:
                self.b._aws("delete_snapshot", SnapshotId=copy)
            except PyvolError as e:
                log.warning("cannot remove the temporary copy %s of backup %s (removed at the "
                            "daemon's next start, or remove it by hand): %s", copy, sid, e)
