"""Real S3 endpoints for the tests: moto's server over HTTP and over HTTPS, SeaweedFS over
HTTP, and a proxy that breaks on request (down, 5xx, stalled, slow, cut off) between a
daemon and either of them."""

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
    ca_bundle: str | None = None  # the certificate to trust over HTTPS; None: the system's

    @property
    def env(self) -> dict:
        return {**CREDS, "AWS_ENDPOINT_URL": self.endpoint,
                **({"AWS_CA_BUNDLE": self.ca_bundle} if self.ca_bundle else {})}

    def client(self, endpoint: str | None = None):
        return boto3.client("s3", endpoint_url=endpoint or self.endpoint,
                            aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"],
                            region_name=CREDS["AWS_DEFAULT_REGION"], verify=self.ca_bundle)

    def bucket(self) -> str:
        """A new, empty bucket for one test."""
        name = "pyvol-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name)
        return name

    def _spawn(self, argv: list[str], log: Path, **popen) -> None:
        """Start the server's process in a session of its own, logging into ``log``."""
        self.log_path = log
        self.log = open(log, "wb")  # noqa: SIM115 - the server's, closed by _halt
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, **popen)

    def _await(self, timeout: float) -> None:
        """Wait until the server answers; its log's end in the error if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().list_buckets()
                return
            except Exception as e:  # anything until it answers, or the deadline
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start ({e}): "
                                       + self.log_path.read_text()[-2000:]) from e
                time.sleep(0.2)

    def _halt(self, directory: str) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(directory, ignore_errors=True)

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


class MotoTls(S3Server):
    """moto's server over HTTPS, with a certificate made for it that the clients are told to
    trust (``AWS_CA_BUNDLE``): botocore sends a body differently over TLS (a trailing
    checksum, the body read in pieces), which AWS itself always gets."""

    name = "moto-https"

    def start(self) -> MotoTls:
        self.dir = tempfile.mkdtemp(prefix="pyvol-moto-tls-")
        cert, key = make_certificate(Path(self.dir))
        self.ca_bundle = str(cert)
        port = free_port()
        self.endpoint = f"https://127.0.0.1:{port}"
        self._spawn([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                     "-p", str(port), "-c", str(cert), "-k", str(key)],
                    Path(self.dir) / "moto.log")
        self._await(timeout=30)
        return self

    def stop(self) -> None:
        self._halt(self.dir)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, valid for a day."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


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
        self._spawn(
            ["nice", "-n", str(nice), weed_binary(), "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
             f"-s3.port={port}",
             *([f"-master.volumeSizeLimitMB={volume_mb}"] if volume_mb else [])],
            Path(self.dir) / "weed.log", env={**os.environ, **CREDS})
        self.endpoint = f"http://127.0.0.1:{port}"
        if nice:
            # in a session of its own, the server is an autogroup of its own wherever the
            # kernel groups by session (sched_autogroup_enabled), and the CPU is shared
            # between groups before any thread's niceness counts: the group's own niceness
            # is the one that keeps it off the cores
            with contextlib.suppress(OSError):
                Path(f"/proc/{self.proc.pid}/autogroup").write_text(str(nice))
        self._await(timeout=60)
        return self

    def stop(self) -> None:
        self._halt(self.dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    """A TCP proxy in front of an S3 endpoint whose behaviour a test switches at will.

    modes: "pass"; "down" (nothing listens: connection refused); "error" (every request gets
    HTTP 503); "stall" (requests are read and never answered); "cut" (the connection of a
    PUT is closed once 1 MiB of it has gone upstream, for at most ``cuts`` different keys,
    each once: its retry passes). ``delay`` slows every request, so a test can kill
    something while a backup is half-way.
    """

    CUT_AFTER = 1 << 20

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.mode = "pass"
        self.delay = 0.0
        self.cuts = 0
        self.cut_keys: list[str] = []  # the keys of the PUTs cut off midway
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

    def set(self, mode: str, delay: float = 0.0, cuts: int = 0) -> None:
        self.cuts = cuts
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
        put, sent = None, 0  # the PUT this connection carries, and its bytes sent so far
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if count and data[:4] in (b"PUT ", b"GET ", b"HEAD", b"POST", b"DELE"):
                    self.requests += 1
                    put = data.split(b" ", 2)[1].decode() if data[:4] == b"PUT " else None
                    sent = 0
                    if self.delay:
                        time.sleep(self.delay)
                sent += len(data)
                if count and put is not None and self._cut(put, sent):
                    src.shutdown(socket.SHUT_RDWR)
                    dst.shutdown(socket.SHUT_RDWR)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _cut(self, key: str, sent: int) -> bool:
        """Whether to cut the PUT of ``key`` off here (mode "cut")."""
        with self._count_lock:
            if self.mode != "cut" or sent < self.CUT_AFTER or key in self.cut_keys \
                    or len(self.cut_keys) >= self.cuts:
                return False
            self.cut_keys.append(key)
            return True

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
