"""Block backups: a snapshot cut into fixed pieces, each stored once under its content's name.

``backup`` reads only the pieces that hold data (or, incrementally, that changed since the
parent's snapshot), skips all-zero pieces, and uploads only chunks the repository lacks; it
returns the manifest's chunk map and the byte counts. ``restore`` writes a manifest's chunks
into a fresh device, checking every chunk against its name. Both run on a bounded thread pool:
hashing, zstd, AES-GCM and network I/O all release the GIL, so the work spreads over the cores
while memory stays at a few pieces per thread.
"""

from __future__ import annotations

from ..crashpoint import crashpoint
from .blobs import CorruptObject, Room
from .device import DeviceReader, DeviceWriter
from .job import Job, bounded_map
from .repo import BackupResult, Repository

Range = tuple[int, int]
WRITE_BLOCK = 64 << 10  # restore skips all-zero blocks of this size, keeping volumes thin


def pieces_overlapping(ranges: list[Range], piece: int, size: int) -> list[int]:
    out: set[int] = set()
    for off, length in ranges:
        end = min(off + length, size)
        if end > off:
            out.update(range(off // piece, (end - 1) // piece + 1))
    return sorted(out)


def clip(ranges: list[Range], start: int, end: int) -> list[Range]:
    """The parts of sorted ``ranges`` inside [start, end), relative to ``start``."""
    out = []
    for off, length in ranges:
        a, b = max(off, start), min(off + length, end)
        if a < b:
            out.append((a - start, b - a))
    return out


def nonzero_runs(data: bytes, block: int) -> list[tuple[int, int]]:
    """The [start, end) runs of ``data`` made of ``block``-sized pieces that are not all
    zero: what a restore writes (the rest stays a hole in a thin volume)."""
    zero = bytes(block)
    view = memoryview(data)
    runs: list[tuple[int, int]] = []
    for off in range(0, len(data), block):
        end = min(off + block, len(data))
        if not zero.startswith(view[off:end]):  # a memcmp, and no copy of the block
            if runs and runs[-1][1] == off:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((off, end))
    return runs


def backup(repo: Repository, device: str, size: int, mapped: list[Range],
           changed: list[Range] | None, parent: dict | None, job: Job,
           threads: int) -> BackupResult:
    """Back up ``device``: every mapped piece, or with ``changed`` only those, the rest
    taken from the ``parent`` backup's manifest."""
    cs = repo.chunk_size
    to_read = pieces_overlapping(mapped if changed is None else changed, cs, size)
    chunks = {int(i): str(n) for i, n in parent["chunks"]} \
        if changed is not None and parent else {}
    stats = {"read": 0, "uploaded": 0, "chunks_new": 0, "chunks_reused": 0, "pieces_zero": 0,
             "pieces_read": len(to_read)}
    repo.known_chunks()  # list once, before the threads start
    job.start("backup", sum(min(cs, size - i * cs) for i in to_read))
    reader = DeviceReader(device, cs)

    def one(index: int):
        job.check()
        start = index * cs
        length = min(cs, size - start)
        ranges = clip(mapped, start, start + length)
        room = Room(length)
        reader.read_into(room.plain, start, ranges)
        nread = sum(n for _, n in ranges)
        job.advance(length)
        if reader.is_zero(room.plain):
            return index, None, nread, 0, False
        name, stored, fresh = repo.store_chunk(room)
        return index, name, nread, stored, fresh

    def collect(result):
        index, name, nread, stored, fresh = result
        stats["read"] += nread
        if name is None:
            chunks.pop(index, None)
            stats["pieces_zero"] += 1
            return
        chunks[index] = name
        stats["uploaded"] += stored
        stats["chunks_new" if fresh else "chunks_reused"] += 1
        if fresh:
            crashpoint("backup.chunk")

    try:
        bounded_map(one, to_read, threads, job, collect)
    finally:
        reader.close()
    stats["chunks_reused"] += len(chunks) - stats["chunks_new"] - stats["chunks_reused"]
    return BackupResult([[i, chunks[i]] for i in sorted(chunks)], stats)


def restore(repo: Repository, manifest: dict, device: str, job: Job, threads: int) -> dict:
    """Write the manifest's chunks into ``device`` (which reads as zeros), checking each."""
    cs = int(manifest["chunk_size"])
    chunks = [(int(i), str(n)) for i, n in manifest["chunks"]]
    size = int(manifest["source"]["size"])
    if any(i < 0 or i * cs >= size for i, _ in chunks):
        raise CorruptObject(f"backup {manifest['id']}: its manifest lists a piece past the "
                            "volume's end")
    job.start("restore", sum(min(cs, size - i * cs) for i, _ in chunks))
    writer = DeviceWriter(device, cs)
    written = [0]

    def one(item):
        index, name = item
        job.check()
        data = repo.chunk_view(name)
        base = index * cs
        n = 0
        for start, end in nonzero_runs(data, WRITE_BLOCK):
            writer.write(base + start, data[start:end])
            n += end - start
        job.advance(len(data))
        return n

    def collect(n):
        written[0] += n
        crashpoint("restore.chunk")

    try:
        bounded_map(one, chunks, threads, job, collect)
    finally:
        writer.close()
    return {"chunks": len(chunks), "written": written[0]}


def verify(repo: Repository, manifest: dict, job: Job, threads: int) -> dict:
    """Read and check every chunk the manifest lists; report every bad one, not just the first."""
    names = sorted({str(c[1]) for c in manifest["chunks"]})
    # progress in bytes, like every other job (the CLI shows bytes and a rate); a tree's
    # chunks vary in length, so its total is unknown until read
    total = 0
    if manifest["kind"] == "block":
        cs, size = int(manifest["chunk_size"]), int(manifest["source"]["size"])
        lengths = {str(n): min(cs, size - int(i) * cs) for i, n in manifest["chunks"]}
        total = sum(lengths.values())
    job.start("verify", total)
    bad: list[str] = []
    nbytes = [0]

    def one(name):
        job.check()
        try:
            n = len(repo.chunk_view(name))
        except CorruptObject as e:
            return name, str(e)
        job.advance(n)
        return name, n

    def collect(result):
        name, outcome = result
        if isinstance(outcome, str):
            bad.append(outcome)
        else:
            nbytes[0] += outcome

    bounded_map(one, names, threads, job, collect)
    return {"chunks": len(names), "bytes": nbytes[0], "bad": sorted(bad)}
