"""Which backups a retention policy keeps: restic's ``forget`` rules, as a pure function.

No I/O and no repository here, so that anything with an id and a time (backups in a
repository, a volume's snapshots, a schedule's own bookkeeping) can be judged the same way.
The rules are restic's (internal/restic/snapshot_policy.go, as restic 0.14 applies them;
tests/test_retention.py checks them against the installed ``restic forget``), because people
already know them and their documented examples:

- Items are judged newest first. ``last N`` keeps the N newest. ``hourly/daily/weekly/
  monthly/yearly N`` keeps, for each of the N newest hours (days, ISO weeks, months, years)
  that hold an item, the **newest item in it**; the count goes down only when an item is
  kept, so a gap (a day with no backup) costs nothing.
- ``within D`` keeps every item newer than D before the newest item (not before now: a
  policy never empties a volume's history just because backups stopped). An item dated in
  the future is not "the newest" for this (restic's rule), so a wrong clock cannot make
  everything look old. ``within-daily D`` and the like keep the newest item of each bucket
  newer than that cutoff.
- An item is kept if any rule keeps it; its reasons name each rule.

Two choices restic leaves to its input:

- **Buckets are counted in UTC**, whatever the zone of the host that judges: a day is a UTC
  day. Backups are written by several hosts (and judged by schedules on others), and a local
  day would change with the judging host's zone and with daylight-saving time (a 23- or
  25-hour day). restic buckets in the zone each snapshot recorded; with all snapshots in UTC
  the two agree.
- **Ties** (two items at the same second) are ordered by id, the larger first, so the same
  input always gives the same answer.

restic 0.17 and later also keep the oldest item of a group when a ``--keep-*`` count is not
used up; restic 0.14 (Debian 12's, the one the tests compare with) does not, and neither does
this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from typing import Iterable

from ..errors import InvalidInput

MAX_COUNT = 1_000_000
COUNTS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
WITHINS = ("within", "within_hourly", "within_daily", "within_weekly", "within_monthly",
           "within_yearly")
_DURATION_RE = re.compile(r"(?:\d{1,6}[ymdh])+")
_UNITS = {"y": "years", "m": "months", "d": "days", "h": "hours"}


def option_name(key: str) -> str:
    """A policy field as the CLI spells it: ``within_daily`` -> ``--keep-within-daily``."""
    return "--keep-" + key.replace("_", "-")


@dataclass(frozen=True)
class Duration:
    """restic's calendar duration (``1y2m3d4h``): years and months are calendar ones."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str, what: str) -> Duration:
        accepted = (f"accepted for {what} is a duration such as 2d, 12h or 1y6m: whole numbers "
                    "each followed by y (years), m (months), d (days) or h (hours), each unit "
                    "at most once, not all zero")
        if not isinstance(text, str) or not _DURATION_RE.fullmatch(text):
            raise InvalidInput(f"invalid {what} {text!r}: {accepted}")
        parts: dict[str, int] = {}
        for number, unit in re.findall(r"(\d+)([ymdh])", text):
            if _UNITS[unit] in parts:
                raise InvalidInput(f"invalid {what} {text!r}: {unit!r} is given twice; {accepted}")
            parts[_UNITS[unit]] = int(number)
        d = cls(**parts)
        if d.zero:
            raise InvalidInput(f"invalid {what} {text!r}: it is zero; {accepted}")
        return d

    @property
    def zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def before(self, t: datetime) -> datetime:
        """``t`` less this duration, normalised as Go's ``AddDate`` does (31 March less one
        month is 3 March, not 28 February): the cutoff restic computes. A cutoff before the
        year 1 is the earliest time there is."""
        try:
            month = t.month - 1 - self.months
            year = t.year - self.years + month // 12
            first = t.replace(year=year, month=month % 12 + 1, day=1)
            return first + timedelta(days=t.day - 1 - self.days, hours=-self.hours)
        except (ValueError, OverflowError):
            return datetime.min.replace(tzinfo=timezone.utc)

    def __str__(self) -> str:
        return "".join(f"{getattr(self, name)}{unit}" for unit, name in _UNITS.items()
                       if getattr(self, name))


@dataclass(frozen=True)
class Policy:
    """What to keep. Counts of 0 and absent durations are rules not used; a policy with no
    rule at all is refused (it would remove everything, which no one asks for by omission)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None
    within_hourly: Duration | None = None
    within_daily: Duration | None = None
    within_weekly: Duration | None = None
    within_monthly: Duration | None = None
    within_yearly: Duration | None = None

    @classmethod
    def parse(cls, options) -> Policy:
        """From a request's ``{"daily": 7, "within": "2d", ...}`` (counts as JSON numbers or
        strings of digits, durations as strings): untrusted input, refused with a sentence
        naming the option and what it accepts."""
        names = ", ".join(option_name(k) for k in (*COUNTS, *WITHINS))
        if not isinstance(options, dict):
            raise InvalidInput(f"invalid retention policy: accepted is an object of {names}")
        unknown = sorted(set(options) - set(COUNTS) - set(WITHINS))
        if unknown:
            raise InvalidInput(f"unknown retention option(s) {', '.join(map(repr, unknown))}: "
                               f"accepted are {names}")
        values: dict = {}
        for key in COUNTS:
            if options.get(key) is not None:
                values[key] = _count(options[key], option_name(key))
        for key in WITHINS:
            if options.get(key) is not None:
                values[key] = Duration.parse(options[key], option_name(key))
        policy = cls(**values)
        if policy.empty:
            raise InvalidInput(
                "no retention policy given: accepted is at least one of --keep-last, "
                "--keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly "
                "(a number of backups, 1 or more) or --keep-within[-hourly|-daily|-weekly|"
                "-monthly|-yearly] (a duration such as 2d); nothing is removed without one")
        return policy

    @property
    def empty(self) -> bool:
        return not any(getattr(self, k) for k in COUNTS) and \
            not any(getattr(self, k) for k in WITHINS)

    def as_dict(self) -> dict:
        """The policy as a request carries it (only the rules in use)."""
        out: dict = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value:
                out[f.name] = str(value) if isinstance(value, Duration) else value
        return out

    def __str__(self) -> str:
        counts = [f"{getattr(self, k)} {'latest' if k == 'last' else k}" for k in COUNTS
                  if getattr(self, k)]
        text = f"{', '.join(counts)} backups" if counts else ""
        withins = [f"{k[len('within_'):]} backups within {getattr(self, k)}"
                   for k in WITHINS[1:] if getattr(self, k)]
        if withins:
            text += (", " if text else "") + ", ".join(withins)
        if self.within:
            text += (" and " if text else "") + f"all backups within {self.within} of the newest"
        return "keep " + text


def _count(value, what: str) -> int:
    accepted = (f"accepted for {what} is a whole number of backups from 0 to {MAX_COUNT} "
                "(0: the rule is not used)")
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,7}", value):
        value = int(value)
    if type(value) is not int:
        raise InvalidInput(f"invalid {what} {value!r}: {accepted}")
    if not 0 <= value <= MAX_COUNT:
        raise InvalidInput(f"invalid {what} {value}: {accepted}")
    return value


@dataclass
class Verdict:
    id: str
    time: datetime
    kept: bool = False
    reasons: list[str] = field(default_factory=list)


def _bucket(rule: str, t: datetime) -> tuple:
    if rule == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if rule == "daily":
        return (t.year, t.month, t.day)
    if rule == "weekly":
        return tuple(t.isocalendar())[:2]
    if rule == "monthly":
        return (t.year, t.month)
    return (t.year,)


def keep(items: Iterable[tuple[str, datetime]], policy: Policy,
         now: datetime | None = None) -> list[Verdict]:
    """Judge one group's items (id, aware time): a Verdict for each, newest first.

    ``now`` only decides which items are "in the future" for the ``within`` rules.
    """
    now = now or datetime.now(timezone.utc)
    verdicts = [Verdict(i, t.astimezone(timezone.utc)) for i, t in items]
    verdicts.sort(key=lambda v: (v.time, v.id), reverse=True)
    past = [v.time for v in verdicts if v.time < now]
    # with every item in the future, restic's "newest" is the zero time: all are within
    newest = past[0] if past else datetime.min.replace(tzinfo=timezone.utc)
    left = {k: getattr(policy, k) for k in COUNTS}
    last_bucket: dict[str, object] = {}
    cutoffs = {k: getattr(policy, k).before(newest) for k in WITHINS
               if getattr(policy, k)}
    for nr, v in enumerate(verdicts):
        if "within" in cutoffs and v.time > cutoffs["within"]:
            v.reasons.append(f"within {policy.within}")
        for k in COUNTS:
            if left[k] <= 0:
                continue
            b = nr if k == "last" else _bucket(k, v.time)
            if b != last_bucket.get(k):
                last_bucket[k] = b
                left[k] -= 1
                v.reasons.append(f"{k} backup")
        for k in WITHINS[1:]:
            if k in cutoffs and v.time > cutoffs[k]:
                rule = k[len("within_"):]
                b = _bucket(rule, v.time)
                if b != last_bucket.get(k):
                    last_bucket[k] = b
                    v.reasons.append(f"{rule} within {getattr(policy, k)}")
        v.kept = bool(v.reasons)
    return verdicts
