"""Test plumbing: a real pyvol daemon process, a raw client for its socket, a real dockerd."""

import contextlib
import gc
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import weakref
from pathlib import Path

import backend_probes
import httpx
from pyvol import mountinfo
from pyvol.backends import loopdev
from pyvol.backends.devicemapper import DevicemapperBackend
from pyvol.errors import CommandFailed


class Api:
    """Raw HTTP over a Unix socket, the way dockerd talks: no Content-Type, body as bytes."""

    # every client's transport, by socket: a dropped client's connections live on in
    # reference cycles until the garbage collector runs
    _transports: "weakref.WeakValueDictionary[int, httpx.HTTPTransport]" = \
        weakref.WeakValueDictionary()

    def __init__(self, socket: Path, timeout: float = 60):
        self.socket = str(socket)
        # verify=False: a Unix socket has no TLS, and loading the CA bundle for nothing costs
        # about 50 ms of a core per client (the suite makes thousands)
        self.transport = httpx.HTTPTransport(uds=self.socket, verify=False)
        self.http = httpx.Client(transport=self.transport, base_url="http://plugin",
                                 timeout=timeout)
        self.transport._pyvol_socket = self.socket
        Api._transports[id(self.transport)] = self.transport

    @classmethod
    def hang_up(cls, socket: Path) -> None:
        """Close every kept-alive connection to ``socket`` (the clients stay usable: the
        next request opens a new one). A daemon told to stop lets each open connection
        linger up to 2 s before its worker exits, as it should for dockerd; the suite's
        clients are done by then, and would make every stop of every test pay for it."""
        gc.collect()  # a dropped client's socket is closed when its cycle is collected
        for transport in list(cls._transports.values()):
            if getattr(transport, "_pyvol_socket", None) == str(socket):
                transport.close()

    def raw(self, path: str, body: bytes = b"", method: str = "POST") -> httpx.Response:
        return self.http.request(method, path, content=body,
                                 headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})

    def post(self, path: str, body=None) -> dict:
        resp = self.raw(path, b"" if body is None else json.dumps(body).encode())
        assert resp.status_code in (200, 500), resp.text
        return resp.json()

    def ok(self, path: str, body=None) -> dict:
        """Call a Docker endpoint and insist it succeeded."""
        data = self.post(path, body)
        assert not data.get("Err"), f"{path} {body}: {data.get('Err')}"
        return data

    def err(self, path: str, body=None) -> str:
        """Call a Docker endpoint and insist it failed; return the message."""
        data = self.post(path, body)
        assert data.get("Err"), f"{path} {body} unexpectedly succeeded: {data}"
        return data["Err"]


class Daemon:
    """`pyvol daemon` as a child process with its own root and socket."""

    def __init__(self, root: Path, socket: Path, env: dict | None = None,
                 wrap: list[str] | None = None):
        self.root, self.socket = Path(root), Path(socket)
        self.env = {**os.environ, "PYVOL_LOOP_POOL_SIZE": "20G", **(env or {})}
        # argv the daemon command is appended to (e.g. `unshare -m ...`); it must exec the
        # daemon in the same process, so that the pid is the daemon's
        self.wrap = list(wrap or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root.parent / f"{self.root.name}.daemon.log"

    def start(self, wait: float = 60) -> "Daemon":
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "pyvol", "--socket", str(self.socket), "daemon",
             "--root", str(self.root)], env=self.env, stdout=log, stderr=log,
            start_new_session=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                # the answer must come from this daemon, not a dying predecessor's workers
                info = Api(self.socket, timeout=2).raw("/pyvol/v1/info", method="GET")
                if info.status_code == 200 and info.json()["pid"] == self.proc.pid:
                    return self
            except (httpx.TransportError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready in {wait}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-5000:]
        except FileNotFoundError:
            return ""

    def kill(self, sig=signal.SIGKILL) -> None:
        """Kill the master only (as the OOM killer or `kill -9 PID` would)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            Api.hang_up(self.socket)
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # orphaned workers of a killed master
        subprocess.run(["pkill", "-KILL", "-f", "--", f"--socket {self.socket} daemon"], check=False)

    @property
    def api(self) -> Api:
        return Api(self.socket)

    def get(self, path: str):
        """GET the control API's ``/pyvol/v1<path>`` and insist on 200: what a test polls
        (a `pyvol` call is a new Python process, a quarter second of a core each)."""
        r = self.api.raw("/pyvol/v1" + path, method="GET")
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
        return r.json()

    def cli(self, *args, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "pyvol", "--socket", str(self.socket),
                               *args], capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"pyvol {' '.join(args)} failed: {proc.stderr}")
        return proc


def compile_pyvol() -> None:
    """Write pyvol's bytecode, as an installed daemon has it (pip compiles it at install). A
    checkout run with PYTHONDONTWRITEBYTECODE set (as on these machines) has none, and every
    CLI call, job process and daemon then compiles pyvol again: a bench timing them from a
    cold cache would time the compiler (0.1 to 0.2 s of a 0.3 s incremental backup)."""
    import compileall

    import pyvol.backends

    for package in (pyvol, pyvol.backends):
        compileall.compile_dir(os.path.dirname(package.__file__), quiet=1)


def workers(d: Daemon) -> list[int]:
    """The daemon's gunicorn workers (the master's children)."""
    out = subprocess.run(["pgrep", "-P", str(d.proc.pid)], capture_output=True, text=True,
                         timeout=10).stdout.split()
    assert out, "the daemon has no workers"
    return [int(p) for p in out]


def put_schedules(d: Daemon, volume: str, opts) -> tuple[int, dict]:
    """``PUT /volumes/VOLUME/schedules`` on the control API: its status and its body."""
    r = d.api.http.put(f"/pyvol/v1/volumes/{volume}/schedules", json={"Opts": opts})
    return r.status_code, r.json()


def until(what: str, check, timeout: float = 30, every: float = 0.1, why=None):
    """Poll ``check`` until it gives something true, and return that; fail naming ``what``
    after ``timeout`` seconds, and what ``why()`` says then (the last error seen, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}"
                                 + (f" ({why()})" if why is not None else ""))
        time.sleep(every)


def release(root: Path) -> None:
    """Unmount and detach everything pyvol made under ``root`` (as a host shutdown would).

    Layers depend on each other (a volume's mount on its loop device, that device on a file in
    the pool's mount, the pool's mount on its loop device), so unwind in rounds until nothing
    is left; a lazy unmount would leave a filesystem alive that the next start cannot mount.
    """
    root = Path(root)
    for candidate in (root, root / "root"):  # a dm pool's devices go before its loop files
        if (candidate / "devicemapper").exists():
            for entry in reversed(mountinfo.under(root)):
                subprocess.run(["umount", entry.mount_point], capture_output=True)
            with contextlib.suppress(Exception):
                backend_probes.teardown(DevicemapperBackend(candidate))
    for _ in range(6):
        mounts = mountinfo.under(root)
        devs = _bound_under(root)
        if not mounts and not devs:
            return
        for entry in reversed(mounts):
            subprocess.run(["umount", entry.mount_point], capture_output=True)
        for dev, st in devs.items():
            # checked on the device's own fd: listed a moment ago, it may since have unbound
            # (a pending detach whose mount just went) and been bound by another lane's test
            with contextlib.suppress(OSError, CommandFailed):
                loopdev.clear(dev, (st.st_dev, st.st_ino))
        time.sleep(0.2)
    for entry in reversed(mountinfo.under(root)):
        subprocess.run(["umount", "-l", entry.mount_point], capture_output=True)


def dispose(base: Path, daemon: "Daemon | None" = None) -> None:
    """A bench's end, after a failure too: stop ``daemon`` and remove its socket (which may
    live outside ``base``, in Docker's plugin directory), then unmount, detach and remove
    everything under ``base``."""
    if daemon:
        daemon.stop()
        daemon.socket.unlink(missing_ok=True)
    release(base)
    shutil.rmtree(base, ignore_errors=True)


def loop_devices_under(root: Path) -> dict[str, str]:
    """Loop devices bound to files under ``root``, deleted ones included: /dev/loopN -> its
    backing file as sysfs prints it here."""
    hints = loopdev.attached()
    return {d: hints.get(d, st.name) for d, st in _bound_under(root).items()}


def _bound_under(root: Path) -> dict[str, loopdev.Status]:
    """Loop devices bound to files under ``root``: /dev/loopN -> what it is bound to.

    By identity, not by path (another namespace's file can print like one of ours): devices
    bound to a file found under ``root``, then, transitively, devices bound to any file on a
    filesystem that lives on one of those (a loop pool's images, deleted or not, mounted in
    this namespace or only in another one).
    """
    root = os.path.realpath(root)
    files, devs = set(), set()
    for top, dirs, names in os.walk(root):
        # a mounted filesystem's own files are covered by its device, below
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(top, d))]
        for n in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, n))
                if stat.S_ISREG(st.st_mode):
                    files.add((st.st_dev, st.st_ino))
    found: dict[str, loopdev.Status] = {}
    every = loopdev.bound()
    while True:
        more = {d: s for d, s in every.items() if d not in found
                and ((s.st_dev, s.st_ino) in files or s.st_dev in devs)}
        if not more:
            return found
        for d, st in more.items():
            found[d] = st
            with contextlib.suppress(OSError):
                devs.add(os.stat(d).st_rdev)


def in_mount_ns(pid: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` in the mount namespace of process ``pid`` (a daemon run under unshare)."""
    proc = subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--", *argv],
                          capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} in the mount namespace of {pid} failed "
                             f"({proc.returncode}): {proc.stderr.strip()}")
    return proc


def write_at(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def make_netns(name: str) -> None:
    """A network namespace with only loopback, up (pyroute2: netlink, no `ip` subprocess)."""
    from pyroute2 import NetNS, netns

    netns.create(name)
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")


def drop_netns(name: str) -> None:
    from pyroute2 import netns

    with contextlib.suppress(OSError):
        netns.remove(name)


# The engine's own client (Debian's docker.io); a newer client elsewhere on PATH may not match.
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"


class Dockerd:
    """A private dockerd in its own network namespace (so its bridge touches no other engine)."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.netns = f"pyvoltest{os.getpid()}"
        self.sock = self.base / "docker.sock"
        self.proc = None

    def start(self) -> "Dockerd":
        if shutil.which("dockerd") is None:
            raise RuntimeError("dockerd is not installed: run scripts/test.sh, which installs it")
        self.base.mkdir(parents=True, exist_ok=True)
        make_netns(self.netns)
        log = open(self.base / "dockerd.log", "ab")
        self.proc = subprocess.Popen(self._wrap(
            ["dockerd",
             "--data-root", str(self.base / "root"), "--exec-root", str(self.base / "exec"),
             "-H", f"unix://{self.sock}", "--pidfile", str(self.base / "dockerd.pid"),
             "--storage-driver", "overlay2"]), stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.run("version", check=False).returncode == 0:
                self._image()
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError("dockerd did not start:\n" + (self.base / "dockerd.log").read_text()[-3000:])

    def _wrap(self, argv: list[str]) -> list[str]:
        """How dockerd's command is run: in the network namespace (it must exec dockerd, so
        that the pid is dockerd's)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]

    def _image(self) -> None:
        """busybox:latest from Debian's busybox-static, imported: no registry is needed."""
        tree = self.base / "busybox"
        (tree / "bin").mkdir(parents=True, exist_ok=True)
        busybox = shutil.which("busybox") or "/bin/busybox"
        shutil.copy(busybox, tree / "bin" / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True).stdout.split()
        for a in applets:
            link = tree / "bin" / a
            if a != "busybox" and not link.exists():
                link.symlink_to("busybox")
        (tree / "etc").mkdir(exist_ok=True)
        if not (tree / "etc" / "mtab").is_symlink():
            (tree / "etc" / "mtab").symlink_to("/proc/mounts")  # busybox df reads it
        tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([DOCKER, "-H", f"unix://{self.sock}", "import", "--change",
                        "ENV PATH=/bin", "-", "busybox:latest"], stdin=tar.stdout, check=True,
                       capture_output=True)
        tar.wait()

    def run(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        proc = subprocess.run([DOCKER, "-H", f"unix://{self.sock}", *args],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip()}")
        return proc

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.run("rm", "-f", *self.run("ps", "-aq", check=False).stdout.split(), check=False)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        drop_netns(self.netns)
        for entry in reversed(mountinfo.under(self.base)):
            subprocess.run(["umount", "-l", entry.mount_point], capture_output=True)


def seed_demo(dockerd: "Dockerd", driver: str) -> None:
    """The seed's walk-through: one container writes test_volume, the next reads it back."""
    dockerd.run("run", "--rm", f"--volume-driver={driver}", "-v", "test_volume:/sample",
                "busybox", "sh", "-c", "echo hi > /sample/test")
    out = dockerd.run("run", "--rm", f"--volume-driver={driver}", "-v", "test_volume:/sample",
                      "busybox", "cat", "/sample/test").stdout
    assert out == "hi\n"


def slow_backup(d: "Daemon", proxy, url: str, requests: int = 12) -> subprocess.Popen:
    """Start `pyvol backup create v --dest URL` through a slowed FaultProxy (tests/s3servers.py)
    and return once ``requests`` more requests have passed it: chunks are flowing."""
    proxy.set("pass", delay=0.3)
    before = proxy.requests
    cli = subprocess.Popen([sys.executable, "-m", "pyvol", "--socket", str(d.socket), "backup",
                            "create", "v", "--dest", url], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while proxy.requests < before + requests:
        assert cli.poll() is None, cli.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return cli


class Node(Dockerd):
    """One Docker host of several on this machine: a dockerd with a network, mount and UTS
    namespace of its own. Its /run/docker/plugins is its own directory (``plugins``), so each
    node has its own plugin of one name (``pyvol``), as separate hosts do; its hostname is
    ``name`` (Swarm places tasks by hostname); ``addr`` is its address on the link that
    ``link_nodes`` makes between the nodes' namespaces. Start its pyvol daemon with
    ``daemon_wrap()``: in this mount namespace, where dockerd sees its mounts."""

    def __init__(self, base: Path, name: str, addr: str):
        super().__init__(base)
        self.name, self.addr = name, addr
        self.netns = f"pv{name}{os.getpid()}"
        self.plugins = self.base / "plugins"

    def _wrap(self, argv: list[str]) -> list[str]:
        self.plugins.mkdir(parents=True, exist_ok=True)
        Path("/run/docker/plugins").mkdir(parents=True, exist_ok=True)
        script = 'mount --bind "$1" /run/docker/plugins && hostname "$2" && shift 2 && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts",
                "sh", "-c", script, "sh", str(self.plugins), self.name, *argv]

    def daemon_wrap(self) -> list[str]:
        return ["nsenter", f"--mount=/proc/{self.proc.pid}/ns/mnt", "--"]

    def in_ns(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` where this node's mounts are."""
        return in_mount_ns(self.proc.pid, *argv, check=check)


def link_nodes(a: Node, b: Node, prefix: int = 24) -> None:
    """A veth pair between two nodes' network namespaces, ``a.addr`` and ``b.addr`` on it."""
    from pyroute2 import IPRoute, NetNS

    host, peer = f"pva{os.getpid() % 100000}", f"pvb{os.getpid() % 100000}"

    with IPRoute() as ip:
        ip.link("add", ifname=host, kind="veth", peer=peer)
        ip.link("set", index=ip.link_lookup(ifname=host)[0], net_ns_fd=a.netns)
        ip.link("set", index=ip.link_lookup(ifname=peer)[0], net_ns_fd=b.netns)
    for node, ifname in ((a, host), (b, peer)):
        with NetNS(node.netns) as ns:
            idx = ns.link_lookup(ifname=ifname)[0]
            ns.addr("add", index=idx, address=node.addr, prefixlen=prefix)
            ns.link("set", index=idx, state="up")


def form_swarm(manager: Node, *workers: Node, timeout: float = 60) -> None:
    """``manager`` inits a swarm on its link address and the workers join it; returns once
    every node is Ready."""
    manager.run("swarm", "init", "--advertise-addr", manager.addr)
    token = manager.run("swarm", "join-token", "-q", "worker").stdout.strip()
    for w in workers:
        w.run("swarm", "join", "--advertise-addr", w.addr, "--token", token,
              f"{manager.addr}:2377")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = manager.run("node", "ls", "--format", "{{.Hostname}} {{.Status}}").stdout.split("\n")
        if sorted(line.split()[0] for line in ready if line.endswith(" Ready")) == sorted(
                n.name for n in (manager, *workers)):
            return
        time.sleep(0.5)
    raise AssertionError(f"swarm not ready in {timeout} s: {ready}")


class MemoryCgroup:
    """A memory cgroup with a hard limit and no swap, made for one test and removed after it:
    the kernel's own OOM killer, acting inside it as it would on a host whose memory ran out.
    cgroup v1: a child of this process's own memory cgroup (whose limits still hold); v2: a
    child of the root, where systemd enables the memory controller. The processes put in it
    go back where they came from on ``close``. Where neither can be made (a container
    without its own cgroups to give, a kernel without ``memory.peak``), the test is skipped
    saying so: that is the machine's lack, not pyvol's."""

    def __init__(self, limit: int):
        import pytest

        name = f"pyvol-test-{os.getpid()}-{time.monotonic_ns()}"
        self.v1 = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        if self.v1:
            self.path = self._cgroup_of(os.getpid(), True) / name
            settings = {"memory.swappiness": "0", "memory.limit_in_bytes": str(limit)}
        else:
            root = Path("/sys/fs/cgroup")
            try:
                if "memory" not in (root / "cgroup.subtree_control").read_text().split():
                    (root / "cgroup.subtree_control").write_text("+memory\n")
            except OSError as e:
                pytest.skip(f"no memory controller to give a test cgroup here: {e}")
            self.path = root / name
            settings = {"memory.max": str(limit), "memory.swap.max": "0"}
        self.path.mkdir()
        try:
            if not self.v1 and not (self.path / "memory.peak").exists():
                pytest.skip("this kernel's cgroup v2 has no memory.peak (5.19 and later do)")
            for file, value in settings.items():
                (self.path / file).write_text(value + "\n")
        except BaseException:
            self.path.rmdir()
            raise
        self._from: dict[int, Path] = {}

    @staticmethod
    def _cgroup_of(pid: int, v1: bool) -> Path:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (v1 and "memory" in controllers.split(",")) or (not v1 and controllers == ""):
                base = Path("/sys/fs/cgroup/memory" if v1 else "/sys/fs/cgroup")
                return base / path.lstrip("/")
        raise AssertionError(f"process {pid} is in no memory cgroup")

    def add(self, pid: int) -> None:
        """Move ``pid`` (all its threads) in; what it forks later starts in here too."""
        self._from[pid] = self._cgroup_of(pid, self.v1)
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def peak(self) -> int:
        """The most memory charged to it at once, in bytes."""
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        """Processes the OOM killer has killed in here."""
        if self.v1:
            text = (self.path / "memory.oom_control").read_text()
        else:
            text = (self.path / "memory.events").read_text()
        for line in text.splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        raise AssertionError(f"this kernel counts no OOM kills in {self.path}")

    def close(self) -> None:
        """Everything in it back out (a process born in here goes where the first one added
        came from), again until none is left, since one may fork meanwhile; then removed."""
        home = next(iter(self._from.values()), self.path.parent)

        def emptied() -> bool:
            procs = (self.path / "cgroup.procs").read_text().split()
            for pid in map(int, procs):
                try:
                    (self._from.get(pid, home) / "cgroup.procs").write_text(f"{pid}\n")
                except OSError:
                    pass  # gone meanwhile
            return not procs

        until("the test cgroup to empty", emptied, 10, 0.05)
        self.path.rmdir()
