"""The backup job process: a repository opened outside the daemon's worker, and the engine's
jobs (backup, restore, verify) run beside it.

Two reasons keep this work out of the worker that answers Docker. Hashing, compression and
encryption release the GIL only inside their C calls; around them the engine's Python
(slicing, queueing, bookkeeping) holds it, and in the worker that is the lock Docker's
requests wait on: a Get during a backup took several times its idle time. And opening a
repository imports cryptography, zstandard and (for S3) botocore: 13 MiB of the worker's
idle RSS after its first job (40 more with boto3, as it was then), and an import stall,
holding that lock, in the first backup after a start. So the worker (backup/session.py)
starts this process for each service call that opens a repository, asks it for what it
needs over a pipe, and the process ends with the call. It has both cores to itself and runs
below the workers' priority.

The protocol, over two pipes (``multiprocessing.connection`` framing, pickled tuples). Every
request carries a number ``n`` and gets one answer with it:

- to the process: ``("open", 0, request)`` first (url, how: open, create or init, the key
  file, settings); then any number of ``("call", n, name, args)`` (a name in ``CALLS``),
  ``("job", n, request)`` (an engine entry point) and ``("cancel", n)`` for a running job.
  End of file (the worker is done, or died) cancels the jobs, and the process ends;
- from the process: ``("progress", n, phase, total, done)`` a few times a second while job
  ``n`` runs, and for each request one ``("ok", n, value)``, ``("error", n, PyvolError)``
  or ``("crash", n, text)`` (a bug; its traceback is in the daemon's log).

What grows with a volume stays here: a manifest read for a restore, a verify or as an
incremental's parent (``open_manifest``), and a backup job's chunk list (answered as a
``HeldChunks``). The worker names them in a job's or a call's arguments (``OpenedManifest``,
``HeldChunks``, also as a value of a dict argument), and they are replaced here by what they
name: their chunk lists, 262,144 entries for 1 TiB, never cross the pipe. Listings and
retention get manifests' heads (``manifest_heads``); a gc gets counts, and has the
unreferenced chunks deleted here a batch at a time (``delete_unreferenced``).

Calls are served on threads of their own, so that the lease renewer's calls go on while a
job runs. The process dies with the thread that started it (PR_SET_PDEATHSIG): a killed
daemon leaves no engine writing into a repository behind it. The key never crosses the
pipe: the process reads the key file itself.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from ..errors import PyvolError, portable
from ..lifeline import die_with_parent
from .job import Job

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from .repo import Repository

log = logging.getLogger(__name__)

#: the engine functions a job may name, and nothing else
ENTRY_POINTS = {"block.backup", "block.restore", "block.verify", "tree.backup", "tree.restore"}
#: functions of backup/repo.py that take the repository first, for what would otherwise
#: bring every manifest (each lists all of its volume's chunks) across the pipe
FUNCTIONS = {"missing_chunks", "manifest_heads", "unreferenced_chunks", "delete_unreferenced",
             "open_manifest"}
#: the repository calls the worker may make (service.py and leases.py use these, no more)
CALLS = {"put_manifest", "delete_manifest", "backup_ids", "volume_key",
         "read_object", "target.list", "target.get", "target.put", "target.put_if_absent",
         "target.delete", "codec.seal", "holder"} | FUNCTIONS
CALL_THREADS = 4  # the worker's caller, its lease renewer, and room for one more of each
PROGRESS_EVERY = 0.25  # seconds between progress messages
NICENESS = 10
#: the most the kernel's OOM killer can prefer a process: a job holds nothing that a retry
#: cannot rebuild, and a container's database on the same host must not die in its place
OOM_SCORE_ADJ = 1000


class _Process:
    def __init__(self, inp: Connection, out: Connection):
        self.inp, self.out = inp, out
        self.repo: Repository | None = None
        self._send_lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._threads: list[threading.Thread] = []

    def send(self, msg) -> None:
        try:
            with self._send_lock:
                self.out.send(msg)
        except OSError:  # the worker is gone: nobody is left to answer
            pass
        except Exception as e:  # did not pickle (nothing was written): a bug, still answered
            log.exception("backup job process could not send its answer")
            if msg[0] != "progress":
                self.send(("crash", msg[1], f"the answer did not cross the pipe: {e}"))

    def answer(self, n: int, fn, *args) -> None:
        """Run ``fn(*args)`` and send its value, or its error, as the answer to ``n``."""
        try:
            msg = ("ok", n, _plain(fn(*args)))
        except PyvolError as e:
            msg = ("error", n, portable(e))
        except BaseException as e:  # noqa: BLE001 - the worker reports it; the traceback is here
            log.exception("backup job process failed")
            msg = ("crash", n, f"{type(e).__name__}: {e}")
        self.send(msg)

    def serve(self) -> None:
        _kind, n, req = self.inp.recv()
        from .. import log as pyvol_log

        pyvol_log.setup(req["log_level"])
        self.answer(n, self._open, req)
        if self.repo is None:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="pyvol-repo-call") as calls:
            try:
                while True:
                    msg = self.inp.recv()
                    if msg[0] == "call":
                        calls.submit(self.answer, msg[1], self._call, msg[2], msg[3])
                    elif msg[0] == "job":
                        self._start_job(msg[1], msg[2])
                    elif msg[0] == "cancel":
                        job = self._jobs.get(msg[1])  # None once it has answered
                        if job is not None:
                            job.cancel()
            except (EOFError, OSError):
                pass
            for job in list(self._jobs.values()):  # the worker is done with us, or died
                job.cancel()
            for t in self._threads:
                t.join()

    def _open(self, req: dict) -> dict:
        from .blobs import read_key_file
        from .repo import Repository

        key = read_key_file(req["key_file"]) if req["key_file"] else None
        if req["how"] == "init":
            self.repo = Repository.init(req["url"], key, req["settings"])
        else:
            self.repo = Repository.open(req["url"], key, req["settings"],
                                        create=req["how"] == "create")
        return {"url": self.repo.url, "config": self.repo.config,
                "encrypted": self.repo.encrypted}

    def _call(self, name: str, args: tuple):
        if name not in CALLS:
            raise ValueError(f"not a repository call: {name}")
        args = self._taken(args)
        if name in FUNCTIONS:
            from . import repo

            return getattr(repo, name)(self.repo, *args)
        owner, _, method = name.rpartition(".")
        return getattr(getattr(self.repo, owner) if owner else self.repo, method)(*args)

    def _start_job(self, n: int, req: dict) -> None:
        job = Job(req["what"], req["deadline"], req["late"])
        self._jobs[n] = job
        t = threading.Thread(target=self._run_job, args=(n, job, req), daemon=True,
                             name=f"pyvol-job-{n}")
        self._threads.append(t)
        t.start()

    def _run_job(self, n: int, job: Job, req: dict) -> None:
        done = threading.Event()

        def report() -> None:
            while not done.wait(PROGRESS_EVERY):
                self._progress(n, job)

        def work():
            try:
                if req["fn"] not in ENTRY_POINTS:
                    raise ValueError(f"not an engine entry point: {req['fn']}")
                module, name = req["fn"].split(".")
                fn = getattr(importlib.import_module(f"pyvol.backup.{module}"), name)
                return self._held(n, fn(self.repo, *self._taken(req["args"]), job,
                                        req["threads"]))
            finally:
                done.set()
                reporter.join()  # no progress line after the answer
                self._progress(n, job)

        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        try:
            self.answer(n, work)
        finally:
            self._jobs.pop(n, None)

    def _taken(self, args) -> list:
        """A job's or a call's arguments with what this process holds in their place: each
        ``OpenedManifest`` (or ``HeldChunks``), itself or a value of a dict among them,
        replaced by the manifest (or the chunk list) it names."""
        from .repo import HeldChunks, OpenedManifest

        def taken(a):
            if isinstance(a, OpenedManifest):
                if (a.volkey, a.bid) not in self.repo.opened:
                    raise ValueError(f"manifest {a.volkey}/{a.bid} was not opened here")
                return self.repo.opened[(a.volkey, a.bid)]
            if isinstance(a, HeldChunks):
                if a.key not in self.repo.held:
                    raise ValueError(f"no chunk list {a.key} is held here")
                return self.repo.held[a.key]
            return a

        return [{k: taken(v) for k, v in a.items()} if isinstance(a, dict) else taken(a)
                for a in args]

    def _held(self, n: int, value):
        """A backup job's answer with its chunk list kept here (``HeldChunks`` in its
        place): the worker writes the manifest through calls that take it back here."""
        from .repo import BackupResult, HeldChunks

        if isinstance(value, BackupResult):
            self.repo.held[f"job-{n}"] = value.chunks
            return BackupResult(HeldChunks(f"job-{n}", len(value.chunks)), value.stats)
        return value

    def _progress(self, n: int, job: Job) -> None:
        s = job.snapshot()
        self.send(("progress", n, s["phase"], s["total"], s["done"]))


def _plain(value):
    """What crosses the pipe: a buffer as bytes, an iterator as a list."""
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    if hasattr(value, "__next__"):
        return list(value)
    return value


def main(argv: list[str]) -> int:
    to_job, from_job, parent = (int(a) for a in argv)
    die_with_parent(parent, signal.SIGKILL)  # the worker died before this: gone at once
    # below the daemon's workers: with every core busy hashing and sealing, Docker's calls
    # still get a core at once (the job takes whatever they leave)
    os.nice(NICENESS)
    _first_to_go()
    from multiprocessing.connection import Connection

    inp, out = Connection(to_job, writable=False), Connection(from_job, readable=False)
    try:
        _Process(inp, out).serve()
    except (EOFError, BrokenPipeError):
        return 1  # the worker went away; nobody is left to answer
    except BaseException:
        log.exception("backup job process failed before it could answer")
        return 1
    return 0


def _first_to_go() -> None:
    """Out of memory, the kernel kills the process with the highest badness: its RSS plus
    ``oom_score_adj`` thousandths of the memory it may use. A job's RSS grows with what a
    repository makes it read (a manifest of a 10 TiB volume is about 200 MiB of JSON, several
    times that parsed, and a hostile repository can hand it that much), yet a database's is
    usually larger, and without this it would be the one killed. Killed, a job fails its
    service call with EngineDied and leaves no backup visible (its manifest is written
    last); any process may raise its own score."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(f"{OOM_SCORE_ADJ}\n")
    except OSError as e:
        log.warning("could not make the backup job process the OOM killer's first choice: "
                    "%s", e)


def _end(code: int) -> None:
    """Leave without the interpreter's teardown. Everything the process wrote was on disk (or
    acknowledged by the object store) before its answer, and the worker holds the repository
    lock until this process is gone: with the teardown (finalising modules, the threads'
    states, the libraries' buffers) that wait was 32 to 64 ms of a 0.6 to 0.9 s incremental
    backup, without it 8 ms."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _end(main(sys.argv[1:]))
