"""A backend's settings (``PYVOL_<BACKEND>_<KEY>``) are text from the environment or the
managed plugin's config: each number is checked where it is read, so that a typo stops the
backend at start with the setting's name, instead of a NaN or a negative wait surfacing
later as a wait that never ends or never happens."""

from __future__ import annotations

import math

from pyvol.errors import InvalidInput


def seconds(backend: str, settings: dict[str, str], key: str, default: float,
            zero: bool = False) -> float:
    """A duration in seconds: positive and finite (``zero``: 0 allowed too, for "do not
    wait")."""
    text = settings.get(key, str(default))
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 or (zero and value == 0))):
        accepted = "0 or a positive number" if zero else "a positive number"
        raise InvalidInput(f"invalid PYVOL_{backend.upper()}_{key.upper()} {text!r}: "
                           f"accepted is {accepted} of seconds")
    return value
