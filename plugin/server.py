"""``pyvol daemon``: set up storage, reconcile, then serve the API with gunicorn on a socket.

Start-up work (provisioning pools, re-attaching loop devices, reconciling records with the
kernel) runs once in gunicorn's master before it forks workers, so workers only serve
requests. The master holds ROOT/daemon.lock for its lifetime: a second daemon on the same root
refuses to start instead of corrupting the first one's state.
"""

import fcntl
import logging
import os
import time

from gunicorn.app.base import BaseApplication

from . import log as pyvol_log
from .api import create_app
from .backends import BACKENDS, default_name
from .config import Config
from .errors import PyvolError
from .log import event
from .host import Host
from .parts import Parts, wire
from .reconcile import reconcile
from .state import Store

log = logging.getLogger(__name__)

SOCKET_UMASK = 0o117  # rw for root and the socket's group, nothing for others: mode 0660
LOCK_WAIT = 30.0  # a SIGKILLed predecessor's workers notice and exit within a few seconds


def _take_daemon_lock(config: Config) -> int:
    path = config.root / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            # A live holder is another daemon: refuse now. A dead one was killed, and its
            # orphaned workers still hold the lock until they notice, within seconds.
            if _alive(holder) or time.monotonic() > deadline:
                raise PyvolError(f"another pyvol daemon (pid {holder or '?'}) is using "
                                 f"{config.root}; stop it first, or give this one its own "
                                 "--root") from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _die_with_parent() -> None:
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the master died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _set_up(config: Config, name: str, cls, backends: dict) -> str | None:
    """Set up one backend into ``backends``; else the reason it is unavailable."""
    if config.enabled_backends is not None and name not in config.enabled_backends:
        return "not enabled (PYVOL_BACKENDS)"
    why = cls.unavailable_reason()
    if why is not None:
        return why
    try:
        backend = cls(config.root, config.backend_settings.get(name, {}))
        why = backend.not_configured()
        if why is not None:
            return why
        backend.setup()
    except PyvolError as e:
        log.error("backend %s could not be set up: %s", name, e)
        return f"setup failed: {e}"
    except Exception as e:  # reported in `pyvol info` and in each refused create
        log.exception("backend %s could not be set up", name)
        return f"setup failed: {e}"
    backends[name] = backend
    return None


def build(config: Config) -> Parts:
    """Set up every backend this host can run (one that fails does not stop the others), and
    wire the daemon's parts over them."""
    store = Store(config.state_path)
    store.init()
    backends, unavailable = {}, {}
    for name, cls in BACKENDS.items():
        why = _set_up(config, name, cls, backends)
        if why is not None:
            unavailable[name] = why
    # The default follows what the kernel can do, not whether setup worked: a dm-thin host
    # whose pool fails its check must refuse creates with the reason, not quietly put new
    # volumes on another backend.
    default = config.default_backend or (
        config.enabled_backends[0] if config.enabled_backends else default_name())
    if default is not None and default not in BACKENDS:
        raise PyvolError(f"unknown default backend {default!r}: accepted are "
                         f"{', '.join(sorted(BACKENDS))}")
    if default in unavailable:
        log.error("default backend %s is unavailable: %s", default, unavailable[default])
    return wire(Host(config, store, backends, default, unavailable))


def start_up(parts: Parts) -> None:
    """Make records and reality agree before any request is served (``reconcile``), then
    let the backups finish or undo what a crash interrupted of theirs."""
    reconcile(parts.host, parts.volumes)
    parts.backups.recover()


class _Gunicorn(BaseApplication):
    def __init__(self, app, options):
        self.application, self.options = app, options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return self.application


def serve(config: Config) -> None:
    pyvol_log.setup(config.log_level)
    # The managed plugin declares every settable variable, empty when unset; boto3 would read
    # an empty AWS_ENDPOINT_URL or AWS_REGION as a value.
    for key in [k for k, v in os.environ.items() if v == "" and k.startswith(("PYVOL_", "AWS_"))]:
        del os.environ[key]
    config.root.mkdir(parents=True, exist_ok=True)
    os.chmod(config.root, 0o700)
    lock_fd = _take_daemon_lock(config)
    os.environ["PYVOL_MASTER_PID"] = str(os.getpid())  # lets `info` name the daemon's pid
    parts = build(config)
    start_up(parts)
    parts.host.store.close()  # workers open their own connections after the fork
    config.socket.parent.mkdir(parents=True, exist_ok=True)

    def post_fork(server, worker):
        os.close(lock_fd)  # only the master holds the daemon lock
        # A worker outliving a SIGKILLed master would keep answering on the old socket while
        # a new daemon starts: have the kernel end it with its master.
        _die_with_parent()

    def when_ready(server):
        event(log, "pyvol daemon ready", socket=str(config.socket), root=str(config.root),
              default_backend=parts.host.default_backend,
              backends=sorted(parts.host.backends), unavailable=parts.host.unavailable)

    options = {
        "bind": f"unix:{config.socket}",
        # gunicorn binds under this umask (and restores its own after): the socket is 0660
        # from the instant it exists, so no local user can connect in a window before a chmod
        "umask": SOCKET_UMASK,
        "workers": config.workers,
        "threads": config.threads,
        "worker_class": "gthread",
        "timeout": 300,
        "graceful_timeout": 20,
        "control_socket_disable": True,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": config.log_level,
        # gunicorn's own lines (workers booting, signals) as JSON too: one format on stderr
        "logconfig_dict": pyvol_log.gunicorn_config(config.log_level),
        "post_fork": post_fork,
        "when_ready": when_ready,
        "proc_name": "pyvol",
    }
    _Gunicorn(create_app(parts), options).run()
