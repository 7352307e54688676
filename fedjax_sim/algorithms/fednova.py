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
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.fedprox import proximal_gradient


def aggregation_norm(num_steps, client_lr: float, momentum: float = 0.0, mu: float = 0.0):
  """``a_k``: the ℓ1 norm of the local aggregation vector after ``num_steps`` steps."""
  tau = jnp.asarray(num_steps, jnp.float32)
  if momentum > 0:
    rho = momentum
    return (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)
  if mu > 0:
    shrink = 1.0 - client_lr * mu
    return (1 - shrink ** tau) / (client_lr * mu)
  return tau


def fednova(client_lr: float = 0.1, momentum: float = 0.0, mu: float = 0.0,
            server_optimizer: optax.GradientTransformation | None = None, **kwargs) -> Algorithm:
  """FedNova: normalized averaging of client updates (weights ``n_k``).

  Args:
    client_lr: ``η`` of the clients' SGD.
    momentum: client SGD momentum ``ρ ∈ [0, 1)``.
    mu: optional FedProx term ``μ ≥ 0`` (not together with momentum).
    server_optimizer: applied to ``−Δ`` (default SGD of step 1).
    **kwargs: the local schedule, as in :func:`fedavg` (``local_epochs``, ``batch_size``, ...).
  """
  client_lr = positive_float("client_lr", client_lr)
  momentum = fraction("momentum", momentum, closed_top=False)
  mu = non_negative_float("mu", mu)
  if momentum > 0 and mu > 0:
    raise ValueError(f"fednova takes momentum or mu, not both (got momentum={momentum}, mu={mu})")
  optimizer = optax.sgd(client_lr, momentum=momentum or None)
  base = fedavg(client_optimizer=optimizer, server_optimizer=server_optimizer, **kwargs)

  def client_result(out):
    a = aggregation_norm(out.num_steps, client_lr, momentum, mu)
    a = jnp.maximum(a, 1e-12)
    normalized = jax.tree.map(lambda y, x: (y - x).astype(jnp.float32) / a, out.params,
                              out.context.global_params)
    return {"normalized": normalized, "a": a}, None

  def server_update(summary, hparams, extra):
    tau_eff = summary.mean_message["a"]
    return jax.tree.map(lambda d: tau_eff * d, summary.mean_message["normalized"]), extra

  hooks = Hooks(client_result=client_result, server_update=server_update,
                gradient=proximal_gradient if mu > 0 else None)
  return base._replace(name="fednova", hooks=hooks, hparams={"mu": mu} if mu > 0 else {})
