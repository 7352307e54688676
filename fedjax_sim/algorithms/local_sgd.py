"""Datacenter Local SGD and its communication schedules.

Local SGD (Stich 2019, "Local SGD Converges Fast and Communicates Little", arXiv:1805.09767; Lin et
al. 2020, "Don't Use Large Mini-Batches, Use Local SGD", arXiv:1808.07217): every worker takes ``H``
mini-batch SGD steps from the current average, then the server averages the workers uniformly.
``H = 1`` is synchronous mini-batch SGD on the union of the workers' batches.

Schedules for ``H`` (the static ``max_local_steps`` bounds the compiled loop; a round with a smaller
``H`` runs only ``H`` steps):

* fixed ``H`` (:func:`local_sgd`);
* growing ``H`` (:func:`local_sgd_growing`): periodic averaging with ``H = min(H_0 · factor^⌊(r−1)/every⌋,
  H_max)``, i.e. 1, 2, 4, 8, … — frequent averaging early, when the models move fast, rarer later
  (the post-local SGD idea of Lin et al. 2020, as a staircase);
* adaptive ``H`` (:func:`local_sgd_adaptive`): our rule, a per-round form of the divergence test of
  dynamic averaging (Kamp et al. 2018, "Efficient Decentralized Deep Learning by Dynamic Model
  Averaging", arXiv:1807.03210), which synchronizes when the workers' models drift too far from
  their average, combined with AdaComm's idea of adapting the period between averagings (Wang &
  Joshi 2019, arXiv:1810.08313). After each round the server measures the workers' relative
  disagreement ``ρ = Σ_k p_k ‖θ_k − θ̄‖² / Σ_k p_k ‖θ_k − θ‖²`` (the share of their update energy that
  is spread around the mean, in ``[0, 1]``, free of the model's scale); if ``ρ > target`` the models
  diverge and ``H`` halves (down to 1), if ``ρ < target / 2`` they stay close and ``H`` doubles (up to
  ``H_max``); in between ``H`` stays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim._checks import fraction, positive_float, positive_int
from fedjax_sim.algorithms._base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg


def local_sgd(client_lr=0.1, local_steps: int = 1, batch_size: int | None = 32,
              **kwargs) -> Algorithm:
  """Local SGD with a fixed ``H = local_steps`` mini-batch steps per round, uniform averaging."""
  kwargs.setdefault("weighting", "uniform")
  algo = fedavg(client_lr=client_lr, local_steps=positive_int("local_steps", local_steps),
                batch_size=batch_size, **kwargs)
  return algo._replace(name="local_sgd")


def _with_steps(algo: Algorithm, name: str, max_local_steps: int, **hooks) -> Algorithm:
  return algo._replace(name=name, local_steps=max_local_steps, hooks=algo.hooks._replace(**hooks))


def local_sgd_growing(client_lr=0.1, initial_steps: int = 1, factor: int = 2, every: int = 10,
                      max_local_steps: int = 64, batch_size: int | None = 32,
                      **kwargs) -> Algorithm:
  """Local SGD with ``H`` growing geometrically: ``H_r = min(initial · factor^⌊(r−1)/every⌋, max)``.

  Args:
    initial_steps: ``H`` of the first ``every`` rounds.
    factor: growth factor (``2``: 1, 2, 4, 8, …).
    every: rounds between increases.
    max_local_steps: the cap (and the compiled loop's static bound).
  """
  initial_steps = positive_int("initial_steps", initial_steps)
  factor, every = positive_int("factor", factor), positive_int("every", every)
  max_local_steps = positive_int("max_local_steps", max_local_steps)
  algo = local_sgd(client_lr, max_local_steps, batch_size, **kwargs)

  def round_steps(_, r):
    stage = (r - 1) // every
    return jnp.minimum(initial_steps * jnp.float32(factor) ** stage, max_local_steps).astype(jnp.int32)
  return _with_steps(algo, "local_sgd_growing", max_local_steps, round_steps=round_steps)


def local_sgd_adaptive(client_lr=0.1, initial_steps: int = 1, max_local_steps: int = 64,
                       target: float = 0.5, batch_size: int | None = 32, **kwargs) -> Algorithm:
  """Local SGD whose ``H`` doubles while the workers stay close and halves when they diverge.

  The rule (module docstring): relative disagreement ``ρ > target`` halves ``H``, ``ρ < target/2``
  doubles it, within ``[1, max_local_steps]``; ``H`` lives in the server state.
  """
  initial_steps = positive_int("initial_steps", initial_steps)
  max_local_steps = positive_int("max_local_steps", max_local_steps)
  if initial_steps > max_local_steps:
    raise ValueError(f"initial_steps={initial_steps} exceeds max_local_steps={max_local_steps}")
  target = fraction("target", positive_float("target", target))
  algo = local_sgd(client_lr, max_local_steps, batch_size, **kwargs)

  def server_update(summary, hparams, extra):
    spread = sum(jnp.sum(d * d) for d in jax.tree.leaves(summary.mean_delta))
    rho = summary.drift / jnp.maximum(summary.drift + spread, 1e-30)
    h = extra["local_steps"]
    h = jnp.where(rho > target, jnp.maximum(h // 2, 1),
                  jnp.where(rho < target / 2, jnp.minimum(h * 2, max_local_steps), h))
    return summary.mean_delta, {"local_steps": h.astype(jnp.int32), "disagreement": rho}

  return _with_steps(
      algo, "local_sgd_adaptive", max_local_steps,
      init_server_extra=lambda _: {"local_steps": jnp.int32(initial_steps),
                                   "disagreement": jnp.float32(0.0)},
      round_steps=lambda extra, r: extra["local_steps"],
      server_update=server_update)
