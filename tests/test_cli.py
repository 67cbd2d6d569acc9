"""The `pyvol` CLI against a running daemon: tables for people, JSON for scripts; which
daemon it talks to; what `info` says about backups; `backup init`. (Tables are
tests/test_cli_tables.py.)"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import Daemon


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
    assert snaps[0]["Name"] == "s1" and len(snaps) == 2
    assert "clivol@s1" in cli("snapshot", "ls").stdout
    assert json.loads(cli("snapshot", "inspect", "clivol@s1", "--json").stdout)["Volume"] == "clivol"
    cli("umount", "clivol")

    cli("create", "clone", "--from-snapshot", "clivol@s1")
    mp2 = cli("mount", "clone").stdout.strip()
    assert Path(mp2, "f").read_text() == "v1"
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
    # a name in a URL's path reaches the daemon quoted, whatever it holds
    for name in ("bad name", "caf\u00e9", "a%2Fb", "a?b"):
        r = shared_daemon.cli("inspect", name, check=False)
        assert r.returncode == 1 and "invalid volume name" in r.stderr, (name, r.stderr)
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
    r = subprocess.run([sys.executable, "-m", "pyvol", "--socket", str(tmp_path / "none.sock"),
                        "ls"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1
    assert "cannot reach the pyvol daemon" in r.stderr and "pyvol daemon" in r.stderr


def test_every_line_the_daemon_writes_is_one_json_event(daemon):
    """Docker files a managed plugin's stderr into its own log: one parseable line per event,
    gunicorn's own lines included."""
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


# --socket, before or after the command; which daemon when none is named

def pyvol(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvol", *args], capture_output=True,
                          text=True, timeout=120, env=env, check=False)


def test_socket_is_accepted_after_any_command_and_wins_over_the_environment(shared_daemon,
                                                                            tmp_path):
    sock = str(shared_daemon.socket)
    shared_daemon.cli("create", "sockvol", "--size", "64M")
    env = {**os.environ, "PYVOL_SOCKET": str(tmp_path / "nobody.sock")}
    for args in (["snapshot", "create", "sockvol", "--socket", sock, "--name", "s", "--json"],
                 ["ls", "--socket", sock, "--json"],
                 ["inspect", "sockvol", "--socket", sock, "--json"],
                 ["snapshot", "ls", "--socket", sock, "--json"],
                 ["snapshot", "--socket", sock, "ls", "--json"],
                 ["--socket", str(tmp_path / "other.sock"), "ls", "--json", "--socket", sock]):
        r = pyvol(*args, env=env)
        assert r.returncode == 0, (args, r.stderr)
        assert json.loads(r.stdout), args
    r = pyvol("backup", "ls", f"file://{tmp_path}/absent", "--socket", sock, env=env)
    assert r.returncode == 1 and "does not exist" in r.stderr  # the daemon's answer
    r = pyvol("ls", env=env)  # PYVOL_SOCKET when no flag names one
    assert r.returncode == 1 and "nobody.sock" in r.stderr


def test_daemon_takes_socket_after_the_command(workdir):
    sock = workdir / "after.sock"
    env = {**os.environ, "PYVOL_SOCKET": str(workdir / "from-env.sock"),
           "PYVOL_LOOP_POOL_SIZE": "2G"}
    with open(workdir / "daemon.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pyvol", "daemon", "--root",
                                 str(workdir / "root"), "--socket", str(sock)], env=env,
                                stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, (workdir / "daemon.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the daemon never made --socket's socket"
            time.sleep(0.1)
        info = json.loads(pyvol("info", "--socket", str(sock), "--json").stdout)
        assert info["socket"] == str(sock) and info["pid"] == proc.pid
        assert not (workdir / "from-env.sock").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


PLUGINS = "/run/docker/plugins"


def in_own_plugin_dir(setup: str, *args) -> subprocess.CompletedProcess:
    """`pyvol ARGS` with neither --socket nor PYVOL_SOCKET, in a mount namespace of its own
    where /run/docker/plugins is an empty tmpfs that the shell lines ``setup`` fill (so the
    host's own daemons and other tests' plugins are out of sight)."""
    script = f"set -e; mkdir -p {PLUGINS}; mount -t tmpfs pyvol-test {PLUGINS}; {setup}; " \
             'exec "$@"'
    env = {k: v for k, v in os.environ.items() if k != "PYVOL_SOCKET"}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           "sh", sys.executable, "-m", "pyvol", *args], capture_output=True,
                          text=True, timeout=120, env=env, check=False)


def place(real, path: str) -> str:
    """Shell lines that make ``real`` (a socket) appear at ``path``."""
    return f"mkdir -p {os.path.dirname(path)}; touch {path}; mount --bind {real} {path}"


HOST = f"{PLUGINS}/pyvol.sock"
MANAGED_A = f"{PLUGINS}/0a1b2c3d4e5f/pyvol.sock"
MANAGED_B = f"{PLUGINS}/9f8e7d6c5b4a/pyvol.sock"


@pytest.fixture
def sockets(tmp_path):
    """A socket something listens on (never answering), and one nobody listens on any more
    (a dead daemon's file)."""
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    live.listen(8)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    yield tmp_path / "live.sock", tmp_path / "dead.sock"
    live.close()


def test_with_a_host_service_and_a_managed_plugin_the_cli_says_which_it_uses(shared_daemon,
                                                                             sockets):
    live, _dead = sockets
    r = in_own_plugin_dir(f"{place(shared_daemon.socket, HOST)}; {place(live, MANAGED_A)}",
                          "ls", "--json")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list)  # the host service (the real daemon) answered
    assert r.stderr.startswith("note: 2 pyvol daemons answer on this host")
    assert f"using the host service's {HOST}" in r.stderr and MANAGED_A in r.stderr
    assert "--socket" in r.stderr


def test_with_several_managed_plugins_and_no_host_service_the_cli_asks_for_socket(
        shared_daemon, sockets):
    live, _dead = sockets
    r = in_own_plugin_dir(f"{place(shared_daemon.socket, MANAGED_A)}; {place(live, MANAGED_B)}",
                          "ls")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: 2 managed pyvol plugins answer on this host")
    assert MANAGED_A in r.stderr and MANAGED_B in r.stderr and "--socket" in r.stderr
    assert "Traceback" not in r.stderr


def test_one_live_daemon_is_used_silently_and_a_dead_ones_socket_is_not_counted(
        shared_daemon, sockets):
    _live, dead = sockets
    r = in_own_plugin_dir(f"{place(dead, HOST)}; {place(shared_daemon.socket, MANAGED_A)}",
                          "ls", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and isinstance(json.loads(r.stdout), list)
    r = in_own_plugin_dir(place(shared_daemon.socket, HOST), "ls", "--json")
    assert r.returncode == 0 and r.stderr == ""


# pyvol info: where backups go

SECRET = "pyvol-info-test-secret-0123456789"


def _aws_free(env: dict) -> dict:
    """``env`` without the AWS settings this host may have (the CA bundle stays)."""
    return {k: v for k, v in env.items() if not k.startswith("AWS_") or k == "AWS_CA_BUNDLE"}


@pytest.mark.parametrize("setup", ["env", "files", "none"])
def test_info_says_where_backups_go_and_never_shows_a_secret(workdir, moto, setup):
    key = workdir / "backup.key"
    assert pyvol("backup", "keygen", str(key)).returncode == 0
    d = Daemon(workdir / "root", workdir / "s.sock")
    d.env = _aws_free(d.env)
    if setup == "env":  # the test S3 server's: credentials and endpoint in the environment
        d.env.update({**moto.env, "AWS_SECRET_ACCESS_KEY": SECRET,
                      "PYVOL_BACKUP_KEY_FILE": str(key)})
        want = {"endpoint": moto.endpoint, "region": "us-east-1", "credentials": "env"}
    elif setup == "files":  # ~/.aws's files; a key file that is not there
        (workdir / "credentials").write_text(
            f"[default]\naws_access_key_id = AKIAFROMFILE\naws_secret_access_key = {SECRET}\n")
        (workdir / "config").write_text("[default]\nregion = eu-west-3\n")
        d.env.update({"AWS_SHARED_CREDENTIALS_FILE": str(workdir / "credentials"),
                      "AWS_CONFIG_FILE": str(workdir / "config"),
                      "PYVOL_BACKUP_KEY_FILE": str(workdir / "absent.key")})
        want = {"endpoint": "https://s3.eu-west-3.amazonaws.com", "region": "eu-west-3",
                "credentials": "shared-credentials-file"}
    else:  # nothing at all (and no instance metadata to ask)
        d.env.update({"AWS_EC2_METADATA_DISABLED": "true",
                      "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "none"),
                      "AWS_CONFIG_FILE": str(workdir / "none")})
        want = {"endpoint": "https://s3.amazonaws.com", "region": "us-east-1",
                "credentials": None}
    d.start()
    try:
        raw = d.cli("info", "--json").stdout
        backups = json.loads(raw)["backups"]
        text = d.cli("info").stdout
    finally:
        d.stop()
    assert backups["s3"] == want
    assert f"S3 endpoint:    {want['endpoint']}" in text
    assert f"S3 region:      {want['region']}" in text
    assert "the daemon reads and writes repositories itself" in text and "AWS_*" in text
    if want["credentials"]:
        assert f"S3 credentials: {want['credentials']} (the AWS credential provider" in text
    else:
        assert "S3 credentials: none found in the daemon's environment" in text
    if setup == "env":
        assert backups["key_file"] == str(key) and "key_file_error" not in backups
        assert f"key file:       {key}: new repositories are encrypted with it" in text
    elif setup == "files":
        assert "cannot read the backup key file" in backups["key_file_error"]
        assert f"key file:       {workdir / 'absent.key'}: cannot read" in text
    else:
        assert backups["key_file"] is None and "new repositories are not encrypted" in text
    for secret in (SECRET, key.read_text().strip(), "AKIAFROMFILE", "pyvoltest"):
        assert secret not in raw and secret not in text


# pyvol backup init

HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_backup_init_makes_a_repository_once_on_file_and_s3(workdir, moto, encrypted):
    key = workdir / "backup.key"
    env = dict(moto.env)
    if encrypted:
        assert pyvol("backup", "keygen", str(key)).returncode == 0
        env["PYVOL_BACKUP_KEY_FILE"] = str(key)
    d = Daemon(workdir / "root", workdir / "s.sock", env=env).start()
    try:
        d.cli("create", "v", "--size", "64M")
        bucket = moto.bucket()
        directory = workdir / "not" / "yet" / "repo"
        for url in (f"file://{directory}", f"s3://{bucket}/pyvol/repo"):
            text = d.cli("backup", "init", url).stdout
            assert text.startswith(f"created repository {url}\n"), text
            ident = re.search(r"^id: +(\S+)$", text, re.MULTILINE)[1]
            assert HEX64.fullmatch(ident)
            assert (f"encrypted: yes, with the key file {key}" if encrypted
                    else "encrypted: no (the daemon has no PYVOL_BACKUP_KEY_FILE)") in text
            if url.startswith("file:"):
                assert directory.stat().st_mode & 0o777 == 0o700
                config = json.loads((directory / "config").read_bytes())
            else:
                config = json.loads(moto.client().get_object(
                    Bucket=bucket, Key="pyvol/repo/config")["Body"].read())
            assert config["id"] == ident and (config["encryption"] is not None) == encrypted
            again = d.cli("backup", "init", url, check=False)
            assert again.returncode == 1, again.stdout
            assert again.stderr == (f"error: {url} is a pyvol repository already (id {ident}); "
                                    "nothing was changed: back up into it with `pyvol backup "
                                    f"create VOLUME --dest {url}`\n")
            made = json.loads(d.cli("backup", "create", "v", "--dest", url, "--json").stdout)
            assert made["url"].startswith(url + "#")
            if encrypted:
                assert key.read_text().strip() not in text + again.stderr
        as_json = json.loads(d.cli("backup", "init", f"file://{workdir}/third", "--json").stdout)
        assert as_json["encrypted"] is encrypted and HEX64.fullmatch(as_json["id"])
        assert as_json["url"] == f"file://{workdir}/third"
    finally:
        d.stop()


def test_backup_create_into_a_missing_directory_names_backup_init(shared_daemon, tmp_path):
    d = shared_daemon
    d.cli("create", "initvol", "--size", "64M")
    absent = tmp_path / "absent" / "repo"
    r = d.cli("backup", "create", "initvol", "--dest", f"file://{absent}", check=False)
    assert r.returncode == 1
    assert r.stderr == (f"error: repository directory {absent} does not exist: make it and the "
                        f"repository with `pyvol backup init file://{absent}`\n")
    assert not absent.parent.exists()
    assert json.loads(d.cli("snapshot", "ls", "initvol", "--json").stdout) == []
    # an empty directory that exists is initialised by the first backup, as before
    empty = tmp_path / "empty"
    empty.mkdir()
    d.cli("backup", "create", "initvol", "--dest", f"file://{empty}")
    assert (empty / "config").is_file()
    refusals = [
        (f"file://{empty}", "is a pyvol repository already"),
        ("ebs://us-east-1", "there is nothing to initialise"),
        ("ftp://host/x", "unknown scheme 'ftp'"),
        (f"file://{empty / 'config'}", "is not a directory"),
        (f"file://{empty / 'config' / 'sub'}", "cannot make the repository directory"),
    ]
    for url, message in refusals:
        r = d.cli("backup", "init", url, check=False)
        assert r.returncode == 1 and message in r.stderr, (url, r.stderr)
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    raw = httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://p")
    for body in ({}, {"Repo": 7}):  # the route itself: 400 with a sentence, never 500
        resp = raw.post("/pyvol/v1/repository/init", json=body)
        assert resp.status_code == 400 and "'Repo'" in resp.json()["Err"]
