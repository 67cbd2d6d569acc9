"""Real S3 endpoints for the tests: moto's server and SeaweedFS over HTTP, and a proxy that
breaks on request (down, 5xx, stalled, slow) between a daemon and either of them."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3

CREDS = {"AWS_ACCESS_KEY_ID": "pyvoltest", "AWS_SECRET_ACCESS_KEY": "pyvoltestsecret",
         "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    name = "s3"
    endpoint = ""

    @property
    def env(self) -> dict:
        return {**CREDS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self, endpoint: str | None = None):
        return boto3.client("s3", endpoint_url=endpoint or self.endpoint,
                            aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"],
                            region_name=CREDS["AWS_DEFAULT_REGION"])

    def bucket(self) -> str:
        """A new, empty bucket for one test."""
        name = "pyvol-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                         Prefix=prefix)
        return [o["Key"] for p in pages for o in p.get("Contents", [])]


class Moto(S3Server):
    name = "moto"

    def start(self) -> Moto:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self.server.stop()


def weed_binary() -> str | None:
    return shutil.which("weed") or next(
        (str(p) for p in [Path(sys.executable).parent / "weed"] if p.exists()), None)


class Seaweed(S3Server):
    """SeaweedFS's `weed mini`: a real S3 server that checks credentials."""

    name = "seaweedfs"

    def start(self, nice: int = 0, volume_mb: int | None = None) -> Seaweed:
        """``nice``: the server's niceness, every thread of it (a benchmark's stand-in for a
        remote server keeps off the cores that the Docker host's own work needs).
        ``volume_mb``: the size at which the server stops writing into a volume file and
        grows new ones (128 in ``weed mini``). With that default, the backup bench's first
        writes after a full upload sometimes waited about a second on it (bench/README)."""
        self.dir = tempfile.mkdtemp(prefix="pyvol-weed-")
        port = free_port()
        self.log = open(Path(self.dir) / "weed.log", "wb")
        self.proc = subprocess.Popen(
            ["nice", "-n", str(nice), weed_binary(), "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
             f"-s3.port={port}",
             *([f"-master.volumeSizeLimitMB={volume_mb}"] if volume_mb else [])],
            env={**os.environ, **CREDS}, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{port}"
        if nice:
            # in a session of its own, the server is an autogroup of its own wherever the
            # kernel groups by session (sched_autogroup_enabled), and the CPU is shared
            # between groups before any thread's niceness counts: the group's own niceness
            # is the one that keeps it off the cores
            with contextlib.suppress(OSError):
                Path(f"/proc/{self.proc.pid}/autogroup").write_text(str(nice))
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().list_buckets()
                return self
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("weed did not start: "
                                       + (Path(self.dir) / "weed.log").read_text()[-2000:])
                time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    """A TCP proxy in front of an S3 endpoint whose behaviour a test switches at will.

    modes: "pass"; "down" (nothing listens: connection refused); "error" (every request gets
    HTTP 503); "stall" (requests are read and never answered). ``delay`` slows every request,
    so a test can kill something while a backup is half-way.
    """

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.mode = "pass"
        self.delay = 0.0
        self.requests = 0
        self.connections = 0  # open now: what a client sent may still be on its way upstream
        self._count_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._listen()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def set(self, mode: str, delay: float = 0.0) -> None:
        if mode == "down" and self._listener is not None:
            self._listener.close()
            self._listener = None
        elif mode != "down" and self._listener is None:
            self._listen()
        self.mode, self.delay = mode, delay

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._count_lock:
            self.connections += 1
        try:
            self._proxy(conn)
        finally:
            with self._count_lock:
                self.connections -= 1

    def _proxy(self, conn: socket.socket) -> None:
        with conn:
            if self.mode == "stall":
                conn.recv(65536)
                self._stop.wait(600)
                return
            if self.mode == "error":
                conn.recv(65536)
                body = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                return
            try:
                up = socket.create_connection(self.upstream)
            except OSError:
                return
            with up:
                t = threading.Thread(target=self._pump, args=(up, conn), daemon=True)
                t.start()
                self._pump(conn, up, count=True)
                t.join(60)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool = False) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if count and data[:4] in (b"PUT ", b"GET ", b"HEAD", b"POST", b"DELE"):
                    self.requests += 1
                    if self.delay:
                        time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
