"""Daemon settings: one place that says where things live and how they are chosen.

Every setting comes from a command-line flag, else an environment variable ``PYVOL_*`` (the
managed plugin sets these through config.json), else a default. Backend settings are passed
through as strings; each backend validates its own.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PyvolError

DEFAULT_ROOT = "/var/lib/pyvol"
DEFAULT_SOCKET = "/run/docker/plugins/pyvol.sock"


@dataclass
class Config:
    root: Path = Path(DEFAULT_ROOT)
    socket: Path = Path(DEFAULT_SOCKET)
    # Backend used when a create names none; None means "the best this kernel offers".
    default_backend: str | None = None
    workers: int = 2
    threads: int = 8
    log_level: str = "info"
    # Per-backend settings, e.g. {"loop": {"pool_size": "100G"}}.
    backend_settings: dict[str, dict[str, str]] = field(default_factory=dict)
    # Backup settings from PYVOL_BACKUP_*: key_file, threads, connect_timeout, read_timeout,
    # max_attempts, lock_lease (docs/backup-repository.md). AWS itself is configured the
    # standard way (AWS_* variables, ~/.aws, instance roles).
    backup_settings: dict[str, str] = field(default_factory=dict)

    # How long Docker waits for a plugin call (its default; `docker plugin enable --timeout`
    # changes it for a managed plugin): long work in a Docker call stops 5 s before.
    docker_timeout: float = 30.0
    # Backends this daemon runs (PYVOL_BACKENDS=nfs,loop); None: every one the host can.
    enabled_backends: list[str] | None = None
    # Where volumes are mounted; the managed plugin points it at its propagatedMount.
    mounts: Path | None = None
    # How often the schedule runner reads shared volumes' schedules from their records.
    schedule_sync: float = 30.0

    @property
    def mounts_dir(self) -> Path:
        return self.mounts or self.root / "mounts"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def state_path(self) -> Path:
        return self.root / "state.db"


MANAGED_GLOB = "/run/docker/plugins/*/pyvol.sock"

def _real(path: str) -> Path:
    """``path`` with every symlink resolved. Mounts are compared with /proc/self/mountinfo,
    which shows only real paths: a root reached through a symlink would never be seen mounted,
    so each start and each Mount would stack another mount that nothing ever takes down."""
    return Path(os.path.realpath(path))


def _seconds(env: dict[str, str], name: str, default: float, low: float, high: float) -> float:
    """A number of seconds from ``env``, refused (naming it) unless from ``low`` to ``high``."""
    text = env.get(name)
    try:
        value = default if text is None else float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:  # also nan
        raise PyvolError(f"invalid {name} {text!r}: accepted is a number of seconds from "
                         f"{low:g} to {high:g}")
    return value


def load(root: str | None = None, socket: str | None = None, backend: str | None = None,
         env: dict[str, str] | None = None) -> Config:
    """Build the configuration: flags win over ``PYVOL_*`` variables, which win over defaults.

    Backend settings are read from ``PYVOL_<BACKEND>_<SETTING>`` (``PYVOL_LOOP_POOL_SIZE=2T``),
    so the managed plugin's env list and a systemd unit configure the daemon the same way.
    """
    # An empty value means unset: the managed plugin's config.json declares every settable
    # variable, empty unless the user sets it.
    env = {k: v for k, v in (os.environ if env is None else env).items() if v != ""}
    cfg = Config(
        root=_real(root or env.get("PYVOL_ROOT", DEFAULT_ROOT)),
        socket=Path(socket or env.get("PYVOL_SOCKET", DEFAULT_SOCKET)),
        default_backend=backend or env.get("PYVOL_BACKEND") or None,
        workers=int(env.get("PYVOL_WORKERS", 2)),
        threads=int(env.get("PYVOL_THREADS", 8)),
        log_level=env.get("PYVOL_LOG_LEVEL", "info"),
        mounts=_real(env["PYVOL_MOUNTS"]) if "PYVOL_MOUNTS" in env else None,
        docker_timeout=float(env.get("PYVOL_DOCKER_TIMEOUT", 30)),
        schedule_sync=_seconds(env, "PYVOL_SCHEDULE_SYNC", 30.0, 1.0, 86400.0),
        enabled_backends=[b.strip() for b in env["PYVOL_BACKENDS"].split(",") if b.strip()]
        if "PYVOL_BACKENDS" in env else None,
    )
    from .backends import BACKENDS  # late: backends import plugin modules

    for name in BACKENDS:
        prefix = f"PYVOL_{name.upper()}_"
        cfg.backend_settings[name] = {
            k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)
        }
        for key, value in cfg.backend_settings[name].items():
            if key.endswith("_file"):  # a pool's file (loop pool_file, devicemapper data_file)
                cfg.backend_settings[name][key] = str(_real(value))
    cfg.backup_settings = {k[len("PYVOL_BACKUP_"):].lower(): v for k, v in env.items()
                           if k.startswith("PYVOL_BACKUP_")}
    return cfg
