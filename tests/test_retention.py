"""`pyvol backup forget`: restic's retention rules, checked against restic itself, and a
forget that removes only manifests, under the repository's lock, and survives being killed.

The policy tests make a restic repository whose snapshots carry chosen times (one restic
host per set of times, so each set is a group of its own), ask the installed ``restic forget
--dry-run --json`` what it keeps and why, and compare with plugin/backup/retention.py on the
same times. Times are UTC on both sides (restic runs with TZ=UTC), so restic's buckets are
UTC buckets, which is what pyvol counts in.
"""

import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pyvol.backup import retention
from pyvol.backup.retention import Duration, Policy, keep
from pyvol.errors import InvalidInput

UTC = timezone.utc


def t(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


# restic's documented example (doc/060_forget.rst): one backup every Sunday for 12 weeks
SUNDAYS = [(t("2019-09-01 11:00:00") + timedelta(weeks=i)).strftime("%Y-%m-%d %H:%M:%S")
           for i in range(12)]

# several a day and an hour, gaps, a month end, a year end that is also an ISO-week-53
# boundary (2026-12-31 is a Thursday: 2027-01-01..03 are in 2026-W53), a leap day, a tie, and
# one in the future (the "within" rules count from the newest one not in the future)
IRREGULAR = [
    "2025-11-30 23:59:59", "2025-12-01 00:00:00", "2026-01-31 08:00:00", "2026-02-01 08:00:00",
    "2026-12-27 22:00:00", "2026-12-28 01:00:00", "2026-12-31 23:30:00",
    "2027-01-01 00:10:00", "2027-01-03 12:00:00", "2027-01-04 00:00:01",
    "2027-01-04 09:00:00", "2027-01-04 09:20:00", "2027-01-04 09:20:00", "2027-01-04 09:59:59",
    "2027-01-04 10:00:00", "2027-01-05 07:00:00", "2027-01-05 18:00:00",
    "2028-02-28 12:00:00", "2028-02-29 12:00:00", "2028-03-01 12:00:00",
    "2099-06-01 00:00:00",
]

# the newest on 31 March: "1m" before it is 3 March by Go's AddDate (31 February
# normalised), which restic uses, and not 28 February
MONTH_END = ["2026-02-27 10:00:00", "2026-02-28 10:00:00", "2026-03-02 10:00:00",
             "2026-03-03 09:00:00", "2026-03-03 11:00:00", "2026-03-20 10:00:00",
             "2026-03-31 10:00:00"]

# ties only: two pairs at the same second, one pair the newest
TIES = ["2026-05-01 10:00:00", "2026-05-01 10:00:00", "2026-05-02 10:00:00",
        "2026-05-02 10:00:00", "2026-05-02 09:00:00"]

GROUPS = {"sundays": SUNDAYS, "irregular": IRREGULAR, "monthend": MONTH_END, "ties": TIES}

POLICIES = [
    {"last": 3},
    {"daily": 4},  # the documented example: the last four Sundays
    {"last": 2, "daily": 3, "weekly": 2, "monthly": 2},
    {"hourly": 5},
    {"weekly": 3, "yearly": 2},
    {"monthly": 6},
    {"last": 1, "weekly": 8},
    {"daily": 7, "weekly": 5, "monthly": 12, "yearly": 75},  # documented
    {"within": "1m"},
    {"within": "2d5h"},
    {"within": "1y1m1d1h"},
    {"last": 1, "within_hourly": "1d"},
    # documented: daily for a week, weekly for a month, monthly for a year, yearly for 75
    {"within_daily": "7d", "within_weekly": "1m", "within_monthly": "1y",
     "within_yearly": "75y"},
    {"hourly": 2, "within_daily": "2d"},
]


def restic_args(policy: dict) -> list[str]:
    out = []
    for key, value in policy.items():
        out += [retention.option_name(key), str(value)]
    return out


@pytest.fixture(scope="module")
def restic_repo():
    """A restic repository holding every group's snapshots at their times."""
    if shutil.which("restic") is None:
        pytest.fail("restic is not installed (scripts/test.sh installs it)")
    base = Path(tempfile.mkdtemp(prefix="pyvol-restic-"))
    env = {**os.environ, "RESTIC_PASSWORD": "test", "RESTIC_REPOSITORY": str(base / "repo"),
           "TZ": "UTC", "RESTIC_CACHE_DIR": str(base / "cache")}
    (base / "data").mkdir()
    (base / "data" / "f").write_text("x")
    subprocess.run(["restic", "init", "-q"], env=env, check=True, timeout=60)
    for host, times in GROUPS.items():
        for when in times:
            subprocess.run(["restic", "backup", "-q", "--host", host, "--time", when,
                            str(base / "data")], env=env, check=True, timeout=60,
                           capture_output=True)
    yield env
    shutil.rmtree(base, ignore_errors=True)


def restic_forget(env: dict, policy: dict) -> dict:
    """host -> (Counter of kept (time, reasons)), Counter of removed times)."""
    out = subprocess.run(["restic", "forget", "--dry-run", "--json", *restic_args(policy)],
                         env=env, check=True, timeout=60, capture_output=True, text=True)
    result = {}
    for group in json.loads(out.stdout):
        kept = Counter()
        for reason in group["reasons"]:
            when = datetime.fromisoformat(reason["snapshot"]["time"]).astimezone(UTC)
            why = tuple(sorted(m.replace(" snapshot", " backup") for m in reason["matches"]))
            kept[(when, why)] += 1
        removed = Counter(datetime.fromisoformat(s["time"]).astimezone(UTC)
                          for s in group.get("remove") or [])
        result[group["host"]] = (kept, removed)
    return result


def pyvol_forget(times: list[str], policy: dict):
    verdicts = keep([(f"id{i:03d}", t(x)) for i, x in enumerate(times)], Policy.parse(policy))
    kept = Counter((v.time, tuple(sorted(v.reasons))) for v in verdicts if v.kept)
    removed = Counter(v.time for v in verdicts if not v.kept)
    return kept, removed


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: " ".join(restic_args(p)))
def test_the_same_times_give_restics_kept_set_and_reasons(restic_repo, policy):
    theirs = restic_forget(restic_repo, policy)
    assert set(theirs) == set(GROUPS)
    for host, times in GROUPS.items():
        kept, removed = pyvol_forget(times, policy)
        assert (kept, removed) == theirs[host], (host, sorted(kept), sorted(theirs[host][0]))
        assert sum(kept.values()) + sum(removed.values()) == len(times)


def test_restics_documented_sunday_example_keeps_the_last_four_sundays():
    verdicts = keep([(str(i), t(x)) for i, x in enumerate(SUNDAYS)], Policy(daily=4))
    assert [v.time for v in verdicts if v.kept] == [t(x) for x in SUNDAYS[:-5:-1]]
    assert all(v.reasons == ["daily backup"] for v in verdicts if v.kept)


def test_restics_documented_hundred_years_of_dailies():
    """"forget --keep-daily 7 --keep-weekly 5 --keep-monthly 12 --keep-yearly 75 would keep the
    most recent 7 daily snapshots and 4 last-day-of-the-week ones (since the 7 dailies already
    include 1 weekly). Additionally, 12 or 11 last-day-of-the-month snapshots [...] And
    finally 75 or 74 last-day-of-the-year snapshots" (restic's documentation)."""
    end = t("2026-05-31 03:00:00")  # a Sunday: the 7 dailies are one ISO week
    assert end.isoweekday() == 7
    items = [(f"{i:05d}", end - timedelta(days=i)) for i in range(365 * 100 + 25)]
    verdicts = keep(items, Policy(daily=7, weekly=5, monthly=12, yearly=75),
                    now=end + timedelta(days=1))
    kept = [v for v in verdicts if v.kept]

    def first_kept_by(rule):  # kept by this rule and by none of the finer ones
        finer = ("daily", "weekly", "monthly", "yearly")[:("daily", "weekly", "monthly",
                                                           "yearly").index(rule)]
        return [v for v in kept if f"{rule} backup" in v.reasons
                and not any(f"{f} backup" in v.reasons for f in finer)]

    assert len(first_kept_by("daily")) == 7
    assert len(first_kept_by("weekly")) == 4
    monthly, yearly = len(first_kept_by("monthly")), len(first_kept_by("yearly"))
    assert monthly in (11, 12)
    # each count is spent in full: a bucket's newest item counts even when a finer rule
    # kept it too (the doc's "75 or 74" yearly ones: here 2026's newest is a daily one and
    # 2025's is December's monthly one, so 73 are kept by the yearly rule alone)
    for rule, n in (("daily", 7), ("weekly", 5), ("monthly", 12), ("yearly", 75)):
        assert sum(f"{rule} backup" in v.reasons for v in kept) == n
    assert yearly == 73
    assert len(kept) == 7 + 4 + monthly + yearly
    # each yearly one is the last day of its year (the newest in its bucket)
    assert all(v.time.month == 12 and v.time.day == 31 for v in first_kept_by("yearly"))


def test_buckets_are_utc_days_whatever_the_offset_of_the_times_given():
    """23:30 and 00:30 UTC are two days, even given as +02:00 times of one local day."""
    plus2 = timezone(timedelta(hours=2))
    items = [("a", datetime(2026, 6, 2, 1, 30, tzinfo=plus2)),   # 1 June 23:30 UTC
             ("b", datetime(2026, 6, 2, 2, 30, tzinfo=plus2))]   # 2 June 00:30 UTC
    assert [v.kept for v in keep(items, Policy(daily=2))] == [True, True]
    assert all(v.time.tzinfo == UTC for v in keep(items, Policy(daily=2)))


def test_ties_are_ordered_by_id_so_the_answer_never_changes():
    same = t("2026-01-01 10:00:00")
    for order in (["b", "a", "c"], ["c", "b", "a"]):
        verdicts = keep([(i, same) for i in order], Policy(last=1))
        assert [(v.id, v.kept) for v in verdicts] == [("c", True), ("b", False), ("a", False)]


def test_go_month_arithmetic_for_within():
    assert Duration(months=1).before(t("2026-03-31 10:00:00")) == t("2026-03-03 10:00:00")
    assert Duration(years=1).before(t("2028-02-29 00:00:00")) == t("2027-03-01 00:00:00")
    assert Duration(days=1, hours=2).before(t("2026-01-01 01:00:00")) == \
        t("2025-12-30 23:00:00")
    assert Duration(years=5000).before(t("2026-01-01 00:00:00")).year == 1


@pytest.mark.parametrize("options, named", [
    ({"daily": -1}, "--keep-daily -1: accepted for --keep-daily is a whole number"),
    ({"daily": "abc"}, "--keep-daily 'abc': accepted"),
    ({"daily": "1.5"}, "--keep-daily '1.5'"),
    ({"last": True}, "--keep-last True"),
    ({"last": 10 ** 9}, "from 0 to 1000000"),
    ({}, "no retention policy given: accepted is at least one of --keep-last"),
    ({"last": 0, "daily": "0"}, "no retention policy given"),
    ({"within": "2w"}, "--keep-within '2w': accepted for --keep-within is a duration"),
    ({"within": "0d"}, "it is zero"),
    ({"within_daily": "1d1d"}, "'d' is given twice"),
    ({"within": 5}, "--keep-within 5"),
    ({"daly": 3}, "unknown retention option(s) 'daly': accepted are --keep-last"),
    ([1], "invalid retention policy: accepted is an object"),
])
def test_bad_policies_are_refused_naming_what_is_accepted(options, named):
    with pytest.raises(InvalidInput) as e:
        Policy.parse(options)
    assert named in str(e.value)


def test_a_policy_reads_back_and_says_what_it_keeps():
    p = Policy.parse({"last": "2", "daily": 7, "within_weekly": "1m", "within": "1y2d"})
    assert p.as_dict() == {"last": 2, "daily": 7, "within": "1y2d", "within_weekly": "1m"}
    assert Policy.parse(p.as_dict()) == p
    assert str(p) == ("keep 2 latest, 7 daily backups, weekly backups within 1m and all "
                      "backups within 1y2d of the newest")
