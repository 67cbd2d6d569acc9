"""A long piece of work's progress and its cancel switch, shared by the engine and the API.

The engine calls ``advance``; the API streams ``snapshot()`` to the CLI twice a second and
calls ``cancel()`` when the CLI goes away, and the engine stops at its next step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from ..errors import PyvolError


class Cancelled(PyvolError):
    http_status = 499


class Job:
    def __init__(self, what: str = "", deadline: float | None = None, late: str = ""):
        """``deadline`` (seconds from now) cancels the work with the message ``late``."""
        self.what = what
        self.deadline = None if deadline is None else time.monotonic() + deadline
        self.late = late
        self.total = 0
        self.done = 0
        self.phase = ""
        self.started = time.monotonic()
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    def start(self, phase: str, total: int) -> None:
        with self._lock:
            self.phase, self.total, self.done = phase, total, 0

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n

    def mirror(self, phase: str, total: int, done: int) -> None:
        """Take the progress a job process reports (backup/engine.py)."""
        with self._lock:
            self.phase, self.total, self.done = phase, total, done

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Cancelled(self.late or f"{self.what} ran out of time")
        if self._cancel.is_set():
            raise Cancelled(f"{self.what or 'the operation'} was cancelled: its client went away")

    def snapshot(self) -> dict:
        with self._lock:
            return {"phase": self.phase, "done": self.done, "total": self.total,
                    "elapsed": round(time.monotonic() - self.started, 2)}


def bounded_map(fn: Callable, items: Iterable, threads: int, job: Job, on_result: Callable):
    """Run ``fn`` over ``items`` on ``threads`` threads with at most ``threads + 2`` in
    flight, so memory stays bounded whatever the number of items; ``on_result`` runs in the
    caller's thread, in completion order. The first error cancels the rest and is raised."""
    pending = set()
    limit = threads + 2
    with ThreadPoolExecutor(threads, thread_name_prefix="pyvol-backup") as pool:
        try:
            for item in items:
                job.check()
                pending.add(pool.submit(fn, item))
                if len(pending) >= limit:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        on_result(f.result())
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    on_result(f.result())
                job.check()
        except BaseException:
            job.cancel()
            for f in pending:
                f.cancel()
            raise
