"""``median()``: the coordinate-wise median of the client updates (Yin et al. 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", arXiv:1803.01498).

For every coordinate, the median over the clients that returned an update (empty cohort slots and
clients that dropped out are ignored); with an even count, the mean of the two middle values, as
``numpy.median``. Unweighted: the algorithm's weights do not enter (a client cannot buy influence
by claiming many examples). A collect reduction: the cohort's updates are held as
``[slots, params]`` (4 bytes per parameter per slot, e.g. 24 MB for 10,000 clients of a
610-parameter model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators._base import Aggregator


def masked_median(updates, weights, mask, state=None, *, key=None):
  """Coordinate-wise median over the slots where ``mask`` is true."""
  del weights, state, key
  def one(a):
    keep = mask.reshape(-1, *([1] * (a.ndim - 1)))
    med = jnp.nanmedian(jnp.where(keep, a.astype(jnp.float32), jnp.nan), axis=0)
    return jnp.where(jnp.any(mask), med, 0.0).astype(a.dtype)
  return jax.tree.map(one, updates)


def median() -> Aggregator:
  """The coordinate-wise median."""
  return Aggregator(name="median", reduction="collect", reduce=masked_median)
