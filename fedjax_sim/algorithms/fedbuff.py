"""FedBuff: buffered asynchronous aggregation, simulated in rounds.

FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation",
arXiv:2106.06639, Algorithm 1). Clients train asynchronously against whatever server model they
downloaded; the server buffers arriving updates and steps once ``K`` have arrived, weighting each
by its staleness ``τ`` (server steps between the client's download and its arrival):

  ``Δ̄ = (1/K) Σ_k s(τ_k) Δ_k``, ``Δ_k = y_k − w^{t−τ_k}``, ``s(τ) = (1 + τ)^{−a}``,
  ``w^{t+1} = w^t + η_g Δ̄``

where ``y_k`` is client ``k``'s model after its local training from ``w^{t−τ_k}``. The paper's
choice is ``a = 1/2`` (``s(τ) = 1/√(1+τ)``); ``a = 0`` weights all arrivals equally. With
``weighting="num_examples"`` the ``1/K`` becomes ``n_k / Σ n_k``. The server step is an optax
transformation of the pseudo-gradient ``−Δ̄`` (default ``optax.sgd(η_g)``).

How the simulation departs from the paper's wall-clock asynchrony: there is no clock. Each round
of the engine is one server step; its cohort (``K = clients_per_round`` clients, sampled as for
FedAvg) are the ``K`` arrivals, and each arrival's staleness is *drawn*, i.e. not produced by
training durations: ``τ_k`` ~ a distribution on ``{0, …, S}`` (``S = max_staleness``), per client
per round, from the client's key ``fold_in(keys.client_start, global id)`` (see
:mod:`fedjax_sim.engine.cohort`), truncated to the number of server steps taken so far (no client
started before the first model). The client trains from the buffered model ``w^{t−τ_k}``. Nothing
ties a client's arrival to an earlier departure, so a client may "arrive" in consecutive rounds,
and the concurrency (clients in flight) is implicit in the staleness distribution rather than a
parameter. The server keeps a ring buffer of the last ``S`` server models on the device (server
state ``extra["models"]``, leaves ``[S, ...]``, slot ``n mod S`` holds ``w^n``), written before
every server step; the current model is ``w^t`` itself. With ``S = 0`` every arrival is fresh and
FedBuff is FedAvg with server step ``η_g``.

Staleness distributions (``staleness``), truncated to ``{0, …, S}`` and renormalized:

* ``"uniform"``: every ``τ`` equally likely;
* ``"geometric"``: ``P(τ) ∝ (1 − p)^τ``, ``p = 1 / (1 + mean_staleness)`` (mean before truncation);
* ``"poisson"``: ``P(τ) ∝ λ^τ / τ!``, ``λ = mean_staleness``;
* a sequence of ``S + 1`` probabilities ``P(τ = 0), …, P(τ = S)``.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fedjax_sim._checks import non_negative_float, positive_float
from fedjax_sim.algorithms._base import Algorithm, check_optimizer
from fedjax_sim.algorithms.fedavg import fedavg

STALENESS = ("uniform", "geometric", "poisson")


def _max_staleness(value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(f"max_staleness must be an integer >= 0, got {value!r}")
  return int(value)


def staleness_probabilities(staleness="uniform", max_staleness: int = 4,
                            mean_staleness: float | None = None) -> np.ndarray:
  """``P(τ = 0), …, P(τ = S)`` of a staleness distribution (see the module docstring)."""
  s = _max_staleness(max_staleness)
  if isinstance(staleness, str):
    if staleness not in STALENESS:
      raise ValueError(f"staleness must be one of {', '.join(STALENESS)} or a sequence of "
                       f"{s + 1} probabilities, got {staleness!r}")
    if staleness == "uniform":
      if mean_staleness is not None:
        raise ValueError(f"mean_staleness={mean_staleness!r} applies to staleness 'geometric' "
                         "and 'poisson', not 'uniform'")
      return np.full(s + 1, 1.0 / (s + 1))
    if mean_staleness is None:
      raise ValueError(f"staleness={staleness!r} needs mean_staleness (the mean delay before "
                       "truncation to max_staleness)")
    mean = positive_float("mean_staleness", mean_staleness)
    tau = np.arange(s + 1)
    if staleness == "geometric":
      log_p = tau * math.log(mean / (1.0 + mean))
    else:
      log_p = tau * math.log(mean) - np.array([math.lgamma(t + 1.0) for t in tau])
    p = np.exp(log_p - log_p.max())
    return p / p.sum()
  try:
    p = np.asarray(staleness, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"staleness must be one of {', '.join(STALENESS)} or a sequence of "
                     f"probabilities, got {staleness!r}") from None
  if p.shape != (s + 1,) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"staleness probabilities must be {s + 1} non-negative numbers (τ = 0 … "
                     f"max_staleness={s}) with a positive sum, got {staleness!r}")
  if mean_staleness is not None:
    raise ValueError(f"mean_staleness={mean_staleness!r} applies to staleness 'geometric' and "
                     "'poisson', not to explicit probabilities")
  return p / p.sum()


def draw_staleness(key: jax.Array, probabilities, steps_done) -> jax.Array:
  """A client's staleness ``τ`` (int32): a draw from ``probabilities`` with ``key``, truncated to
  ``steps_done``, the server steps taken so far."""
  logits = jnp.log(jnp.asarray(probabilities, jnp.float32))
  tau = jax.random.categorical(key, logits).astype(jnp.int32)
  return jnp.minimum(tau, steps_done)


def fedbuff(client_lr=0.1, server_lr: float = 1.0, max_staleness: int = 4,
            staleness="uniform", mean_staleness: float | None = None,
            staleness_exponent: float = 0.5, local_epochs: int = 1,
            batch_size: int | None = 32, local_steps: int | None = None, shuffle: bool = True,
            weighting: str = "uniform",
            client_optimizer: optax.GradientTransformation | None = None,
            server_optimizer: optax.GradientTransformation | None = None) -> Algorithm:
  """FedBuff: each server step averages ``K`` (cohort size) arrivals trained from stale models.

  The rule and what the simulation simplifies are in the module docstring.

  Args:
    client_lr: the client SGD learning rate, as in :func:`fedavg` (float or schedule).
    server_lr: ``η_g`` of the default server SGD.
    max_staleness: ``S``, the largest staleness; the server keeps ``S`` past models on device.
    staleness: ``"uniform"``, ``"geometric"``, ``"poisson"`` or ``S + 1`` probabilities.
    mean_staleness: the mean delay of ``"geometric"`` and ``"poisson"`` (before truncation).
    staleness_exponent: ``a`` in ``s(τ) = (1 + τ)^{−a}``; ``0.5`` is the paper's ``1/√(1+τ)``,
      ``0`` no staleness weighting. A numeric hyperparameter (``hparams``): a sweep may batch
      several values in one program.
    local_epochs, batch_size, local_steps, shuffle: the local schedule, as in :func:`fedavg`.
    weighting: ``"uniform"`` (the paper's ``1/K``) or ``"num_examples"``.
    client_optimizer: any optax transformation; default ``optax.sgd(client_lr)``.
    server_optimizer: any optax transformation; default ``optax.sgd(server_lr)``.
  """
  check_optimizer("server_optimizer", server_optimizer)
  probabilities = staleness_probabilities(staleness, max_staleness, mean_staleness)
  s = len(probabilities) - 1
  exponent = non_negative_float("staleness_exponent", staleness_exponent)
  base = fedavg(client_lr=client_lr, local_epochs=local_epochs, batch_size=batch_size,
                local_steps=local_steps, shuffle=shuffle, weighting=weighting,
                client_optimizer=client_optimizer, server_optimizer=server_optimizer,
                server_lr=positive_float("server_lr", server_lr))

  def init_server_extra(params):
    extra = {"steps": jnp.int32(0)}
    if s:
      extra["models"] = jax.tree.map(lambda p: jnp.repeat(p[None], s, axis=0), params)
    return extra

  def client_start(extra, params, key, hparams):
    if not s:
      return params, jnp.float32(1.0)
    tau = draw_staleness(key, probabilities, extra["steps"])
    slot = (extra["steps"] - tau) % s
    stale = jax.tree.map(lambda m: lax.dynamic_index_in_dim(m, slot, keepdims=False),
                         extra["models"])
    start = jax.tree.map(lambda p, m: jnp.where(tau == 0, p, m), params, stale)
    return start, (1.0 + tau.astype(jnp.float32)) ** -hparams["staleness_exponent"]

  def server_update(summary, hparams, extra):
    steps = extra["steps"]
    new = {"steps": steps + 1}
    if s:  # w^t into slot t mod S before the step
      new["models"] = jax.tree.map(
          lambda m, p: lax.dynamic_update_index_in_dim(m, p.astype(m.dtype), steps % s, 0),
          extra["models"], summary.params)
    return summary.mean_delta, new

  hooks = base.hooks._replace(init_server_extra=init_server_extra, client_start=client_start,
                              server_update=server_update)
  return base._replace(name="fedbuff", hooks=hooks, hparams={**base.hparams,
                                                                 "staleness_exponent": exponent})
