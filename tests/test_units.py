"""Small pure pieces: sizes, mountinfo escapes, extent comparison, backup ids."""

import os
import threading
import time

import pytest

from pyvol.backends.extents import differing
from pyvol.backup.repo import BACKUP_ID_RE, new_backup_id
from pyvol.errors import InvalidInput
from pyvol.mountinfo import _unescape
from pyvol.units import format_size, parse_size


@pytest.mark.parametrize("text,value", [
    ("10G", 10 << 30), ("512M", 512 << 20), ("1.5T", 3 << 39), ("4096", 4096), ("1k", 1024),
    ("10GiB", 10 << 30), ("2GB", 2 << 30), (" 3G ", 3 << 30),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "1X", "1.2.3G", "ten", "1 G B"])
def test_parse_size_refuses_with_the_accepted_form(text):
    with pytest.raises(InvalidInput, match="K, M, G, T or P"):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (512, 1 << 20, 3 << 29, 10 << 30)] == ["512B", "1M", "1.5G", "10G"]


def test_mountinfo_unescapes_octal():
    assert _unescape(r"/mnt/a\040b\011c\134d") == "/mnt/a b\tc\\d"


def test_differing_extents():
    a = [(0, 1000, 4096), (8192, 5000, 8192)]
    b = [(0, 1000, 4096), (8192, 5000, 4096), (12288, 9000, 4096), (40960, 7000, 4096)]
    assert differing(a, b) == [(12288, 4096), (40960, 4096)]
    assert differing(a, a) == []
    assert differing([], b) == [(0, 4096), (8192, 8192), (40960, 4096)]


def test_backup_ids_made_within_a_second_sort_in_the_order_they_were_made():
    """Retention keeps the newest by (created, id), to the second, and an incremental takes
    the newest id as its parent: ids made in one second must not sort at random."""
    ids = []
    for _ in range(20):
        ids.append(new_backup_id())
        time.sleep(0.002)
    assert ids == sorted(ids)
    assert len(set(ids)) == 20 and all(BACKUP_ID_RE.fullmatch(i) for i in ids)


def test_the_s3_session_knows_every_service_credentials_may_need(monkeypatch):
    """The job's botocore session lists botocore's services from its directories' names, not by
    opening each one (targets._quick_loader): every service botocore's own loader knows is
    still known, so credentials from a role (STS) or from SSO can make their clients; an
    S3-only list broke them."""
    import botocore.loaders
    from pyvol.backup import targets

    for var, value in {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    with targets._session_lock:
        session = targets._boto_session()
    for service in ("s3", "sts", "sso", "sso-oidc"):
        assert session.create_client(service).meta.service_model.service_name == service
    ours = session.get_component("data_loader")
    theirs = botocore.loaders.create_loader()
    for kind in ("service-2", "endpoint-rule-set-1"):
        assert set(theirs.list_available_services(kind)) <= set(
            ours.list_available_services(kind))


def test_a_view_sent_to_s3_reads_like_a_file_botocore_can_rewind():
    """botocore measures a file body, reads it in pieces for its checksum and signature,
    seeks back, reads it again to send it, and seeks back once more for a retry: every
    read from the start gives the same bytes, and the view is never copied whole."""
    from pyvol.backup.targets import _sendable, _ViewBody

    data = bytes(range(256)) * 64
    body = _sendable(memoryview(bytearray(data))[100:9000])
    assert isinstance(body, _ViewBody) and len(body) == 8900
    assert _sendable(b"x") == b"x" and isinstance(_sendable(bytearray(b"x")), bytearray)
    assert body.read(100) == data[100:200] and body.tell() == 100
    assert body.read() == data[200:9000] and body.read(10) == b"" and body.tell() == 8900
    assert body.seek(0) == 0 and body.read(None) == data[100:9000]
    assert body.seek(-10, os.SEEK_END) == 8890 and body.read(-1) == data[8990:9000]
    assert body.seek(5) == 5 and body.seek(5, os.SEEK_CUR) == 10 and body.read(1) == data[110:111]
    with pytest.raises(ValueError, match="whence"):
        body.seek(0, 7)
    assert not _ViewBody(memoryview(b""))  # empty: botocore sends no body


def test_a_lock_whose_file_its_holder_removed_is_taken_again_on_a_new_file(tmp_path,
                                                                          monkeypatch):
    """A removal discards its snapshot's lock file (``locks.held(discard=True)``) while
    another process may have opened that file and wait for it. The waiter, once the old
    file is its, must open the path again: a lock on a removed file excludes no one."""
    from pyvol import locks
    from pyvol.errors import Conflict

    waiter_tries, waiter_holds, release = threading.Event(), threading.Event(), threading.Event()
    take_within = locks.take_within

    def tried(take, wait, refusal):  # the waiter has the old file open, and waits for it
        if threading.current_thread().name == "waiter":
            waiter_tries.set()
        return take_within(take, wait, refusal)

    def waiter():
        with locks.held(tmp_path, "snap.v@s", "the snapshot", wait=10):
            waiter_holds.set()
            release.wait(10)

    monkeypatch.setattr(locks, "take_within", tried)
    with locks.held(tmp_path, "snap.v@s", "the snapshot", discard=True):
        t = threading.Thread(target=waiter, name="waiter")
        t.start()
        assert waiter_tries.wait(10)
        time.sleep(0.05)
        assert not waiter_holds.is_set()
    assert waiter_holds.wait(10)
    try:
        with pytest.raises(Conflict), locks.held(tmp_path, "snap.v@s", "the snapshot",
                                                 wait=0):
            pass
        assert (tmp_path / "snap.v@s.lock").exists()
    finally:
        release.set()
        t.join(10)
