"""Bad input on every endpoint: a clear Err, never a traceback, nothing outside the root."""

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvol.api import DOCKER_ENDPOINTS
from pyvol.manager import NAME_RE

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
     "unknown option colour: accepted are backend, from-backup, from-snapshot, fs, size"),
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
            assert NAME_RE.match(entry), entry
    for entry in os.listdir(root / "locks"):
        assert entry.startswith("vol.") and NAME_RE.match(entry[4:-5]), entry
    assert not Path("/tmp/evil").exists() and not Path("/x").exists()
