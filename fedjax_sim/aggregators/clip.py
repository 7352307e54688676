"""``clip(max_norm, inner)``: bound every client's contribution, then aggregate with ``inner``.

Each client's whole update (delta and algorithm message taken as one flat vector) is scaled by
``min(1, max_norm / ‖u‖₂)``: inside the ball it is unchanged, outside it keeps its direction and
gets norm ``max_norm``. This is the clipping step of DP-FedAvg (McMahan et al. 2018,
arXiv:1710.06963) and, around the mean, norm bounding against model-replacement attacks (Sun et
al. 2019, arXiv:1911.07963). Composition is by functions: ``clip(1.0, median())`` clips, then
takes the median.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim._checks import positive_float
from fedjax_sim.aggregators._base import Aggregator, check, tree_norm
from fedjax_sim.aggregators.mean import mean


def clip_by_norm(update, max_norm):
  """``update · min(1, max_norm / ‖update‖)``."""
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(tree_norm(update), 1e-30))
  return jax.tree.map(lambda a: (a * scale).astype(a.dtype), update)


def clip(max_norm: float, inner: Aggregator | None = None) -> Aggregator:
  """Clips each client's update to L2 norm ``max_norm``, then applies ``inner`` (default mean).

  Args:
    max_norm: the bound ``C > 0`` on each client's update norm.
    inner: the aggregator the clipped updates go to; its own client transform runs after the clip.
  """
  max_norm = positive_float("max_norm", max_norm)
  return _clipped(max_norm, check(inner if inner is not None else mean()))


def _clipped(max_norm: float, inner: Aggregator) -> Aggregator:
  def client(update, client_state, state, *, key):
    clipped = clip_by_norm(update, max_norm)
    if inner.client is None:
      return clipped, client_state
    return inner.client(clipped, client_state, state, key=key)

  # An inner rule specialized later (its setup) is clipped the same way.
  setup = (None if inner.setup is None
           else lambda info, hparams: _clipped(max_norm, check(inner.setup(info, hparams))))
  return inner._replace(name=f"clip({inner.name})", client=client, setup=setup)
