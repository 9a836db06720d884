"""Argument checks shared by the constructors."""

from __future__ import annotations

from reid_ms.errors import ConfigError


def positive_int(value: object, name: str, *, minimum: int = 1, owner: str = "") -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``, else a :class:`ConfigError` (prefixed by ``owner``)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigError(f"{owner + ': ' if owner else ''}{name} must be {what}, got {value!r}")
    return value
