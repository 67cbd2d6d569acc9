"""The one way pyvol runs an external program: an argument list, a timeout, no shell."""

import logging
import os
import subprocess

from .errors import CommandFailed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
KILLED_WAIT = 5.0  # for a tool killed at its timeout to end; one stuck in the kernel never does


def run(argv: list[str], timeout: float = DEFAULT_TIMEOUT, input: bytes | None = None,
        ok_codes: tuple[int, ...] = (0,), env: dict[str, str] | None = None) -> str:
    """Run ``argv`` and return its stdout; raise CommandFailed with its stderr on failure.

    A hung tool (a stuck mount, a wedged device) must not hang the daemon, so every call has
    a timeout; the message names the tool so the user knows what to look at.
    """
    log.debug("exec %s", argv)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if input is not None else None,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=None if env is None else {**os.environ, **env})
    except FileNotFoundError:
        raise CommandFailed(f"{argv[0]} is not installed on this host") from None
    try:
        out, err_out = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.communicate(timeout=KILLED_WAIT)
        except subprocess.TimeoutExpired:
            # subprocess.run would wait for it without end: a thread of the daemon (or its
            # master) hung behind a tool in uninterruptible sleep, on a suspended device say.
            # It is left; Python reaps it if it ever ends.
            log.error("%s did not end when killed after %gs; left behind", argv[0], timeout)
        raise CommandFailed(f"{argv[0]} did not finish within {timeout:g}s") from None
    except BaseException:
        proc.kill()
        raise
    if proc.returncode not in ok_codes:
        err = err_out.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        # mount(8) ends with a hint about dmesg: the line before it says what went wrong
        lines = [ln for ln in err.splitlines() if "dmesg(1) may have more" not in ln]
        last = lines[-1].strip() if lines else "no message"
        raise CommandFailed(f"{argv[0]} failed (exit {proc.returncode}): {last}")
    return out.decode(errors="replace")
