"""Bad input on every endpoint: a clear Err, never a traceback, nothing outside the root."""

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvol.api import DOCKER_ENDPOINTS
from pyvol.errors import InvalidInput
from pyvol.names import NAME_RE
from pyvol.units import parse_size

CASES = [
    # (endpoint, raw body, words the Err must contain)
    ("/VolumeDriver.Create", b"{not json", "malformed JSON"),
    ("/VolumeDriver.Create", b"[1, 2]", "JSON object"),
    ("/VolumeDriver.Create", b'"str"', "JSON object"),
    ("/VolumeDriver.Create", b"{}", "missing field 'Name'"),
    ("/VolumeDriver.Create", b'{"Name": 5}', "invalid volume name"),
    ("/VolumeDriver.Create", b'{"Name": "../../etc"}', "invalid volume name"),
    ("/VolumeDriver.Create", b'{"Name": "a/b"}', "invalid volume name"),
    ("/VolumeDriver.Create", b'{"Name": ".hidden"}', "invalid volume name"),
    ("/VolumeDriver.Create", json.dumps({"Name": "x" * 129}).encode(), "invalid volume name"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"size": "10X"}}', "invalid size"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"size": "-1G"}}', "invalid size"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"size": ""}}', "invalid size"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"size": "1T"}}', "larger than the loop pool"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"size": "1M"}}', "too small"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"colour": "red"}}',
     "unknown option colour: accepted are backend, backup-cron, backup-every, backup-keep, "
     "backup-to, from-backup, from-snapshot, fs, size, snapshot-cron, snapshot-every, "
     "snapshot-keep"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"size": 5}}', "map of option names to strings"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": [1]}', "map of option names to strings"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"fs": "btrfs"}}', "accepted are ext4, xfs"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"backend": "nope"}}', "accepted are loop"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"from-snapshot": "x"}}', "VOLUME@SNAPSHOT"),
    ("/VolumeDriver.Create", b'{"Name": "b1", "Opts": {"from-snapshot": "x@y"}}', "no such volume: x"),
    ("/VolumeDriver.Mount", b'{"Name": "nope", "ID": "1"}', "no such volume: nope"),
    ("/VolumeDriver.Mount", b'{"Name": "nope", "ID": 7}', "invalid mount ID"),
    ("/VolumeDriver.Remove", b'{"Name": "nope"}', "no such volume: nope"),
    ("/VolumeDriver.Path", b'{"Name": "nope"}', "no such volume: nope"),
    ("/VolumeDriver.Get", b'{"Name": "../x"}', "invalid volume name"),
    ("/VolumeDriver.Create", b'{"Name": "' + b"a" * 70000 + b'"}', "too large"),
]


@pytest.mark.parametrize("path,body,words", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_bad_input_gets_a_clear_err(shared_daemon, path, body, words):
    resp = shared_daemon.api.raw(path, body)
    data = resp.json()
    assert words in data["Err"], data
    assert "Traceback" not in resp.text
    listed = shared_daemon.api.ok("/VolumeDriver.List", {})["Volumes"]
    assert "b1" not in [v["Name"] for v in listed], "a refused create left a volume"


def test_duplicate_name_is_refused(shared_daemon):
    api = shared_daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "dup", "Opts": {"size": "32M"}})
    assert "already exists" in api.err("/VolumeDriver.Create", {"Name": "dup"})
    api.ok("/VolumeDriver.Remove", {"Name": "dup"})


def test_wrong_method_and_unknown_endpoint(shared_daemon):
    resp = shared_daemon.api.raw("/VolumeDriver.Create", method="GET")
    assert resp.status_code == 405 and "not allowed" in resp.json()["Err"]
    resp = shared_daemon.api.raw("/VolumeDriver.Explode", b"{}")
    assert resp.status_code == 404 and "/VolumeDriver.Create" in resp.json()["Err"]


names = st.one_of(
    st.text(max_size=140),
    st.sampled_from(["..", ".", "../../tmp/evil", "/etc", "a/../b", "a\x00b", "ok-name", "-x",
                     "x" * 128, "x" * 129, "vol@snap", " a", "a\n"]),
    st.integers(), st.none(), st.lists(st.integers(), max_size=2),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=3),
    max_leaves=8)
opts = st.one_of(
    st.none(), json_values,
    st.dictionaries(st.sampled_from(["size", "fs", "backend", "from-snapshot", "x", ""]),
                    st.one_of(st.text(max_size=12), st.sampled_from(["1G", "0", "1e3M", "16M"])),
                    max_size=3))
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"Name": names}, optional={"Opts": opts, "ID": names}).map(
        lambda d: json.dumps(d).encode()),
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(DOCKER_ENDPOINTS + ["/pyvol/v1/volumes", "/x", "/"]), body=bodies)
def test_fuzzed_requests_never_leak_a_traceback(shared_daemon, path, body):
    resp = shared_daemon.api.raw(path, body)
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    data = resp.json()
    if resp.status_code != 200:
        assert isinstance(data, dict) and data.get("Err"), (resp.status_code, data)
    if isinstance(data, dict) and data.get("Err"):
        assert resp.status_code < 500 or "internal error" not in data["Err"], data
    if path == "/VolumeDriver.Create" and not data.get("Err"):
        shared_daemon.api.ok("/VolumeDriver.Remove", {"Name": json.loads(body)["Name"]})


def test_fuzzing_touched_nothing_outside_the_root(shared_daemon):
    """Run after the fuzzer (same module daemon): only valid names exist under the root."""
    root = Path(shared_daemon.root)
    assert sorted(os.listdir(root.parent)) == sorted(
        [root.name, shared_daemon.socket.name, shared_daemon.log_path.name])
    for sub in ("mounts",):
        for entry in os.listdir(root / sub) if (root / sub).exists() else []:
            assert NAME_RE.fullmatch(entry), entry
    for entry in os.listdir(root / "locks"):
        assert entry.startswith("vol.") and NAME_RE.fullmatch(entry[4:-5]), entry
    assert not Path("/tmp/evil").exists() and not Path("/x").exists()


# Regressions from fuzzing both APIs: each of these answered 500 "internal error".

def control(d, method: str, path: str, body=None, params=None):
    """Call the control API as the CLI does; return (status, body as JSON)."""
    resp = d.api.http.request(method, "/pyvol/v1" + path, params=params,
                              content=b"" if body is None else
                              body if isinstance(body, bytes) else json.dumps(body).encode())
    assert "Traceback" not in resp.text and "internal error" not in resp.text, resp.text
    return resp.status_code, resp.json()


def test_deeply_nested_json_is_refused_not_500(shared_daemon):
    deep = b"[" * 60000  # the decoder gives up on depth before it sees the end
    balanced = b'{"Name": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    shallow_but_deep = b'{"Name": "b1", "Opts": ' + b'{"a": ' * 40 + b"1" + b"}" * 41
    for body in (deep, balanced, shallow_but_deep):
        for path in ("/VolumeDriver.Create", "/VolumeDriver.Mount", "/Plugin.Activate"):
            resp = shared_daemon.api.raw(path, body)
            assert resp.status_code == 200 and "nested" in resp.json()["Err"], resp.text
        status, data = control(shared_daemon, "POST", "/volumes", body)
        assert status == 400 and "nested" in data["Err"], data


@pytest.fixture(scope="module")
def backup_url(shared_daemon):
    """A real backup (of a small volume) in a file:// repository outside the daemon's dir."""
    repo = Path(tempfile.mkdtemp(prefix="pyvol-bad-repo-", dir="/tmp"))
    shared_daemon.api.ok("/VolumeDriver.Create", {"Name": "bsrc", "Opts": {"size": "16M"}})
    out = shared_daemon.cli("backup", "create", "bsrc", "--dest", f"file://{repo}", "--json")
    yield json.loads(out.stdout)["url"]
    shutil.rmtree(repo, ignore_errors=True)


def test_400_digit_size_is_refused(shared_daemon, backup_url):
    huge = "9" * 400
    err = shared_daemon.api.err("/VolumeDriver.Create", {"Name": "b1", "Opts": {"size": huge}})
    assert "too large" in err and "accepted" in err and len(err) < 400, err
    status, data = control(shared_daemon, "POST", "/volumes",
                           {"Name": "b1", "Opts": {"size": huge + "G"}})
    assert status == 400 and "too large" in data["Err"], data
    status, data = control(shared_daemon, "POST", "/restore",
                           {"Url": backup_url, "Name": "b1", "Size": huge})
    assert status == 400 and "too large" in data["Err"], data
    # sizes of other types, and JSON numbers too long for Python to read
    for size in (5, [1], {"a": "1G"}, True, 1.5):
        status, data = control(shared_daemon, "POST", "/restore",
                               {"Url": backup_url, "Name": "b1", "Size": size})
        assert status == 400 and "'Size'" in data["Err"] and "10G" in data["Err"], data
    status, data = control(shared_daemon, "POST", "/restore",
                           b'{"Url": "x", "Name": "b1", "Size": ' + b"9" * 5000 + b"}")
    assert status == 400 and "malformed JSON" in data["Err"], data
    for bad in ({"Url": 5, "Name": "b1"}, {"Url": backup_url, "Name": "b1", "Backend": ["x"]}):
        status, data = control(shared_daemon, "POST", "/restore", bad)
        assert status == 400 and "accepted is a string" in data["Err"], data
    status, data = control(shared_daemon, "POST", "/restore", {"Url": backup_url, "Name": {}})
    assert status == 400 and "invalid volume name" in data["Err"], data
    assert "b1" not in [v["Name"] for v in shared_daemon.api.ok("/VolumeDriver.List")["Volumes"]]


def test_size_zero_is_refused(shared_daemon, backup_url):
    for size in ("0", "0G", "0.0001", "000K"):
        err = shared_daemon.api.err("/VolumeDriver.Create", {"Name": "b1", "Opts": {"size": size}})
        assert "positive size" in err, err
    status, data = control(shared_daemon, "POST", "/restore",
                           {"Url": backup_url, "Name": "b1", "Size": "0"})
    assert status == 400 and "positive size" in data["Err"], data


def test_lone_surrogate_mount_id_is_refused(shared_daemon):
    api = shared_daemon.api
    api.ok("/VolumeDriver.Create", {"Name": "sur", "Opts": {"size": "16M"}})
    try:
        for path in ("/VolumeDriver.Unmount", "/VolumeDriver.Mount"):
            err = api.err(path, {"Name": "sur", "ID": "\ud800"})  # sent as "\ud800" escaped
            assert "not valid UTF-8" in err, err
        assert "not valid UTF-8" in api.err("/VolumeDriver.Create", {"Name": "x\udfff"})
        assert "not valid UTF-8" in api.err("/VolumeDriver.Create",
                                            {"Name": "b1", "Opts": {"\ud83d": "1G"}})
        status, data = control(shared_daemon, "POST", "/volumes/sur/unmount", {"ID": "\udc80"})
        assert status == 400 and "not valid UTF-8" in data["Err"], data
        assert api.ok("/VolumeDriver.Get", {"Name": "sur"})["Volume"]["Status"]["mounts"] == 0
    finally:
        api.ok("/VolumeDriver.Remove", {"Name": "sur"})


def raw_http(sock_path, request: bytes, shut_write: bool = False) -> tuple[int, bytes]:
    """Send raw bytes on the daemon's socket; return the answer's status and body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(sock_path))
        s.sendall(request)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():  # the answer's own chunks
        out, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, body


def chunked(path: str, chunks: bytes, close: bool = True) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: plugin\r\nTransfer-Encoding: chunked\r\n"
            "Accept: application/vnd.docker.plugins.v1.2+json\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + chunks


def test_malformed_chunked_body_is_refused(shared_daemon):
    sock = shared_daemon.socket
    bad_bodies = [
        b"zz\r\n{}\r\n0\r\n\r\n",            # chunk size not hex
        b"2\r\n{}XX0\r\n\r\n",               # chunk not ended by CRLF
        b"2;\x01=\r\n{}\r\n0\r\n\r\n",       # bad chunk extension
    ]
    for body in bad_bodies:
        for path, ok_status in (("/VolumeDriver.Create", 200), ("/pyvol/v1/volumes", 400)):
            status, answer = raw_http(sock, chunked(path, body))
            assert status == ok_status, (body, status, answer)
            err = json.loads(answer)["Err"]
            assert "malformed request body" in err, err
    # the body ends before its chunks do
    status, answer = raw_http(sock, chunked("/VolumeDriver.Create", b"10\r\n{}"), shut_write=True)
    assert status == 200 and "malformed request body" in json.loads(answer)["Err"], answer
    # well-formed chunks (Go's client sends them for bodies of unknown length) still work
    status, answer = raw_http(sock, chunked("/VolumeDriver.Get", b'4\r\n{"Na\r\n'
                                            b'c\r\nme": "nope"}\r\n0\r\n\r\n'))
    assert status == 200 and json.loads(answer)["Err"] == "no such volume: nope", answer
    # a bad body on a connection kept alive closes it after the answer: no stray bytes
    status, answer = raw_http(sock, chunked("/VolumeDriver.List", b"zz\r\n{}\r\n0\r\n\r\n",
                                            close=False))
    assert status == 200 and "malformed request body" in json.loads(answer)["Err"], answer
    assert shared_daemon.api.raw("/pyvol/v1/info", method="GET").json()["pid"] == \
        shared_daemon.proc.pid


def test_trailing_newline_names_are_refused(shared_daemon):
    """Waits on manager.py's NAME_RE/SNAP_RE/MOUNT_ID_RE using fullmatch (and unmount
    checking the mount ID as mount does): '$' matches before a final newline."""
    api = shared_daemon.api
    listed = lambda: [v["Name"] for v in api.ok("/VolumeDriver.List")["Volumes"]]  # noqa: E731
    try:
        assert "invalid volume name" in api.err("/VolumeDriver.Create",
                                                {"Name": "nl\n", "Opts": {"size": "16M"}})
    finally:
        if "nl\n" in listed():
            api.ok("/VolumeDriver.Remove", {"Name": "nl\n"})
    api.ok("/VolumeDriver.Create", {"Name": "tnl", "Opts": {"size": "16M"}})
    try:
        status, data = control(shared_daemon, "POST", "/volumes/tnl/snapshots", {"Name": "s\n"})
        assert status == 400 and "invalid snapshot name" in data["Err"], data
        mount = api.post("/VolumeDriver.Mount", {"Name": "tnl", "ID": "id\n"})
        if not mount["Err"]:
            api.ok("/VolumeDriver.Unmount", {"Name": "tnl", "ID": "id\n"})
        assert "invalid mount ID" in mount["Err"], mount
        assert "invalid mount ID" in api.err("/VolumeDriver.Unmount", {"Name": "tnl", "ID": "id\n"})
    finally:
        api.ok("/VolumeDriver.Remove", {"Name": "tnl"})  # its snapshots go with it


def test_options_and_odd_methods_answer_json(shared_daemon):
    for path, method in (("/VolumeDriver.Create", "OPTIONS"), ("/pyvol/v1/info", "OPTIONS"),
                         ("/pyvol/v1/volumes", "PATCH"), ("/VolumeDriver.List", "PUT")):
        resp = shared_daemon.api.raw(path, b"", method=method)
        assert resp.status_code == 405, (path, method, resp.text)
        assert "not allowed" in resp.json()["Err"] and "accepted is" in resp.json()["Err"]


@pytest.mark.parametrize("text,value", [
    ("1.5T", 3 << 39), ("0.5K", 512), ("1.0000000001K", 1024), ("8191P", 8191 << 50),
    (str((1 << 63) - 1), (1 << 63) - 1), ("0.1", None), ("1." + "9" * 60000 + "K", 2047),
    ("000000000000000000000000000001G", 1 << 30),
])
def test_parse_size_is_exact(text, value):
    """Read as integers and fractions, never floats: any length is exact or refused."""
    if value is None:
        with pytest.raises(InvalidInput, match="positive size"):
            parse_size(text)
    else:
        assert parse_size(text) == value


@pytest.mark.parametrize("text,words", [
    ("9" * 400, "too large"), ("9" * 60000 + "G", "too large"), ("8192P", "too large"),
    (str(1 << 63), "too large"), ("0", "positive size"), ("0G", "positive size"),
    ("١٦M", "K, M, G, T or P"), ("1" + " " * 60000 + "x", "K, M, G, T or P"),
    ([1], "K, M, G, T or P"),
])
def test_parse_size_refuses_quickly_and_says_what_is_accepted(text, words):
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=words) as e:
        parse_size(text)
    assert time.monotonic() - started < 1 and len(str(e.value)) < 300, str(e.value)
