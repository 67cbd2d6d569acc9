"""A hostile repository: one made with pyvol's own writer, then edited object by object by
someone who can write to it but has no key (or, for a plain repository, can write anything).

Every case checks what the attack is after, not only the error: a canary file outside the
restore target must keep its bytes, owner and mode, and nothing may appear next to it.
Engine level, on a file:// repository in a temporary directory; no daemon. Runs as root.
"""

import hashlib
import io
import json
import os
import resource
import shutil
import socket
import stat
import struct
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import zstandard

from pyvol.backup import block, tree
from pyvol.backup.blobs import CorruptObject
from pyvol.backup.job import Job
from pyvol.backup.repo import Repository, new_backup_id, utcnow
from pyvol.errors import Conflict, PyvolError

KEY = bytes(range(32))
CANARY = b"canary: nothing a restore does may change these bytes\n" * 3


@pytest.fixture
def place():
    """A repository, a restore target, and next to them a directory with a canary in it."""
    base = Path(tempfile.mkdtemp(prefix="pyvol-hostile-", dir="/tmp"))
    for d in ("repo", "target", "outside", "outside/dir", "source"):
        (base / d).mkdir()
    (base / "outside" / "canary").write_bytes(CANARY)
    os.chmod(base / "outside" / "canary", 0o644)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def outside_state(base: Path) -> dict:
    """Everything under outside/: names, types, owners, modes, contents, link targets."""
    out = {}
    root = base / "outside"
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            entry = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink)
            if stat.S_ISREG(st.st_mode):
                entry += (open(p, "rb").read(),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(p),)
            out[os.path.relpath(p, root)] = entry
    st = os.lstat(root)
    out["."] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink)
    return out


def assert_outside_untouched(base: Path, before: dict) -> None:
    assert (base / "outside" / "canary").read_bytes() == CANARY
    assert outside_state(base) == before
    # nothing new next to the repository either (the target's parent)
    assert sorted(p.name for p in base.iterdir()) == ["outside", "repo", "source", "target"]


def open_repo(base: Path, key: bytes | None = None) -> Repository:
    return Repository.open(f"file://{base / 'repo'}", key, create=True)


def member(name: str, kind=tarfile.REGTYPE, data: bytes = b"", **attrs) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = attrs.pop("mtime", 1_700_000_000)
    for k, v in attrs.items():
        setattr(info, k, v)
    if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
        info.size = len(data)
    return info, data


def archive(*members) -> bytes:
    """A pax stream of the given members, exactly as listed (no name clean-up)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def tree_manifest(repo: Repository, chunks: list, stream: int) -> dict:
    """A manifest like the daemon's (service.py _tree_backup), stored and read back."""
    bid = new_backup_id()
    manifest = {
        "format": 1, "id": bid, "kind": "tree", "volume": "vol", "created": utcnow(),
        "host": "test", "source": {"backend": "nfs", "snapshot": "s", "size": 1 << 30,
                                   "stream": stream, "snapshot_created": utcnow(),
                                   "instance": "test"},
        "parent": None, "incremental": False, "chunk_size": repo.chunk_size,
        "chunks": chunks, "stats": {},
    }
    repo.put_manifest(manifest)
    return repo.get_manifest(repo.volume_key("vol"), bid)


def hostile_tree(repo: Repository, stream: bytes, pieces: int = 3) -> dict:
    """Store a crafted archive as a tree backup, cut into a few chunks as the writer would."""
    step = max(1, -(-len(stream) // pieces))
    chunks = []
    for i, off in enumerate(range(0, len(stream), step)):
        name, _stored, _fresh = repo.store_chunk(stream[off:off + step])
        chunks.append([i, name])
    return tree_manifest(repo, chunks, len(stream))


def restore(repo: Repository, manifest: dict, target: Path) -> dict:
    return tree.restore(repo, manifest, str(target), Job("restore"), 4)


def refused(base: Path, *members, naming: tuple[str, ...]) -> str:
    """Restore an archive of ``members``: it must fail naming each of ``naming``, and
    nothing outside the target may change."""
    before = outside_state(base)
    repo = open_repo(base)
    manifest = hostile_tree(repo, archive(*members))
    with pytest.raises(CorruptObject) as e:
        restore(repo, manifest, base / "target")
    msg = str(e.value)
    assert manifest["id"] in msg
    for what in naming:
        assert what in msg, msg
    assert_outside_untouched(base, before)
    return msg


def restored(base: Path, *members) -> Path:
    """Restore an archive of ``members``, which must succeed without touching the outside."""
    before = outside_state(base)
    repo = open_repo(base)
    restore(repo, hostile_tree(repo, archive(*members)), base / "target")
    assert_outside_untouched(base, before)
    return base / "target"


# -- paths -------------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["ABS", "../outside/canary", "../../../../../../ABS"])
def test_symlink_then_file_cannot_write_outside(place, link):
    canary = str(place / "outside" / "canary")
    link = link.replace("/ABS", canary).replace("ABS", canary)
    target = restored(place,
                      member("x", tarfile.SYMTYPE, linkname=link),
                      member("x", data=b"overwritten\n", mode=0o666))
    st = os.lstat(target / "x")
    assert stat.S_ISREG(st.st_mode) and (target / "x").read_bytes() == b"overwritten\n"


def test_symlink_then_file_with_hard_link_cannot_write_outside(place):
    """The link's target is never opened, even when the file is then hard-linked."""
    target = restored(place,
                      member("x", tarfile.SYMTYPE, linkname=str(place / "outside" / "canary")),
                      member("x", data=b"mine\n"),
                      member("y", tarfile.LNKTYPE, linkname="x"))
    assert os.lstat(target / "x").st_ino == os.lstat(target / "y").st_ino
    assert os.lstat(target / "x").st_nlink == 2


@pytest.mark.parametrize("link", ["ABS_DIR", "../outside/dir", "../outside"])
def test_symlink_to_directory_then_file_beneath_is_refused(place, link):
    link = link.replace("ABS_DIR", str(place / "outside" / "dir"))
    refused(place,
            member("d", tarfile.SYMTYPE, linkname=link),
            member("d/planted", data=b"planted\n"),
            naming=("d/planted",))


def test_symlink_to_directory_then_subdirectory_beneath_is_refused(place):
    refused(place,
            member("d", tarfile.SYMTYPE, linkname=str(place / "outside")),
            member("d/sub/deeper", tarfile.DIRTYPE),
            naming=("d/sub/deeper",))


def test_symlink_then_directory_of_same_name_stays_inside(place):
    target = restored(place,
                      member("d", tarfile.SYMTYPE, linkname=str(place / "outside")),
                      member("d", tarfile.DIRTYPE, mode=0o700),
                      member("d/f", data=b"inside\n"))
    assert stat.S_ISDIR(os.lstat(target / "d").st_mode)
    assert (target / "d" / "f").read_bytes() == b"inside\n"


def test_symlink_to_outside_is_restored_as_a_symlink(place):
    """A link target is data (it means something inside the container), never followed."""
    canary = str(place / "outside" / "canary")
    target = restored(place,
                      member("abs", tarfile.SYMTYPE, linkname=canary),
                      member("rel", tarfile.SYMTYPE, linkname="../outside/canary"),
                      member("dir", tarfile.SYMTYPE, linkname=str(place / "outside"),
                             uid=999, gid=999))
    assert os.readlink(target / "abs") == canary
    assert os.readlink(target / "rel") == "../outside/canary"
    assert os.lstat(target / "dir").st_uid == 999  # the link's own owner, not its target's


def test_root_member_as_symlink_is_refused(place):
    refused(place,
            member(".", tarfile.SYMTYPE, linkname=str(place / "outside")),
            member("planted", data=b"x"),
            naming=("'.'",))


def test_root_member_keeps_owner_and_mode_on_the_target_only(place):
    target = restored(place, member(".", tarfile.DIRTYPE, mode=0o750, uid=999, gid=998),
                      member("f", data=b"x"))
    st = os.lstat(target)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 999, 998)
    assert st.st_mtime == 1_700_000_000


@pytest.mark.parametrize("name", ["ABS/planted", "ABS_CANARY", "/planted-at-root"])
def test_absolute_member_name_is_refused(place, name):
    name = name.replace("ABS_CANARY", str(place / "outside" / "canary")) \
               .replace("ABS", str(place / "outside"))
    refused(place, member(name, data=b"planted\n"), naming=(name,))
    assert not os.path.exists("/planted-at-root")


@pytest.mark.parametrize("name", ["../outside/planted", "../outside/canary",
                                  "a/../../outside/planted", "./../outside/dir/planted", ".."])
def test_dotdot_member_name_is_refused(place, name):
    kind = tarfile.DIRTYPE if name == ".." else tarfile.REGTYPE
    refused(place, member(name, kind, data=b"planted\n"), naming=(name,))


def test_nul_in_member_name_is_refused(place):
    info, data = member("ok", data=b"x")
    info.pax_headers = {"path": "a\0/../../outside/planted"}
    refused(place, (info, data), naming=("NUL",))


def test_file_replacing_a_directory_with_content_is_refused(place):
    refused(place,
            member("d", tarfile.DIRTYPE),
            member("d/f", data=b"x"),
            member("d", data=b"replaces the directory"),
            naming=("'d'",))


def test_archive_ending_inside_a_file_is_refused(place):
    stream = archive(member("big", data=os.urandom(100_000)))
    before = outside_state(place)
    repo = open_repo(place)
    manifest = hostile_tree(repo, stream[:60_000])
    with pytest.raises(CorruptObject, match=manifest["id"]):
        restore(repo, manifest, place / "target")
    assert_outside_untouched(place, before)


# -- hard links --------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["ABS_CANARY", "/etc/passwd", "../outside/canary", "../x",
                                  "never-restored", "sub/../../outside/canary"])
def test_hard_link_outside_or_to_nothing_is_refused(place, link):
    link = link.replace("ABS_CANARY", str(place / "outside" / "canary"))
    refused(place,
            member("sub", tarfile.DIRTYPE),
            member("x", data=b"a file"),
            member("h", tarfile.LNKTYPE, linkname=link),
            naming=("'h'", link))


def test_hard_link_to_a_symlink_to_outside_is_refused(place):
    refused(place,
            member("s", tarfile.SYMTYPE, linkname=str(place / "outside" / "canary")),
            member("h", tarfile.LNKTYPE, linkname="s"),
            naming=("'h'", "'s'"))


def test_hard_link_to_a_file_replaced_by_a_symlink_is_refused(place):
    refused(place,
            member("f", data=b"was a file"),
            member("f", tarfile.SYMTYPE, linkname=str(place / "outside" / "canary")),
            member("h", tarfile.LNKTYPE, linkname="f"),
            naming=("'h'", "'f'"))


def test_hard_link_to_a_directory_is_refused(place):
    refused(place,
            member("d", tarfile.DIRTYPE),
            member("h", tarfile.LNKTYPE, linkname="d"),
            naming=("'h'", "'d'"))


# -- special files, owners, modes --------------------------------------------------------

@pytest.mark.parametrize("kind,dev", [(tarfile.CHRTYPE, (1, 3)), (tarfile.CHRTYPE, (1, 1)),
                                      (tarfile.BLKTYPE, (7, 0))])
def test_device_node_is_refused(place, kind, dev):
    refused(place, member("dev-node", kind, devmajor=dev[0], devminor=dev[1], mode=0o666),
            naming=("dev-node",))
    assert not os.path.lexists(place / "target" / "dev-node")


def test_setuid_root_file_is_restored_without_setuid(place):
    target = restored(place,
                      member("bin", tarfile.DIRTYPE, mode=0o2775, uid=0, gid=50),
                      member("bin/rootshell", data=b"#!/bin/sh\n", mode=0o6755, uid=0, gid=0),
                      member("bin/usershell", data=b"#!/bin/sh\n", mode=0o4711, uid=999,
                             gid=999),
                      member("tmp", tarfile.DIRTYPE, mode=0o1777))
    assert stat.S_IMODE(os.lstat(target / "bin/rootshell").st_mode) == 0o755
    st = os.lstat(target / "bin/usershell")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o711, 999)
    # a directory's setgid and sticky bits are part of how the volume works: kept
    assert stat.S_IMODE(os.lstat(target / "bin").st_mode) == 0o2775
    assert os.lstat(target / "bin").st_gid == 50
    assert stat.S_IMODE(os.lstat(target / "tmp").st_mode) == 0o1777


def test_file_capabilities_are_not_restored(place):
    # VFS_CAP_REVISION_2 with the effective flag, permitting CAP_SETUID (bit 7)
    caps = struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0)
    probe = place / "source" / "probe"
    probe.write_bytes(b"x")
    try:
        os.setxattr(probe, "security.capability", caps)
    except OSError as e:
        pytest.skip(f"this filesystem takes no file capabilities: {e}")
    info, data = member("capshell", data=b"#!/bin/sh\n", mode=0o755, uid=0, gid=0)
    info.pax_headers = {"SCHILY.xattr.security.capability":
                        caps.decode("utf-8", "surrogateescape"),
                        "SCHILY.xattr.user.kept": "yes"}
    target = restored(place, (info, data))
    assert "security.capability" not in os.listxattr(target / "capshell")
    assert os.getxattr(target / "capshell", "user.kept") == b"yes"


def test_fifo_is_restored_and_never_opened_for_writing(place):
    target = restored(place,
                      member("pipe", tarfile.FIFOTYPE, mode=0o620, uid=999, gid=999))
    st = os.lstat(target / "pipe")
    assert stat.S_ISFIFO(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o620, 999)


# -- a real tree round-trips -------------------------------------------------------------

def digest(root: Path, skip=()) -> list:
    """Names, types, owners, modes, mtimes, user xattrs, contents, link targets, and which
    files share an inode."""
    out, inodes = [], {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files) + ([] if dirpath != str(root) else ["."]):
            p = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(p, root)
            if rel in skip:
                continue
            st = os.lstat(p)
            entry = [rel, st.st_mode, st.st_uid, st.st_gid, st.st_mtime]
            if stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(p))
            else:
                entry.append(sorted((x, os.getxattr(p, x)) for x in os.listxattr(p)
                                    if x.startswith("user.")))
            if stat.S_ISREG(st.st_mode):
                entry.append(hashlib.sha256(open(p, "rb").read()).hexdigest())
                entry.append(st.st_size)
                entry.append(inodes.setdefault((st.st_dev, st.st_ino), rel))
            out.append(entry)
    return out


def build_tree(src: Path) -> None:
    os.makedirs(src / "etc/conf.d")
    os.makedirs(src / "var/lib/db")
    (src / "etc/conf.d/app.conf").write_text("key = value\n" * 40)
    os.setxattr(src / "etc/conf.d/app.conf", "user.origin", b"pyvol-test")
    for f in ("var/lib/db/table", "var/lib/db/wal"):
        (src / f).write_bytes(os.urandom(70_000))
        os.chown(src / f, 999, 999)
        os.chmod(src / f, 0o640)
    os.chown(src / "var/lib/db", 999, 999)
    os.chmod(src / "var/lib/db", 0o700)
    os.chmod(src / "etc", 0o2750)
    (src / "data.bin").write_bytes(os.urandom(300_000))
    os.link(src / "data.bin", src / "var/data.hardlink")
    os.symlink("conf.d/app.conf", src / "etc/current")
    os.symlink("/var/lib/elsewhere/current", src / "abs-link")
    with open(src / "sparse.img", "wb") as f:
        f.truncate(10 << 20)
        f.seek(5 << 20)
        f.write(os.urandom(4096))
    (src / "empty").write_bytes(b"")
    os.mkfifo(src / "var/pipe", 0o600)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "var/lib/db/socket"))
    sock.close()
    os.chown(src, 999, 999)
    os.chmod(src, 0o751)
    # fixed times everywhere, symlinks included, deepest first
    for dirpath, dirs, files in os.walk(src, topdown=False):
        for name in dirs + files:
            os.utime(os.path.join(dirpath, name), (1_600_000_000, 1_600_000_000),
                     follow_symlinks=False)
        os.utime(dirpath, (1_650_000_000, 1_650_000_000))


def backup_tree(repo: Repository, src: Path) -> dict:
    result = tree.backup(repo, str(src), Job("backup"), 4)
    return tree_manifest(repo, result.chunks, result.stats.pop("stream"))


def test_realistic_tree_round_trips(place):
    src, target = place / "source", place / "target"
    build_tree(src)
    expected = digest(src, skip={"var/lib/db/socket"})
    repo = open_repo(place, KEY)
    manifest = backup_tree(repo, src)
    assert manifest["chunks"]
    restore(repo, manifest, target)
    assert digest(target) == expected
    assert not os.path.lexists(target / "var/lib/db/socket")  # skipped by the backup
    sparse = os.lstat(target / "sparse.img")
    assert sparse.st_size == 10 << 20 and sparse.st_blocks * 512 <= 256 << 10
    assert stat.S_ISFIFO(os.lstat(target / "var/pipe").st_mode)
    assert os.lstat(target / "data.bin").st_ino == os.lstat(target / "var/data.hardlink").st_ino


def test_socket_is_skipped_without_changing_the_stream(place):
    """A tree with a socket archives to the same chunks as the tree without it."""
    src = place / "source"
    (src / "f").write_bytes(b"data\n" * 1000)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    sock.close()
    os.utime(src, (1_600_000_000, 1_600_000_000))
    repo = open_repo(place)
    with_socket = tree.backup(repo, str(src), Job("backup"), 2)
    assert with_socket.stats["files"] == 2  # the root and f
    os.unlink(src / "sock")
    os.utime(src, (1_600_000_000, 1_600_000_000))
    without = tree.backup(repo, str(src), Job("backup"), 2)
    assert with_socket.chunks == without.chunks


def test_a_directory_that_vanishes_while_it_is_read_fails_the_backup(place):
    """The snapshot being read is removed (another host's retention moves it to its trash):
    a directory listed in its parent but gone when the walk goes into it fails the backup,
    rather than leaving a backup that lacks it. The job's per-entry check is the moment: by
    the entry after "a", the root has been listed and "a" archived, not yet walked into."""
    src = place / "source"
    (src / "a").mkdir(parents=True)
    (src / "a" / "inside").write_bytes(b"rows\n" * 1000)
    (src / "z").write_bytes(b"z")

    class RemovesA(Job):
        checks = 0

        def check(self):
            RemovesA.checks += 1
            if RemovesA.checks == 3:  # before the entry "z"
                shutil.rmtree(src / "a")
            super().check()

    with pytest.raises(Conflict, match=r"^a vanished from the snapshot while the backup read"):
        tree.backup(open_repo(place), str(src), RemovesA("backup"), 2)


# -- block chunks and repository metadata --------------------------------------------------

def block_backup(place: Path, key: bytes | None,
                 repo: Repository | None = None) -> tuple[Repository, dict]:
    """A 3-piece sparse "device" (a plain file) backed up; the repository (``repo``, or a
    file:// one in ``place``) and manifest."""
    repo = repo or open_repo(place, key)
    cs = repo.chunk_size
    dev = place / "source" / "device"
    size = 3 * cs
    with open(dev, "wb") as f:
        f.truncate(size)
        for i in range(3):
            f.seek(i * cs + 4096)
            f.write(os.urandom(8192))
    result = block.backup(repo, str(dev), size, [(0, size)], None, None, Job("backup"), 4)
    assert len(result.chunks) == 3
    bid = new_backup_id()
    repo.put_manifest({
        "format": 1, "id": bid, "kind": "block", "volume": "vol", "created": utcnow(),
        "host": "test", "source": {"backend": "loop", "snapshot": "s", "size": size,
                                   "fs": "ext4", "snapshot_created": utcnow(),
                                   "instance": "test"},
        "parent": None, "incremental": False, "chunk_size": cs,
        "chunks": result.chunks, "stats": result.stats,
    })
    return repo, repo.get_manifest(repo.volume_key("vol"), bid)


def chunk_file(place: Path, name: str) -> Path:
    return place / "repo" / "chunks" / name[:2] / name


def block_restore(repo: Repository, manifest: dict, place: Path) -> dict:
    dev = place / "target" / "device"
    with open(dev, "wb") as f:
        f.truncate(int(manifest["source"]["size"]))
    return block.restore(repo, manifest, str(dev), Job("restore"), 4)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_swapped_chunk_objects_are_both_reported(place, key):
    repo, manifest = block_backup(place, key)
    a, b = manifest["chunks"][0][1], manifest["chunks"][1][1]
    fa, fb, tmp = chunk_file(place, a), chunk_file(place, b), place / "repo" / "swap"
    os.rename(fa, tmp)
    os.rename(fb, fa)
    os.rename(tmp, fb)
    report = block.verify(repo, manifest, Job("verify"), 4)
    assert len(report["bad"]) == 2, report
    assert any(a in m for m in report["bad"]) and any(b in m for m in report["bad"]), report
    with pytest.raises(CorruptObject) as e:
        block_restore(repo, manifest, place)
    assert a in str(e.value) or b in str(e.value)


def test_manifest_naming_a_missing_chunk_fails_naming_it(place):
    repo, manifest = block_backup(place, KEY)
    gone = manifest["chunks"][2][1]
    chunk_file(place, gone).unlink()
    report = block.verify(repo, manifest, Job("verify"), 4)
    assert len(report["bad"]) == 1 and gone in report["bad"][0], report
    with pytest.raises(CorruptObject, match=gone):
        block_restore(repo, manifest, place)


def test_tree_manifest_naming_a_missing_chunk_fails_naming_it(place):
    src = place / "source"
    (src / "f").write_bytes(os.urandom(3 << 20))
    repo = open_repo(place)
    manifest = backup_tree(repo, src)
    gone = manifest["chunks"][-1][1]
    chunk_file(place, gone).unlink()
    with pytest.raises(CorruptObject, match=gone):
        restore(repo, manifest, place / "target")


def zstd_bomb(size: int, declared: bool) -> bytes:
    """A zstd frame of ``size`` zero bytes, made in pieces so this process never holds them."""
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=declared)
    with cctx.stream_writer(out, size=size if declared else -1, closefd=False) as w:
        piece = bytes(1 << 20)
        for _ in range(size // len(piece)):
            w.write(piece)
    return out.getvalue()


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_an_s3_repositorys_chunks_are_read_whole_and_checked(place, s3, monkeypatch, key):
    """S3 reads a chunk into the thread's buffer piece by piece: a restore comes out byte for
    byte, and an object too long, cut short or another chunk's is refused naming it."""
    for var, value in s3.env.items():
        monkeypatch.setenv(var, value)
    bucket = s3.bucket()
    repo, manifest = block_backup(
        place, key, Repository.open(f"s3://{bucket}/r", key, create=True))
    block_restore(repo, manifest, place)
    assert (place / "target" / "device").read_bytes() == \
        (place / "source" / "device").read_bytes()

    client = s3.client()
    names = [n for _, n in manifest["chunks"]]
    stored = {n: client.get_object(Bucket=bucket, Key="r/" + repo.chunk_key(n))["Body"].read()
              for n in names}
    for bad, why in [(stored[names[0]] + os.urandom(repo.chunk_size), "larger than any"),
                     (stored[names[0]][:len(stored[names[0]]) // 2], None),
                     (stored[names[1]], None)]:
        client.put_object(Bucket=bucket, Key="r/" + repo.chunk_key(names[0]), Body=bad)
        with pytest.raises(CorruptObject, match=why or names[0]) as e:
            block_restore(repo, manifest, place)
        assert names[0] in str(e.value)
    report = block.verify(repo, manifest, Job("verify"), 4)
    assert len(report["bad"]) == 1 and names[0] in report["bad"][0], report


@pytest.mark.parametrize("declared", [True, False], ids=["size-declared", "size-unknown"])
def test_decompression_bomb_is_refused_without_the_memory(place, declared):
    repo, manifest = block_backup(place, None)  # plain: the blob needs no key
    name = manifest["chunks"][0][1]
    frame = zstd_bomb(1 << 30, declared)
    assert len(frame) < 1 << 20
    if declared:
        assert zstandard.frame_content_size(frame) == 1 << 30
    chunk_file(place, name).write_bytes(b"\x01" + frame)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    started = time.monotonic()
    with pytest.raises(CorruptObject) as e:
        repo.get_chunk(name)
    assert time.monotonic() - started < 5
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    assert grew < 200 << 10, f"reading the bomb took {grew >> 10} MiB more memory"
    msg = str(e.value)
    assert name in msg, msg
    assert str(repo.chunk_size) in msg or "limit" in msg, msg
    report = block.verify(repo, manifest, Job("verify"), 2)
    assert len(report["bad"]) == 1 and name in report["bad"][0]


def rewrite_config(place: Path, change) -> None:
    path = place / "repo" / "config"
    config = json.loads(path.read_bytes())
    change(config)
    path.write_text(json.dumps(config, indent=1))


def test_config_downgraded_to_unencrypted_is_refused(place):
    open_repo(place, KEY)
    rewrite_config(place, lambda c: c.update(encryption=None))
    with pytest.raises(PyvolError) as e:
        Repository.open(f"file://{place / 'repo'}", KEY)
    msg = str(e.value)
    assert "config" in msg, msg
    assert "not encrypted" in msg or "altered" in msg, msg


def test_config_with_changed_chunk_size_is_refused(place):
    open_repo(place, KEY)
    rewrite_config(place, lambda c: c.update(chunk_size=1 << 20))
    with pytest.raises(PyvolError, match="config"):
        Repository.open(f"file://{place / 'repo'}", KEY)


def test_a_schedules_listing_passes_over_a_bad_manifest_that_a_persons_listing_names(place):
    """One manifest that does not decode (or whose schedule mark is no string) must not stop a
    schedule's retention for good: its listing passes over it and keeps the rest, while
    `pyvol backup ls` still fails naming it."""
    from types import SimpleNamespace

    from pyvol.backup.service import Backups

    repo = open_repo(place, KEY)
    good = tree_manifest(repo, [], 0)
    marked = tree_manifest(repo, [], 0)
    bad_mark = dict(marked, id=new_backup_id(), schedule_of=["not", "a", "string"])
    bad_mark.pop("url")
    repo.put_manifest(bad_mark)
    garbled = tree_manifest(repo, [], 0)
    path = place / "repo" / "manifests" / repo.volume_key("vol") / garbled["id"]
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    key_file = place / "key"
    key_file.write_bytes(KEY)
    backups = Backups(None, SimpleNamespace(backup_settings={"key_file": str(key_file)}))
    url = f"file://{place / 'repo'}"
    listed = backups.list(url, "vol", passing_over_bad=True)
    assert sorted(b["id"] for b in listed) == sorted([good["id"], marked["id"]])
    with pytest.raises(CorruptObject):
        backups.list(url, "vol")
