"""A repository as the daemon's worker holds it: opened in a job process of its own
(backup/engine.py, which says why and gives the protocol), and asked over a pipe.

``RemoteRepository`` answers the calls of ``Repository`` that service.py and leases.py make
(engine.CALLS) and runs the engine's jobs in the same process (``run``), so a backup's
snapshot, lock, manifest and data all go through one process started once per service call.
The worker itself imports neither cryptography nor zstandard, and botocore only when
``pyvol info`` asks which S3 settings this daemon resolves (targets.s3_environment).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial

from ..errors import PyvolError
from .engine import CALLS
from .job import Job

log = logging.getLogger(__name__)

POLL = 0.2  # how often a job's caller looks at its cancel switch while waiting
ENDING = 30  # how long the process may take to stop once told to (one chunk's I/O at most)
# glibc gives each thread that allocates its own malloc arena (up to 8 a core); the job's
# threads allocate 4 MiB buffers, and idle arenas keep their freed pages. Two arenas took a
# backup's peak RSS from 151 to 148 MiB in bench_backup.py, at the same speed (bench/README).
JOB_ENV = {"MALLOC_ARENA_MAX": "2"}


class EngineDied(PyvolError):
    """The job process ended without an answer (killed, out of memory)."""


def oom_kills() -> int:
    """How many processes the kernel's OOM killer has killed since boot (any cgroup's limit
    or the host's memory running out): a job process SIGKILLed while this rose was most
    likely one of them, which its error says, so that nobody hunts for who sent the signal."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class _Answer:
    def __init__(self, number: int, job: Job | None):
        self.number, self.job = number, job
        self.event = threading.Event()
        self.kind, self.value = "", None

    def result(self):
        if self.kind == "ok":
            return self.value
        if self.kind == "error":
            raise self.value
        raise RuntimeError(self.value)  # "crash": a bug; its traceback is in the daemon's log


class _Part:
    """``repo.target`` or ``repo.codec``: their calls in CALLS, made in the job process."""

    def __init__(self, repo: RemoteRepository, name: str):
        self._repo, self._name = repo, name

    def __getattr__(self, method: str):
        name = f"{self._name}.{method}"
        if name not in CALLS:
            raise AttributeError(f"{name} is not a repository call the worker makes")
        return partial(self._repo.call, name)


class RemoteRepository:
    """``how``: "open" an existing repository, "create" it if it has none, or "init" a new
    one (refused where there is one). Close it (``with``) when the service call ends: the
    process ends with it.

    ``wait=False`` returns once the process is started and asked to open the repository,
    before it has: starting Python and opening takes about 80 ms from a cold cache, which a
    backup spends taking its snapshot meanwhile. ``opened()`` then waits for the answer
    (and raises its error); nothing else may be asked before it."""

    def __init__(self, url, how: str, key_file: str | None, settings: dict[str, str],
                 wait: bool = True):
        self._numbers = itertools.count(1)
        self._answers: dict[int, _Answer] = {}
        self._lock = threading.Lock()  # the answers, the pipe's sending end, _dead
        self._dead: PyvolError | None = None
        self._closed = False
        self._oom_kills = oom_kills()
        self._killed = False  # by this side: then a SIGKILL is ours, not the OOM killer's
        to_job_r, to_job_w = os.pipe()
        from_job_r, from_job_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pyvol.backup.engine", str(to_job_r), str(from_job_w),
                 str(os.getpid())],
                pass_fds=(to_job_r, from_job_w), stdin=subprocess.DEVNULL, close_fds=True,
                cwd="/", env={**os.environ, **JOB_ENV})
        except BaseException:
            os.close(to_job_w)
            os.close(from_job_r)
            raise
        finally:
            os.close(to_job_r)
            os.close(from_job_w)
        from multiprocessing.connection import Connection

        self._out = Connection(to_job_w, readable=False)
        self._inp = Connection(from_job_r, writable=False)
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name="pyvol-repo-answers")
        self._reader.start()
        request = {"url": url, "how": how, "key_file": key_file, "settings": settings,
                   "log_level": logging.getLevelName(logging.getLogger().level).lower()}
        try:
            self._opening: _Answer | None = self._ask("open", request, number=0)
        except BaseException:
            self.close()
            raise
        self.target = _Part(self, "target")
        self.codec = _Part(self, "codec")
        if wait:
            self.opened()

    def opened(self) -> RemoteRepository:
        """Wait until the process has opened the repository; its failure closes this."""
        if self._opening is None:
            return self
        try:
            info = self._answered(self._opening)
        except BaseException:
            self.close()
            raise
        self._opening = None
        self.url: str = info["url"]
        self.config: dict = info["config"]
        self.encrypted: bool = info["encrypted"]
        self.chunk_size = int(self.config["chunk_size"])
        return self

    def __enter__(self) -> RemoteRepository:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # asking
    def __getattr__(self, name: str):
        if name not in CALLS:
            raise AttributeError(f"{name} is not a repository call the worker makes")
        return partial(self.call, name)

    def call(self, name: str, *args):
        """``Repository.<name>(*args)`` in the job process."""
        return self._answered(self._ask("call", name, args))

    @staticmethod
    def _answered(answer: _Answer):
        answer.event.wait()  # answered, or failed by the reader once the process is gone
        return answer.result()

    def backup_url(self, volkey: str, bid: str) -> str:
        return f"{self.url}#{volkey}/{bid}"

    def run(self, fn: str, args: tuple, job: Job, threads: int):
        """``pyvol.backup.<fn>(repo, *args, job, threads)`` in the job process (which runs
        only engine.ENTRY_POINTS); its errors are raised here as they were raised there, and
        ``job`` mirrors its progress."""
        request = {"fn": fn, "args": args, "threads": threads, "what": job.what,
                   "deadline": None if job.deadline is None else job.deadline - time.monotonic(),
                   "late": job.late}
        answer = self._ask("job", request, job=job)
        n = answer.number
        cancelled_at = None
        while not answer.event.wait(POLL):
            if job.cancelled and cancelled_at is None:
                cancelled_at = time.monotonic()
                self._post(("cancel", n))
            if cancelled_at is not None and time.monotonic() - cancelled_at > ENDING:
                # it stops at its next step; one stuck in I/O (a hung server) is stopped here
                self._kill()
                job.check()  # raises the cancel's own reason
        return answer.result()

    def _ask(self, kind: str, *body, number: int | None = None, job: Job | None = None):
        with self._lock:
            if self._dead is not None:
                raise self._dead
            answer = _Answer(next(self._numbers) if number is None else number, job)
            self._answers[answer.number] = answer
            try:
                self._out.send((kind, answer.number, *body))
            except OSError:  # it died: the reader answers every question with how
                pass
        return answer

    def _post(self, msg) -> None:
        with self._lock:
            if self._dead is None:
                try:
                    self._out.send(msg)
                except OSError:
                    pass

    def _read(self) -> None:
        try:
            while True:
                kind, n, *rest = self._inp.recv()
                answer = self._answers.get(n)
                if answer is None:
                    continue
                if kind == "progress":
                    if answer.job is not None:
                        answer.job.mirror(*rest)
                    continue
                answer.kind, answer.value = kind, rest[0]
                with self._lock:
                    self._answers.pop(n, None)
                answer.event.set()
        except (EOFError, OSError):
            pass
        except Exception:  # an answer that does not unpickle: nothing after it can be trusted
            log.exception("unreadable message from the backup job process; stopping it")
            self._killed = True
            self._proc.kill()
        try:
            code = self._proc.wait(timeout=ENDING)
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            if code == -signal.SIGKILL and not self._killed and oom_kills() > self._oom_kills:
                how += (": the kernel's OOM killer killed a process meanwhile, most likely "
                        "this one, which it takes first (memory ran out)")
        except subprocess.TimeoutExpired:
            how = "its pipe closed"
        died = EngineDied(f"the backup job process ended without an answer ({how}); the "
                          "daemon's log may say why")
        with self._lock:
            self._dead = died
            waiting, self._answers = list(self._answers.values()), {}
        for answer in waiting:
            answer.kind, answer.value = "error", died
            answer.event.set()

    # ending
    def _kill(self) -> None:
        self._killed = True
        self._proc.kill()
        self._proc.wait()

    def close(self) -> None:
        """End the process: it cancels what still runs, and a process that does not stop
        within ENDING is killed. The caller's repository lock is released before this, and
        nothing of the process outlives it."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._out.close()  # the end of the pipe: the process finishes and leaves
        try:
            self._proc.wait(timeout=ENDING)
        except subprocess.TimeoutExpired:
            self._kill()
        except BaseException:  # interrupted while waiting: still never leave it running
            self._kill()
            raise
        finally:
            self._reader.join(timeout=5)
            self._inp.close()
