"""The range checks of the experiments' settings, one wording for every config class."""

from __future__ import annotations

import math

__all__ = ["positive_ints", "positive_number"]


def positive_ints(owner: object, names: tuple[str, ...]) -> None:
    """Raises ValueError naming the first of ``owner``'s attributes ``names`` (sizes, counts,
    intervals) that is below 1."""
    for name in names:
        value = getattr(owner, name)
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


def positive_number(name: str, value: float) -> None:
    """Raises ValueError unless ``value`` (a learning rate, a temperature) is finite and
    above 0: NaN and infinity would turn every later number into NaN."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, got {value}")
