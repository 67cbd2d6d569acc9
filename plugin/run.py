"""The one way pyvol runs an external program: an argument list, a timeout, no shell."""

import logging
import os
import subprocess

from .errors import CommandFailed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0


def run(argv: list[str], timeout: float = DEFAULT_TIMEOUT, input: bytes | None = None,
        ok_codes: tuple[int, ...] = (0,), env: dict[str, str] | None = None) -> str:
    """Run ``argv`` and return its stdout; raise CommandFailed with its stderr on failure.

    A hung tool (a stuck mount, a wedged device) must not hang the daemon, so every call has
    a timeout; the message names the tool so the user knows what to look at.
    """
    log.debug("exec %s", argv)
    try:
        proc = subprocess.run(
            argv, input=input, capture_output=True, timeout=timeout, check=False,
            env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"{argv[0]} did not finish within {timeout:g}s") from None
    except FileNotFoundError:
        raise CommandFailed(f"{argv[0]} is not installed on this host") from None
    if proc.returncode not in ok_codes:
        err = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(
            errors="replace"
        ).strip()
        # mount(8) ends with a hint about dmesg: the line before it says what went wrong
        lines = [ln for ln in err.splitlines() if "dmesg(1) may have more" not in ln]
        last = lines[-1].strip() if lines else "no message"
        raise CommandFailed(f"{argv[0]} failed (exit {proc.returncode}): {last}")
    return proc.stdout.decode(errors="replace")
