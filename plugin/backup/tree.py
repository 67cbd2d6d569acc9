"""File-tree backups (nfs volumes, or any directory): a deterministic archive stream, cut
with content-defined chunking so that unchanged files dedupe between backups.

The stream is a POSIX pax archive of the snapshot directory, written in sorted order with
numeric owners, modes, mtimes, xattrs (``SCHILY.xattr.*``), symlinks and hard links, so the
same tree always gives the same bytes. FastCDC (pyfastcdc) cuts it into chunks of 512 KiB to
4 MiB whose boundaries follow the content: an edit moves only the chunks around it. Unix
sockets are left out (an archive cannot hold one; the program that listens makes it again).

Restore streams the chunks back in order (fetched ahead in parallel), checks each against its
name, and extracts, writing zero blocks as holes so sparse files stay sparse. Anyone who can
write to a shared repository can hand a restore any archive, and the restore runs as root, so
tarfile only parses the stream; the files are made here, through directory descriptors:

- Paths. The target is opened with ``O_DIRECTORY|O_NOFOLLOW`` and every member's parent is
  walked from it one component at a time with ``O_NOFOLLOW`` (missing directories are made on
  the way); a symlink or a file where a directory should be refuses the member. What exists at
  the member's own name is removed first (an empty directory included; a directory with
  content refuses the member) and the member is created new, a file with ``O_EXCL``, so no
  write ever follows a link, and nothing outside the target is created or changed.
- Names. Empty names, NUL bytes, absolute names and names that climb out of the target
  (``..`` after normalisation) are refused. ``.`` is the target itself and must be a
  directory; its owner, mode and time are applied to the target.
- Symlinks are made as given, absolute or escaping targets included: a volume can hold
  ``current -> /var/lib/app/v2``, which means something inside its containers. A link target
  is only data here: no restore step follows one (above), nor does anything else pyvol does
  with a volume, and a container resolves it in its own mount namespace.
- Hard links only to a regular file this same restore created (and that no later member
  replaced): no link to a file outside the target, or to one the archive did not bring.
- Device nodes are refused (one on a volume gives its containers a host device), as are tar's
  sparse members and unknown types. FIFOs are made.
- Owners: numeric uid and gid as archived (a database's files belong to the container's user).
  Modes as archived, except that setuid and setgid are cleared on everything but directories,
  and ``security.capability`` xattrs are dropped: a repository writer must not be able to
  plant a setuid-root binary, or one with file capabilities, in a volume containers run from.
  Directories keep setgid and the sticky bit. Other xattrs, mtimes, owners and modes are
  applied best effort (as tarfile's extraction did): a target that refuses them, such as an
  NFS export with root_squash, still gets the data. Directories get theirs last, deepest
  first, each reopened from the target without following links.

Python's ``tarfile.data_filter`` is the floor for paths and links: every member it refuses for
its path (absolute, outside the target, through a link) or as a device node is refused or
contained here. It is stricter in three ways a volume backup cannot be: it drops owners and
most mode bits (a volume's owners and modes are part of its data), it refuses absolute and
escaping symlink targets (kept here as data, safe as said above), and it refuses FIFOs (a
FIFO is a pipe between the volume's own users and reaches nothing of the host).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import queue
import stat
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from pyfastcdc import FastCDC

from ..errors import Conflict, PyvolError
from .blobs import CorruptObject
from .job import Job, bounded_map
from .repo import BackupResult, Repository

MIN_CHUNK, AVG_CHUNK, MAX_CHUNK = 512 << 10, 1 << 20, 4 << 20
HOLE = 64 << 10
XATTR = "SCHILY.xattr."


def _entries(root: str) -> Iterator[tuple[str, str]]:
    """(path, name in the archive) for the whole tree, in one fixed order. A directory that
    cannot be listed fails the walk: os.walk's default passes over it in silence, and a
    backup would then succeed without it (a snapshot removed by another host while this one
    reads it, say)."""
    yield root, "."
    for dirpath, dirs, files in os.walk(root, onerror=_unlistable):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(dirpath, name)
            yield path, os.path.relpath(path, root)


def _unlistable(e: OSError) -> None:
    raise e


def _unreadable(e: OSError, root: str) -> PyvolError:
    where = (os.path.relpath(e.filename, root) if isinstance(e.filename, str)
             else "a file or directory")
    if isinstance(e, FileNotFoundError):
        return Conflict(f"{where} vanished from the snapshot while the backup read it (was "
                        "the snapshot removed meanwhile?); no backup was written")
    return PyvolError(f"cannot read {where} in the snapshot: {e.strerror or e}; no backup "
                      "was written")


def _xattrs(path: str) -> dict[str, str]:
    out = {}
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:
        return out
    for name in names:
        try:
            out[XATTR + name] = os.getxattr(path, name, follow_symlinks=False).decode(
                "utf-8", "surrogateescape")
        except OSError:
            continue
    return out


class _Cutter(io.RawIOBase):
    """The archive's sink: buffers the stream and hands out content-defined chunks."""

    def __init__(self, out: queue.Queue, job: Job):
        self.buf = bytearray()
        self.out, self.job = out, job
        self.cdc = FastCDC(avg_size=AVG_CHUNK, min_size=MIN_CHUNK, max_size=MAX_CHUNK)
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.buf += data
        self.size += len(data)
        if len(self.buf) >= 4 * MAX_CHUNK:
            self._emit(final=False)
        return len(data)

    def _emit(self, final: bool) -> None:
        cuts = list(self.cdc.cut_buf(bytes(self.buf)))
        keep = 0 if final else 1  # the last cut may move once more data arrives
        used = 0
        for c in cuts[:len(cuts) - keep] if keep else cuts:
            self.job.check()
            self.out.put(bytes(self.buf[c.offset:c.offset + c.length]))
            used = c.offset + c.length
        del self.buf[:used]

    def finish(self) -> None:
        if self.buf:
            self._emit(final=True)


def backup(repo: Repository, directory: str, job: Job, threads: int) -> BackupResult:
    """Archive ``directory`` into the repository; the chunk list and the byte counts."""
    stats = {"read": 0, "uploaded": 0, "chunks_new": 0, "chunks_reused": 0, "files": 0}
    chunks: dict[int, str] = {}
    pipe: queue.Queue = queue.Queue(maxsize=threads + 2)
    failure: list[BaseException] = []
    try:
        job.start("backup", sum(os.lstat(p).st_size for p, _ in _entries(directory)
                                if os.path.isfile(p) and not os.path.islink(p)))
    except OSError as e:
        raise _unreadable(e, directory) from None

    def produce():
        try:
            cutter = _Cutter(pipe, job)
            with tarfile.open(fileobj=cutter, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for path, arcname in _entries(directory):
                    job.check()
                    info = tar.gettarinfo(path, arcname)
                    if info is None:  # a Unix socket: no archive format can hold one
                        continue
                    info.uname = info.gname = ""
                    info.pax_headers = _xattrs(path)
                    if info.isreg():
                        with open(path, "rb") as f:
                            tar.addfile(info, f)
                        stats["read"] += info.size
                        job.advance(info.size)
                    else:
                        tar.addfile(info)
                    stats["files"] += 1
            cutter.finish()
            stats["stream"] = cutter.size
        except OSError as e:
            failure.append(_unreadable(e, directory))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            failure.append(e)
        finally:
            pipe.put(None)

    def items():
        n = 0
        while (data := pipe.get()) is not None:
            yield n, data
            n += 1

    producer = threading.Thread(target=produce, name="tree-archive", daemon=True)
    producer.start()
    repo.known_chunks()  # list once, before the threads start

    def one(item):
        index, data = item
        return (index, *repo.store_chunk(data))

    def collect(result):
        index, name, stored, fresh = result
        chunks[index] = name
        stats["uploaded"] += stored
        stats["chunks_new" if fresh else "chunks_reused"] += 1

    try:
        bounded_map(one, items(), threads, job, collect)
    finally:
        if failure:
            job.cancel()
        while producer.is_alive():  # unblock a producer waiting on a full pipe
            try:
                pipe.get(timeout=0.1)
            except queue.Empty:
                pass
        producer.join()
    if failure:
        raise failure[0]
    return BackupResult([[i, chunks[i]] for i in sorted(chunks)], stats)


class _ChunkStream(io.RawIOBase):
    """The archive stream again, from the chunks in order, fetched a few ahead in parallel."""

    def __init__(self, repo: Repository, names: list[str], job: Job, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tree-restore")
        self.repo, self.job = repo, job
        self.pending = [self.pool.submit(repo.get_chunk, n) for n in names[:threads + 2]]
        self.rest = iter(names[threads + 2:])
        self.current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.current:
            if not self.pending:
                return 0
            self.job.check()
            data = self.pending.pop(0).result()
            self.job.advance(len(data))
            nxt = next(self.rest, None)
            if nxt is not None:
                self.pending.append(self.pool.submit(self.repo.get_chunk, nxt))
            self.current = memoryview(data)
        n = min(len(b), len(self.current))
        b[:n] = self.current[:n]
        self.current = self.current[n:]
        return n

    def close(self) -> None:
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        super().close()


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FIFO = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)  # what O_NOFOLLOW|O_DIRECTORY says of a link or file
_PLAIN_FILE = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_UNSAFE_XATTRS = frozenset({"security.capability"})  # file capabilities: setuid by another name
_BEST_EFFORT = (OSError, ValueError, OverflowError)  # also a hostile header's absurd numbers


class _Restorer:
    """Writes archive members under one directory, through directory file descriptors only.

    Every path is walked from the root's descriptor one component at a time with
    ``O_NOFOLLOW``, and every final component is created by this restore (whatever was there
    is removed first), so no symlink is ever followed and no write can land outside the root.
    """

    def __init__(self, directory: str, backup_id: str):
        self.bid = backup_id
        self.root = os.open(directory, _DIR)
        self.files: set[str] = set()  # regular files this restore created: hard-link sources
        self.dirs: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []
        self._parent: tuple[tuple[str, ...], int] = ((), self.root)  # the last parent walked

    def close(self) -> None:
        self._set_parent((), self.root)
        os.close(self.root)

    def _refuse(self, member: tarfile.TarInfo, why: str) -> CorruptObject:
        return CorruptObject(f"backup {self.bid}: archive member {member.name!r} {why}; the "
                             "repository holds an archive pyvol did not write, or was altered")

    def _components(self, member: tarfile.TarInfo, name: str, what: str) -> tuple[str, ...]:
        """``name`` as path components under the root; () is the root itself."""
        if not name:
            raise self._refuse(member, f"has an empty {what}")
        if "\0" in name:
            raise self._refuse(member, f"has a NUL byte in its {what} {name!r}")
        if os.path.isabs(name):
            raise self._refuse(member, f"has an absolute {what} {name!r}")
        norm = os.path.normpath(name)
        parts = () if norm == "." else tuple(norm.split("/"))
        if parts and parts[0] == "..":
            raise self._refuse(member, f"has a {what} {name!r} that climbs out of the volume")
        return parts

    def _open_dir(self, comps: tuple[str, ...], create: bool) -> int:
        """A descriptor of the real directory at ``comps`` (the root's own for ()), walked
        without following links; missing components are made when ``create``. OSError
        (ELOOP, ENOTDIR) when a component is a symlink or not a directory."""
        fd = self.root
        try:
            for comp in comps:
                try:
                    nxt = os.open(comp, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o700, dir_fd=fd)  # the member's own mode comes at the end
                    nxt = os.open(comp, _DIR, dir_fd=fd)
                if fd != self.root:
                    os.close(fd)
                fd = nxt
        except BaseException:
            if fd != self.root:
                os.close(fd)
            raise
        return fd

    def _set_parent(self, comps: tuple[str, ...], fd: int) -> None:
        old = self._parent[1]
        if old != self.root and old != fd:
            os.close(old)
        self._parent = (comps, fd)

    def _parent_of(self, member: tarfile.TarInfo, comps: tuple[str, ...]) -> int:
        """The directory a member goes into, kept open for the members that follow (removals
        only ever happen inside it, so it stays the directory that its path names)."""
        parent = comps[:-1]
        if self._parent[0] != parent:
            try:
                fd = self._open_dir(parent, create=True)
            except OSError as e:
                if e.errno not in _NOT_A_DIR:
                    raise
                raise self._refuse(member, f"would be written through {'/'.join(parent)!r}, "
                                   "which is a symlink or not a directory") from None
            self._set_parent(parent, fd)
        return self._parent[1]

    def _clear(self, member: tarfile.TarInfo, parent: int, leaf: str, rel: str,
               keep_dir: bool) -> bool:
        """Make room for a member: remove what is at its name, except a real directory when
        the member is one too (True: that directory is kept)."""
        try:
            st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            try:
                os.rmdir(leaf, dir_fd=parent)
            except OSError:
                raise self._refuse(member, f"would replace the directory {rel!r}, which is not "
                                   "empty") from None
        else:
            os.unlink(leaf, dir_fd=parent)
        self.files.discard(rel)
        return False

    def _link_source(self, member: tarfile.TarInfo) -> tuple[str, ...]:
        src = self._components(member, member.linkname, "hard link target")
        if "/".join(src) not in self.files:
            raise self._refuse(member, f"is a hard link to {member.linkname!r}, which is not a "
                               "regular file this restore created in the volume")
        return src

    def extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        comps = self._components(member, member.name, "name")
        if not comps:
            if not member.isdir():
                raise self._refuse(member, "names the volume's root but is not a directory")
            self.dirs.append(((), member))
            return
        if member.ischr() or member.isblk():
            raise self._refuse(member, f"is a device node ({member.devmajor}:{member.devminor})"
                               "; pyvol restores none: it would give the volume's containers a "
                               "host device")
        if member.isreg() and (member.type not in _PLAIN_FILE or member.issparse()):
            raise self._refuse(member, "is a sparse tar member, which pyvol never writes")
        if member.isreg() and member.size < 0:
            raise self._refuse(member, f"has a negative size {member.size}")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()
                or member.isfifo()):
            raise self._refuse(member, f"has the unknown type {member.type!r}")
        rel = "/".join(comps)
        src = self._link_source(member) if member.islnk() else None
        if src is not None and "/".join(src) == rel:
            raise self._refuse(member, "is a hard link to itself")
        if member.issym() and (not member.linkname or "\0" in member.linkname):
            raise self._refuse(member, f"is a symlink with an invalid target "
                               f"{member.linkname!r}")
        parent = self._parent_of(member, comps)
        leaf = comps[-1]
        exists = self._clear(member, parent, leaf, rel, keep_dir=member.isdir())
        if member.isdir():
            if not exists:
                os.mkdir(leaf, 0o700, dir_fd=parent)
            self.dirs.append((comps, member))  # owner, mode and time at the end
        elif member.isreg():
            fd = os.open(leaf, _NEW_FILE, 0o600, dir_fd=parent)
            try:
                self._write(tar, member, fd)
                self._attrs(fd, member)
            finally:
                os.close(fd)
            self.files.add(rel)
        elif member.issym():
            os.symlink(member.linkname, leaf, dir_fd=parent)
            with contextlib.suppress(*_BEST_EFFORT):
                os.chown(leaf, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
            with contextlib.suppress(*_BEST_EFFORT):
                os.utime(leaf, (member.mtime, member.mtime), dir_fd=parent,
                         follow_symlinks=False)
        elif member.islnk():
            self._hard_link(member, src, parent, leaf)
            self.files.add(rel)
        else:  # a FIFO
            os.mkfifo(leaf, 0o600, dir_fd=parent)
            fd = os.open(leaf, _FIFO, dir_fd=parent)
            try:
                self._attrs(fd, member)
            finally:
                os.close(fd)

    def _hard_link(self, member, src: tuple[str, ...], parent: int, leaf: str) -> None:
        try:
            src_dir = self._open_dir(src[:-1], create=False)
        except OSError:
            raise self._refuse(member, f"is a hard link to {member.linkname!r}, which is no "
                               "longer a file in the volume") from None
        try:
            st = os.stat(src[-1], dir_fd=src_dir, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise self._refuse(member, f"is a hard link to {member.linkname!r}, which is "
                                   "not a regular file")
            os.link(src[-1], leaf, src_dir_fd=src_dir, dst_dir_fd=parent,
                    follow_symlinks=False)
        except FileNotFoundError:
            raise self._refuse(member, f"is a hard link to {member.linkname!r}, which is no "
                               "longer in the volume") from None
        finally:
            if src_dir != self.root:
                os.close(src_dir)

    def _write(self, tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
        """The member's data, with every all-zero block of HOLE bytes left as a hole."""
        source = tar.extractfile(member)
        zero = bytes(HOLE)
        left = member.size
        while left:
            block = source.read(min(left, HOLE))
            if not block:
                raise CorruptObject(f"backup {self.bid}: the archive ends inside "
                                    f"{member.name!r}")
            if block == zero[:len(block)]:
                os.lseek(fd, len(block), os.SEEK_CUR)
            else:
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
            left -= len(block)
        os.ftruncate(fd, member.size)

    @staticmethod
    def _attrs(fd: int, member: tarfile.TarInfo) -> None:
        """Owner, xattrs, mode, time, in tarfile's order (chown clears capabilities and
        setuid bits, so it comes first); each best effort, as tarfile's extraction was: a
        filesystem that refuses one (an NFS export with root_squash) still gets the data."""
        with contextlib.suppress(*_BEST_EFFORT):
            os.fchown(fd, member.uid, member.gid)
        for key, value in member.pax_headers.items():
            name = key[len(XATTR):]
            if key.startswith(XATTR) and name not in _UNSAFE_XATTRS:
                with contextlib.suppress(*_BEST_EFFORT):  # a filesystem without that namespace
                    os.setxattr(fd, name, value.encode("utf-8", "surrogateescape"))
        mode = member.mode & 0o7777
        if not member.isdir():
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        with contextlib.suppress(*_BEST_EFFORT):
            os.fchmod(fd, mode)
        with contextlib.suppress(*_BEST_EFFORT):
            os.utime(fd, (member.mtime, member.mtime))

    def finish(self) -> None:
        """Directories' owners, xattrs, modes and times, deepest first, once nothing more is
        written into them (which would move their mtimes), each reopened from the root
        without following links."""
        for comps, member in sorted(self.dirs, key=lambda d: d[0], reverse=True):
            try:
                fd = self._open_dir(comps, create=False)
            except OSError:
                continue  # a later member replaced it: nothing of it is left to finish
            try:
                self._attrs(fd, member)
            finally:
                if fd != self.root:
                    os.close(fd)


def restore(repo: Repository, manifest: dict, directory: str, job: Job, threads: int) -> dict:
    """Extract a tree backup into ``directory`` (an empty volume), by the rules above."""
    names = [str(n) for _, n in sorted(manifest["chunks"], key=lambda c: int(c[0]))]
    job.start("restore", int(manifest["source"].get("stream", 0)) or 1)
    stream = _ChunkStream(repo, names, job, threads)
    try:
        out = _Restorer(directory, str(manifest["id"]))
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    job.check()
                    out.extract(tar, member)
            out.finish()
        finally:
            out.close()
    except tarfile.TarError as e:
        raise CorruptObject(f"backup {manifest['id']}: the archive does not read back: {e}") \
            from None
    finally:
        stream.close()
    return {"chunks": len(names)}
