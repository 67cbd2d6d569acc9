"""A volume's schedules: what the options say, when each run falls, and how they are shown.

Options are the same at create (``docker volume create -o snapshot-every=1h``) and later
(``pyvol schedule set``), so one parser serves both. A schedule's runs fall on a grid of its
interval, shifted by a phase taken from a hash of the volume's name: a hundred volumes with
the same interval do not all snapshot in the same second, and a volume's runs fall at the same
times of day on every host and after every restart. The runner (plugin/scheduler.py) does the
work; this module only decides and records.
"""

from __future__ import annotations

import hashlib
import re
import time

from . import clock
from .backup.retention import Policy
from .errors import InvalidInput, NotFound
from .names import check_name
from .state import Schedule, Store

KINDS = ("snapshot", "backup")
ACCEPTED_TARGETS = "accepted are s3://BUCKET[/PREFIX], file:///PATH or ebs://REGION (ebs volumes)"
OPTIONS = {
    "snapshot-every": "take a snapshot every INTERVAL (30s, 10m, 1h, 1d, 1h30m)",
    "snapshot-cron": "take a snapshot at the times of a cron expression, in UTC ('0 3 * * *'), "
                     "instead of every INTERVAL",
    "snapshot-keep": "snapshots of the schedule kept: N (the N newest) or a policy "
                     "last=N,hourly=N,daily=N,weekly=N,monthly=N,yearly=N,within=DURATION",
    "backup-every": "back up every INTERVAL into backup-to",
    "backup-cron": "back up at the times of a cron expression, in UTC, instead of every INTERVAL",
    "backup-to": "the schedule's repository: " + ACCEPTED_TARGETS,
    "backup-keep": "backups of the schedule kept: N or a policy as snapshot-keep's "
                   "(daily=7,weekly=4)",
}
# A run falls at most this fraction of its interval after the grid's slot (and at most
# MAX_PHASE seconds): spread enough to part a hundred volumes, close enough to be predictable.
PHASE_FRACTION = 0.25
MAX_PHASE = 3600
MIN_EVERY, MAX_EVERY = 1, 366 * 86400

_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_INTERVAL_RE = re.compile(r"(?:[0-9]{1,7}[wdhms])+")
_ACCEPTED_EVERY = ("accepted is an interval such as 30s, 10m, 1h, 1d or 1h30m (whole numbers "
                   "each followed by w, d, h, m or s), from 1s to 366d")


def parse_interval(text, what: str) -> int:
    """``1h30m`` -> 5400 seconds."""
    if not isinstance(text, str) or not _INTERVAL_RE.fullmatch(text.strip()):
        raise InvalidInput(f"invalid {what} {text!r}: {_ACCEPTED_EVERY}")
    seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"([0-9]+)([wdhms])", text))
    if not MIN_EVERY <= seconds <= MAX_EVERY:
        raise InvalidInput(f"invalid {what} {text!r}: {_ACCEPTED_EVERY}")
    return seconds


_ACCEPTED_CRON = ("accepted is a cron expression of 5 fields, minute hour day-of-month month "
                  "day-of-week, read in UTC (such as '0 3 * * *' or '*/15 * * * 1-5'), or of 6 "
                  "with seconds last")
CRON_SAMPLE = 16  # firings looked at for a cron expression's shortest gap
_RANDOM_FIELD = re.compile(r"[hHrR](\([0-9]+-[0-9]+\))?(/[0-9]+)?")


def parse_cron(text, what: str) -> tuple[str, int]:
    """A cron expression (croniter's dialect, 5 fields or 6 with seconds last) and the
    shortest gap between two of its runs, which stands for its interval: it bounds the phase
    (runs keep their order) and how far ahead a slot may be."""
    from croniter import CroniterError, croniter

    if not isinstance(text, str) or len(text) > 200 or len(text.split()) not in (5, 6):
        raise InvalidInput(f"invalid {what} {text!r}: {_ACCEPTED_CRON}")
    expr = " ".join(text.split())
    if any(_RANDOM_FIELD.fullmatch(f) for f in expr.split()):
        # croniter draws R (and H, hashed) afresh for each reader: every host, every sync
        # would see other times
        raise InvalidInput(f"invalid {what} {text!r}: random (R) or hashed (H) fields are "
                           f"not accepted; {_ACCEPTED_CRON}")
    try:
        it = croniter(expr, 0.0, ret_type=float)
        times = [it.get_next() for _ in range(CRON_SAMPLE)]
    except (CroniterError, Exception):  # noqa: BLE001 -- bad, or never runs: refused
        raise InvalidInput(f"invalid {what} {text!r}: {_ACCEPTED_CRON}") from None
    return expr, max(MIN_EVERY, min(MAX_EVERY, int(min(b - a for a, b in zip(times, times[1:])))))


def format_interval(seconds: int) -> str:
    out = ""
    for unit, size in _UNITS.items():
        if unit == "w":
            continue  # 14d reads better than 2w
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out or "0s"


def parse_keep(text, what: str) -> dict:
    """``24`` (the 24 newest) or ``daily=7,weekly=4``: a retention policy as
    backup/retention.py takes it (restic's --keep-* rules)."""
    accepted = (f"accepted for {what} is a number N (keep the N newest) or rules such as "
                "daily=7,weekly=4 from last, hourly, daily, weekly, monthly, yearly (counts) "
                "and within, within-hourly, within-daily, within-weekly, within-monthly, "
                "within-yearly (durations such as 2d)")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"invalid {what} {text!r}: {accepted}")
    text = text.strip()
    if re.fullmatch(r"[0-9]{1,7}", text):
        options = {"last": text}
    else:
        options = {}
        for part in text.split(","):
            key, eq, value = part.strip().partition("=")
            if not eq or not key or not value:
                raise InvalidInput(f"invalid {what} {text!r}: {part.strip()!r} is not "
                                   f"RULE=VALUE; {accepted}")
            key = key.strip().replace("-", "_")
            if key in options:
                raise InvalidInput(f"invalid {what} {text!r}: {key} is given twice; {accepted}")
            options[key] = value.strip()
    try:
        policy = Policy.parse(options)
    except InvalidInput as e:
        raise InvalidInput(f"invalid {what} {text!r}: {e}; {accepted}") from None
    return policy.as_dict()


def format_keep(keep: dict | None) -> str:
    if not keep:
        return "all"
    if list(keep) == ["last"]:
        return str(keep["last"])
    return ",".join(f"{k.replace('_', '-')}={v}" for k, v in keep.items())


def check_target(url, backend: str | None = None) -> str:
    """A repository URL as the backup service takes it, checked by the very parsers that
    open it (backup/targets.py's ``parse_repo_url``, backends/ebs.py's ``parse_ebs_url``): a
    URL accepted here is one a run can at least try, not one that fails at every slot. It is
    opened only when the schedule runs (a destination down then shows in the outcome).
    ``ebs://REGION`` takes only a volume on the ebs backend (``backend``: the volume's, when
    known). No credentials in it, and none in an error: the URL is shown in Status and
    `schedule ls`, and the daemon's environment holds them."""
    from .backends.ebs import parse_ebs_url
    from .backup.targets import parse_repo_url, shown_url

    if isinstance(url, str) and url.startswith("ebs://"):
        try:
            _region, snap = parse_ebs_url(url)
        except InvalidInput:
            snap = ""
        if snap is not None:
            raise InvalidInput(f"invalid backup-to {shown_url(url)}: {ACCEPTED_TARGETS}")
        if backend is not None and backend != "ebs":
            raise InvalidInput(f"invalid backup-to {shown_url(url)}: an ebs:// destination "
                               f"takes volumes on the ebs backend, and this one is on {backend};"
                               " accepted for it are s3://BUCKET[/PREFIX] and file:///PATH")
        return url
    try:
        parse_repo_url(url)
    except InvalidInput as e:
        raise InvalidInput(f"invalid backup-to: {e}; or ebs://REGION for an ebs volume") \
            from None
    return url


def parse_options(opts: dict[str, str], current: dict[str, Schedule] | None = None,
                  backend: str | None = None) -> dict[str, dict]:
    """The schedules ``opts`` ask for, by kind: {"snapshot": {every, keep, target}, ...}.
    Options of a kind that ``current`` has change only what they name. ``backend``: the
    volume's, which decides whether ebs:// is a destination it can have.

    A schedule needs its keep policy: runs every 30 s with nothing removed fill a dm pool's
    metadata (or a repository) with no one watching; "keep everything" is ``last=`` a number
    large enough, said on purpose."""
    current = current or {}
    unknown = sorted(k for k in opts if k not in OPTIONS)
    if unknown:
        raise InvalidInput(f"unknown schedule option {', '.join(unknown)}: accepted are "
                           f"{', '.join(OPTIONS)}")
    out: dict[str, dict] = {}
    for what in KINDS:
        given = {k[len(what) + 1:]: v for k, v in opts.items() if k.startswith(what + "-")}
        if not given:
            continue
        old = current.get(what)
        spec = {"every": old.every if old else None, "keep": old.keep if old else None,
                "target": old.target if old else None, "cron": old.cron if old else None}
        if "every" in given and "cron" in given:
            raise InvalidInput(f"{what}-every and {what}-cron were both given: a schedule runs "
                               "every INTERVAL or at the times of a cron expression; give one")
        if "every" in given:
            spec["every"] = parse_interval(given["every"], f"{what}-every")
            spec["cron"] = None
        if "cron" in given:
            spec["cron"], spec["every"] = parse_cron(given["cron"], f"{what}-cron")
        if "keep" in given:
            spec["keep"] = parse_keep(given["keep"], f"{what}-keep")
        if "to" in given:
            spec["target"] = check_target(given["to"], backend)
        if spec["every"] is None:
            raise InvalidInput(f"a {what} schedule needs {what}-every (an interval such as 1h)"
                               f" or {what}-cron; only "
                               f"{', '.join(f'{what}-{k}' for k in given)} was given")
        if what == "backup" and spec["target"] is None:
            raise InvalidInput("a backup schedule needs backup-to, its repository: "
                               + ACCEPTED_TARGETS)
        if spec["keep"] is None:
            raise InvalidInput(f"a {what} schedule needs {what}-keep, what it keeps: a number N "
                               f"(the N newest) or rules such as daily=7,weekly=4; only "
                               f"{', '.join(f'{what}-{k}' for k in given)} was given")
        out[what] = spec
    return out


def spec_of(s: Schedule) -> dict:
    """A schedule's settings as a shared volume's record holds them (docs/schedules.md)."""
    return {"every": s.every, "keep": s.keep, "target": s.target, "cron": s.cron}


def check_published(what: str, value, backend: str) -> dict | None:
    """A schedule as another host wrote it into a shared volume's record: untrusted, so
    checked as the options are, and refused (InvalidInput) rather than run half-understood.
    None: that host removed it."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"every", "keep", "target", "cron"}:
        raise InvalidInput(f"the {what} schedule in the record is not an object of every, keep, "
                           "target and cron")
    every = value.get("every")
    if type(every) is not int or not MIN_EVERY <= every <= MAX_EVERY:
        raise InvalidInput(f"the {what} schedule in the record has every {every!r}: accepted "
                           f"is a whole number of seconds from {MIN_EVERY} to {MAX_EVERY}")
    keep = Policy.parse(value.get("keep")).as_dict()
    target = value.get("target")
    if what == "backup":
        target = check_target(target, backend)
    elif target is not None:
        raise InvalidInput(f"the {what} schedule in the record has a target: only a backup "
                           "schedule has one")
    cron = value.get("cron")
    if cron is not None:
        cron, every = parse_cron(cron, f"{what}-cron")
    return {"every": every, "keep": keep, "target": target, "cron": cron}


def schedule_options(opts: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split a create's options into (the schedule's, the volume's)."""
    ours = {k: v for k, v in opts.items() if k in OPTIONS}
    return ours, {k: v for k, v in opts.items() if k not in OPTIONS}


def phase(volume: str, what: str, every: int) -> int:
    """Seconds after each slot of the grid this schedule runs: the same on every host."""
    h = int.from_bytes(hashlib.sha256(f"{volume}/{what}".encode()).digest()[:8], "big")
    return int(h / 2 ** 64 * min(every * PHASE_FRACTION, MAX_PHASE))


def next_after(t: float, volume: str, what: str, every: int, cron: str | None = None) -> float:
    """The first slot of the schedule after ``t``: however long the daemon was down, a
    missed slot is run once (it is due) and the next one is in the future. A cron schedule's
    slots are its expression's times, shifted by the same phase."""
    p = phase(volume, what, every)
    if cron is not None:
        from croniter import croniter

        return croniter(cron, t - p, ret_type=float).get_next() + p
    return p + (int((t - p) // every) + 1) * every


def store_rows(store: Store, volume: str, specs: dict[str, dict],
               now: float | None = None) -> None:
    """Write the schedules of ``specs`` for ``volume`` (inside the caller's transaction)."""
    now = time.time() if now is None else now
    for what, spec in specs.items():
        cron = spec.get("cron")
        at = clock.stamp(next_after(now, volume, what, spec["every"], cron))
        store.put_schedule(Schedule(volume, what, spec["every"], spec["keep"], spec["target"],
                                    at, cron=cron))


def describe(s: Schedule) -> dict:
    """A schedule as Status and `schedule ls` show it (a repository URL, never a secret)."""
    return {"volume": s.volume, "what": s.what,
            "every": f"cron {s.cron}" if s.cron else format_interval(s.every),
            "keep": format_keep(s.keep), "target": s.target, "next": s.next_at,
            "last": s.last_at, "result": s.last_result, "error": s.last_error,
            "failures": s.failures, "runs": s.runs, "by": s.ran_by}


def publish(host, v, specs: dict[str, dict | None]) -> bool:
    """Write a shared volume's schedules (None: removed) into its record, where every host's
    runner reads them (plugin/scheduler.py); whether the volume is shared."""
    from .backends.shared import SharedBackend

    b = host.backends.get(v.backend)
    if not isinstance(b, SharedBackend):
        return False
    b.set_schedules(v.name, specs)
    return True


class Schedules:
    """``pyvol schedule set/ls/rm``: the records; the runner reads them."""

    def __init__(self, host, catalogue):
        self.host, self.catalogue, self.store = host, catalogue, host.store

    def set(self, volume, opts) -> list[dict]:
        check_name(volume)
        if not isinstance(opts, dict) or not opts or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in opts.items()):
            raise InvalidInput("invalid schedule options: accepted is a non-empty map of "
                               f"{', '.join(OPTIONS)} to strings")
        with self.host.lock(volume):
            v = self.catalogue.ready(volume)
            current = {s.what: s for s in self.store.schedules(volume)}
            specs = parse_options(opts, current, v.backend)
            # a shared volume another host made gets its row here first: the schedule refers
            # to it (schedules.volume REFERENCES volumes), as a snapshot's row does
            self.catalogue.adopt(v)
            publish(self.host, v, specs)
            with self.store.tx():
                store_rows(self.store, volume, specs)
        return self.list(volume)

    def _unpublish(self, volume: str, kinds: list[str]) -> int:
        """Remove a shared volume's schedules of ``kinds`` from its record, so that no host
        runs them any more; how many the record had (0 for a volume that is not shared)."""
        from .backends.shared import SharedBackend

        # this host's row first: a share it cannot reach now must fail the removal (its
        # record would bring the schedule back), not make the volume look absent
        v = self.store.volume(volume) or self.catalogue.find(volume)
        b = self.host.backends.get(v.backend) if v is not None else None
        if not isinstance(b, SharedBackend):
            return 0
        had = (b.record(volume) or {}).get("schedules")
        b.set_schedules(volume, {k: None for k in kinds})
        return sum(isinstance(had, dict) and had.get(k) is not None for k in kinds)

    def list(self, volume=None) -> list[dict]:
        if volume is not None:
            self.catalogue.ready(check_name(volume))
        return [describe(s) for s in self.store.schedules(volume)]

    def remove(self, volume, what=None) -> dict:
        check_name(volume)
        if what is not None and what not in KINDS:
            raise InvalidInput(f"invalid schedule kind {what!r}: accepted are "
                               f"{', '.join(KINDS)}, or none for both")
        with self.host.lock(volume):
            in_record = self._unpublish(volume, [what] if what else list(KINDS))
            with self.store.tx():
                n = max(self.store.delete_schedules(volume, what), in_record)
        if n == 0:
            raise NotFound(f"volume {volume} has no {what + ' ' if what else ''}schedule")
        return {"removed": n}
