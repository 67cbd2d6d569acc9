"""The CLI's side of the control API: HTTP over the daemon's Unix socket (httpx)."""

import httpx

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
