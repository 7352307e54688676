"""``mean()``: the weighted mean of the client updates, FedAvg's aggregation (the default).

``Σ_k w_k u_k / Σ_k w_k`` over the clients that returned, with the algorithm's weights (``n_k``
for FedAvg, uniform for SCAFFOLD and Local SGD). A stream reduction: the sums are accumulated
chunk by chunk and the cohort's updates are never held at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators._base import Aggregator, StreamSums


def weighted_mean(sums: StreamSums, state=None):
  """``Σ w u / Σ w`` (zero when nothing returned)."""
  del state
  total = jnp.maximum(sums.weight, 1e-30)
  return jax.tree.map(lambda a: a / total, sums.weighted_sum)


def mean() -> Aggregator:
  """The weighted mean (the engine's default aggregator)."""
  return Aggregator(name="mean", reduction="stream", finalize=weighted_mean)
