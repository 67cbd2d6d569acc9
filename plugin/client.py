"""The CLI's side of the control API: HTTP over the daemon's Unix socket, and which socket
that is when none is named.

HTTP is the standard library's http.client: every CLI command pays for its imports before it
does anything, and httpx's cost about 0.2 s of each `pyvol` call (bench/README.md); the client
needs one request per connection, JSON bodies and a streamed answer read line by line."""

import glob
import http.client
import json
import os
import socket as _socket
from urllib.parse import quote, urlencode

from .config import DEFAULT_SOCKET, MANAGED_GLOB
from .errors import PyvolError


class DaemonUnreachable(PyvolError):
    pass


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to the server listening on the Unix socket ``path``."""

    def __init__(self, path: str, timeout: float):
        super().__init__("pyvol", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request(path: str, method: str, url: str, body=None, timeout: float = 120.0):
    """Send one request to the socket ``path``: (connection, response), the response's body
    still to read; OSError or http.client.HTTPException if the server cannot be reached."""
    conn = UnixHTTPConnection(path, timeout)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    try:
        conn.request(method, url, body=data, headers=headers)
        return conn, conn.getresponse()
    except BaseException:
        conn.close()
        raise


class Client:
    def __init__(self, socket: str, timeout: float = 120.0):
        self.socket, self.timeout = socket, timeout

    def _send(self, method: str, path: str, body, params: dict | None):
        query = {k: v for k, v in (params or {}).items() if v is not None}
        # quoted as httpx did: a name with a space or beyond ASCII reaches the daemon,
        # which says what a name may be
        url = quote("/pyvol/v1" + path, safe="/@") + (f"?{urlencode(query)}" if query else "")
        try:
            return request(self.socket, method, url, body, self.timeout)
        except (OSError, http.client.HTTPException) as e:
            raise DaemonUnreachable(
                f"cannot reach the pyvol daemon at {self.socket} ({e}): is it running? "
                "Start it with `pyvol daemon`, or point --socket / PYVOL_SOCKET at it") from None

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None):
        conn, resp = self._send(method, path, body, params)
        try:
            text = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise DaemonUnreachable(f"lost the pyvol daemon at {self.socket} during the call "
                                    f"({e})") from None
        finally:
            conn.close()
        try:
            data = json.loads(text)
        except ValueError:
            raise PyvolError(f"the daemon answered HTTP {resp.status} with no JSON") from None
        if resp.status != 200 or (isinstance(data, dict) and data.get("Err")):
            raise PyvolError(data.get("Err") if isinstance(data, dict) else str(data))
        return data

    def stream(self, method: str, path: str, body: dict, on_progress) -> dict:
        """Call a long-running endpoint, passing each progress report to ``on_progress``."""
        outcome = None
        conn, resp = self._send(method, path, body, {"stream": "1"})
        try:
            if resp.status != 200:
                try:
                    err = json.loads(resp.read()).get("Err")
                except (ValueError, AttributeError):
                    err = None
                raise PyvolError(err or f"the daemon answered HTTP {resp.status}")
            for line in _lines(resp):
                if not line.strip():
                    continue
                msg = json.loads(line)
                if "progress" in msg:
                    on_progress(msg["progress"])
                else:
                    outcome = msg
        except (OSError, http.client.HTTPException) as e:
            raise DaemonUnreachable(
                f"lost the pyvol daemon at {self.socket} during the call ({e}); whatever was "
                "interrupted left nothing half-done behind, run it again") from None
        finally:
            conn.close()
        if outcome is None:
            raise PyvolError("the daemon ended the call without a result; see its log")
        if outcome.get("Err"):
            raise PyvolError(outcome["Err"])
        return outcome["result"]


def _lines(resp: http.client.HTTPResponse):
    """The lines of a streamed answer as they arrive. Read with read1, which raises
    IncompleteRead when a chunked answer is cut off (the daemon killed mid-call): iterating
    the response itself reads through peek, which takes a cut-off for the end."""
    pending = b""
    while chunk := resp.read1(65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


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
