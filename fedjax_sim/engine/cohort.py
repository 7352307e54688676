"""Stage 1 of a round: its named randomness streams, the cohort, and the cohort's conditions.

Sampling (:class:`Sampling`): ``fixed`` draws ``m`` distinct clients uniformly without
replacement (the default); ``poisson`` includes each client independently with probability ``q``,
so the cohort size varies. The compiled round needs a static number of slots: a Poisson cohort
gets :func:`poisson_capacity` slots, the smallest count its size exceeds with probability at most
``OVERFLOW_PROBABILITY`` per round; unused slots are empty (they return nothing), and a round that
draws more clients than slots reports it (``RoundPlan.drawn``; the simulation warns and records
it) rather than dropping them silently.

Randomness (reproducible whatever the plan, chunk or block size): ``round_key = fold_in(train_key,
r)``; ``sample, clients, system = split(round_key, 3)`` (the derivation every earlier version
used, so no number changed when more streams were added); the streams added with aggregators are
``fold_in(round_key, 1001 …)``: the per-client transform (client ``k`` uses ``fold_in(stream,
k)``), the reduction, the server-side transform and Byzantine updates; ``fold_in(round_key, 1005)``
is the client-start stream (``Hooks.client_start``, e.g. FedBuff's staleness draws; client ``k``
uses ``fold_in(stream, k)``). The Byzantine set of an
attack comes from ``fold_in(train_key, 0)``, round 0's key, which no round uses. Client ``k``'s
training key is ``fold_in(clients, k)`` with ``k`` its global id; ``system`` draws stragglers and
dropouts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim import attacks, systems


OVERFLOW_PROBABILITY = 1e-9  # per round, for the capacity of Poisson-sampled cohorts


class Sampling(NamedTuple):
  """How each round's cohort is drawn: ``kind`` ``"fixed"`` (``m`` without replacement) or
  ``"poisson"`` (each client independently with probability ``rate``)."""
  kind: str = "fixed"
  rate: float = 1.0


def poisson_capacity(num_clients: int, rate: float,
                     overflow: float = OVERFLOW_PROBABILITY) -> int:
  """Slots for a Poisson cohort: the smallest ``c`` with ``P(Binomial(N, q) > c) ≤ overflow``
  (exact binomial tail). E.g. N = 300,000, q = 0.01: 3,333 slots for a mean of 3,000."""
  from scipy import stats
  if rate >= 1.0:
    return num_clients
  c = int(stats.binom.isf(overflow, num_clients, rate))
  while stats.binom.sf(c, num_clients, rate) > overflow:  # isf is a float inverse: make sure
    c += 1
  return max(1, min(num_clients, c))


class RoundKeys(NamedTuple):
  """The named randomness streams of one round."""
  sample: jax.Array  # cohort sampling
  clients: jax.Array  # local training (shuffles): fold_in(clients, global id)
  system: jax.Array  # stragglers and dropouts
  client_transform: jax.Array  # the aggregator's per-client transform: fold_in(., global id)
  aggregator: jax.Array  # the aggregator's reduction
  server: jax.Array  # the aggregator's server-side transform
  attack: jax.Array  # Byzantine clients' updates: fold_in(attack, global id)
  client_start: jax.Array  # Hooks.client_start (FedBuff's staleness): fold_in(., global id)


def round_keys(train_key: jax.Array, round_num) -> RoundKeys:
  """The streams of round ``round_num`` (1-based) of the training key ``train_key``."""
  key = jax.random.fold_in(train_key, round_num)
  sample, clients, system = jax.random.split(key, 3)
  more = [jax.random.fold_in(key, 1001 + i) for i in range(5)]
  return RoundKeys(sample, clients, system, *more)


def sample_cohort(key: jax.Array, num_clients: int, cohort_size: int) -> jax.Array:
  """``cohort_size`` distinct global client ids, uniformly without replacement (all when equal).

  Uses the top-``m`` of i.i.d. 32-bit random integers per client (no full sort of the population).
  """
  if cohort_size >= num_clients:
    return jnp.arange(num_clients, dtype=jnp.int32)
  _, ids = lax.top_k(jax.random.bits(key, (num_clients,)), cohort_size)
  return ids.astype(jnp.int32)


def poisson_cohort(key: jax.Array, num_clients: int, capacity: int, rate: float):
  """``(ids [capacity], member [capacity], drawn)``: each client joins with probability ``rate``;
  the members come first (in random order), ``member`` marks them, ``drawn`` counts every client
  drawn (more than ``capacity`` is an overflow: the extra members got no slot)."""
  k_in, k_order = jax.random.split(key)
  joins = jax.random.uniform(k_in, (num_clients,)) < rate
  bits = jax.random.bits(k_order, (num_clients,), jnp.uint32)
  # Members rank above every non-member: top bit set for members, cleared for the others.
  score = jnp.where(joins, bits | jnp.uint32(1 << 31), bits & jnp.uint32((1 << 31) - 1))
  _, ids = lax.top_k(score, capacity)
  return ids.astype(jnp.int32), joins[ids], jnp.sum(joins.astype(jnp.int32))


def draw_cohort(key: jax.Array, num_clients: int, cohort_size: int, sampling: Sampling):
  """``(ids, member, drawn)`` of one round for either sampling (``member`` all true and ``drawn =
  m`` for fixed-size cohorts)."""
  if sampling is not None and sampling.kind == "poisson":
    return poisson_cohort(key, num_clients, cohort_size, sampling.rate)
  ids = sample_cohort(key, num_clients, cohort_size)
  return ids, jnp.ones(cohort_size, bool), jnp.int32(cohort_size)


class RoundPlan(NamedTuple):
  """What a round decided before any client trains."""
  cohort: jax.Array  # [m] global ids (positions 0 … m − 1 for a streamed round's own data)
  conditions: systems.CohortConditions  # per cohort position: returns, straggler, u
  keys: RoundKeys
  local_steps: jax.Array  # Local-SGD ``H`` of this round (0 when the algorithm has no schedule)
  round: jax.Array  # the 1-based round number
  drawn: jax.Array = None  # clients drawn this round (Poisson: may differ from the slot count)
  attackers: jax.Array = None  # [m] the position holds a Byzantine client (``None``: no attack)


def plan_round(spec, train_key: jax.Array, server_extra: Any, r) -> RoundPlan:
  """This round's cohort, per-position conditions, keys and Local-SGD ``H``."""
  keys = round_keys(train_key, r)
  cohort, member, drawn = draw_cohort(keys.sample, spec.num_clients, spec.cohort_size,
                                      spec.sampling)
  attackers = None
  if spec.attack is not None:  # the Byzantine set is the key of round 0, which no round uses
    byzantine = attacks.members(spec.attack, jax.random.fold_in(train_key, 0), spec.num_clients)
    attackers = byzantine[cohort] & member
  if spec.streaming:  # a streamed round's data holds exactly its cohort, in cohort order
    cohort = jnp.arange(spec.cohort_size, dtype=jnp.int32)
  conditions = systems.cohort_conditions(keys.system, spec.cohort_size, spec.system)
  if spec.poisson:  # empty slots return nothing
    conditions = conditions._replace(returns=conditions.returns & member)
  round_steps = spec.algo.hooks.round_steps
  h = (jnp.int32(0) if round_steps is None
       else jnp.asarray(round_steps(server_extra, r), jnp.int32))
  return RoundPlan(cohort, conditions, keys, h, r, drawn, attackers)
