"""Byzantine-robust rules on the collect path: ``trimmed_mean``, ``krum`` (and Multi-Krum),
``geometric_median`` and ``centered_clip``. Norm bounding (Sun et al. 2019) is
:func:`~fedjax_sim.aggregators.clip` around the mean.

Every rule sees the cohort's slots ``[slots, ...]`` with a validity mask (empty slots and clients
that did not return are ignored) and treats each client's whole update (delta and algorithm
message) as one vector where a rule needs vectors. Weights: ``trimmed_mean``, ``krum`` and
``centered_clip`` ignore the algorithm's weights (a Byzantine client could claim many examples to
buy influence); ``geometric_median`` uses them, as RFA does (Pillutla et al. 2022).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim._checks import positive_float, positive_int
from fedjax_sim.aggregators._base import Aggregator, flat_updates, unflat_update
from fedjax_sim.aggregators.median import (count_pair, from_sortable_keys, kth_smallest_keys,
                                           kth_smallest_keys_pair, sortable_keys)


# --- trimmed mean -------------------------------------------------------------------------------

def masked_trimmed_mean(updates, mask, beta: float):
  """Per coordinate, the mean of the valid values after dropping the ``⌊β·n⌋`` smallest and the
  ``⌊β·n⌋`` largest (``n`` valid slots); ties are counted exactly, as a sort would."""
  count = jnp.sum(mask.astype(jnp.int32))
  trim = jnp.floor(beta * count.astype(jnp.float32)).astype(jnp.int32)
  kept = jnp.maximum(count - 2 * trim, 1)

  def one(a):
    keys = sortable_keys(a.reshape(a.shape[0], -1))
    # both order statistics in one radix selection (one read of the keys per pass, not two)
    lo, hi = kth_smallest_keys_pair(keys, mask, trim, count - 1 - trim)
    valid = mask[:, None]
    values = a.reshape(a.shape[0], -1).astype(jnp.float32)
    inside = valid & (keys > lo[None]) & (keys < hi[None])
    total = jnp.sum(jnp.where(inside, values, 0.0), axis=0)
    at_or_below_lo, below_hi = count_pair(valid, keys <= lo[None], keys < hi[None])
    lo_v, hi_v = from_sortable_keys(lo), from_sortable_keys(hi)
    # kept ranks are trim … count − 1 − trim: the copies of lo and hi inside that range
    lo_copies = at_or_below_lo - trim
    hi_copies = count - trim - below_hi
    total = jnp.where(lo == hi, kept * lo_v, total + lo_copies * lo_v + hi_copies * hi_v)
    out = jnp.where(count > 0, total / kept, 0.0)
    return out.reshape(a.shape[1:]).astype(a.dtype)
  return jax.tree.map(one, updates)


def trimmed_mean(beta: float) -> Aggregator:
  """Coordinate-wise β-trimmed mean (Yin et al. 2018): drop the ``⌊β·n⌋`` largest and smallest
  values of every coordinate, average the rest (unweighted). ``β = 0`` is the unweighted mean.

  Args:
    beta: the trimmed fraction at each end, in ``[0, 0.5)``.
  """
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 0.5:
    raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
  beta = float(beta)
  return Aggregator(name=f"trimmed_mean({beta:g})", reduction="collect",
                    reduce=lambda updates, weights, mask, state, *, key:
                    masked_trimmed_mean(updates, mask, beta))


# --- Krum ---------------------------------------------------------------------------------------

KRUM_CHUNK = 1024  # candidate columns of the pairwise-distance matrix held at once


def krum_scores(flat: jax.Array, mask: jax.Array, num_byzantine: int) -> jax.Array:
  """Each valid slot's Krum score: the sum of squared distances to its ``n − f − 2`` nearest
  other valid slots (``inf`` for invalid slots). The ``[slots, slots]`` distances are computed
  ``KRUM_CHUNK`` columns at a time (memory ``slots × KRUM_CHUNK``), the neighbour cut by radix
  selection (no sort)."""
  slots = flat.shape[0]
  count = jnp.sum(mask.astype(jnp.int32))
  k = jnp.maximum(count - num_byzantine - 2, 1)
  sq = jnp.sum(flat * flat, axis=1)
  chunk = min(KRUM_CHUNK, slots)
  pad = -slots % chunk
  cols = jnp.arange(slots + pad).reshape(-1, chunk)

  def scores_of(col):
    c = jnp.minimum(col, slots - 1)
    dist = jnp.maximum(sq[:, None] + sq[c][None] - 2.0 * flat @ flat[c].T, 0.0)  # [slots, chunk]
    others = mask[:, None] & (jnp.arange(slots)[:, None] != c[None])
    keys = sortable_keys(dist)
    kth = kth_smallest_keys(keys, others, k - 1)
    below = others & (keys < kth[None])
    n_below = jnp.sum(below, axis=0)
    total = jnp.sum(jnp.where(below, dist, 0.0), axis=0) + (k - n_below) * from_sortable_keys(kth)
    return jnp.where(mask[c] & (col < slots), total, jnp.inf)
  return lax.map(scores_of, cols).reshape(-1)[:slots]


def krum(num_byzantine: int, num_selected: int = 1) -> Aggregator:
  """Krum (Blanchard et al. 2017): the update whose ``n − f − 2`` nearest neighbours are closest
  (sum of squared distances); with ``num_selected > 1``, Multi-Krum: the unweighted mean of the
  ``num_selected`` lowest-score updates. Needs ``n > 2f + 2`` valid clients (checked against the
  cohort before the round is built).

  Args:
    num_byzantine: ``f``, the number of Byzantine clients tolerated.
    num_selected: how many updates are averaged (1 = Krum).
  """
  if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 0:
    raise ValueError(f"num_byzantine must be an integer >= 0, got {num_byzantine!r}")
  num_selected = positive_int("num_selected", num_selected)

  def reduce(updates, weights, mask, state, *, key):
    del weights, state, key
    flat = flat_updates(updates)
    scores = krum_scores(flat, mask, num_byzantine)
    _, best = lax.top_k(-scores, num_selected)
    chosen = jnp.isfinite(scores[best])
    mean = jnp.sum(jnp.where(chosen[:, None], flat[best], 0.0), axis=0) / jnp.maximum(
        jnp.sum(chosen), 1)
    return unflat_update(updates, mean)

  def setup(info, hparams):
    del hparams
    if not info.slots > 2 * num_byzantine + 2:
      raise ValueError(f"krum: num_byzantine={num_byzantine} needs more than "
                       f"2·{num_byzantine} + 2 = {2 * num_byzantine + 2} clients per round, the "
                       f"cohort has {info.slots}")
    if num_selected > info.slots:
      raise ValueError(f"krum: num_selected={num_selected} exceeds the {info.slots} clients per "
                       f"round")
    return rule._replace(setup=None)

  name = "krum" if num_selected == 1 else f"multi_krum({num_selected})"
  rule = Aggregator(name=name, reduction="collect", reduce=reduce, setup=setup)
  return rule


# --- geometric median (RFA) -----------------------------------------------------------------------

def weiszfeld(flat, weights, mask, max_iter: int, eps: float, nu: float):
  """Smoothed Weiszfeld iterations from the weighted mean: ``v ← Σ β_i x_i / Σ β_i`` with
  ``β_i = w_i / max(ν, ‖x_i − v‖)``, until ``v`` moves by at most ``eps`` (relative to its
  norm plus one) or ``max_iter`` iterations."""
  w = jnp.where(mask, weights.astype(jnp.float32), 0.0)
  w = w / jnp.maximum(jnp.sum(w), 1e-30)

  def step(v):
    beta = w / jnp.maximum(nu, jnp.linalg.norm(flat - v[None], axis=1))
    return beta @ flat / jnp.maximum(jnp.sum(beta), 1e-30)

  def cond(carry):
    i, v, moved = carry
    return (i < max_iter) & (moved > eps * (1.0 + jnp.linalg.norm(v)))

  def body(carry):
    i, v, _ = carry
    new = step(v)
    return i + 1, new, jnp.linalg.norm(new - v)

  start = w @ flat
  _, v, _ = lax.while_loop(cond, body, (jnp.int32(0), start, jnp.float32(jnp.inf)))
  return v


def geometric_median(max_iter: int = 100, eps: float = 1e-6, nu: float = 1e-6) -> Aggregator:
  """The weighted geometric median of the updates, ``argmin_v Σ w_i ‖x_i − v‖`` (RFA, Pillutla
  et al. 2022), by smoothed Weiszfeld iterations (see :func:`weiszfeld`).

  Args:
    max_iter: at most this many iterations.
    eps: stop when an iteration moves ``v`` by at most ``eps·(1 + ‖v‖)``.
    nu: the smoothing ``ν``: distances below it count as ``ν`` (no division by zero).
  """
  max_iter = positive_int("max_iter", max_iter)
  eps, nu = positive_float("eps", eps), positive_float("nu", nu)

  def reduce(updates, weights, mask, state, *, key):
    del state, key
    flat = flat_updates(updates)
    return unflat_update(updates, weiszfeld(flat, weights, mask, max_iter, eps, nu))
  return Aggregator(name="geometric_median", reduction="collect", reduce=reduce)


# --- centered clipping --------------------------------------------------------------------------

def centered_clip(tau: float, iters: int = 1) -> Aggregator:
  """Centered clipping (Karimireddy et al. 2021): from the previous round's aggregate ``v``,
  ``iters`` times ``v ← v + mean_i (x_i − v)·min(1, τ/‖x_i − v‖)`` (unweighted mean over the valid
  clients). The aggregate is kept in the aggregator state for the next round (zeros at first).

  Args:
    tau: the clipping radius ``τ > 0``.
    iters: the number of iterations ``L``.
  """
  tau = positive_float("tau", tau)
  iters = positive_int("iters", iters)

  def init(update):
    return jnp.zeros(sum(a.size for a in jax.tree.leaves(update)), jnp.float32)

  def reduce(updates, weights, mask, state, *, key):
    del weights, key
    flat = flat_updates(updates)
    valid = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(valid), 1.0)

    def step(_, v):
      diff = flat - v[None]
      scale = jnp.minimum(1.0, tau / jnp.maximum(jnp.linalg.norm(diff, axis=1), 1e-30))
      return v + (valid * scale) @ diff / count
    start = jnp.concatenate([state, jnp.zeros(flat.shape[1] - state.shape[0], jnp.float32)])
    return unflat_update(updates, lax.fori_loop(0, iters, step, start))

  def server(aggregate, state, *, key):
    del key
    last = flat_updates(jax.tree.map(lambda a: a[None], aggregate))[0]
    return aggregate, last[:state.shape[0]]
  return Aggregator(name="centered_clip", reduction="collect", init=init, reduce=reduce,
                    server=server)
