"""Backups and cross-host restore, against real S3 servers (moto, SeaweedFS) and a directory.

Two daemons with their own root dirs and sockets stand for two hosts; they share the S3
endpoint and the file target, as hosts of one cluster would.
"""

import hashlib
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import Daemon, slow_backup, until, workers
from s3servers import FaultProxy

MiB = 1 << 20


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def fill(path, size: int, pattern: bytes | None = None) -> str:
    """Write ``size`` bytes (random, or a repeated pattern) and fsync; return their sha256."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n) if pattern is None else (pattern * (n // len(pattern) + 1))[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return sha256(path)


def backup(d: Daemon, ref: str, dest: str) -> dict:
    return json.loads(d.cli("backup", "create", ref, "--dest", dest, "--json").stdout)


def with_volume(d: Daemon, name: str, size: str = "256M", mount_id: str = "t") -> str:
    d.api.ok("/VolumeDriver.Create", {"Name": name, "Opts": {"size": size}})
    return d.api.ok("/VolumeDriver.Mount", {"Name": name, "ID": mount_id})["Mountpoint"]


@pytest.fixture
def file_repo(workdir) -> str:
    """An empty repository directory, as a file:// URL."""
    (workdir / "repo").mkdir()
    return f"file://{workdir / 'repo'}"


@pytest.fixture(params=["moto", "moto-https", "seaweedfs", "file"])
def repo(request, workdir):
    """(repository URL, daemon env) on each kind of target."""
    if request.param == "file":
        path = workdir / "repo"
        path.mkdir()
        return f"file://{path}", {}
    server = request.getfixturevalue({"moto": "moto", "moto-https": "moto_https",
                                      "seaweedfs": "seaweed"}[request.param])
    return f"s3://{server.bucket()}/backups", server.env


def hosts(workdir: Path, env: dict, **extra) -> tuple[Daemon, Daemon]:
    a = Daemon(workdir / "host-a", workdir / "a.sock", env={**env, **extra}).start()
    b = Daemon(workdir / "host-b", workdir / "b.sock", env={**env, **extra}).start()
    return a, b


def stop(*daemons: Daemon) -> None:
    for d in daemons:
        d.stop()


def test_volume_written_on_a_is_restored_on_b_byte_for_byte(workdir, repo):
    url, env = repo
    a, b = hosts(workdir, env)
    try:
        mp = with_volume(a, "db")
        digest = fill(f"{mp}/table.ibd", 40 * MiB)
        Path(mp, "small").write_text("hello\n")
        made = backup(a, "db", url)
        assert made["url"].startswith(url + "#db/") and made["incremental"] is False
        assert b.cli("backup", "ls", url).stdout.count(made["url"][:20]) == 1
        listed = json.loads(b.cli("backup", "ls", url, "--volume", "db", "--json").stdout)
        assert [x["url"] for x in listed] == [made["url"]]
        b.cli("backup", "verify", made["url"])
        restored = json.loads(b.cli("restore", made["url"], "copy", "--json").stdout)
        assert restored["Status"]["size"] == 256 * MiB
        assert restored["Status"]["source"] == made["url"]
        mp_b = b.api.ok("/VolumeDriver.Mount", {"Name": "copy", "ID": "t"})["Mountpoint"]
        assert sha256(f"{mp_b}/table.ibd") == digest
        assert Path(mp_b, "small").read_text() == "hello\n"
    finally:
        stop(a, b)


def test_restore_into_a_larger_volume_grows_its_filesystem(workdir, daemon, file_repo):
    d, url = daemon, file_repo
    mp = with_volume(d, "small", "128M")
    digest = fill(f"{mp}/f", 8 * MiB)
    made = backup(d, "small", url)
    d.cli("restore", made["url"], "big", "--size", "1G")
    mp2 = d.api.ok("/VolumeDriver.Mount", {"Name": "big", "ID": "t"})["Mountpoint"]
    st = os.statvfs(mp2)
    assert st.f_blocks * st.f_frsize > 900 * MiB
    assert sha256(f"{mp2}/f") == digest
    err = d.cli("restore", made["url"], "tiny", "--size", "64M", check=False)
    assert err.returncode == 1 and "smaller than" in err.stderr and "accepted" in err.stderr


def test_incremental_backup_reads_and_uploads_about_the_changed_one_percent(
        workdir, daemon, file_repo):
    d, url = daemon, file_repo
    mp = with_volume(d, "db", "1G")
    fill(f"{mp}/data", 400 * MiB)
    full = backup(d, "db", url)
    # only mapped ranges are read: the 600M never written are not
    assert 400 * MiB <= full["stats"]["read"] < 440 * MiB, full["stats"]
    with open(f"{mp}/data", "r+b") as f:  # 1% of the volume, rewritten in place
        f.seek(123 * MiB)
        f.write(os.urandom(10 * MiB + 240 * 1024))
        os.fsync(f.fileno())
    inc = backup(d, "db", url)
    assert inc["incremental"] is True and inc["parent"] == full["id"]
    one_percent = (1 << 30) // 100
    print("incremental stats", inc["stats"])
    assert one_percent <= inc["stats"]["read"] <= 2 * one_percent, inc["stats"]
    assert one_percent <= inc["stats"]["uploaded"] <= 2 * one_percent, inc["stats"]
    # the parent's snapshot is no longer needed: only the newest backup snapshot is kept
    snaps = json.loads(d.cli("snapshot", "ls", "db", "--json").stdout)
    assert [s["Name"] for s in snaps] == [inc["source"]["snapshot"]]
    # and the lock a backup reads a snapshot under goes with the snapshot: one file per
    # backup would otherwise stay in the locks directory for good
    assert {p.name for p in (d.root / "locks").glob("snap.*")} \
        <= {f"snap.db@{inc['source']['snapshot']}.lock"}
    # a volume with the same content shares every chunk
    d.cli("create", "twin", "--from-snapshot", f"db@{inc['source']['snapshot']}")
    chunks_before = len(list((workdir / "repo" / "chunks").rglob("*")))
    twin = backup(d, "twin", url)
    assert twin["stats"]["chunks_new"] == 0 and twin["stats"]["uploaded"] == 0
    assert len(list((workdir / "repo" / "chunks").rglob("*"))) == chunks_before
    # the incremental restores to exactly the changed data
    d.cli("restore", inc["url"], "again")
    mp2 = d.api.ok("/VolumeDriver.Mount", {"Name": "again", "ID": "t"})["Mountpoint"]
    assert sha256(f"{mp2}/data") == sha256(f"{mp}/data")


def test_a_full_read_when_the_parent_snapshot_is_gone_still_uploads_only_new_chunks(
        workdir, daemon, file_repo):
    d, url = daemon, file_repo
    mp = with_volume(d, "v")
    fill(f"{mp}/f", 24 * MiB)
    first = backup(d, "v", url)
    d.cli("snapshot", "rm", f"v@{first['source']['snapshot']}")
    out = d.cli("backup", "create", "v", "--dest", url)
    assert "full read" in out.stderr and "snapshot of the previous backup is gone" in out.stderr
    second = json.loads(d.cli("backup", "inspect", out.stdout.strip(), "--json").stdout)
    assert second["incremental"] is False
    assert second["stats"]["read"] >= 24 * MiB
    assert second["stats"]["chunks_new"] <= 2, second["stats"]  # journal/inode pieces only


@pytest.fixture
def plugin_env(moto):
    return moto.env


@pytest.mark.docker
def test_docker_volume_create_from_backup_on_another_host(workdir, moto, dockerd, plugin):
    url = f"s3://{moto.bucket()}/r"
    a = Daemon(workdir / "host-a", workdir / "a.sock", env=moto.env).start()
    try:
        mp = with_volume(a, "web")
        digest = fill(f"{mp}/index.html", 6 * MiB)
        made = backup(a, "web", url)
    finally:
        a.stop()
    dockerd.run("volume", "create", "-d", plugin.driver, "-o", f"from-backup={made['url']}",
                "web")
    out = dockerd.run("run", "--rm", "-v", "web:/site", "busybox", "sha256sum",
                      "/site/index.html").stdout
    assert out.split()[0] == digest


def test_gc_deletes_only_unreferenced_chunks_and_rm_needs_no_parent(workdir, daemon, file_repo):
    d, url = daemon, file_repo
    mp = with_volume(d, "v")
    fill(f"{mp}/a", 16 * MiB)
    first = backup(d, "v", url)
    fill(f"{mp}/b", 16 * MiB)
    second = backup(d, "v", url)
    d.cli("backup", "rm", first["url"])
    assert "no backup" in d.cli("backup", "inspect", first["url"], check=False).stderr
    gc = json.loads(d.cli("backup", "gc", url, "--json").stdout)
    # a's data is still used by the second backup; only pieces rewritten since
    # (fs metadata) were the first backup's alone
    assert gc["backups"] == 1 and gc["chunks_kept"] == second["chunk_count"]
    assert gc["chunks_deleted"] >= 1 and gc["bytes_freed"] < 8 * MiB, gc
    d.cli("backup", "verify", second["url"])  # a manifest needs no parent to be whole
    d.cli("backup", "rm", second["url"])
    gc = json.loads(d.cli("backup", "gc", url, "--json").stdout)
    assert gc["chunks_deleted"] > 8 and gc["chunks_kept"] == 0
    assert list((workdir / "repo" / "chunks").rglob("*.*")) == []


def test_a_corrupt_or_missing_chunk_fails_verify_and_restore_naming_it(workdir, daemon, file_repo):
    d, url = daemon, file_repo
    mp = with_volume(d, "v")
    fill(f"{mp}/f", 20 * MiB)
    made = backup(d, "v", url)
    d.cli("backup", "verify", made["url"])
    chunks = sorted(p for p in (workdir / "repo" / "chunks").rglob("*") if p.is_file())
    victim = max(chunks, key=lambda p: p.stat().st_size)
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    bad = d.cli("backup", "verify", made["url"], check=False)
    assert bad.returncode == 1 and victim.name in bad.stderr, bad.stderr
    bad = d.cli("restore", made["url"], "copy", check=False)
    assert bad.returncode == 1 and victim.name in bad.stderr, bad.stderr
    assert "copy" not in d.cli("ls").stdout
    assert not any(p.name.startswith("copy") for p in (workdir / "root").rglob("*.img"))
    victim.unlink()
    bad = d.cli("restore", made["url"], "copy", check=False)
    assert bad.returncode == 1 and f"chunk {victim.name} is missing" in bad.stderr
    assert "copy" not in d.cli("ls").stdout


def test_encrypted_repository_hides_names_and_content_and_needs_its_key(workdir, moto):
    url = f"s3://{moto.bucket()}/secret"
    bucket = url.split("/")[2]
    keys = workdir / "keys"
    keys.mkdir()
    a = Daemon(workdir / "host-a", workdir / "a.sock", env=moto.env)
    a.cli("backup", "keygen", str(keys / "k1"))
    a.cli("backup", "keygen", str(keys / "k2"))
    a.env["PYVOL_BACKUP_KEY_FILE"] = str(keys / "k1")
    a.start()
    plain = Daemon(workdir / "host-b", workdir / "b.sock", env=moto.env).start()
    wrong = Daemon(workdir / "host-c", workdir / "c.sock",
                   env={**moto.env, "PYVOL_BACKUP_KEY_FILE": str(keys / "k2")}).start()
    try:
        mp = with_volume(a, "payroll")
        pattern = b"PYVOL-PLAINTEXT-MARKER-" * 11
        digest = fill(f"{mp}/f", 8 * MiB, pattern)
        made = backup(a, "payroll", url)
        assert "payroll" not in made["url"]
        s3 = moto.client()
        names = moto.keys(bucket, "secret/")
        assert not any("payroll" in k for k in names)
        piece = (pattern * (4 * MiB // len(pattern) + 1))[:4 * MiB]
        assert not any(hashlib.sha256(piece).hexdigest() in k for k in names)
        for k in names:
            body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
            assert b"PYVOL-PLAINTEXT-MARKER" not in body, k
        config = json.loads(s3.get_object(Bucket=bucket, Key="secret/config")["Body"].read())
        assert config["encryption"]["cipher"] == "AES-256-GCM"
        r = plain.cli("restore", made["url"], "x", check=False)
        assert r.returncode == 1 and "encrypted repository" in r.stderr
        assert "PYVOL_BACKUP_KEY_FILE" in r.stderr
        r = wrong.cli("backup", "ls", url, check=False)
        assert r.returncode == 1 and "wrong key" in r.stderr
        assert (keys / "k1").read_text().strip() not in a.log()
        a.cli("restore", made["url"], "again")
        mp2 = a.api.ok("/VolumeDriver.Mount", {"Name": "again", "ID": "t"})["Mountpoint"]
        assert sha256(f"{mp2}/f") == digest
        a.cli("backup", "verify", made["url"])
        # all that reading the repository took ran in job processes: the workers that answer
        # Docker never loaded the crypto or compression libraries (idle memory, import stalls)
        for worker in workers(a):
            maps = Path(f"/proc/{worker}/maps").read_text()
            assert "/cryptography/" not in maps and "/zstandard/" not in maps, worker
    finally:
        stop(a, plain, wrong)


FAST_FAIL = {"PYVOL_BACKUP_CONNECT_TIMEOUT": "1", "PYVOL_BACKUP_READ_TIMEOUT": "2",
             "PYVOL_BACKUP_MAX_ATTEMPTS": "2"}


@pytest.fixture
def proxied(workdir, moto):
    """A daemon whose S3 endpoint is a FaultProxy in front of moto; and a bucket."""
    proxy = FaultProxy(moto.endpoint)
    d = Daemon(workdir / "root", workdir / "s.sock",
               env={**moto.env, "AWS_ENDPOINT_URL": proxy.endpoint, **FAST_FAIL}).start()
    yield d, proxy, moto.bucket()
    d.stop()
    proxy.close()


@pytest.mark.parametrize("mode,message", [
    ("down", "cannot reach"), ("error", "HTTP 503"), ("stall", "did not answer")])
def test_a_broken_endpoint_fails_in_bounded_time_and_writes_no_manifest(proxied, moto, mode,
                                                                        message):
    d, proxy, bucket = proxied
    url = f"s3://{bucket}/r"
    mp = with_volume(d, "v")
    fill(f"{mp}/f", 8 * MiB)
    backup(d, "v", url)
    proxy.set(mode)
    started = time.monotonic()
    r = d.cli("backup", "create", "v", "--dest", url, check=False)
    elapsed = time.monotonic() - started
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert elapsed < 60, f"{mode}: failed only after {elapsed:.0f}s"
    proxy.set("pass")
    assert len(moto.keys(bucket, "r/manifests/")) == 1
    assert len(json.loads(d.cli("snapshot", "ls", "v", "--json").stdout)) == 1


def test_a_chunk_whose_put_is_cut_off_midway_is_sent_again_whole(proxied, moto):
    """A chunk goes to S3 as a file over the thread's buffer, which botocore reads as it
    sends (targets._ViewBody). A connection that breaks mid-body makes botocore retry on a
    new one from the body's start: the chunk stored must be the whole chunk, or it would
    sit in the repository under its name, and every later backup would reuse it, until a
    restore found it corrupt."""
    d, proxy, bucket = proxied
    url = f"s3://{bucket}/r"
    mp = with_volume(d, "v")
    digest = fill(f"{mp}/f", 24 * MiB)
    proxy.set("cut", cuts=3)
    made = backup(d, "v", url)
    proxy.set("pass")
    cut = [k for k in proxy.cut_keys if "/chunks/" in k]
    assert len(cut) == 3, proxy.cut_keys  # three chunks' first attempt broke off at 1 MiB
    d.cli("backup", "verify", made["url"])  # every chunk decrypts and hashes to its name
    d.cli("restore", made["url"], "back")
    back = d.api.ok("/VolumeDriver.Mount", {"Name": "back", "ID": "r"})["Mountpoint"]
    assert sha256(f"{back}/f") == digest


def _kill_midway(d: Daemon, proxy: FaultProxy, url: str, kill) -> subprocess.Popen:
    """Start a slow backup through the proxy and call ``kill(cli)`` once chunks are flowing."""
    cli = slow_backup(d, proxy, url, 12)
    kill(cli)
    cli.wait(30)
    proxy.set("pass")
    return cli


def test_cli_killed_mid_backup_leaves_no_backup_and_the_rerun_reuses_chunks(proxied, moto):
    d, proxy, bucket = proxied
    url = f"s3://{bucket}/r"
    mp = with_volume(d, "v", "512M")
    fill(f"{mp}/f", 160 * MiB)
    _kill_midway(d, proxy, url, lambda cli: cli.send_signal(signal.SIGKILL))
    # the daemon notices and cancels within a step
    until("the cancelled backup's snapshot removed", lambda: not d.get("/snapshots?volume=v"),
          timeout=60, every=0.2)
    assert moto.keys(bucket, "r/manifests/") == []
    assert "[]" in d.cli("backup", "ls", url, "--json").stdout
    uploaded = len(moto.keys(bucket, "r/chunks/"))
    assert uploaded > 0
    rerun = backup(d, "v", url)
    # every uploaded chunk is reused but those of fs metadata rewritten since (a journal block)
    assert rerun["stats"]["chunks_reused"] >= uploaded - 2, rerun["stats"]
    assert rerun["stats"]["chunks_new"] <= rerun["stats"]["pieces_read"] - uploaded + 2
    d.cli("backup", "verify", rerun["url"])


def test_the_parent_snapshot_of_a_running_incremental_backup_cannot_be_removed(proxied, moto):
    """An incremental backup reads its changes against the previous backup's snapshot: that
    snapshot is held from the moment it is chosen, so removing it meanwhile is refused
    instead of leaving the backup to compare against nothing."""
    d, proxy, bucket = proxied
    url = f"s3://{bucket}/r"
    mp = with_volume(d, "v", "512M")
    fill(f"{mp}/old", 16 * MiB)
    first = backup(d, "v", url)
    [parent] = json.loads(d.cli("snapshot", "ls", "v", "--json").stdout)
    fill(f"{mp}/new", 96 * MiB)  # enough new chunks to keep the slowed backup running
    cli = slow_backup(d, proxy, url, 6)
    r = d.cli("snapshot", "rm", parent["Ref"], check=False)
    assert r.returncode == 1 and "being read by a running backup" in r.stderr, r.stderr
    assert cli.poll() is None, "the backup ended before the removal was tried"
    proxy.set("pass")
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, err
    [second] = [b for b in json.loads(d.cli("backup", "ls", url, "--json").stdout)
                if b["url"] != first["url"]]
    assert second["incremental"], second
    d.cli("backup", "verify", second["url"])
    # once the backup is written its parent is superseded, and goes
    refs = [x["Ref"] for x in json.loads(d.cli("snapshot", "ls", "v", "--json").stdout)]
    assert parent["Ref"] not in refs and len(refs) == 1, refs


def test_previous_manifests_with_a_malformed_source_are_no_parent(workdir, daemon, file_repo):
    """A repository is untrusted: newer manifests of the volume whose source is no object,
    or whose snapshot name is no string, are passed over when the next backup looks for its
    parent; it finds the real one behind them."""
    from pyvol.backup.repo import Repository, new_backup_id

    mp = with_volume(daemon, "v")
    fill(f"{mp}/f", 8 * MiB)
    first = backup(daemon, "v", file_repo)
    repo = Repository.open(file_repo, None)
    instance = first["source"]["instance"]
    for source in (["not", "an", "object"], {"instance": instance, "snapshot": ["x"],
                                             "snapshot_created": 1}):
        time.sleep(0.01)  # ids sort by the millisecond: each newer than the last
        repo.put_manifest({"format": 1, "id": new_backup_id(), "kind": "block", "volume": "v",
                           "source": source, "chunks": [], "chunk_size": repo.chunk_size})
    fill(f"{mp}/g", 4 * MiB)
    second = backup(daemon, "v", file_repo)
    assert second["incremental"] and second["parent"] == first["id"], second


def _engines(d: Daemon) -> dict[int, int]:
    """The daemon's job processes (backup/engine.py): pid -> parent pid."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if b"pyvol.backup.engine" in argv and os.getpgid(int(entry.name)) == d.proc.pid:
            out[int(entry.name)] = ppid
    return out


def test_a_backup_runs_in_its_own_process_which_dies_with_its_worker(proxied, moto):
    """The engine works outside the worker that answers Docker (no shared interpreter
    lock), and a worker killed mid-backup takes its job process with it: nothing goes on
    writing into the repository, and the worker that replaces it serves at once."""
    from pyvol.backup.repo import process_start

    d, proxy, bucket = proxied
    url = f"s3://{bucket}/r"
    mp = with_volume(d, "v", "512M")
    fill(f"{mp}/f", 160 * MiB)
    cli = slow_backup(d, proxy, url, 12)
    engines = _engines(d)
    assert len(engines) == 1, engines
    (engine, worker), = engines.items()
    assert worker != d.proc.pid and worker in workers(d)
    os.kill(worker, signal.SIGKILL)
    # gone, or a zombie nobody reaps (its parent was killed): no start time either way
    until("the job process to end with its worker", lambda: process_start(engine) is None,
          10, 0.05)
    cli.wait(30)
    proxy.set("pass")
    # a request the job process had wholly sent before it died may still be in the proxy's
    # delay: it reaches moto late, but it was not sent late
    until("the proxy to pass on what the dead process sent", lambda: proxy.connections == 0,
          30, 0.05)
    chunks = len(moto.keys(bucket, "r/chunks/"))
    time.sleep(2)
    assert len(moto.keys(bucket, "r/chunks/")) == chunks, "something still uploads"
    assert moto.keys(bucket, "r/manifests/") == []
    assert _engines(d) == {}
    d.api.ok("/VolumeDriver.Get", {"Name": "v"})  # the master's new worker answers
    rerun = backup(d, "v", url)
    d.cli("backup", "verify", rerun["url"])


def test_a_failed_backup_whose_snapshot_is_being_read_keeps_it_only_until_it_is_free(
        proxied, moto):
    """A failed backup drops the snapshot it took for itself, unless something else reads
    it (another backup of it, here the test holding its read lock): then its note stays,
    and the snapshot goes as soon as it is free, with the daemon up, not at its next start
    (plugin/abandoned.py). Before, the note went and the snapshot stayed for good."""
    import fcntl
    import sqlite3

    d, proxy, bucket = proxied
    url = f"s3://{bucket}/r"
    mp = with_volume(d, "v", "512M")
    fill(f"{mp}/f", 160 * MiB)
    cli = slow_backup(d, proxy, url, 12)
    lock, = (d.root / "locks").glob("snap.v@backup-*.lock")
    snap = lock.name[len("snap.v@"):-len(".lock")]
    with open(lock, "rb") as reader:
        fcntl.flock(reader, fcntl.LOCK_SH)
        (engine, _worker), = _engines(d).items()
        os.kill(engine, signal.SIGKILL)
        _out, err = cli.communicate(timeout=60)
        assert cli.returncode == 1, err
        proxy.set("pass")
        time.sleep(3)  # more than the runner's look at notes takes (every 2 s)
        assert [s["Name"] for s in json.loads(d.cli("snapshot", "ls", "v", "--json").stdout)] \
            == [snap]
        db = sqlite3.connect(d.root / "state.db")
        try:
            assert db.execute("SELECT value FROM meta WHERE key = ?",
                              (f"backup-snapshot:v@{snap}",)).fetchone() is not None
        finally:
            db.close()
    until("the failed backup's snapshot to go once nothing reads it",
          lambda: json.loads(d.cli("snapshot", "ls", "v", "--json").stdout) == [], 20, 0.2)
    assert "removing the snapshot of a backup that did not end" in d.log()
    assert "Traceback" not in d.log()
    assert not lock.exists()


def test_a_job_process_killed_mid_backup_leaves_no_lock_that_blocks_the_next_taker(proxied,
                                                                                 moto):
    """A backup's lock names its job process as the holder. Killed (out of memory, by hand),
    it fails the backup and leaves its lock objects, which the worker can no longer delete;
    the next taker breaks them at once as a dead holder's, rather than waiting out a lease."""
    d, proxy, bucket = proxied
    url = f"s3://{bucket}/r"
    mp = with_volume(d, "v", "512M")
    fill(f"{mp}/f", 160 * MiB)
    cli = slow_backup(d, proxy, url, 12)
    (engine, _worker), = _engines(d).items()
    os.kill(engine, signal.SIGKILL)
    _out, err = cli.communicate(timeout=60)
    assert cli.returncode == 1 and "ended without an answer (signal 9)" in err, err
    proxy.set("pass")
    assert moto.keys(bucket, "r/locks/"), "the killed job's lock objects are left"
    assert moto.keys(bucket, "r/manifests/") == []
    d.cli("backup", "gc", url)  # an exclusive lock, taken at once
    assert moto.keys(bucket, "r/locks/") == []
    assert json.loads(d.cli("snapshot", "ls", "v", "--json").stdout) == []
    assert "breaking the repository lock of a dead holder" in d.log()
    assert "could not delete repository lock" not in d.log(), "said to expire, but broken"


def test_daemon_killed_mid_backup_leaves_no_backup_and_the_rerun_succeeds(proxied, moto,
                                                                          workdir):
    d, proxy, bucket = proxied
    url = f"s3://{bucket}/r"
    mp = with_volume(d, "v", "512M")
    digest = fill(f"{mp}/f", 160 * MiB)
    cli = _kill_midway(d, proxy, url, lambda cli: os.killpg(d.proc.pid, signal.SIGKILL))
    assert cli.returncode == 1 and "lost the pyvol daemon" in cli.stderr.read()
    d.stop()
    assert moto.keys(bucket, "r/manifests/") == []
    d.start()
    # the interrupted backup's snapshot was removed at start, as its manifest never came
    assert json.loads(d.cli("snapshot", "ls", "v", "--json").stdout) == []
    rerun = backup(d, "v", url)
    assert rerun["stats"]["chunks_reused"] > 0
    d.cli("restore", rerun["url"], "back")
    mp2 = d.api.ok("/VolumeDriver.Mount", {"Name": "back", "ID": "t"})["Mountpoint"]
    assert sha256(f"{mp2}/f") == digest


def test_backups_of_two_volumes_run_at_once_and_docker_calls_keep_answering(proxied, moto):
    d, proxy, bucket = proxied
    url = f"s3://{bucket}/r"
    for name in ("one", "two"):
        fill(f"{with_volume(d, name)}/f", 40 * MiB)
    proxy.set("pass", delay=0.1)
    results = {}

    def run(name):
        results[name] = d.cli("backup", "create", name, "--dest", url, check=False)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    answered = 0
    while any(t.is_alive() for t in threads):
        assert d.api.ok("/VolumeDriver.List")["Volumes"]
        d.api.ok("/VolumeDriver.Get", {"Name": "one"})
        answered += 1
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results.values()), results
    assert answered > 3
    assert len(moto.keys(bucket, "r/manifests/")) == 2


def test_an_exclusive_lock_refuses_backups_naming_its_holder_and_expired_locks_go(workdir):
    from pyvol.backup import leases
    from pyvol.backup.repo import Repository
    from pyvol.errors import Conflict

    (workdir / "repo").mkdir()
    url = f"file://{workdir / 'repo'}"
    repo = Repository.open(url, None, create=True)
    d = Daemon(workdir / "root", workdir / "s.sock").start()
    try:
        mp = with_volume(d, "v")
        fill(f"{mp}/f", 4 * MiB)
        with leases.locked(repo, "exclusive"):
            r = d.cli("backup", "create", "v", "--dest", url, check=False)
            assert r.returncode == 1 and "locked (exclusive lock held by host" in r.stderr
            with pytest.raises(Conflict):
                leases.locked(repo, "shared").__enter__()
        assert json.loads(d.cli("snapshot", "ls", "v", "--json").stdout) == []
        with leases.locked(repo, "shared"):
            with leases.locked(repo, "shared"):  # shared locks coexist
                r = d.cli("backup", "gc", url, check=False)
                assert r.returncode == 1 and "a backup is running" in r.stderr
        dead = leases.Lease(repo, "exclusive", lease=0.5)
        dead.acquire()
        dead._stop.set()  # its holder "dies": no more renewals
        time.sleep(1.5)
        backup(d, "v", url)
        assert list((workdir / "repo" / "locks").iterdir()) == []
    finally:
        d.stop()


def test_bad_repository_urls_and_backup_urls_get_clear_errors(daemon, workdir, moto):
    mp = with_volume(daemon, "v")
    fill(f"{mp}/f", MiB)
    cases = [
        (("backup", "create", "v", "--dest", "ftp://x/y"), "unknown scheme 'ftp'"),
        (("backup", "create", "v", "--dest", "/tmp/x"), "accepted are s3://"),
        (("backup", "create", "v", "--dest", f"file://{workdir}/absent"), "does not exist"),
        (("backup", "create", "nope", "--dest", f"file://{workdir}"), "no such volume"),
        (("backup", "ls", f"file://{workdir}"), "no pyvol repository"),
        (("backup", "inspect", "file:///tmp#v"), "invalid backup URL"),
        (("restore", "s3://b/p#v/xyz", "n"), "invalid backup URL"),
    ]
    for args, message in cases:
        r = daemon.cli(*args, check=False)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert json.loads(daemon.cli("snapshot", "ls", "--json").stdout) == []
    assert json.loads(daemon.cli("ls", "--json").stdout)[0]["Name"] == "v"
    (workdir / "repo").mkdir()
    r = daemon.cli("backup", "create", "v@nosuch", "--dest", f"file://{workdir}/repo",
                   check=False)
    assert r.returncode == 1 and "snapshot v@nosuch not found" in r.stderr, r.stderr
    # nor a lock file for it: no removal of that snapshot will ever come to take it away
    assert list((daemon.root / "locks").glob("snap.*")) == []


def test_the_cli_shows_progress_on_a_terminal_and_nothing_under_json(proxied):
    d, proxy, bucket = proxied
    url = f"s3://{bucket}/r"
    fill(f"{with_volume(d, 'v')}/f", 40 * MiB)
    proxy.set("pass", delay=0.2)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pyvol", "--socket", str(d.socket), "backup",
                             "create", "v", "--dest", url], stdout=subprocess.PIPE,
                            stderr=slave, env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        shown += data
    proc.wait(60)
    os.close(master)
    assert proc.returncode == 0
    text = shown.decode(errors="replace")
    assert "backup" in text and "/s" in text and "MB" in text, text[-500:]
    quiet = d.cli("backup", "create", "v", "--dest", url, "--json")
    assert quiet.stderr == "" and json.loads(quiet.stdout)["url"]


def test_a_docker_create_from_a_slow_backup_stops_before_docker_gives_up(workdir, moto):
    """Docker waits 30 s (here set to 7) for a plugin: a restore that would take longer is
    stopped in time, nothing is left, and the Err says to use `pyvol restore` instead."""
    proxy = FaultProxy(moto.endpoint)
    d = Daemon(workdir / "root", workdir / "s.sock",
               env={**moto.env, "AWS_ENDPOINT_URL": proxy.endpoint, "PYVOL_DOCKER_TIMEOUT": "7",
                    "PYVOL_BACKUP_THREADS": "2"}).start()
    try:
        url = f"s3://{moto.bucket()}/r"
        fill(f"{with_volume(d, 'v')}/f", 40 * MiB)
        made = backup(d, "v", url)
        proxy.set("pass", delay=1.0)
        started = time.monotonic()
        err = d.api.err("/VolumeDriver.Create", {"Name": "late",
                                                 "Opts": {"from-backup": made["url"]}})
        assert time.monotonic() - started < 7
        assert "longer than Docker waits" in err and f"pyvol restore '{made['url']}' late" in err
        assert "late" not in d.cli("ls").stdout
        proxy.set("pass")
        d.cli("restore", made["url"], "late")  # the CLI has no such limit
    finally:
        d.stop()
        proxy.close()


def test_a_backups_chunk_list_stays_in_the_job_process(tmp_path):
    """A chunk list grows with the volume (262,144 entries for 1 TiB): the backup job keeps
    it and answers the worker with a HeldChunks, which the calls that check and write the
    manifest take back; an incremental takes its parent's list where the job process read
    it (OpenedManifest). The manifest written lists every chunk all the same."""
    from pyvol.backup.job import Job
    from pyvol.backup.repo import (HeldChunks, OpenedManifest, Repository, new_backup_id,
                                   utcnow)
    from pyvol.backup.session import RemoteRepository

    (tmp_path / "repo").mkdir()
    device = tmp_path / "device"
    with RemoteRepository(f"file://{tmp_path / 'repo'}", "init", None, {}) as repo:
        cs = repo.chunk_size
        with open(device, "wb") as f:
            f.write(os.urandom(8 * cs))
        size = 8 * cs
        result = repo.run("block.backup", (str(device), size, [(0, size)], None, None),
                          Job("backup"), 2)
        assert result.chunks == HeldChunks("job-1", 8)
        assert repo.missing_chunks(result.chunks) == []
        bid = new_backup_id()
        source = {"backend": "loop", "snapshot": "s", "size": size, "fs": "ext4",
                  "snapshot_created": utcnow(), "instance": "test"}
        url = repo.put_manifest({
            "format": 1, "id": bid, "kind": "block", "volume": "v", "created": utcnow(),
            "host": "test", "source": source, "parent": None, "incremental": False,
            "chunk_size": cs, "chunks": result.chunks, "stats": result.stats})
        volkey = repo.volume_key("v")
        head = repo.open_manifest(volkey, bid)  # the whole stays in the job process
        assert head["url"] == url and "chunks" not in head and head["chunk_count"] == 8
        written = Repository.open(f"file://{tmp_path / 'repo'}", None).get_manifest(volkey, bid)
        assert [i for i, _ in written["chunks"]] == list(range(8))

        # one piece changed: the rest comes from the parent the job process opened
        with open(device, "r+b") as f:
            f.seek(3 * cs)
            f.write(os.urandom(cs))
        inc = repo.run("block.backup", (str(device), size, [(0, size)], [(3 * cs, cs)],
                                        OpenedManifest(volkey, bid)), Job("backup"), 2)
        assert len(inc.chunks) == 8 and inc.stats["pieces_read"] == 1
        assert inc.stats["chunks_new"] == 1 and inc.stats["chunks_reused"] == 7


def test_a_gc_deletes_in_its_job_process_only_before_its_checked_lease_runs_out(tmp_path):
    """gc's deletes happen where the unreferenced list is, in batches; the worker checks
    its lease before each batch and passes the time that check holds until, and no delete
    is made after it (docs/backup-repository.md, gc step 4)."""
    from pyvol import clock
    from pyvol.backup.repo import Repository, delete_unreferenced, unreferenced_chunks

    (tmp_path / "repo").mkdir()
    repo = Repository.open(f"file://{tmp_path / 'repo'}", None, create=True)
    for _ in range(5):  # stored, and named by no manifest
        repo.store_chunk(os.urandom(4096))
    found = unreferenced_chunks(repo)
    assert found["unreferenced"] == 5 and found["kept"] == 0 and found["backups"] == 0
    assert delete_unreferenced(repo, 10, clock.steady() - 1) == (0, 0)
    assert len(list(repo.target.list("chunks/"))) == 5
    n, size = delete_unreferenced(repo, 2, clock.steady() + 60)
    assert n == 2 and size > 0 and len(list(repo.target.list("chunks/"))) == 3
    assert delete_unreferenced(repo, 10, clock.steady() + 60)[0] == 3
    assert list(repo.target.list("chunks/")) == []
    assert delete_unreferenced(repo, 10, clock.steady() + 60) == (0, 0)


@pytest.mark.parametrize("server", ["seaweed", "moto_https"])
def test_a_chunk_goes_to_s3_from_where_it_was_read_without_a_second_buffer(request, server,
                                                                         monkeypatch):
    """A block backup reads each piece into a ``Room`` and, for S3, seals it there and sends
    it from there as a file botocore reads in pieces, over HTTP and over HTTPS (where
    botocore sends a trailing checksum): no chunk-sized buffer besides the room (an mmap,
    which tracemalloc does not count). Sealing into a fresh bytearray, as before, traced
    4.2 MiB over HTTP and 10.9 over HTTPS. Both servers run in processes of their own, so
    the traced memory is the client's alone."""
    import tracemalloc

    from pyvol.backup.blobs import TAG, Room
    from pyvol.backup.repo import CHUNK_SIZE, SEAL_OVERHEAD, Repository
    from pyvol.files import ALIGN

    s3 = request.getfixturevalue(server)
    for var, value in s3.env.items():
        monkeypatch.setenv(var, value)
    repo = Repository.open(f"s3://{s3.bucket()}/r", os.urandom(32), create=True)
    repo.store_chunk(os.urandom(4096))  # the client, its connections and its codec warm
    data = os.urandom(CHUNK_SIZE)  # incompressible: stored raw, sealed in place
    room = Room(len(data))
    room.plain[:] = data
    tracing = tracemalloc.is_tracing()  # under -X tracemalloc: measured from here all the same
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        base = tracemalloc.get_traced_memory()[0]
        name, stored, fresh = repo.store_chunk(room)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not tracing:
            tracemalloc.stop()
    assert fresh and stored == len(data) + SEAL_OVERHEAD
    # sealed where it was read: the room holds the stored object, head before the plaintext
    head = SEAL_OVERHEAD - TAG
    assert repo.target.get(repo.chunk_key(name), 8 << 20) == \
        room.buffer[ALIGN - head:ALIGN + len(data) + TAG]
    # botocore's pieces (1 MiB) are about 2 MiB at most; a second chunk is 4
    assert peak < CHUNK_SIZE * 3 // 4, f"{peak} bytes allocated to store a chunk of {len(data)}"
    assert bytes(repo.chunk_view(name)) == data
