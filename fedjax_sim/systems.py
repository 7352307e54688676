"""System heterogeneity: stragglers and dropouts, decided on device inside the compiled round.

Stragglers follow the FedProx paper (Li et al. 2020, arXiv:1812.06127, §5.2): each round a fixed
fraction of the cohort cannot finish its ``E`` epochs. Under policy ``"drop"`` (what FedAvg does in
that paper) their updates are discarded; under ``"partial"`` (FedProx) a straggler runs a number of
epochs drawn uniformly from ``{1, …, E}`` (``{1, …, H}`` local steps for Local SGD) and its partial
update is aggregated like any other. Dropouts are independent: each selected client returns nothing
with probability ``dropout_rate``. The server average renormalizes over the clients that returned;
a round in which none returned leaves the server state unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

POLICIES = ("drop", "partial")


class Heterogeneity(NamedTuple):
  """Who fails to finish a round.

  Attributes:
    straggler_fraction: fraction of each round's cohort that are stragglers
      (``round(fraction · m)`` clients, chosen uniformly).
    straggler_policy: ``"drop"`` (discard their updates) or ``"partial"`` (they run
      ``U{1..E}`` epochs).
    dropout_rate: probability that a selected client returns nothing.
  """
  straggler_fraction: float = 0.0
  straggler_policy: str = "drop"
  dropout_rate: float = 0.0

  @property
  def partial(self) -> bool:
    return self.straggler_policy == "partial" and self.straggler_fraction > 0


def check(system: Heterogeneity | None) -> Heterogeneity:
  """Validates a :class:`Heterogeneity` (``None`` = every client finishes)."""
  if system is None:
    return Heterogeneity()
  if not isinstance(system, Heterogeneity):
    raise ValueError(f"system must be a fedjax_sim.Heterogeneity, got {type(system).__name__}")
  for name in ("straggler_fraction", "dropout_rate"):
    value = getattr(system, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
      raise ValueError(f"{name} must be in [0, 1], got {value!r}")
  if system.straggler_policy not in POLICIES:
    raise ValueError(f"straggler_policy must be one of {', '.join(POLICIES)}, "
                     f"got {system.straggler_policy!r}")
  return system


class CohortConditions(NamedTuple):
  """Per cohort position: ``returns`` (its update reaches the server), ``straggler``, and ``u``
  (uniform in [0, 1), the draw that sets a partial straggler's amount of work)."""
  returns: jax.Array
  straggler: jax.Array
  u: jax.Array


def cohort_conditions(key: jax.Array, cohort_size: int, system: Heterogeneity) -> CohortConditions:
  """Draws this round's stragglers and dropouts for cohort positions ``0 … m − 1``."""
  k_strag, k_drop, k_work = jax.random.split(key, 3)
  num_stragglers = round(system.straggler_fraction * cohort_size)
  straggler = jax.random.permutation(k_strag, cohort_size) < num_stragglers
  returns = jax.random.uniform(k_drop, (cohort_size,)) >= system.dropout_rate
  if system.straggler_policy == "drop":
    returns = returns & ~straggler
  return CohortConditions(returns, straggler, jax.random.uniform(k_work, (cohort_size,)))


def partial_steps(u: jax.Array, full_steps: jax.Array, steps_per_epoch: jax.Array,
                  local_epochs: int | None) -> jax.Array:
  """A partial straggler's steps: ``U{1..E}`` whole epochs, or ``U{1..H}`` steps when
  ``local_epochs`` is ``None`` (fixed-``H`` Local SGD). Never more than ``full_steps``."""
  if local_epochs is None:
    steps = 1 + jnp.floor(u * full_steps).astype(jnp.int32)
  else:
    steps = (1 + jnp.floor(u * local_epochs).astype(jnp.int32)) * steps_per_epoch
  return jnp.minimum(steps, full_steps)
