"""Stage 1 of a round: its named randomness streams, the cohort, and the cohort's conditions.

Randomness (reproducible whatever the plan, chunk or block size): ``round_key = fold_in(train_key,
r)``; ``sample, clients, system = split(round_key, 3)`` (the derivation every earlier version
used, so no number changed when more streams were added); the streams added with aggregators are
``fold_in(round_key, 1001 …)``: the per-client transform (client ``k`` uses ``fold_in(stream,
k)``), the reduction and the server-side transform. Client ``k``'s training key is
``fold_in(clients, k)`` with ``k`` its global id; ``system`` draws stragglers and dropouts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim import systems


class RoundKeys(NamedTuple):
  """The named randomness streams of one round."""
  sample: jax.Array  # cohort sampling
  clients: jax.Array  # local training (shuffles): fold_in(clients, global id)
  system: jax.Array  # stragglers and dropouts
  client_transform: jax.Array  # the aggregator's per-client transform: fold_in(., global id)
  aggregator: jax.Array  # the aggregator's reduction
  server: jax.Array  # the aggregator's server-side transform


def round_keys(train_key: jax.Array, round_num) -> RoundKeys:
  """The streams of round ``round_num`` (1-based) of the training key ``train_key``."""
  key = jax.random.fold_in(train_key, round_num)
  sample, clients, system = jax.random.split(key, 3)
  more = [jax.random.fold_in(key, 1001 + i) for i in range(3)]
  return RoundKeys(sample, clients, system, *more)


def sample_cohort(key: jax.Array, num_clients: int, cohort_size: int) -> jax.Array:
  """``cohort_size`` distinct global client ids, uniformly without replacement (all when equal).

  Uses the top-``m`` of i.i.d. 32-bit random integers per client (no full sort of the population).
  """
  if cohort_size >= num_clients:
    return jnp.arange(num_clients, dtype=jnp.int32)
  _, ids = lax.top_k(jax.random.bits(key, (num_clients,)), cohort_size)
  return ids.astype(jnp.int32)


class RoundPlan(NamedTuple):
  """What a round decided before any client trains."""
  cohort: jax.Array  # [m] global ids (positions 0 … m − 1 for a streamed round's own data)
  conditions: systems.CohortConditions  # per cohort position: returns, straggler, u
  keys: RoundKeys
  local_steps: jax.Array  # Local-SGD ``H`` of this round (0 when the algorithm has no schedule)
  round: jax.Array  # the 1-based round number


def plan_round(spec, train_key: jax.Array, server_extra: Any, r) -> RoundPlan:
  """This round's cohort, per-position conditions, keys and Local-SGD ``H``."""
  keys = round_keys(train_key, r)
  # A streamed round's data holds exactly its cohort, in cohort order.
  cohort = (jnp.arange(spec.cohort_size, dtype=jnp.int32) if spec.streaming
            else sample_cohort(keys.sample, spec.num_clients, spec.cohort_size))
  conditions = systems.cohort_conditions(keys.system, spec.cohort_size, spec.system)
  round_steps = spec.algo.hooks.round_steps
  h = (jnp.int32(0) if round_steps is None
       else jnp.asarray(round_steps(server_extra, r), jnp.int32))
  return RoundPlan(cohort, conditions, keys, h, r)
