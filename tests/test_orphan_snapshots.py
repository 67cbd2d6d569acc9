"""A backup's own snapshots never outlive their use (issue 11): each is the base of its
repository's next backup until a newer backup succeeds, and goes with its backup."""

import json
import os
import threading
from pathlib import Path


def _own(d, vol: str) -> list[str]:
    return [s["Name"] for s in json.loads(d.cli("snapshot", "ls", vol, "--json").stdout)
            if s["Origin"] == "backup"]


def test_concurrent_backups_of_one_volume_leave_one_base_per_repository(daemon, workdir):
    repos = []
    for name in ("r1", "r2"):
        (workdir / name).mkdir()
        repos.append(f"file://{workdir / name}")
    daemon.api.ok("/VolumeDriver.Create", {"Name": "busy", "Opts": {"size": "128M"}})
    mp = daemon.api.ok("/VolumeDriver.Mount", {"Name": "busy", "ID": "c"})["Mountpoint"]
    Path(mp, "data").write_bytes(os.urandom(24 << 20))
    failures = []

    def backup(url):
        out = daemon.cli("backup", "create", "busy", "--dest", url, check=False)
        if out.returncode:
            failures.append(out.stderr)

    for _ in range(2):
        threads = [threading.Thread(target=backup, args=(url,)) for url in repos * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert not failures, failures
    # one base per repository: its next backup is incremental, nothing else is kept
    assert len(_own(daemon, "busy")) == 2, _own(daemon, "busy")
    for url in repos:
        out = json.loads(daemon.cli("backup", "create", "busy", "--dest", url, "--json").stdout)
        assert out["incremental"] is True, out
    assert len(_own(daemon, "busy")) == 2, _own(daemon, "busy")
    daemon.api.ok("/VolumeDriver.Unmount", {"Name": "busy", "ID": "c"})


def test_removing_the_newest_backup_drops_its_snapshot(daemon, workdir):
    (workdir / "repo").mkdir()
    url = f"file://{workdir / 'repo'}"
    daemon.api.ok("/VolumeDriver.Create", {"Name": "gone", "Opts": {"size": "64M"}})
    made = json.loads(daemon.cli("backup", "create", "gone", "--dest", url, "--json").stdout)
    assert _own(daemon, "gone") == [made["source"]["snapshot"]]
    daemon.cli("backup", "rm", made["url"])
    assert _own(daemon, "gone") == []
