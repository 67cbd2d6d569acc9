"""An EC2 for the ebs backend: moto's server for the API, plus what moto cannot do.

moto keeps EBS state (volumes, attachments, snapshots, tags) over real HTTP but holds no data
and makes no devices appear. ``EbsDataPlane`` stands in front of it as an HTTP proxy and adds
exactly that, at the narrowest seam: each volume id is a sparse file; AttachVolume makes a
loop device of it appear, a moment later, as ``DEVICE_DIR/<instance>/<volume id>`` (where a
Nitro host would show /dev/disk/by-id/nvme-...); DetachVolume makes it go; CreateSnapshot
copies the file at that instant; CreateVolume from a snapshot starts from that copy. moto
completes a snapshot at once; ``pending`` makes one read as pending for a while. moto detaches
at once; ``stuck_detach`` makes a volume's detach never happen (it reads "detaching"), as a
real one can hang. ``Imds`` is one instance's metadata service (IMDSv2, token first).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from pyvol.backends import loopdev
from pyvol.errors import CommandFailed

GiB = 1 << 30


def _serve(handler_cls) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class EbsDataPlane:
    def __init__(self, moto_endpoint: str, base: Path, attach_delay: float = 0.3):
        self.upstream = moto_endpoint
        # one client for every forwarded call (it is thread-safe); a client per call would
        # load the CA bundle each time, about 50 ms of a core, for plain HTTP
        self.http = httpx.Client(timeout=60, verify=False)
        self.base = Path(base)
        self.blobs, self.snaps, self.devices = (self.base / "blobs", self.base / "snaps",
                                                self.base / "devices")
        for d in (self.blobs, self.snaps, self.devices):
            d.mkdir(parents=True, exist_ok=True)
        self.attach_delay = attach_delay
        # snapshot id -> how many more DescribeSnapshots answers show it "pending" (as a real
        # one is until EBS has stored it) before it reads "completed" again
        self.pending: dict[str, int] = {}
        # volume ids whose DetachVolume is answered but never done: they stay attached, and
        # DescribeVolumes shows their attachments "detaching"
        self.stuck_detach: set[str] = set()
        self.loops: dict[tuple[str, str], str] = {}
        # (volume, instance) -> the identity of the blob its device was bound to
        self.bound_to: dict[tuple[str, str], tuple[int, int]] = {}
        self.lock = threading.Lock()
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = dict(urllib.parse.parse_qsl(body.decode()))
                if req.get("Action") == "DetachVolume" and req["VolumeId"] in plane.stuck_detach:
                    return self._answer(200, {}, plane.detaching(req).encode())
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length")}
                resp = plane.http.post(plane.upstream + self.path, content=body,
                                       headers=headers)
                content = resp.content
                if resp.status_code == 200:
                    plane.after(req, resp.text)
                    if req.get("Action") == "DescribeSnapshots":
                        content = plane.pending_view(resp.text).encode()
                    elif req.get("Action") == "DescribeVolumes":
                        content = plane.detaching_view(resp.text).encode()
                self._answer(resp.status_code, resp.headers, content)

            def _answer(self, status: int, headers, content: bytes):
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = _serve(Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"

    def device_dir(self, instance: str) -> Path:
        d = self.devices / instance
        d.mkdir(exist_ok=True)
        return d

    @staticmethod
    def _tag(xml: str, tag: str) -> str | None:
        m = re.search(rf"<{tag}>([^<]+)</{tag}>", xml)
        return m.group(1) if m else None

    def pending_view(self, xml: str) -> str:
        """DescribeSnapshots' answer with the still-pending snapshots' status rewritten."""
        def status(m):
            with self.lock:
                left = self.pending.get(m.group(2), 0)
                if left <= 0:
                    return m.group(0)
                self.pending[m.group(2)] = left - 1
            return m.group(1) + "pending" + m.group(3)

        return re.sub(r"(<snapshotId>(snap-[0-9a-f]+)</snapshotId>(?:(?!<snapshotId>).)*?"
                      r"<status>)completed(</status>)", status, xml, flags=re.DOTALL)

    @staticmethod
    def detaching(req: dict) -> str:
        """DetachVolume's answer, for a detach that is accepted and never happens."""
        return ('<?xml version="1.0" encoding="utf-8"?>\n<DetachVolumeResponse xmlns='
                '"http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>stuck</requestId>'
                f'<volumeId>{req["VolumeId"]}</volumeId><instanceId>{req.get("InstanceId", "")}'
                '</instanceId><status>detaching</status></DetachVolumeResponse>')

    def detaching_view(self, xml: str) -> str:
        """DescribeVolumes' answer with the stuck detaches' attachments "detaching"."""
        def status(m):
            stuck = m.group(2) in self.stuck_detach
            return m.group(1) + "detaching" + m.group(3) if stuck else m.group(0)

        return re.sub(r"(<item><volumeId>(vol-[0-9a-f]+)</volumeId><instanceId>"
                      r"(?:(?!</item>).)*?<status>)attached(</status>)", status, xml,
                      flags=re.DOTALL)

    def after(self, req: dict, xml: str) -> None:
        action = req.get("Action")
        if action == "CreateVolume":
            vol, size = self._tag(xml, "volumeId"), int(self._tag(xml, "size"))
            blob = self.blobs / f"{vol}.img"
            if req.get("SnapshotId"):
                subprocess.run(["cp", "--sparse=always", str(self.snaps / f"{req['SnapshotId']}.img"),
                                str(blob)], check=True)
            with open(blob, "ab") as f:
                f.truncate(size * GiB)
        elif action == "CreateSnapshot":
            snap = self._tag(xml, "snapshotId")
            subprocess.run(["sync"], check=True)
            subprocess.run(["cp", "--sparse=always", str(self.blobs / f"{req['VolumeId']}.img"),
                            str(self.snaps / f"{snap}.img")], check=True)
        elif action == "CopySnapshot":
            subprocess.run(["cp", "--sparse=always",
                            str(self.snaps / f"{req['SourceSnapshotId']}.img"),
                            str(self.snaps / f"{self._tag(xml, 'snapshotId')}.img")], check=True)
        elif action == "AttachVolume":
            vol, inst = req["VolumeId"], req["InstanceId"]
            threading.Timer(self.attach_delay, self._appear, (vol, inst)).start()
        elif action == "DetachVolume":
            self._disappear(req["VolumeId"], req.get("InstanceId"))
        elif action == "ModifyVolume" and req.get("Size"):
            # EC2 grows the volume and the attached device shows its new size: the blob
            # grows, and each loop device of it re-reads the size (losetup -c)
            with open(self.blobs / f"{req['VolumeId']}.img", "ab") as f:
                f.truncate(int(req["Size"]) * GiB)
            with self.lock:
                for (v, _), dev in self.loops.items():
                    if v == req["VolumeId"]:
                        subprocess.run(["losetup", "-c", dev], check=True)
        elif action == "DeleteVolume":
            (self.blobs / f"{req['VolumeId']}.img").unlink(missing_ok=True)
        elif action == "DeleteSnapshot":
            (self.snaps / f"{req['SnapshotId']}.img").unlink(missing_ok=True)

    def _appear(self, vol: str, inst: str) -> None:
        with self.lock:
            # direct I/O: an EBS volume has no page cache of the host's under it, and a
            # buffered loop device reads a sparse file's holes about 20 times slower (3 s a
            # GiB here): an ebs backup reads whole snapshots (ebs.changed_ranges)
            dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=on",
                                  str(self.blobs / f"{vol}.img")],
                                 capture_output=True, text=True, check=True).stdout.strip()
            self.loops[(vol, inst)] = dev
            self.bound_to[(vol, inst)] = loopdev.identity(self.blobs / f"{vol}.img")
            link = self.device_dir(inst) / vol
            link.unlink(missing_ok=True)
            link.symlink_to(dev)

    def _disappear(self, vol: str, inst: str | None, wait: bool = True) -> None:
        with self.lock:
            for (v, i), dev in list(self.loops.items()):
                if v == vol and (inst is None or i == inst):
                    (self.device_dir(i) / v).unlink(missing_ok=True)
                    with contextlib.suppress(OSError, CommandFailed):  # only if still ours
                        loopdev.clear(dev, self.bound_to.pop((v, i)))
                    # gone for real (a detach of a device someone holds is deferred), so that
                    # the next attach never picks a device that is about to vanish
                    backing = Path(f"/sys/block/{Path(dev).name}/loop/backing_file")
                    for _ in range(100 if wait else 0):
                        if not backing.exists():
                            break
                        time.sleep(0.05)
                    del self.loops[(v, i)]

    def close(self) -> None:
        # no wait: a device a stopped daemon left mounted goes when the test's workdir is
        # released (its unmount), after this; waiting for it here cost 5 s a device
        for vol, inst in list(self.loops):
            self._disappear(vol, inst, wait=False)
        self.server.shutdown()
        self.http.close()
        shutil.rmtree(self.base, ignore_errors=True)


class Imds:
    """One instance's metadata service: IMDSv2 (a PUT for a token, then reads with it)."""

    def __init__(self, instance_id: str, zone: str):
        token = os.urandom(8).hex()
        meta = {"instance-id": instance_id, "placement/availability-zone": zone}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, text: str):
                self.send_response(code)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text.encode())

            def do_PUT(self):
                if self.path == "/latest/api/token":
                    return self._send(200, token)
                self._send(404, "")

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != token:
                    return self._send(401, "")
                key = self.path.removeprefix("/latest/meta-data/")
                self._send(200, meta[key]) if key in meta else self._send(404, "")

        self.server = _serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()


class EbsRig:
    """A fresh EC2 (moto, reset) with three running instances, each with its own IMDS and
    device directory: hosts for the ebs backend (two in us-east-1a, one in us-east-1b)."""

    ZONES = ("us-east-1a", "us-east-1a", "us-east-1b")

    def __init__(self, moto, base: Path):
        import boto3

        httpx.post(moto.endpoint + "/moto-api/reset", timeout=30)
        self.plane = EbsDataPlane(moto.endpoint, base)
        self.ec2 = boto3.client("ec2", endpoint_url=moto.endpoint, region_name="us-east-1",
                                aws_access_key_id="pyvoltest", aws_secret_access_key="x")
        image = self.ec2.describe_images()["Images"][0]["ImageId"]
        self.instances = [self.ec2.run_instances(
            ImageId=image, MinCount=1, MaxCount=1, Placement={"AvailabilityZone": zone})[
            "Instances"][0]["InstanceId"] for zone in self.ZONES]
        self.imds = [Imds(i, z) for i, z in zip(self.instances, self.ZONES)]
        self.creds = {"AWS_ACCESS_KEY_ID": "pyvoltest", "AWS_SECRET_ACCESS_KEY": "x",
                      "AWS_DEFAULT_REGION": "us-east-1",
                      "AWS_ENDPOINT_URL_EC2": self.plane.endpoint}
        self._saved = {k: os.environ.get(k) for k in self.creds}
        os.environ.update(self.creds)  # for backends made in this process

    def settings(self, host: int) -> dict:
        # release_wait: a Mount refused because another instance holds the volume answers
        # after 2 s here, not the product's 20 (tests/test_move.py tests that bound).
        # poll_delay: the rig answers at once, so its waiters look every 0.5 s, not the
        # product's 2 (every step of an ebs backup waits for one state or another)
        return {"imds_url": self.imds[host].url, "attach_timeout": "20", "release_wait": "2",
                "poll_delay": "0.5",
                "device_dir": str(self.plane.device_dir(self.instances[host]))}

    def env(self, host: int) -> dict:
        return {**self.creds, **{f"PYVOL_EBS_{k.upper()}": v
                                 for k, v in self.settings(host).items()}}

    def volumes(self, name: str) -> list[dict]:
        return self.ec2.describe_volumes(Filters=[{"Name": "tag:pyvol-name",
                                                   "Values": [name]}])["Volumes"]

    def close(self) -> None:
        for imds in self.imds:
            imds.close()
        self.plane.close()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
