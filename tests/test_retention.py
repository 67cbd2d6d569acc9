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
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import MemoryCgroup, workers
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

    def backup(host_when):
        host, when = host_when
        subprocess.run(["restic", "backup", "-q", "--host", host, "--time", when,
                        str(base / "data")], env=env, check=True, timeout=60,
                       capture_output=True)

    # each restic process spends most of its time deriving the key, so two at once halve the
    # wait; restic's backups take shared locks, so they may run side by side
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(backup, [(h, w) for h, times in GROUPS.items() for w in times]))
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


# `pyvol backup forget` against a daemon and a real repository. Real backups give the
# repository its chunks; further manifests, copies of a real one written with pyvol's own
# repository code at chosen times (each naming a snapshot of its own, as real ones do), give
# it a history of days and months that a test cannot wait for.

MiB = 1 << 20


def _backup(d, ref: str, dest: str) -> dict:
    return json.loads(d.cli("backup", "create", ref, "--dest", dest, "--json").stdout)


def _volume(d, name: str) -> str:
    d.api.ok("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "64M"}})
    return d.api.ok("/VolumeDriver.Mount", {"Name": name, "ID": "t"})["Mountpoint"]


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _plant(url: str, template_url: str, when: str, n: int, volume: str | None = None,
           host: str | None = None) -> str:
    """A manifest copied from ``template_url``'s, dated ``when`` (UTC); its backup URL."""
    from pyvol.backup.repo import Repository, split_backup_url

    repo = Repository.open(url, None)
    _, volkey, bid = split_backup_url(template_url)
    m = repo.get_manifest(volkey, bid)
    m.pop("url")
    stamp = t(when)
    m["id"] = stamp.strftime("%Y%m%dT%H%M%SZ") + f"-{n:08x}"
    m["created"] = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    m["source"]["snapshot"] = f"backup-{m['id']}"
    m["parent"] = None
    if volume:
        m["volume"] = volume
    if host:
        m["host"] = host
    return repo.put_manifest(m)


def _manifests(repo_dir: Path) -> set[str]:
    return {str(p.relative_to(repo_dir / "manifests"))
            for p in (repo_dir / "manifests").rglob("*") if p.is_file()}


def _kept(result: dict) -> dict[str, bool]:
    return {b["url"]: b["kept"] for g in result["groups"] for b in g["backups"]}


def _first_backup(d, workdir: Path) -> tuple[Path, str, str, dict]:
    """A file:// repository in ``workdir`` with one backup of a new volume v, holding 4 MiB:
    the repository's directory and URL, v's mount point, and the backup."""
    repo_dir = workdir / "repo"
    repo_dir.mkdir()
    url = f"file://{repo_dir}"
    mp = _volume(d, "v")
    _write(f"{mp}/a", os.urandom(4 * MiB))
    return repo_dir, url, mp, _backup(d, "v", url)


def test_forget_removes_only_what_the_policy_drops_per_volume_and_host(workdir, daemon):
    d = daemon
    repo_dir, url, mp, first = _first_backup(d, workdir)
    _write(f"{mp}/b", b"second" * MiB)
    second = _backup(d, "v", url)
    assert second["parent"] == first["id"]  # the parent goes below; its child must not care
    host = second["host"]
    planted = {when: _plant(url, second["url"], when, i) for i, when in enumerate([
        "2026-11-26 20:00:00", "2026-11-26 08:00:00", "2026-11-25 12:00:00",
        "2026-11-24 12:00:00", "2026-11-01 12:00:00", "2026-10-15 12:00:00"])}
    other = [_plant(url, second["url"], when, 10 + i, host="other-host")
             for i, when in enumerate(["2026-11-20 10:00:00", "2026-11-21 10:00:00"])]
    w = _plant(url, second["url"], "2026-09-01 10:00:00", 20, volume="w")
    before = _manifests(repo_dir)
    assert len(before) == 11
    policy = ["--keep-last", "1", "--keep-daily", "3", "--keep-monthly", "2"]

    # a dry run says what would go, and why the rest stays, and changes nothing
    dry = json.loads(d.cli("backup", "forget", url, *policy, "--dry-run", "--json").stdout)
    assert _manifests(repo_dir) == before
    assert dry["dry_run"] is True and dry["removed"] == 4 and dry["kept"] == 7
    # v on this host: the newest of today, of the 26th and of the 25th; October's newest
    expected = {second["url"]: True, first["url"]: False,
                planted["2026-11-26 20:00:00"]: True, planted["2026-11-26 08:00:00"]: False,
                planted["2026-11-25 12:00:00"]: True, planted["2026-11-24 12:00:00"]: False,
                planted["2026-11-01 12:00:00"]: False, planted["2026-10-15 12:00:00"]: True,
                # judged on their own: together with v's, neither would stay
                other[0]: True, other[1]: True, w: True}
    assert _kept(dry) == expected
    rows = {b["url"]: b for g in dry["groups"] for b in g["backups"]}
    assert rows[second["url"]]["reasons"] == ["last backup", "daily backup", "monthly backup"]
    assert rows[planted["2026-10-15 12:00:00"]]["reasons"] == ["monthly backup"]
    assert {(g["volume"], g["host"]) for g in dry["groups"]} == {
        ("v", host), ("v", "other-host"), ("w", host)}
    table = d.cli("backup", "forget", url, *policy, "--dry-run").stdout
    assert f"would remove  {first['url']}" in table and "no rule keeps it" in table
    assert "would remove 4 backups, kept 7" in table

    # --volume judges that volume only
    only_w = json.loads(d.cli("backup", "forget", url, "--volume", "w", "--keep-last", "1",
                              "--json").stdout)
    assert _kept(only_w) == {w: True} and _manifests(repo_dir) == before

    done = json.loads(d.cli("backup", "forget", url, *policy, "--gc", "--json").stdout)
    assert done["dry_run"] is False and _kept(done) == expected
    left = {u for u, k in expected.items() if k}
    assert {x["url"] for x in json.loads(d.cli("backup", "ls", url, "--json").stdout)} == left
    assert len(_manifests(repo_dir)) == 7
    # gc ran after it: the first backup's own chunks (fs metadata it alone had) are gone
    assert done["gc"]["backups"] == 7 and done["gc"]["chunks_deleted"] >= 1, done["gc"]
    # what stays is whole: the child of the removed parent verifies and restores
    d.cli("backup", "verify", second["url"])
    d.cli("restore", second["url"], "copy")
    mp2 = d.api.ok("/VolumeDriver.Mount", {"Name": "copy", "ID": "t"})["Mountpoint"]
    assert Path(mp2, "b").read_bytes() == b"second" * MiB
    # the newest backup's snapshot is still this host's base for the next incremental
    snaps = json.loads(d.cli("snapshot", "ls", "v", "--json").stdout)
    assert second["source"]["snapshot"] in {s["Name"] for s in snaps}
    assert _backup(d, "v", url)["incremental"] is True

    again = d.cli("backup", "forget", url, *policy)
    assert "removed 1 backups, kept 7" in again.stdout  # the new one displaced one daily
    assert f"pyvol backup gc {url}" in again.stdout


@pytest.mark.parametrize("args, named", [
    (["--keep-daily", "-1"], "invalid --keep-daily -1: accepted for --keep-daily is a whole "
                             "number of backups from 0 to 1000000"),
    (["--keep-daily", "abc"], "invalid --keep-daily 'abc': accepted"),
    ([], "no retention policy given: accepted is at least one of --keep-last"),
    (["--keep-last", "0"], "no retention policy given"),
    (["--keep-within", "1w"], "accepted for --keep-within is a duration such as 2d"),
])
def test_bad_policies_are_refused_before_the_repository_is_touched(shared_daemon, args, named):
    bad = shared_daemon.cli("backup", "forget", "file:///nonexistent/repo", *args, check=False)
    assert bad.returncode == 1 and named in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_forget_api_refuses_fields_of_the_wrong_shape(shared_daemon):
    api = shared_daemon.api
    for body, named in [
        ({"Repo": "file:///nonexistent", "Keep": [1]}, "accepted is an object of --keep-last"),
        ({"Repo": "file:///nonexistent", "Keep": {"last": 1}, "DryRun": "yes"},
         "invalid field 'DryRun': 'yes'; accepted is true or false"),
        ({"Repo": 5, "Keep": {"last": 1}}, "invalid field 'Repo'"),
        ({"Repo": "file:///x", "Volume": "../x", "Keep": {"last": 1}}, "invalid"),
    ]:
        r = api.raw("/pyvol/v1/repository/forget", json.dumps(body).encode())
        assert r.status_code == 400 and named in r.json()["Err"], (body, r.json())


def test_forget_takes_the_repository_lock_like_other_writers(workdir, daemon):
    from pyvol.backup.leases import Lease
    from pyvol.backup.repo import Repository

    d = daemon
    repo_dir = workdir / "repo"
    repo_dir.mkdir()
    url = f"file://{repo_dir}"
    _volume(d, "v")
    made = _backup(d, "v", url)
    _plant(url, made["url"], "2026-01-01 10:00:00", 1)
    lease = Lease(Repository.open(url, None), "shared")
    lease.acquire()  # a backup, say, running in this (live) process
    try:
        busy = d.cli("backup", "forget", url, "--keep-last", "1", check=False)
        assert busy.returncode == 1 and "is locked (shared lock held by host" in busy.stderr
        assert len(_manifests(repo_dir)) == 2
        # a dry run removes nothing and so waits for no one
        assert "would remove 1 backups" in d.cli("backup", "forget", url, "--keep-last", "1",
                                                 "--dry-run").stdout
    finally:
        lease.release()
    d.cli("backup", "forget", url, "--keep-last", "1")
    assert _manifests(repo_dir) == {f"v/{made['id']}"}


def test_a_forget_killed_halfway_leaves_a_readable_repository_and_the_rerun_finishes(workdir):
    from helpers import Daemon

    repo_dir = workdir / "repo"
    repo_dir.mkdir()
    url = f"file://{repo_dir}"
    root, sock = workdir / "root", workdir / "pyvol.sock"
    d = Daemon(root, sock, env={"PYVOL_CRASH_AT": "forget.deleting"}).start()
    try:
        mp = _volume(d, "v")
        _write(f"{mp}/data", os.urandom(2 * MiB))
        made = _backup(d, "v", url)
        older = [_plant(url, made["url"], f"2026-01-0{i + 1} 10:00:00", i) for i in range(5)]
        killed = d.cli("backup", "forget", url, "--keep-last", "2", check=False)
        assert killed.returncode == 1
        d.proc.wait(timeout=60)  # the crash point killed the whole daemon
        d.stop()
        assert len(_manifests(repo_dir)) == 5  # one of the four went, then the kill
        d = Daemon(root, sock).start()
        listed = [x["url"] for x in json.loads(d.cli("backup", "ls", url, "--json").stdout)]
        assert len(listed) == 5 and made["url"] in listed and older[4] in listed
        for u in listed:  # every backup left is whole
            d.cli("backup", "verify", u)
        # the dead daemon's lock is broken at once, and the rerun removes the rest
        d.cli("backup", "forget", url, "--keep-last", "2")
        assert {x["url"] for x in json.loads(d.cli("backup", "ls", url, "--json").stdout)} == \
            {made["url"], older[4]}
        assert not list((repo_dir / "locks").iterdir())
    finally:
        d.stop()


def _status(pid: int, field: str) -> int:
    """A memory size from /proc/PID/status (VmRSS now, VmHWM its peak so far), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def _big_manifest(url: str, template_url: str, tib: int, when: str, n: int) -> str:
    """A copy of ``template_url``'s manifest, dated ``when``, for a volume of ``tib`` TiB,
    each of whose pieces is one of the template's chunks; its backup URL."""
    from pyvol.backup.repo import Repository, split_backup_url

    repo = Repository.open(url, None)
    names = [name for _, name in
             repo.get_manifest(*split_backup_url(template_url)[1:])["chunks"]]
    big = _plant(url, template_url, when, n)
    m = repo.get_manifest(*split_backup_url(big)[1:])
    m.pop("url")
    m["source"]["size"] = tib << 40
    m["chunks"] = [[i, names[i % len(names)]] for i in range((tib << 40) // repo.chunk_size)]
    repo.put_manifest(m)
    return big


def test_big_manifests_are_read_in_the_job_process_not_the_worker(workdir, daemon):
    """A manifest lists every chunk of its volume (a 1 TiB volume's: 262,144, about 20 MB of
    JSON). `backup ls`, `forget` and `gc` read every manifest, `verify` (and a restore) one;
    the worker that answers Docker must get their heads and the unreferenced chunks, not
    the chunk maps, or its memory grows by tens of MiB a manifest (forget held them all)."""
    from pyvol.backup.repo import Repository, split_backup_url

    d = daemon
    _repo_dir, url, _mp, real = _first_backup(d, workdir)
    repo = Repository.open(url, None)
    _, volkey, bid = split_backup_url(real["url"])
    names = [n for _, n in repo.get_manifest(volkey, bid)["chunks"]]
    for n in range(4):
        big = _big_manifest(url, real["url"], 1, f"2026-11-0{n + 1} 12:00:00", n)

    rss_before = {pid: _status(pid, "VmRSS") for pid in workers(d)}
    listed = json.loads(d.cli("backup", "ls", url, "--json").stdout)
    assert sorted(b["chunk_count"] for b in listed) == [len(names)] + [262144] * 4
    verified = json.loads(d.cli("backup", "verify", big, "--json").stdout)
    assert verified["bad"] == [] and verified["chunks"] == len(set(names))
    result = json.loads(d.cli("backup", "forget", url, "--keep-last", "2", "--gc",
                              "--json").stdout)
    assert result["removed"] == 3 and result["kept"] == 2
    assert result["gc"]["backups"] == 2 and result["gc"]["chunks_deleted"] == 0
    assert result["gc"]["chunks_kept"] == len(set(names))
    grew = max(_status(pid, "VmHWM") - rss for pid, rss in rss_before.items())
    assert grew < 16 * MiB, f"a worker's memory grew by {grew / MiB:.0f} MiB"


def _daemon_into(d, cgroup: MemoryCgroup) -> None:
    """The daemon's master and workers into ``cgroup``: the job processes a worker starts
    from now on start there."""
    for pid in [d.proc.pid, *workers(d)]:
        cgroup.add(pid)


def test_manifests_are_parsed_one_at_a_time(workdir, daemon):
    """A parsed manifest is several times its JSON (a 2 TiB volume's: about 40 MB of JSON,
    about 150 MiB parsed and checked), and a hostile repository's may each be 256 MiB of it.
    Listings, retention and gc fetch two at a time, for an object store's latency, but
    parse one at a time: listing two such manifests costs the job process little more than
    listing one (the second's plaintext, waiting its turn). Both parsed at once, it cost
    about 210 MiB more."""
    d = daemon
    _repo_dir, url, _mp, real = _first_backup(d, workdir)
    peaks = []
    for n in range(2):
        _big_manifest(url, real["url"], 2, f"2026-11-0{n + 1} 12:00:00", n)
        with MemoryCgroup(4 << 30) as cgroup:
            _daemon_into(d, cgroup)
            listed = json.loads(d.cli("backup", "ls", url, "--json").stdout)
            assert len(listed) == n + 2
            peaks.append(cgroup.peak())
    assert peaks[1] - peaks[0] < 100 * MiB, \
        f"peaks with one and with two manifests: {[p // MiB for p in peaks]} MiB"


#: a stand-in for a database's memory: its pid into the cgroup, then that many bytes written
HOLDER = """import os, sys
open(sys.argv[1], "w").write(f"{os.getpid()}\\n")
held = b"x" * int(sys.argv[2])
print("holding", flush=True)
sys.stdin.read()
"""


def test_out_of_memory_the_kernel_kills_the_backup_job_not_a_database(workdir, daemon):
    """A job process's memory grows with what a repository makes it read: a manifest of a
    big volume (a 2 TiB volume's: about 150 MiB parsed and checked), or a hostile one of up
    to 256 MiB of JSON. When memory runs out, the kernel's OOM killer must take the job,
    which holds nothing a retry cannot rebuild, and not a database beside it that holds
    more memory. In a memory cgroup limited to 256 MiB, with the daemon and a process holding
    160 MiB in it, `backup ls` reads such a manifest: the job is killed and its call fails
    saying so, the holder lives, and the daemon answers. Without the limit, it lists."""
    d = daemon
    _repo_dir, url, _mp, real = _first_backup(d, workdir)
    _big_manifest(url, real["url"], 2, "2026-11-01 12:00:00", 0)
    with MemoryCgroup(256 * MiB) as cgroup:
        _daemon_into(d, cgroup)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(cgroup.path / "cgroup.procs"), str(160 * MiB)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "holding\n"
            listed = d.cli("backup", "ls", url, "--json", check=False)
            assert listed.returncode == 1, listed.stdout
            assert "ended without an answer (signal 9: the kernel's OOM killer" in \
                listed.stderr, listed.stderr
            assert "Traceback" not in listed.stderr
            assert holder.poll() is None, "the OOM killer took the database's stand-in"
            assert cgroup.oom_kills() == 1
            d.api.ok("/VolumeDriver.Get", {"Name": "v"})
        finally:
            holder.kill()
            holder.wait()
    listed = json.loads(d.cli("backup", "ls", url, "--json").stdout)
    assert len(listed) == 2 and max(b["chunk_count"] for b in listed) == 2 * 262144
