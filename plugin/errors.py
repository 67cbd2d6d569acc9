"""Errors that reach a caller.

Every failure a user can cause or see is one of these, carrying a sentence that names what was
wrong and what is accepted. The API turns them into ``Err`` (Docker) or an error body (CLI);
anything else is a bug and is logged with its traceback on the daemon side only.
"""


class PyvolError(Exception):
    """Base class: ``http_status`` is used by the control API, Docker always gets ``Err``."""

    http_status = 500


class InvalidInput(PyvolError):
    http_status = 400


class NotFound(PyvolError):
    http_status = 404


class Conflict(PyvolError):
    """Exists already, in use, or being changed by another request."""

    http_status = 409


class PoolFull(PyvolError):
    http_status = 507


class CommandFailed(PyvolError):
    """An external tool failed; the message carries its name and its last words."""

    http_status = 500


def portable(e: PyvolError) -> PyvolError:
    """``e`` itself if it survives pickling (the backup job process's answers cross a pipe),
    else a PyvolError with its sentence and status."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        plain = PyvolError(str(e))
        plain.http_status = getattr(e, "http_status", plain.http_status)
        return plain
