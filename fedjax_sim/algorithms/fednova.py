"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", arXiv:2007.07481).

Clients that take different numbers of local steps ``τ_k`` pull FedAvg toward the objectives of
the clients that step most. FedNova averages *normalized* updates instead: client ``k`` sends
``Δ_k / a_k``, where ``a_k`` is the ℓ1 norm of its local aggregation vector — ``τ_k`` for plain SGD,
``[τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ)`` with client momentum ``ρ``, ``[1 − (1 − ημ)^τ] / (ημ)`` with a
FedProx term ``μ`` — and the server applies ``Δ = τ_eff Σ_k p_k Δ_k / a_k`` with
``τ_eff = Σ_k p_k a_k`` and ``p_k = n_k / Σ_{j∈S} n_j``. When every ``a_k`` is equal this is FedAvg.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim._checks import fraction, non_negative_float, positive_float
from fedjax_sim.algorithms._base import Algorithm, Hooks
from fedjax_sim.algorithms.fedavg import fedavg, sgd_optimizer
from fedjax_sim.algorithms.fedprox import proximal_gradient


def aggregation_norm(num_steps, client_lr: float, momentum: float = 0.0, mu: float = 0.0):
  """``a_k``: the ℓ1 norm of the local aggregation vector after ``num_steps`` steps."""
  tau = jnp.asarray(num_steps, jnp.float32)
  if momentum > 0:
    return momentum_norm(tau, momentum, 1 - momentum)
  if mu > 0:
    return proximal_norm(tau, client_lr * mu, 1.0 - client_lr * mu)
  return tau


def momentum_norm(tau, rho, one_minus_rho):
  """``[τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ)`` (``1 − ρ`` given, rounded from double precision)."""
  return (tau - rho * (1 - rho ** tau) / one_minus_rho) / one_minus_rho


def proximal_norm(tau, lr_mu, shrink):
  """``[1 − (1 − ημ)^τ] / (ημ)`` with ``ημ`` and ``shrink = 1 − ημ`` given."""
  return (1 - shrink ** tau) / lr_mu


def fednova(client_lr: float = 0.1, momentum: float = 0.0, mu: float = 0.0,
            server_optimizer: optax.GradientTransformation | None = None, **kwargs) -> Algorithm:
  """FedNova: normalized averaging of client updates (weights ``n_k``).

  Args:
    client_lr: ``η`` of the clients' SGD.
    momentum: client SGD momentum ``ρ ∈ [0, 1)``.
    mu: optional FedProx term ``μ ≥ 0`` (not together with momentum).
    server_optimizer: applied to ``−Δ`` (default SGD of step ``server_lr``, see :func:`fedavg`).
    **kwargs: the local schedule, as in :func:`fedavg` (``local_epochs``, ``batch_size``, ...).

  ``client_lr``, and ``momentum`` or ``mu`` when > 0, are data (:attr:`Algorithm.hparams`): a
  sweep can vary them (a swept value of 0 keeps the ``> 0`` program, whose limit it is).
  """
  client_lr = positive_float("client_lr", client_lr)
  momentum = fraction("momentum", momentum, closed_top=False)
  mu = non_negative_float("mu", mu)
  if momentum > 0 and mu > 0:
    raise ValueError(f"fednova takes momentum or mu, not both (got momentum={momentum}, mu={mu})")
  hparams = {}
  optimizer = sgd_optimizer("client_lr", client_lr, hparams, "momentum", momentum)
  base = fedavg(client_optimizer=optimizer, server_optimizer=server_optimizer, **kwargs)

  def derived(h):  # what aggregation_norm computes in Python, from the run's values
    if momentum > 0:
      return {"1-momentum": 1 - h.get("momentum", momentum)}
    if mu > 0:
      lr_mu = h.get("client_lr", client_lr) * h.get("mu", mu)
      return {"client_lr*mu": lr_mu, "1-client_lr*mu": 1.0 - lr_mu}
    return {}

  def client_result(out):
    hp = out.context.hparams
    tau = jnp.asarray(out.num_steps, jnp.float32)
    if momentum > 0:  # constants unless swept (Algorithm.constant_hparams, derived)
      a = momentum_norm(tau, hp.get("momentum", momentum), hp.get("1-momentum", 1 - momentum))
    elif mu > 0:
      a = proximal_norm(tau, hp.get("client_lr*mu", client_lr * mu),
                        hp.get("1-client_lr*mu", 1.0 - client_lr * mu))
    else:
      a = tau
    a = jnp.maximum(a, 1e-12)
    normalized = jax.tree.map(lambda y, x: (y - x).astype(jnp.float32) / a, out.params,
                              out.context.global_params)
    return {"normalized": normalized, "a": a}, None

  def server_update(summary, hparams, extra):
    tau_eff = summary.mean_message["a"]
    return jax.tree.map(lambda d: tau_eff * d, summary.mean_message["normalized"]), extra

  hooks = Hooks(client_result=client_result, server_update=server_update,
                gradient=proximal_gradient if mu > 0 else None)
  if mu > 0:
    hparams["mu"] = mu
  return base._replace(name="fednova", hooks=hooks, hparams={**base.hparams, **hparams},
                       constant_hparams=base.constant_hparams | (set(hparams) - {"mu"}),
                       derived=derived)
