"""What a name, a snapshot reference and a mount ID may be: checked where a request enters,
matched whole, so that every path built from them stays under the root."""

import re
from datetime import datetime, timezone

from .errors import InvalidInput

# matched whole (fullmatch): '$' would also match before a trailing newline
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SNAP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MOUNT_ID_RE = re.compile(r"[\x21-\x7e]{0,256}")
# a schedule's snapshot (plugin/scheduler.py): sched-TIME, TIME compact UTC, and -N after it
# for a later run in the same second. Its retention judges these names on shared storage,
# where another host's snapshots have no row here to say who took them: no user may give one.
SCHEDULED_SNAP_RE = re.compile(r"sched-([0-9]{8}T[0-9]{6}Z)(?:-[0-9]{1,6})?")


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


def check_user_snap_name(name) -> str:
    check_snap_name(name)
    if SCHEDULED_SNAP_RE.fullmatch(name):
        raise InvalidInput(f"invalid snapshot name {name!r}: names sched-TIME are the "
                           "snapshot schedules' own (their retention removes them); choose "
                           "another name")
    return name


def scheduled_snapshot_time(name: str) -> datetime | None:
    """When a schedule's snapshot was taken, from its name; None for any other name."""
    m = SCHEDULED_SNAP_RE.fullmatch(name)
    if m is None:
        return None
    try:
        return datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:  # digits that are no date (month 13)
        return None


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
