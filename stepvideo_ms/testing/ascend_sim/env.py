"""The simulation's settings from the environment: a positive number, or a clear error naming the variable."""
from __future__ import annotations

import os


def positive_number(name: str, default: float, what: str) -> float:
    """$name as a float above 0 (default when unset); `what` says what it measures, e.g. "seconds"."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"${name}={raw!r} must be a number of {what}") from None
    if not value > 0:
        raise ValueError(f"${name}={raw!r} must be positive")
    return value
