"""Argument checks shared by the constructors."""

from __future__ import annotations

import math

from reid_ms.errors import ConfigError


def positive_int(value: object, name: str, *, minimum: int = 1, owner: str = "") -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``, else a :class:`ConfigError` (prefixed by ``owner``)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigError(f"{owner + ': ' if owner else ''}{name} must be {what}, got {value!r}")
    return value


def real_number(value: object, name: str, *, low: float = -math.inf, high: float = math.inf,
                high_open: bool = False, owner: str = "") -> float:
    """``value`` as a float if it is a finite real number (not a bool) in ``[low, high]`` (``[low, high)``
    with ``high_open``), else a :class:`ConfigError` (prefixed by ``owner``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        number = float(value)
        if low <= number and (number < high if high_open else number <= high):
            return number
    what = "a finite number"
    if (low, high) != (-math.inf, math.inf):
        what = f"lie in [{low:g}, {high:g}{')' if high_open else ']'}"
    raise ConfigError(f"{owner + ': ' if owner else ''}{name} must {'be ' if (low, high) == (-math.inf, math.inf) else ''}"
                      f"{what}, got {value!r}")
