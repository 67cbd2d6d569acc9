"""A child process that must not outlive its parent: gunicorn's workers (a worker answering
on the old socket while a new daemon starts) and the backup job process (an engine writing
into a repository after the lock's holder is gone)."""

import ctypes
import os

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int) -> None:
    """Have the kernel send ``sig`` to this process when the thread that forked it ends;
    if ``parent`` is already gone (it died before prctl took effect), send it now."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
