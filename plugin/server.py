"""``pyvol daemon``: set up storage, reconcile, then serve the API with gunicorn on a socket.

Start-up work (provisioning pools, re-attaching loop devices, reconciling records with the
kernel) runs once in gunicorn's master before it forks workers, so workers only serve
requests. The master holds ROOT/daemon.lock for its lifetime: a second daemon on the same root
refuses to start instead of corrupting the first one's state.
"""

import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from . import log as pyvol_log
from . import mountinfo
from .api import create_app
from .backends import BACKENDS, default_name
from .config import Config
from .errors import PyvolError
from .log import event
from .host import Host
from .leftovers import Leftovers
from .lifeline import die_with_parent
from .parts import Parts, wire
from .reconcile import reconcile
from .state import Store

log = logging.getLogger(__name__)

SOCKET_UMASK = 0o117  # rw for root and the socket's group, nothing for others: mode 0660
# what a worker told to exit has to end its requests and scheduled runs, before the master
# kills it
GRACEFUL_TIMEOUT = 20
LOCK_WAIT = 30.0  # a SIGKILLed predecessor's workers notice and exit within a few seconds


SHM = "/dev/shm"


def heartbeat_dir() -> str | None:
    """Where gunicorn's workers keep the file they touch to show the master they are alive:
    /dev/shm where that is a tmpfs, else gunicorn's default (the temporary directory).

    A gthread worker's one accepting thread touches it (``os.utime``) before every
    connection it takes. On a disk-backed /tmp that touch is a journaled metadata change,
    and behind a restore writing gigabytes to the same disk it waited for the journal:
    Docker's Get calls stalled 140 to 320 ms in bench_backup.py at 8 GiB (bench/README)."""
    found = [e for e in mountinfo.entries() if e.mount_point == SHM]
    if found and found[-1].fstype == "tmpfs" and os.access(SHM, os.W_OK):
        return SHM
    return None


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


class Notify:
    """systemd's notify protocol (pyvol.service: Type=notify, NotifyAccess=main): datagrams
    to $NOTIFY_SOCKET from the main process, which is gunicorn's master (``pyvol daemon``
    runs it in its own process). Taken out of the environment at once: gunicorn would send
    its own READY=1 when it has bound the socket, before any worker can answer on it, and
    children have nothing to say to systemd. A no-op when systemd did not start us."""

    def __init__(self):
        self.address = os.environ.pop("NOTIFY_SOCKET", None)

    def __call__(self, *lines: str) -> None:
        if not self.address:
            return
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(address)
                s.sendall("\n".join(lines).encode())
        except OSError as e:
            log.warning("cannot tell systemd %s: %s", lines[0], e)


def _answers(path, timeout: float) -> bool:
    """Whether the socket at ``path`` answers Docker's first call, POST /Plugin.Activate."""
    import http.client

    from .client import request

    try:
        conn, reply = request(str(path), "POST", "/Plugin.Activate", timeout=timeout)
        try:
            doc = json.loads(reply.read())
        finally:
            conn.close()
        return reply.status == 200 and "VolumeDriver" in doc["Implements"]
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
        return False


class _Arbiter(Arbiter):
    """gunicorn's master, telling systemd READY=1 once the socket answers Plugin.Activate
    (start-up work is done before gunicorn starts; workers must have booted too), and
    STOPPING=1 as soon as it is told to stop."""

    def __init__(self, app, notify: Notify, socket_path, leftovers: Leftovers):
        super().__init__(app)
        self.notify, self.socket_path, self.ready = notify, socket_path, False
        self.leftovers = leftovers

    def manage_workers(self):
        super().manage_workers()  # a dead worker's replacement first: it boots meanwhile
        self.leftovers.undo()
        # Called first right after the workers are forked, then once a second or so from
        # the main loop: a slow worker is asked again, and signals are handled in between.
        if not self.ready and self.notify.address and _answers(self.socket_path, 2):
            self.ready = True
            self.notify("READY=1", f"STATUS=serving on {self.socket_path}")

    def spawn_worker(self):
        """Fork a worker with SIGTERM held back until its own handler is in place
        (post_worker_init lets it through). Before that, a SIGTERM (a stop right after a
        start) runs the master's inherited handler, which only queues it in the child's copy
        of the master: lost, and the master then waits out the whole graceful timeout
        before it kills the worker."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return super().spawn_worker()
        finally:  # in the master; the worker never returns here
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    def _stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def handle_term(self):
        self._stopping()
        super().handle_term()

    def handle_int(self):
        self._stopping()
        super().handle_int()

    def handle_quit(self):
        self._stopping()
        super().handle_quit()


class _Gunicorn(BaseApplication):
    def __init__(self, app, options, notify: Notify, socket_path, leftovers: Leftovers):
        self.application, self.options = app, options
        self.notify, self.socket_path, self.leftovers = notify, socket_path, leftovers
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return self.application

    def run(self):  # BaseApplication.run, with our arbiter
        try:
            _Arbiter(self, self.notify, self.socket_path, self.leftovers).run()
        except RuntimeError as e:
            print(f"\nError: {e}\n", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(1)


def serve(config: Config) -> None:
    notify = Notify()
    pyvol_log.setup(config.log_level)
    # The managed plugin declares every settable variable, empty when unset; boto3 would read
    # an empty AWS_ENDPOINT_URL or AWS_REGION as a value.
    for key in [k for k, v in os.environ.items() if v == "" and k.startswith(("PYVOL_", "AWS_"))]:
        del os.environ[key]
    config.root.mkdir(parents=True, exist_ok=True)
    os.chmod(config.root, 0o700)
    lock_fd = _take_daemon_lock(config)
    os.environ["PYVOL_MASTER_PID"] = str(os.getpid())  # lets `info` name the daemon's pid
    notify("STATUS=setting up backends")
    parts = build(config)
    notify("STATUS=reconciling records with the system")
    start_up(parts)
    parts.host.store.close()  # workers open their own connections after the fork
    config.socket.parent.mkdir(parents=True, exist_ok=True)

    def post_fork(server, worker):
        os.close(lock_fd)  # only the master holds the daemon lock
        # A worker outliving a SIGKILLed master would keep answering on the old socket while
        # a new daemon starts: have the kernel end it with its master.
        die_with_parent(server.pid, signal.SIGTERM)

    def post_worker_init(worker):
        # the worker's own SIGTERM handler is in place now (_Arbiter.spawn_worker)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        # every worker starts one; only the holder of ROOT/scheduler.lock runs schedules. It
        # starts no run once the worker is told to exit (worker.alive false on SIGTERM)
        parts.runner.start(lambda: worker.alive)

    def worker_exit(server, worker):
        # A run is not cut off wherever it is (perhaps inside a filesystem freeze, which the
        # master would then thaw after it: leftovers.py, a snapshot lost all the same).
        # Backups in flight are cancelled, and the runs waited for, within the graceful
        # timeout from when the runner saw the SIGTERM (the master kills the worker after
        # it); none in flight (every
        # worker but the runner's, usually): no wait at all. gunicorn calls this hook in the
        # master too, as it reaps a worker: there it must not touch the runner that future
        # workers inherit at fork.
        if os.getpid() == worker.pid:
            parts.runner.stop(GRACEFUL_TIMEOUT - 2)

    leftovers = Leftovers(parts.host)

    def child_exit(server, worker):
        # in the master, as it reaps a worker; the undoing runs from its loop
        leftovers.worker_died()

    def on_exit(server):
        # a worker killed at the end of a stop's graceful timeout: the loop has ended, and
        # the worker may still be ending
        leftovers.last_pass()

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
        "worker_tmp_dir": heartbeat_dir(),
        "timeout": 300,
        "graceful_timeout": GRACEFUL_TIMEOUT,
        "control_socket_disable": True,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": config.log_level,
        # gunicorn's own lines (workers booting, signals) as JSON too: one format on stderr
        "logconfig_dict": pyvol_log.gunicorn_config(config.log_level),
        "post_fork": post_fork,
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
        "child_exit": child_exit,
        "on_exit": on_exit,
        "when_ready": when_ready,
        "proc_name": "pyvol",
    }
    _Gunicorn(create_app(parts), options, notify, config.socket, leftovers).run()
