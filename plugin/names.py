"""What a name, a snapshot reference and a mount ID may be: checked where a request enters,
matched whole, so that every path built from them stays under the root."""

import re

from .errors import InvalidInput

# matched whole (fullmatch): '$' would also match before a trailing newline
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SNAP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MOUNT_ID_RE = re.compile(r"[\x21-\x7e]{0,256}")


def check_name(name, what: str = "volume name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid {what} {name!r}: accepted are 1-128 characters of letters, digits, "
            "'_', '.' and '-', starting with a letter or digit")
    return name


def check_snap_name(name) -> str:
    if not isinstance(name, str) or not SNAP_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid snapshot name {name!r}: accepted are 1-64 characters of letters, "
            "digits, '_', '.' and '-', starting with a letter or digit")
    return name


def check_mount_id(mount_id) -> str:
    if not isinstance(mount_id, str) or not MOUNT_ID_RE.fullmatch(mount_id):
        raise InvalidInput("invalid mount ID: accepted is a string of up to 256 printable "
                           "ASCII characters without spaces (Docker sends 64 hex characters)")
    return mount_id


def parse_snap_ref(ref) -> tuple[str, str]:
    if not isinstance(ref, str) or ref.count("@") != 1:
        raise InvalidInput(f"invalid snapshot reference {ref!r}: accepted is VOLUME@SNAPSHOT")
    vol, snap = ref.split("@")
    return check_name(vol), check_snap_name(snap)
