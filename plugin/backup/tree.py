"""File-tree backups (nfs volumes, or any directory): a deterministic archive stream, cut
with content-defined chunking so that unchanged files dedupe between backups.

The stream is a POSIX pax archive of the snapshot directory, written in sorted order with
numeric owners, modes, mtimes, xattrs (``SCHILY.xattr.*``), symlinks and hard links, so the
same tree always gives the same bytes. FastCDC (pyfastcdc) cuts it into chunks of 512 KiB to
4 MiB whose boundaries follow the content: an edit moves only the chunks around it. Restore
streams the chunks back in order (fetched ahead in parallel), checks each against its name,
and extracts, writing zero blocks as holes so sparse files stay sparse.
"""

from __future__ import annotations

import io
import os
import queue
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from pyfastcdc import FastCDC

from .blobs import CorruptObject
from .job import Job, bounded_map
from .repo import Repository

MIN_CHUNK, AVG_CHUNK, MAX_CHUNK = 512 << 10, 1 << 20, 4 << 20
HOLE = 64 << 10
XATTR = "SCHILY.xattr."


def _entries(root: str) -> Iterator[tuple[str, str]]:
    """(path, name in the archive) for the whole tree, in one fixed order."""
    yield root, "."
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(dirpath, name)
            yield path, os.path.relpath(path, root)


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


def backup(repo: Repository, directory: str, job: Job, threads: int) -> tuple[list, dict]:
    """Archive ``directory`` into the repository; the chunk list and the byte counts."""
    stats = {"read": 0, "uploaded": 0, "chunks_new": 0, "chunks_reused": 0, "files": 0}
    chunks: dict[int, str] = {}
    pipe: queue.Queue = queue.Queue(maxsize=threads + 2)
    failure: list[BaseException] = []
    job.start("backup", sum(os.lstat(p).st_size for p, _ in _entries(directory)
                            if os.path.isfile(p) and not os.path.islink(p)))

    def produce():
        try:
            cutter = _Cutter(pipe, job)
            with tarfile.open(fileobj=cutter, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for path, arcname in _entries(directory):
                    job.check()
                    info = tar.gettarinfo(path, arcname)
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
    return [[i, chunks[i]] for i in sorted(chunks)], stats


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


class _Extractor(tarfile.TarFile):
    """tarfile's extraction, with holes for zero blocks and xattrs restored."""

    def makefile(self, tarinfo, targetpath):
        source = self.fileobj
        source.seek(tarinfo.offset_data)
        zero = bytes(HOLE)
        with open(targetpath, "wb") as f:
            left = tarinfo.size
            while left:
                block = source.read(min(left, HOLE))
                if not block:
                    raise CorruptObject(f"archive ends inside {tarinfo.name}")
                if block == zero[:len(block)]:
                    f.seek(len(block), os.SEEK_CUR)
                else:
                    f.write(block)
                left -= len(block)
            f.truncate(tarinfo.size)

    def chmod(self, tarinfo, targetpath):
        for key, value in tarinfo.pax_headers.items():
            if key.startswith(XATTR) and not tarinfo.issym():
                try:
                    os.setxattr(targetpath, key[len(XATTR):],
                                value.encode("utf-8", "surrogateescape"))
                except OSError:
                    pass  # a filesystem without that namespace: the data matters more
        super().chmod(tarinfo, targetpath)


def _inside(dest: str):
    """A tarfile filter that keeps every member inside ``dest`` and changes nothing else."""
    real_dest = os.path.realpath(dest)

    def check(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        name = os.path.normpath(member.name)
        if os.path.isabs(member.name) or name.split(os.sep)[0] == "..":
            raise CorruptObject(f"archive member {member.name!r} points outside the volume")
        parent = os.path.realpath(os.path.dirname(os.path.join(dest, name)))
        if parent != real_dest and not parent.startswith(real_dest + os.sep):
            raise CorruptObject(f"archive member {member.name!r} would be written through a "
                                "link outside the volume")
        if member.islnk():
            target = os.path.normpath(member.linkname)
            if os.path.isabs(target) or target.split(os.sep)[0] == "..":
                raise CorruptObject(f"hard link {member.name!r} points outside the volume")
        return member
    return check


def restore(repo: Repository, manifest: dict, directory: str, job: Job, threads: int) -> dict:
    names = [str(n) for _, n in sorted(manifest["chunks"], key=lambda c: int(c[0]))]
    job.start("restore", int(manifest["source"].get("stream", 0)) or 1)
    stream = _ChunkStream(repo, names, job, threads)
    try:
        with _Extractor.open(fileobj=stream, mode="r|") as tar:
            tar.extraction_filter = _inside(directory)
            tar.extractall(directory, numeric_owner=True)
    except tarfile.TarError as e:
        raise CorruptObject(f"backup {manifest['id']}: the archive does not read back: {e}") \
            from None
    finally:
        stream.close()
    return {"chunks": len(names)}
