"""The backup engine runs each job (backup, restore, verify) in a process of its own.

Hashing, compression and encryption release the GIL only inside their C calls; around them,
the engine's Python (slicing, queueing, bookkeeping) holds it. In the daemon's worker that
would be the interpreter lock Docker's requests wait on: a Get during a backup took several
times its idle time. So the worker only starts a job process (``python -m
pyvol.backup.engine``), hands it the job over a pipe, and relays its progress; the process
has both cores to itself and answers with the result or the error.

The protocol, over two pipes (``multiprocessing.connection`` framing, pickled tuples):

- to the job: ``("job", request)`` once, then ``("cancel",)`` if the client goes away or the
  repository lock is lost; end of file (the worker died) cancels too;
- from the job: ``("progress", phase, total, done)`` a few times a second, then one
  ``("ok", result)``, ``("error", PyvolError)`` or ``("crash", text)``.

The job process dies with the thread that started it (PR_SET_PDEATHSIG), so a killed daemon
leaves no engine writing into a repository behind it, and runs at a lower CPU priority than
the workers. The key never crosses the pipe: the job reads the key file itself.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from ..errors import PyvolError
from ..lifeline import die_with_parent
from .job import Job

if TYPE_CHECKING:  # imported where a job starts: the daemon's workers never need it
    from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

#: the engine functions a job may name, and nothing else
ENTRY_POINTS = {"block.backup", "block.restore", "block.verify", "tree.backup", "tree.restore"}
PROGRESS_EVERY = 0.25  # seconds between progress messages
POLL = 0.2  # how often the worker looks at its job's cancel switch while waiting
NICENESS = 10
ENDING = 30  # how long a job may take to stop once told to (one chunk's I/O at most)


class EngineDied(PyvolError):
    """The job process ended without an answer (killed, out of memory)."""


def run(fn: str, repo, args: tuple, job: Job, threads: int, key_file: str | None,
        settings: dict[str, str]):
    """Run ``pyvol.backup.<fn>(repo, *args, job, threads)`` in a job process and return its
    result; its errors are raised here as they were raised there."""
    if fn not in ENTRY_POINTS:
        raise ValueError(f"not an engine entry point: {fn}")
    request = {"fn": fn, "log_level": logging.getLevelName(logging.getLogger().level).lower(),
               "url": repo.url, "config": repo.config, "key_file": key_file,
               "settings": settings, "args": args, "threads": threads,
               "deadline": None if job.deadline is None else job.deadline - time.monotonic(),
               "late": job.late, "what": job.what}
    to_job_r, to_job_w = os.pipe()
    from_job_r, from_job_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyvol.backup.engine", str(to_job_r), str(from_job_w),
             str(os.getpid())],
            pass_fds=(to_job_r, from_job_w), stdin=subprocess.DEVNULL, close_fds=True, cwd="/")
    except BaseException:
        os.close(to_job_w)
        os.close(from_job_r)
        raise
    finally:
        os.close(to_job_r)
        os.close(from_job_w)
    from multiprocessing.connection import Connection

    out, inp = Connection(to_job_w, readable=False), Connection(from_job_r, writable=False)
    try:
        try:
            out.send(("job", request))
        except OSError:  # it died before reading: _relay reads the end and says how
            pass
        return _relay(proc, out, inp, job)
    finally:
        out.close()  # a job still running takes the end of the pipe as a cancel
        inp.close()
        # the caller's repository lock is released after this: the job must be gone
        try:
            proc.wait(timeout=ENDING)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except BaseException:  # interrupted while waiting: still never leave it running
            proc.kill()
            proc.wait()
            raise


def _relay(proc: subprocess.Popen, out: Connection, inp: Connection, job: Job):
    cancelled_at = None
    while True:
        if job.cancelled and cancelled_at is None:
            with contextlib.suppress(OSError):
                out.send(("cancel",))
            cancelled_at = time.monotonic()
        if cancelled_at is not None and time.monotonic() - cancelled_at > ENDING:
            # it stops at its next step; one stuck in I/O (a hung server) is stopped here
            proc.kill()
            proc.wait()
            job.check()  # raises the cancel's own reason
        if not inp.poll(POLL):
            continue
        try:
            msg = inp.recv()
        except (EOFError, OSError):
            code = proc.wait()
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            raise EngineDied(f"the {job.what or 'backup'} process ended without an answer "
                             f"({how}); the daemon's log may say why") from None
        kind = msg[0]
        if kind == "progress":
            job.mirror(*msg[1:])
        elif kind == "ok":
            return msg[1]
        elif kind == "error":
            raise msg[1]
        else:  # "crash": a bug in the engine; its traceback is in the daemon's log
            raise RuntimeError(msg[1])


# the job process

def _serve(inp: Connection, out: Connection) -> None:
    from .. import log as pyvol_log
    from .blobs import read_key_file
    from .repo import Repository

    _kind, req = inp.recv()
    pyvol_log.setup(req["log_level"])
    job = Job(req["what"], req["deadline"], req["late"])
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            out.send(msg)

    def listen() -> None:  # a cancel, or the worker gone
        try:
            while inp.recv()[0] != "cancel":
                pass
        except (EOFError, OSError):
            pass
        job.cancel()

    done = threading.Event()

    def report() -> None:
        while not done.wait(PROGRESS_EVERY):
            s = job.snapshot()
            send(("progress", s["phase"], s["total"], s["done"]))

    threading.Thread(target=listen, daemon=True).start()
    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        key = read_key_file(req["key_file"]) if req["key_file"] else None
        repo = Repository.attach(req["url"], req["config"], key, req["settings"])
        module, name = req["fn"].split(".")
        fn = getattr(importlib.import_module(f"pyvol.backup.{module}"), name)
        result = fn(repo, *req["args"], job, req["threads"])
        answer = ("ok", result)
    except PyvolError as e:
        answer = ("error", _portable(e))
    except BaseException as e:  # noqa: BLE001 - the worker reports it; the traceback is here
        log.exception("backup engine failed")
        answer = ("crash", f"{type(e).__name__}: {e}")
    done.set()
    reporter.join()  # no progress line after the answer
    s = job.snapshot()
    send(("progress", s["phase"], s["total"], s["done"]))
    send(answer)


def _portable(e: PyvolError) -> PyvolError:
    """The error itself if it survives the pipe, else a PyvolError with its sentence."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        plain = PyvolError(str(e))
        plain.http_status = getattr(e, "http_status", plain.http_status)
        return plain


def main(argv: list[str]) -> int:
    to_job, from_job, parent = (int(a) for a in argv)
    die_with_parent(parent, signal.SIGKILL)  # the worker died before this: gone at once
    # below the daemon's workers: with every core busy hashing and sealing, Docker's calls
    # still get a core at once (the job takes whatever they leave)
    os.nice(NICENESS)
    from multiprocessing.connection import Connection

    inp, out = Connection(to_job, writable=False), Connection(from_job, readable=False)
    try:
        _serve(inp, out)
    except (EOFError, BrokenPipeError):
        return 1  # the worker went away; nobody is left to answer
    except BaseException:
        log.exception("backup engine failed before it could answer")
        return 1
    return 0


def _end(code: int) -> None:
    """Leave without the interpreter's teardown. Everything the job wrote was on disk (or
    acknowledged by the object store) before its answer, and the worker holds the repository
    lock until this process is gone: with the teardown (finalising modules, the threads'
    states, the libraries' buffers) that wait was 32 to 64 ms of a 0.6 to 0.9 s incremental
    backup, without it 8 ms."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _end(main(sys.argv[1:]))
