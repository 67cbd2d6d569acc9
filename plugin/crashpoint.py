"""Named steps at which a test can kill the whole daemon, to prove that recovery copes.

``PYVOL_CRASH_AT=step[,step...]`` in the daemon's environment makes the process that reaches
one of those steps SIGKILL its daemon's process group (master and workers at once, as a power
cut would). With ``PYVOL_CRASH_ALONE=PATH`` as well, only that process dies (as the OOM
killer takes one), and only the first to get there: it makes PATH, and a process that finds
PATH made goes on, so that the worker that replaces it can run the step again. Unset, as it
always is outside tests, a crash point is one set lookup. tests/test_crashpoints.py lists
the steps and what must hold after each.
"""

import os
import signal

_AT = frozenset(s for s in os.environ.get("PYVOL_CRASH_AT", "").split(",") if s)
_ALONE = os.environ.get("PYVOL_CRASH_ALONE", "")


def crashpoint(step: str) -> None:
    if step not in _AT:
        return
    if not _ALONE:
        os.killpg(os.getpgid(0), signal.SIGKILL)
        return
    try:
        os.close(os.open(_ALONE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
