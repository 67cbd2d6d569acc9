"""The CLI's side of the control API: HTTP over the daemon's Unix socket (httpx), and which
socket that is when none is named."""

import glob
import json
import os
import socket as _socket

import httpx

from .config import DEFAULT_SOCKET, MANAGED_GLOB
from .errors import PyvolError


class DaemonUnreachable(PyvolError):
    pass


class Client:
    def __init__(self, socket: str, timeout: float = 120.0):
        self.socket = socket
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=socket),
                                  base_url="http://pyvol", timeout=timeout)

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None):
        try:
            resp = self._http.request(method, "/pyvol/v1" + path, json=body, params=params)
        except httpx.TransportError as e:
            raise DaemonUnreachable(
                f"cannot reach the pyvol daemon at {self.socket} ({e}): is it running? "
                "Start it with `pyvol daemon`, or point --socket / PYVOL_SOCKET at it") from None
        try:
            data = resp.json()
        except ValueError:
            raise PyvolError(f"the daemon answered HTTP {resp.status_code} with no JSON") from None
        if resp.status_code != 200 or (isinstance(data, dict) and data.get("Err")):
            raise PyvolError(data.get("Err") if isinstance(data, dict) else str(data))
        return data

    def stream(self, method: str, path: str, body: dict, on_progress) -> dict:
        """Call a long-running endpoint, passing each progress report to ``on_progress``."""
        outcome = None
        try:
            with self._http.stream(method, "/pyvol/v1" + path, json=body,
                                   params={"stream": "1"}) as resp:
                if resp.status_code != 200:
                    resp.read()
                    try:
                        err = resp.json().get("Err")
                    except ValueError:
                        err = None
                    raise PyvolError(err or f"the daemon answered HTTP {resp.status_code}")
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "progress" in msg:
                        on_progress(msg["progress"])
                    else:
                        outcome = msg
        except httpx.TransportError as e:
            raise DaemonUnreachable(
                f"lost the pyvol daemon at {self.socket} during the call ({e}); whatever was "
                "interrupted left nothing half-done behind, run it again") from None
        if outcome is None:
            raise PyvolError("the daemon ended the call without a result; see its log")
        if outcome.get("Err"):
            raise PyvolError(outcome["Err"])
        return outcome["result"]


def _answers(path: str) -> bool:
    """Whether something listens on the socket ``path`` (a dead daemon leaves its file)."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def find_socket(note) -> str:
    """The socket to use when neither --socket nor PYVOL_SOCKET names one.

    Looked for: the host service's (DEFAULT_SOCKET) and each managed plugin's
    (``/run/docker/plugins/<plugin id>/pyvol.sock``), counting only those that accept a
    connection. One found: that one. Several: the host service's, and ``note`` (a line for
    stderr) says so and lists the others; several managed plugins and no host service: refused,
    asking for --socket. None: the host service's path, so the error names where it looked.
    """
    found = [p for p in [DEFAULT_SOCKET, *sorted(glob.glob(MANAGED_GLOB))]
             if os.path.exists(p) and _answers(p)]
    if len(found) == 1:
        return found[0]
    if not found:
        return DEFAULT_SOCKET
    if found[0] == DEFAULT_SOCKET:
        note(f"note: {len(found)} pyvol daemons answer on this host ({', '.join(found)}); "
             f"using the host service's {DEFAULT_SOCKET}. Name another with --socket or "
             "PYVOL_SOCKET")
        return DEFAULT_SOCKET
    raise PyvolError(f"{len(found)} managed pyvol plugins answer on this host "
                     f"({', '.join(found)}) and no host service does: name one with --socket "
                     "or PYVOL_SOCKET")
