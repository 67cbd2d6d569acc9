"""Named steps at which a test can kill the whole daemon, to prove that recovery copes.

``PYVOL_CRASH_AT=step[,step...]`` in the daemon's environment makes the process that reaches
one of those steps SIGKILL its daemon's process group (master and workers at once, as a power
cut or the OOM killer would). Unset, as it always is outside tests, a crash point is one
set lookup. tests/test_crashpoints.py lists the steps and what must hold after each.
"""

import os
import signal

_AT = frozenset(s for s in os.environ.get("PYVOL_CRASH_AT", "").split(",") if s)


def crashpoint(step: str) -> None:
    if step in _AT:
        os.killpg(os.getpgid(0), signal.SIGKILL)
