"""The `pyvol` CLI against a running daemon: tables for people, JSON for scripts."""

import json
import os


def test_volume_lifecycle_through_the_cli(shared_daemon):
    cli = shared_daemon.cli
    assert cli("create", "clivol", "--size", "64M", "--opt", "fs=ext4").stdout.strip() == "clivol"
    table = cli("ls").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "BACKEND", "SIZE"]
    assert "clivol" in table and "64M" in table
    vol = json.loads(cli("inspect", "clivol", "--json").stdout)
    assert vol["Status"]["size"] == 64 << 20 and vol["Status"]["backend"] == "loop"

    mp = cli("mount", "clivol").stdout.strip()
    with open(os.path.join(mp, "f"), "w") as f:
        f.write("v1")
    assert cli("snapshot", "create", "clivol", "--name", "s1").stdout.strip() == "clivol@s1"
    auto = json.loads(cli("snapshot", "create", "clivol", "--json").stdout)
    assert auto["Ref"].startswith("clivol@") and auto["Name"] != "s1"
    snaps = json.loads(cli("snapshot", "ls", "clivol", "--json").stdout)
    assert [s["Name"] for s in snaps][0] == "s1" and len(snaps) == 2
    assert "clivol@s1" in cli("snapshot", "ls").stdout
    assert json.loads(cli("snapshot", "inspect", "clivol@s1", "--json").stdout)["Volume"] == "clivol"
    cli("umount", "clivol")

    cli("create", "clone", "--from-snapshot", "clivol@s1")
    mp2 = cli("mount", "clone").stdout.strip()
    assert open(os.path.join(mp2, "f")).read() == "v1"
    cli("umount", "clone")
    cli("snapshot", "rm", "clivol@s1")
    assert "clivol@s1" not in cli("snapshot", "ls").stdout
    cli("rm", "clone")
    cli("rm", "clivol")
    assert json.loads(cli("ls", "--json").stdout) == []


def test_cli_errors_exit_nonzero_with_the_daemons_message(shared_daemon):
    r = shared_daemon.cli("create", "bad name", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("error: invalid volume name 'bad name'")
    assert "Traceback" not in r.stderr
    r = shared_daemon.cli("rm", "missing", check=False)
    assert r.returncode == 1 and "no such volume: missing" in r.stderr
    r = shared_daemon.cli("snapshot", "rm", "novolumeref", check=False)
    assert r.returncode == 1 and "VOLUME@SNAPSHOT" in r.stderr
    r = shared_daemon.cli("create", "x", "--opt", "novalue", check=False)
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr


def test_info_shows_backends_and_pool_usage(shared_daemon):
    info = json.loads(shared_daemon.cli("info", "--json").stdout)
    assert info["default_backend"] == "loop"
    loop = info["backends"]["loop"]
    assert loop["available"] and loop["pool_size"] > 19 << 30 and loop["pool_used"] > 0
    assert "loop" in shared_daemon.cli("info").stdout


def test_cli_without_a_daemon_says_how_to_start_one(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pyvol", "--socket", str(tmp_path / "none.sock"),
                        "ls"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "cannot reach the pyvol daemon" in r.stderr and "pyvol daemon" in r.stderr


def test_every_line_the_daemon_writes_is_one_json_event(daemon):
    """Docker files a managed plugin's stderr into its own log: one parseable line per event,
    gunicorn's own lines included."""
    import json

    daemon.api.ok("/VolumeDriver.Create", {"Name": "logged", "Opts": {"size": "64M"}})
    daemon.api.err("/VolumeDriver.Create", {"Name": "bad/name"})
    daemon.cli("snapshot", "create", "logged")
    daemon.stop()
    lines = [ln for ln in daemon.log_path.read_text().splitlines() if ln.strip()]
    events = [json.loads(ln) for ln in lines]  # fails on any line that is not JSON
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in events)
    loggers = {e["logger"] for e in events}
    assert "gunicorn.error" in loggers and "pyvol.volumes" in loggers
    assert any(e["msg"] == "snapshot created" and e["volume"] == "logged" for e in events)
