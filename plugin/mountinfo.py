"""What the kernel says is mounted, from /proc/self/mountinfo.

``os.path.ismount`` is wrong for a bind mount on the same filesystem, and pyvol's records are
only a claim: this file is the truth the daemon reconciles against.
"""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    source: str
    fstype: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def entries(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    result = []
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(lf) < 6 or len(rf) < 2:
                continue
            result.append(MountEntry(_unescape(lf[4]), _unescape(rf[1]), rf[0], lf[5]))
    return result


def is_mounted(mount_point: str | Path) -> bool:
    target = str(Path(mount_point))
    return any(e.mount_point == target for e in entries())


def under(directory: str | Path) -> list[MountEntry]:
    """Mounts at or below ``directory``, innermost last as the kernel lists them."""
    base = str(Path(directory))
    return [e for e in entries() if e.mount_point == base or e.mount_point.startswith(base + "/")]


def source_of(mount_point: str | Path) -> str | None:
    target = str(Path(mount_point))
    found = [e.source for e in entries() if e.mount_point == target]
    return found[-1] if found else None
