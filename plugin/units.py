"""Sizes as people write them (``10G``) and as the kernel wants them (bytes)."""

import re

from .errors import InvalidInput

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``512M``, ``10G``, ``1.5T``, ``10GiB`` or plain bytes; binary units."""
    m = _SIZE.match(str(text))
    if not m:
        raise InvalidInput(
            f"invalid {what} {text!r}: accepted is a number with an optional K, M, G, T or P "
            "suffix (binary units), e.g. 512M or 10G"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    return int(value)


def format_size(n: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        size = _UNITS[unit]
        if n >= size:
            v = n / size
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"
