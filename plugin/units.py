"""Sizes as people write them (``10G``) and as the kernel wants them (bytes)."""

import re

from .errors import InvalidInput

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# ASCII digits only: \d would also take other scripts' digits, which int() reads as numbers
# matched against the stripped text: a single run of \s keeps a failing match linear
_SIZE = re.compile(r"([0-9]+)(?:\.([0-9]+))?\s*([KMGTP]?)(?:i?B)?", re.IGNORECASE)
MAX_SIZE = (1 << 63) - 1  # what the kernel's loff_t and SQLite's INTEGER hold
_ACCEPTED = ("accepted is a positive size: a number with an optional K, M, G, T or P suffix "
             "(binary units), e.g. 512M or 10G, below 8192P")


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``512M``, ``10G``, ``1.5T``, ``10GiB`` or plain bytes; binary units.

    Exact: digits are read as integers, never as floats, so a size of any
    length is either a byte count or refused, and fractions of a byte are dropped.
    """
    m = _SIZE.fullmatch(str(text).strip()) if isinstance(text, (str, int)) else None
    if not m:
        raise InvalidInput(f"invalid {what} {_short(text)}: {_ACCEPTED}")
    whole, frac, unit = m.group(1).lstrip("0"), m.group(2) or "", m.group(3).upper()
    # 2**63 has 19 digits: more integer digits than 20 can only be too large, and reading
    # them would cost time (Python refuses to convert more than 4300 at all)
    if len(whole) > 20:
        raise InvalidInput(f"{what} {_short(text)} is too large: {_ACCEPTED}")
    # Dropping fraction digits beyond the 60th never changes the whole bytes of a size whose
    # unit is 2**u with u <= 60: the truncated value x = D*2**u/10**60 is a multiple of
    # 2**u/10**60, so the next integer above x is at least that far away, farther than the
    # dropped digits (< 2**u/10**60) reach. It also bounds the work of reading them.
    frac = frac[:60]
    scale = 10 ** len(frac)  # the number is (whole * scale + frac) / scale, exactly
    size = (int(whole or "0") * scale + int(frac or "0")) * _UNITS[unit] // scale
    if size > MAX_SIZE:
        raise InvalidInput(f"{what} {_short(text)} is too large: {_ACCEPTED}")
    if size <= 0:
        raise InvalidInput(f"invalid {what} {_short(text)}: that is zero bytes; {_ACCEPTED}")
    return size


def _short(value) -> str:
    """``value`` as a message shows it: quoted, and cut if long."""
    text = repr(value) if isinstance(value, (str, int)) else f"of type {type(value).__name__}"
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


def format_size(n: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        size = _UNITS[unit]
        if n >= size:
            v = n / size
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"
