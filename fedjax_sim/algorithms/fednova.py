"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", arXiv:2007.07481).

Clients that take different numbers of local steps ``τ_k`` pull FedAvg toward the objectives of
the clients that step most. FedNova averages *normalized* updates instead: client ``k`` sends
``Δ_k / a_k``, where ``a_k`` is the ℓ1 norm of its local aggregation vector — ``τ_k`` for plain SGD,
``[τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ)`` with client momentum ``ρ``, ``[1 − (1 − ημ)^τ] / (ημ)`` with a
FedProx term ``μ`` — and the server applies ``Δ = τ_eff Σ_k p_k Δ_k / a_k`` with
``τ_eff = Σ_k p_k a_k`` and ``p_k = n_k / Σ_{j∈S} n_j``. When every ``a_k`` is equal this is FedAvg.

With a client learning-rate schedule ``η_t`` over the local steps, ``a_k`` is the ℓ1 norm of the
aggregation vector in units of the rate (the coefficients of the gradients in ``−Δ_k``):
``Σ_{t<τ} η_t`` for SGD, ``Σ_t η_t (1 − ρ^{t+1}) / (1 − ρ)`` with momentum and the recurrence
``a ← (1 − η_t μ) a + η_t`` with a proximal term. For a constant rate these are ``η`` times the
closed forms above; a common factor cancels between ``Δ_k / a_k`` and ``τ_eff``, so the rule is
unchanged. A per-round schedule (``client_lr_per="round"``) keeps the closed forms with that
round's rate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim._checks import fraction, non_negative_float
from fedjax_sim.algorithms._base import Algorithm, Hooks, learning_rate
from fedjax_sim.algorithms.fedavg import LR_UNITS, fedavg, sgd_optimizer
from fedjax_sim.algorithms.fedprox import proximal_gradient


def aggregation_norm(num_steps, client_lr, momentum: float = 0.0, mu: float = 0.0):
  """``a_k``: the ℓ1 norm of the local aggregation vector after ``num_steps`` steps.

  ``client_lr`` a float (or a traced scalar): in steps (the closed forms); a schedule of the local
  step count: in units of the rate (``Σ_t`` of each gradient's coefficient, see the module
  docstring).
  """
  if callable(client_lr):
    def body(t, carry):
      a, trace = carry
      lr = jnp.asarray(client_lr(t), jnp.float32)
      trace = momentum * trace + 1.0  # Σ_{s≤t} ρ^{t−s}
      return (1.0 - lr * mu) * a + lr * trace, trace
    steps = jnp.asarray(num_steps, jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (jnp.float32(0), jnp.float32(0)))[0]
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


def fednova(client_lr=0.1, momentum: float = 0.0, mu: float = 0.0,
            server_optimizer: optax.GradientTransformation | None = None,
            client_lr_per: str = "step", **kwargs) -> Algorithm:
  """FedNova: normalized averaging of client updates (weights ``n_k``).

  Args:
    client_lr: ``η`` of the clients' SGD: a float or an optax schedule (``a_k`` then sums the
      rates, see the module docstring).
    client_lr_per: what a schedule counts: ``"step"`` (local steps, from 0 every round) or
      ``"round"`` (the 0-based round).
    momentum: client SGD momentum ``ρ ∈ [0, 1)``.
    mu: optional FedProx term ``μ ≥ 0`` (not together with momentum).
    server_optimizer: applied to ``−Δ`` (default SGD of step ``server_lr``, see :func:`fedavg`).
    **kwargs: the local schedule, as in :func:`fedavg` (``local_epochs``, ``batch_size``, ...).

  ``client_lr``, and ``momentum`` or ``mu`` when > 0, are data (:attr:`Algorithm.hparams`): a
  sweep can vary them (a swept value of 0 keeps the ``> 0`` program, whose limit it is).
  """
  client_lr = learning_rate("client_lr", client_lr)
  momentum = fraction("momentum", momentum, closed_top=False)
  mu = non_negative_float("mu", mu)
  if momentum > 0 and mu > 0:
    raise ValueError(f"fednova takes momentum or mu, not both (got momentum={momentum}, mu={mu})")
  if client_lr_per not in LR_UNITS:
    raise ValueError(f"client_lr_per must be one of {', '.join(LR_UNITS)}, got {client_lr_per!r}")
  per_round = callable(client_lr) and client_lr_per == "round"
  hparams = {}
  if per_round:  # plain steps scaled by the round's rate (update_scale)
    optimizer = optax.sgd(1.0, momentum=momentum or None)
  else:
    optimizer = sgd_optimizer("client_lr", client_lr, hparams, "momentum", momentum)
  base = fedavg(client_optimizer=optimizer, server_optimizer=server_optimizer, **kwargs)
  hooks = Hooks(update_scale=lambda r: client_lr(r - 1)) if per_round else Hooks()

  def derived(h):  # what aggregation_norm computes in Python, from the run's values
    if momentum > 0:
      return {"1-momentum": 1 - h.get("momentum", momentum)}
    if mu > 0 and not callable(client_lr):
      lr_mu = h.get("client_lr", client_lr) * h.get("mu", mu)
      return {"client_lr*mu": lr_mu, "1-client_lr*mu": 1.0 - lr_mu}
    return {}

  def client_result(out):
    hp = out.context.hparams
    tau = jnp.asarray(out.num_steps, jnp.float32)
    if callable(client_lr):  # a schedule: a_k in units of the rate (module docstring)
      lr = client_lr(out.context.round - 1) if per_round else client_lr
      a = aggregation_norm(out.num_steps, lr, momentum, mu)
    elif momentum > 0:  # constants unless swept (Algorithm.constant_hparams, derived)
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

  hooks = hooks._replace(client_result=client_result, server_update=server_update,
                         gradient=proximal_gradient if mu > 0 else None)
  if mu > 0:
    hparams["mu"] = mu
  return base._replace(name="fednova", hooks=hooks, hparams={**base.hparams, **hparams},
                       constant_hparams=base.constant_hparams | (set(hparams) - {"mu"}),
                       derived=derived)
