"""Ahead-of-time compilation of a jitted block: compiled once per argument signature, called as
an executable, with XLA's memory analysis of each compiled program kept.

``jax.jit`` compiles on the first call but does not hand back the executable, so reading XLA's
memory analysis (``jitted.lower(...).compile().memory_analysis()``) would compile the program a
second time. :class:`AheadOfTime` lowers and compiles once per signature (the tree structure and
each argument's type and placement) and calls that executable; ``compilations()`` counts them, as
``jit``'s own cache would.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax


class MemoryUse(NamedTuple):
  """XLA's memory analysis of one compiled program (bytes, on its device).

  ``peak_bytes = argument + output − alias + temp``: the arguments (population, eval data, server
  state) and the outputs are live for the whole call except that a donated argument and the
  output it is aliased to share one buffer (``alias``), and ``temp`` is the largest amount of
  temporary memory XLA's buffer assignment ever has live at once (its heap simulation). It is an
  upper bound of what the call holds on the device at any moment, and exact when the outputs are
  live together with every argument and the temporaries at their peak. XLA's own
  ``peak_memory_in_bytes`` (its buffer assignment's peak over the program's life, which may free
  arguments early) is kept as ``xla_peak`` where the backend reports it (0 otherwise).
  """
  argument: int
  output: int
  alias: int
  temp: int
  xla_peak: int

  @property
  def peak_bytes(self) -> int:
    return self.argument + self.output - self.alias + self.temp

  @classmethod
  def of(cls, compiled) -> "MemoryUse | None":
    """The analysis of a ``jax.stages.Compiled``, or ``None`` where the backend gives none."""
    try:
      stats = compiled.memory_analysis()
    except Exception:  # pragma: no cover - backends without the analysis
      return None
    if stats is None:
      return None
    stats = stats[0] if isinstance(stats, (list, tuple)) else stats
    return cls(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
               int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes),
               int(getattr(stats, "peak_memory_in_bytes", 0) or 0))


def _signature(args) -> tuple:
  """What decides whether a compiled program accepts ``args``: the tree, each leaf's type (shape,
  dtype, weak type) and, for device arrays, their placement."""
  leaves, tree = jax.tree.flatten(args)
  return tree, tuple((jax.typeof(a), getattr(a, "sharding", None)) for a in leaves)


class AheadOfTime:
  """``jitted`` compiled ahead of time, once per argument signature.

  ``aot(*args)`` runs the executable compiled for ``args``' signature (compiling it on first
  sight); ``compilations()`` is the number of programs compiled; ``memory()`` the
  :class:`MemoryUse` of the last one called.
  """

  def __init__(self, jitted: Callable):
    self.jitted = jitted
    self._programs: dict = {}
    self._last = None

  def __call__(self, *args):
    key = _signature(args)
    program = self._programs.get(key)
    if program is None:
      compiled = self.jitted.lower(*args).compile()
      program = self._programs[key] = (compiled, MemoryUse.of(compiled))
    self._last = program
    return program[0](*args)

  def compilations(self) -> int:
    return len(self._programs)

  def memory(self) -> MemoryUse | None:
    return None if self._last is None else self._last[1]
