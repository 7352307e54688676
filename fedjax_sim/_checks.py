"""Argument checks shared by the public entry points; each error names the value it rejects."""

from __future__ import annotations

import math


def positive_int(name: str, value, allow_none: bool = False):
  """Returns ``value`` if it is a positive int (or ``None`` when allowed), else raises ValueError."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, "
                     f"got {value!r}")
  return value


def positive_float(name: str, value) -> float:
  """Returns ``float(value)`` if it is a positive finite number, else raises ValueError."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
      or not math.isfinite(value):
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")
  return float(value)
