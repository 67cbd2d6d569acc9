"""Fuzz every route of both APIs against one real daemon, then check it still tells the truth.

Every route the app serves (read from its URL map, so a new route cannot be missed: see
``test_every_route_is_fuzzed``) gets random methods, path parts, query strings and bodies,
sent the way dockerd sends them (no Content-Type, Docker's Accept header). Whatever comes in,
the answer must be below 500, carry no traceback, be JSON (with an ``Err`` string on error)
on Docker's endpoints, and the same daemon must keep answering. Afterwards `pyvol ls --json`
must agree with the kernel's mounts and loop devices.

Valid names come from small pools, so the fuzz also creates, mounts, snapshots, backs up and
restores real (small) volumes. Repository URLs are only ever invalid ones or file:// URLs of
directories under the test's own temporary directory: random text never holds "://", so it
can never name a repository anywhere else (or S3).

The number of examples comes from PYVOL_FUZZ_EXAMPLES (default 300, a few minutes). The long
fuzz, on this host:

    PYVOL_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest tests/test_fuzz_api.py

(or ``PYVOL_FUZZ_EXAMPLES=10000 scripts/test.sh tests/test_fuzz_api.py``, which installs first).
"""

import json
import os
import shutil
import tempfile
import time
import types
import urllib.parse
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import Daemon, loop_devices_under, release
from pyvol import mountinfo
from pyvol.api import DOCKER_ENDPOINTS, create_app

EXAMPLES = int(os.environ.get("PYVOL_FUZZ_EXAMPLES", "300"))
DOCKER_ACCEPT = "application/vnd.docker.plugins.v1.2+json"


@pytest.fixture(scope="module")
def fuzz():
    """One daemon for the whole fuzz (loop backend only, small default size), a file://
    repository next to it, and one real backup in it to inspect, verify and restore."""
    base = Path(tempfile.mkdtemp(prefix="pyvol-fz-", dir="/tmp"))
    repo = base / "repo"
    repo.mkdir()
    d = Daemon(base / "root", base / "pyvol.sock",
               env={"PYVOL_BACKENDS": "loop", "PYVOL_LOOP_DEFAULT_SIZE": "32M"}).start()
    try:
        d.api.ok("/VolumeDriver.Create", {"Name": "fz-a", "Opts": {"size": "16M"}})
        out = d.cli("backup", "create", "fz-a", "--dest", f"file://{repo}", "--json")
        ns = types.SimpleNamespace(daemon=d, base=base, repo=f"file://{repo}",
                                   backup=json.loads(out.stdout)["url"])
        URLS[:] = [ns.repo, ns.repo, ns.backup, ns.backup.replace("#fz-a/", "#fz-b/"),
                   ns.repo + "#fz-a/20200101T000000Z-deadbeef", ns.repo + "#../x/y"]
        yield ns
    finally:
        d.stop()
        release(base)
        shutil.rmtree(base, ignore_errors=True)


# --- what to send --------------------------------------------------------------------------

def no_url(s) -> bool:
    """Random text never names a repository: without "://" no target can open."""
    return "://" not in (s if isinstance(s, str) else s.decode("latin-1"))


texts = st.text(max_size=40).filter(no_url)
odd = st.sampled_from(["", " ", "..", ".", "/", "a/b", "../../tmp/evil", "a\x00b", "a\n", "nl\n",
                       "-x", "x" * 128, "x" * 129, "x" * 300, "vol@snap", "@", "a@b@c", "é",
                       "\u202e", "%00", "%2F", "\ud800", "a\udfffb", "\U0001f600"])
# pools of valid names, so the fuzz also reaches real volumes, snapshots and mounts
def mostly(valid, *others):
    """``valid`` three times in four; otherwise one of ``others``. (one_of(v, v, v, o) would
    not do: one_of drops repeated branches.)"""
    return st.sampled_from([valid, valid, valid, st.one_of(*others)]).flatmap(lambda s: s)


names = mostly(st.sampled_from(["fz-a", "fz-b", "fz-c"]), odd, texts)
snap_names = mostly(st.sampled_from(["s1", "s2", "backup-x"]), odd, texts)
refs = st.one_of(st.builds(lambda v, s: f"{v}@{s}", st.sampled_from(["fz-a", "fz-b", "nope"]),
                           st.sampled_from(["s1", "s2", "nope"])), names)
mount_ids = mostly(st.sampled_from(["id1", "id2", ""]),
                   st.sampled_from(["x" * 256, "x" * 257, "id\n", "a b"]), texts)
sizes = mostly(st.sampled_from(["16M", "20M", "32M", "300M", "16MiB", " 24 M "]),
               st.sampled_from(["0", "0G", "0.1", "9" * 400, "9" * 400 + "G", "1e3M", "-1G",
                                "1T", "8192P", "8191P", "1.5", "0x10", "١٦M", "NaN", "inf"]),
               texts)
# only URLs that cannot reach beyond our directory: invalid ones, and (filled in by the
# fixture) file:// URLs of the repository and of backups in it, real and made up
URLS: list[str] = []
bad_urls = st.sampled_from(["", "x", "://", "file://", "file://host/x", "file:relative", "s3://",
                            "s3:///x", "ebs://", "ebs://us-east-1", "ebs://us-east-1/snap-1",
                            "http://x/y", "file:///x?y", "file:///x#y", "#", "x#y/z",
                            "ftp://x", "\ud800://x"])
urls = mostly(st.integers(0, 99).map(lambda i: URLS[i % len(URLS)]), bad_urls, texts)
json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10 ** 300)
                | st.floats() | texts | odd)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8)


def field(values):
    return mostly(values, json_values)


opts = mostly(
    st.fixed_dictionaries({}, optional={"size": sizes,
                                        "fs": st.sampled_from(["ext4", "ext4", "xfs"])}),
    st.fixed_dictionaries({"from-snapshot": st.sampled_from(["fz-a@s1", "fz-b@s2", "fz-c@s1"])},
                          optional={"size": sizes}),
    st.fixed_dictionaries({"from-backup": urls}, optional={"size": sizes}),
    st.none(), json_values,
    st.dictionaries(st.sampled_from(["size", "fs", "backend", "from-snapshot", "from-backup",
                                     "x", "", "\ud800"]),
                    st.one_of(sizes, st.sampled_from(["ext4", "xfs", "btrfs", "loop", "nfs",
                                                      "fz-a@s1", "fz-b@s2"]), urls, json_values),
                    max_size=3))

# route -> (fields of a JSON body, query parameters), for every route of create_app
NAME = {"Name": names}
ROUTES = {
    "/Plugin.Activate": ({}, {}),
    "/VolumeDriver.Create": ({"Name": names, "Opts": opts}, {}),
    "/VolumeDriver.Remove": (NAME, {}),
    "/VolumeDriver.Mount": ({"Name": names, "ID": mount_ids}, {}),
    "/VolumeDriver.Unmount": ({"Name": names, "ID": mount_ids}, {}),
    "/VolumeDriver.Path": (NAME, {}),
    "/VolumeDriver.Get": (NAME, {}),
    "/VolumeDriver.List": ({}, {}),
    "/VolumeDriver.Capabilities": ({}, {}),
    "/pyvol/v1/info": ({}, {}),
    "/pyvol/v1/volumes": ({"Name": names, "Opts": opts}, {}),
    "/pyvol/v1/volumes/<name>": ({}, {}),
    "/pyvol/v1/volumes/<name>/mount": ({"ID": mount_ids}, {}),
    "/pyvol/v1/volumes/<name>/unmount": ({"ID": mount_ids}, {}),
    "/pyvol/v1/snapshots": ({}, {"volume": names}),
    "/pyvol/v1/volumes/<name>/snapshots": ({"Name": snap_names}, {}),
    "/pyvol/v1/snapshots/<ref>": ({}, {}),
    "/pyvol/v1/snapshots/<ref>/rollback": (
        {"DiscardCurrent": mostly(st.booleans(), json_values)}, {}),
    "/pyvol/v1/volumes/<name>/resize": ({"Size": sizes}, {}),
    "/pyvol/v1/volumes/<name>/changes": ({}, {"base": snap_names, "snap": snap_names}),
    "/pyvol/v1/volumes/<name>/claims": ({}, {}),
    "/pyvol/v1/volumes/<name>/claims/clear": ({"Host": field(texts)}, {}),
    "/pyvol/v1/schedules": ({}, {"volume": names}),
    "/pyvol/v1/volumes/<name>/schedules": (
        {"Opts": mostly(st.dictionaries(st.sampled_from(
            ["snapshot-every", "snapshot-keep", "backup-every", "backup-to", "backup-keep", "x"]),
            st.sampled_from(["1h", "30s", "0s", "1x", "24", "daily=7,weekly=4", "last=",
                             "file:///x", "s3://a:b@c/d"]) | texts, max_size=3))},
        {"what": st.sampled_from(["snapshot", "backup", "x"]) | texts}),
    "/pyvol/v1/backups": ({"Volume": refs, "Dest": urls}, {"repo": urls, "volume": names}),
    "/pyvol/v1/backup": ({}, {"url": urls}),
    "/pyvol/v1/backup/verify": ({"Url": urls}, {}),
    "/pyvol/v1/repository/gc": ({"Repo": urls}, {}),
    "/pyvol/v1/repository/forget": (
        {"Repo": urls, "Volume": names, "DryRun": st.booleans(), "Gc": st.booleans(),
         "Keep": mostly(st.dictionaries(
             st.sampled_from(["last", "daily", "weekly", "within", "within_daily", "x"]),
             st.sampled_from([1, 2, 0, -1, "3", "abc", "2d", "1y2m", "1w", "0d"]) | texts,
             max_size=3), json_values)}, {}),
    "/pyvol/v1/repository/init": ({"Repo": urls}, {}),
    "/pyvol/v1/restore": ({"Url": urls, "Name": names, "Size": sizes, "Backend": texts}, {}),
}
PATH_PARTS = {"name": names, "ref": refs}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO"]


def app_routes() -> dict[str, list[str]]:
    """Every rule the app serves, with its methods (HEAD is implied by GET)."""
    app = create_app(types.SimpleNamespace(volumes=None, snapshots=None, backups=None))
    routes: dict[str, list[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static":
            routes.setdefault(rule.rule, []).extend(sorted(rule.methods - {"HEAD"}))
    return routes


APP_ROUTES = app_routes()


def test_every_route_is_fuzzed():
    assert set(APP_ROUTES) == set(ROUTES), "add the new route to ROUTES"
    assert set(DOCKER_ENDPOINTS) <= set(APP_ROUTES)


def quoted(part) -> str:
    """A path part as a client would put it in a URL (lone surrogates become bad UTF-8)."""
    return urllib.parse.quote(part, safe="", errors="surrogatepass")


@st.composite
def requests(draw):
    rule = draw(mostly(st.sampled_from(sorted(ROUTES)),
                       st.sampled_from(["/", "/x", "/pyvol/v1", "/pyvol/v2/info",
                                        "/VolumeDriver.Explode"])))
    fields, params = ROUTES.get(rule, ({}, {}))
    path = rule
    for arg, values in PATH_PARTS.items():
        if f"<{arg}>" in path:
            path = path.replace(f"<{arg}>", quoted(draw(st.one_of(values, odd))))
    method = draw(mostly(st.sampled_from(APP_ROUTES.get(rule, ["GET"])),
                         st.sampled_from(METHODS)))

    query = draw(st.fixed_dictionaries({}, optional={
        **params, "stream": st.sampled_from(["1", "0", ""]) | texts, "x": texts}))
    query_text = urllib.parse.urlencode(query, errors="surrogatepass")
    if draw(st.booleans()) and draw(st.booleans()):  # now and then, a raw query string
        raw = draw(st.text(max_size=60).filter(lambda t: no_url(urllib.parse.unquote(t))))
        query_text = urllib.parse.quote(raw, safe="=&;+%/?:@!$'()*,[]")  # structure kept
    body = draw(mostly(
        st.fixed_dictionaries({k: field(v) for k, v in fields.items()} if fields else {},
                              optional={"x": json_values})
        .map(lambda d: json.dumps(d).encode()),
        st.fixed_dictionaries({k: v for k, v in fields.items()})
        .map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200).filter(no_url),
        st.sampled_from([b"", b"null", b"{}", b"[]", b"{", b"\xff\xfe", b"NaN", b"1" * 5000]),
        st.integers(30, 40).map(lambda n: b"[" * n + b"]" * n),
        st.just(b"[" * 60000),
    ))
    headers = {"Accept": DOCKER_ACCEPT}
    ctype = draw(st.sampled_from([None, None, None, "application/json", "text/plain",
                                  "application/x-www-form-urlencoded",
                                  "multipart/form-data; boundary=x"]))
    if ctype:
        headers["Content-Type"] = ctype
    return rule, method, path, query_text, body, headers


def check_answer(method: str, path: str, resp: httpx.Response) -> None:
    what = f"{method} {path} -> {resp.status_code}: {resp.text[:500]!r}"
    assert resp.status_code < 500, what
    assert "Traceback" not in resp.text and 'File "' not in resp.text, what
    if method == "HEAD":
        return  # no body, by HTTP's rules
    if resp.headers.get("content-type", "").startswith("application/x-ndjson"):
        lines = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
        assert lines and isinstance(lines[-1], dict), what
        outcome = lines[-1]
        assert "result" in outcome or isinstance(outcome.get("Err"), str), what
        assert "internal error" not in outcome.get("Err", ""), what
        return
    data = resp.json()  # every answer of the daemon's own is JSON
    if resp.status_code != 200:
        assert isinstance(data, dict) and isinstance(data.get("Err"), str) and data["Err"], what
    if path in DOCKER_ENDPOINTS:
        assert isinstance(data, dict), what
        if path == "/Plugin.Activate" and "Implements" in data:
            assert data == {"Implements": ["VolumeDriver"]}, what
        else:
            assert isinstance(data.get("Err"), str), what
    if isinstance(data, dict) and data.get("Err"):
        assert "internal error" not in data["Err"], what


def outcome(resp: httpx.Response) -> str:
    """"ok" or "refused", for the statistics (--hypothesis-show-statistics)."""
    try:
        data = resp.json()
    except ValueError:
        return "stream" if resp.status_code == 200 else "?"
    return "refused" if resp.status_code != 200 or (
        isinstance(data, dict) and data.get("Err")) else "ok"


@settings(max_examples=EXAMPLES, deadline=None,
          # the daemon is module-scoped on purpose (one daemon across all examples); a
          # real mkfs or backup makes some examples slow
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(req=requests())
def test_fuzzed_requests_on_every_route(fuzz, req):
    rule, method, path, query, body, headers = req
    d = fuzz.daemon
    url = path + ("?" + query if query else "")
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://plugin",
                      timeout=120) as http:
        resp = http.request(method, url, content=body, headers=headers)
        check_answer(method, path, resp)
        event(f"{method} {rule} -> {resp.status_code} {outcome(resp)}")
        info = http.get("/pyvol/v1/info")
        assert info.status_code == 200 and info.json()["pid"] == d.proc.pid, info.text
    assert d.proc.poll() is None, d.log()


def test_after_fuzzing_records_agree_with_the_kernel(fuzz):
    """`pyvol ls --json` against /proc/self/mountinfo and the loop devices (runs after the
    fuzz, on the same daemon)."""
    d = fuzz.daemon
    root = d.root
    pool_mount, pool_file = root / "loop" / "pool", root / "loop" / "pool.img"
    for attempt in range(20):  # a detached loop device can take a moment to go
        vols = json.loads(d.cli("ls", "--json").stdout)
        mounted = {e.mount_point for e in mountinfo.under(root)}
        problems = []
        in_use = set()
        for v in vols:
            mp = str(root / "mounts" / v["Name"])
            if v["Status"]["mounts"] > 0:
                in_use.add(v["Name"])
                if mp not in mounted or v["Mountpoint"] != mp:
                    problems.append(f"{v['Name']} is listed as mounted but {mp} is not")
            elif mp in mounted or v["Mountpoint"]:
                problems.append(f"{v['Name']} is listed with no mounts but {mp} is mounted")
        expected = {str(pool_mount)} | {str(root / "mounts" / n) for n in in_use}
        problems += [f"mount {m} belongs to no listed, mounted volume"
                     for m in sorted(mounted - expected)]
        images = {str(pool_file)} | {str(root / "loop" / "pool" / "volumes" / f"{n}.img")
                                     for n in in_use}
        problems += [f"loop device {dev} is bound to {f}, which no mounted volume explains"
                     for dev, f in sorted(loop_devices_under(root).items()) if f not in images]
        if not problems:
            break
        time.sleep(0.5)
    assert not problems, "\n".join(problems)
    assert d.proc.poll() is None
