"""Argument checks shared by the public entry points; each error names the value it rejects."""

from __future__ import annotations

import math
import numbers


def positive_int(name: str, value, allow_none: bool = False):
  """Returns ``int(value)`` if it is a positive integer (Python or NumPy; or ``None`` when
  allowed), else raises ValueError."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, "
                     f"got {value!r}")
  return int(value)


def _real(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def positive_float(name: str, value) -> float:
  """Returns ``float(value)`` if it is a positive finite number, else raises ValueError."""
  if not _real(value) or not value > 0:
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")
  return float(value)


def non_negative_float(name: str, value) -> float:
  """Returns ``float(value)`` if it is a finite number ``≥ 0``, else raises ValueError."""
  if not _real(value) or value < 0:
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  return float(value)


def fraction(name: str, value, closed_top: bool = True) -> float:
  """Returns ``float(value)`` if it lies in ``[0, 1]`` (``[0, 1)`` without ``closed_top``)."""
  if not _real(value) or value < 0 or value > 1 or (not closed_top and value == 1):
    raise ValueError(f"{name} must be in [0, {'1]' if closed_top else '1)'}, got {value!r}")
  return float(value)
