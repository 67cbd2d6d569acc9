"""pyvol as a systemd service (packaging/pyvol.service: Type=notify, NotifyAccess=main).

The unit is checked by systemd-analyze; the notify protocol by a test that plays systemd: it
listens on a NOTIFY_SOCKET of its own, starts `pyvol daemon` with it, and holds the daemon
to what the unit promises dockerd (ordered after it): READY=1 only once the socket answers
Plugin.Activate, sent by the main process, and STOPPING=1 when told to stop."""

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import Api, Daemon

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "pyvol.service"
INSTALLED = "/usr/local/bin/pyvol"  # where scripts/install.sh links the command


def _verify(unit: Path) -> str:
    """systemd-analyze verify's complaints about ``unit`` ('' when none). It exits 0 on
    unknown keys and bad values (it only warns), so what counts is what it prints."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install the systemd package (scripts/test.sh does)"
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    return (proc.stdout + proc.stderr).strip() or ("" if proc.returncode == 0 else
                                                   f"exit {proc.returncode}")


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    """The unit as shipped, with ExecStart pointing at this environment's pyvol: the
    installed path exists only where install.sh ran, and verify checks that it does."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} daemon\n" in text
    here = Path(sys.executable).with_name("pyvol")
    assert os.access(here, os.X_OK), f"{here}: the test command's environment has no pyvol"
    copy = tmp_path / "pyvol.service"
    copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={here} "))
    assert _verify(copy) == ""
    if os.access(INSTALLED, os.X_OK):  # a host where install.sh ran: the unit as it is
        assert _verify(UNIT) == ""
    # the check itself sees a mistake (verify only warns about it)
    copy.write_text(text.replace("NotifyAccess=", "NotifyAcess="))
    assert "Unknown key 'NotifyAcess'" in _verify(copy)


class FakeSystemd:
    """A NOTIFY_SOCKET: each datagram with the pid the kernel vouches for (SCM_CREDENTIALS),
    as systemd checks it against NotifyAccess=main."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.got: list[tuple[int, list[str]]] = []

    def next(self, timeout: float) -> tuple[int, list[str]] | None:
        """The next message (sender pid, lines), or None after ``timeout`` s."""
        self.sock.settimeout(timeout)
        try:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = next(struct.unpack("iII", d)[0] for level, kind, d in anc
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        self.got.append((pid, data.decode().split("\n")))
        return self.got[-1]

    def until(self, line: str, timeout: float) -> int:
        """Wait for a message with ``line``; its sender's pid."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.next(left)
            if msg and line in msg[1]:
                return msg[0]
        raise AssertionError(f"no {line} in {timeout} s; got {self.got}")

    def close(self):
        self.sock.close()


def _start(workdir: Path, notify: FakeSystemd, **env) -> Daemon:
    """`pyvol daemon` as systemd would start it, without waiting for it: the test plays
    the waiting."""
    d = Daemon(workdir / "root", workdir / "pyvol.sock",
               env={"PYVOL_BACKENDS": "loop", "NOTIFY_SOCKET": notify.path, **env})
    d.root.mkdir(parents=True)
    with open(d.log_path, "ab") as log:
        d.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvol", "--socket", str(d.socket), "daemon", "--root",
             str(d.root)], env=d.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    return d


def _activate(sock: Path, timeout: float) -> dict:
    return Api(sock, timeout=timeout).raw("/Plugin.Activate").json()


@pytest.fixture
def systemd(workdir):
    fake = FakeSystemd(workdir / "notify.sock")
    yield fake
    fake.close()


def test_ready_comes_once_the_socket_answers_and_stopping_on_sigterm(workdir, systemd):
    d = _start(workdir, systemd)
    try:
        pid = systemd.until("READY=1", timeout=120)
        # at that instant: the socket answers dockerd's first call, and start-up is done
        assert _activate(d.socket, timeout=5) == {"Implements": ["VolumeDriver"]}
        info = d.api.raw("/pyvol/v1/info", method="GET").json()
        assert info["pid"] == d.proc.pid and info["backends"]["loop"]["available"], d.log()
        # systemd (NotifyAccess=main) believes the main process only: `pyvol daemon` itself
        assert pid == d.proc.pid
        assert all(sender == d.proc.pid for sender, _ in systemd.got), systemd.got
        assert sum("READY=1" in lines for _, lines in systemd.got) == 1  # not gunicorn's too
        os.kill(d.proc.pid, signal.SIGTERM)  # KillMode=mixed: SIGTERM to the main process
        assert systemd.until("STOPPING=1", timeout=30) == d.proc.pid
        assert d.proc.wait(timeout=60) == 0
    finally:
        d.stop()


def test_no_ready_while_no_worker_answers(workdir, systemd):
    """gunicorn binds the socket before any worker can answer on it (and says READY=1 then):
    with no workers yet, the socket exists and takes connections but nothing answers, and
    the daemon says nothing. One more worker (SIGTTIN, gunicorn's) and READY=1 comes."""
    d = _start(workdir, systemd, PYVOL_WORKERS="0")
    try:
        deadline = time.monotonic() + 120
        while not d.socket.exists():
            assert d.proc.poll() is None and time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        with pytest.raises(httpx.TimeoutException):
            _activate(d.socket, timeout=3)
        while (msg := systemd.next(timeout=3)) is not None:
            assert "READY=1" not in msg[1], systemd.got
        os.kill(d.proc.pid, signal.SIGTTIN)
        assert systemd.until("READY=1", timeout=60) == d.proc.pid
        assert _activate(d.socket, timeout=5) == {"Implements": ["VolumeDriver"]}
    finally:
        d.stop()


def test_a_stop_right_after_a_start_never_waits_out_the_graceful_timeout(workdir):
    """`systemctl restart` twice in a row, or a stop while a worker is still booting: the
    SIGTERM must reach every worker's own handler. One that arrived before the handler was
    installed used to be lost in the worker's copy of the master's handler, and the master
    then waited its whole graceful timeout (20 s) before killing that worker; about one
    stop in ten right after a start did so."""
    d = Daemon(workdir / "root", workdir / "pyvol.sock")
    for _ in range(6):
        d.start()
        Api.hang_up(d.socket)
        started = time.monotonic()
        os.killpg(d.proc.pid, signal.SIGTERM)
        d.proc.wait(timeout=30)
        assert time.monotonic() - started < 10, "a worker missed its SIGTERM"
