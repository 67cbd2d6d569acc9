"""Files that are either whole or absent: the one way pyvol writes a file others may read.

A backup repository on a directory (possibly NFS) and the nfs backend's records on an export
are read by other processes and other hosts at any moment, and either may crash mid-write.
"""

import os
import secrets
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # readers that list a directory skip names starting with this


def write_whole(path: Path, data: bytes, exclusive: bool = False) -> bool:
    """Write ``data`` to a temporary name, fsync, then rename it over ``path`` (or, when
    ``exclusive``, hard-link it, which never replaces: False if ``path`` existed), and fsync
    the directory so the name itself survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return True
