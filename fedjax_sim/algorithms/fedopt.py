"""The FedOpt family: server momentum and adaptive server optimizers.

FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", arXiv:1909.06335): ``v ← β v + Δ̄``, ``x ← x + η v`` with ``Δ̄`` the
weighted mean client delta; ``β = 0, η = 1`` is FedAvg.

FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization",
arXiv:2003.00295, Algorithm 2), on ``Δ = Δ̄``:

    m ← β1 m + (1 − β1) Δ
    Adagrad: v ← v + Δ²
    Yogi:    v ← v − (1 − β2) Δ² sign(v − Δ²)
    Adam:    v ← β2 v + (1 − β2) Δ²
    x ← x + η m / (√v + τ)

with no bias correction. Two conventions, chosen with ``convention=``:

* ``"paper"`` (default): exactly the rule above, starting from ``m = 0`` and ``v = τ²`` (the paper
  requires ``v_{-1} ≥ τ²``; ``initial_accumulator`` overrides it — the authors' code used 0).
* ``"optax"``: optax's own optimizers on the pseudo-gradient ``−Δ``: ``optax.adam`` and
  ``optax.yogi`` (bias-corrected moments; yogi starts ``v`` at 1e-6) with ``eps = τ``, and
  ``optax.adagrad`` (no first moment, ``v`` starts at 0.1) with ``eps = τ``. Their first steps
  differ from the paper's: e.g. the first Adam step is ``η Δ / (|Δ| + τ)`` there but
  ``η (1 − β1) Δ / (√((1 − β2) Δ²) + τ)`` here.

Every factory also takes any ``server_optimizer=`` (an optax transformation of ``−Δ``) through
:func:`fedavg`'s keywords, and ``client_optimizer=`` for client momentum or Adam.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim._checks import fraction, non_negative_float, positive_float
from fedjax_sim.algorithms._base import Algorithm, hparam_optimizer, learning_rate
from fedjax_sim.algorithms.fedavg import fedavg, sgd_optimizer

RULES = ("adagrad", "adam", "yogi")
CONVENTIONS = ("paper", "optax")


class AdaptiveState(NamedTuple):
  count: jax.Array
  m: Any
  v: Any


def reddi_adaptive(rule: str, learning_rate, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3,
                   initial_accumulator: float | None = None) -> optax.GradientTransformation:
  """Reddi et al.'s server update as an optax transformation of the pseudo-gradient ``g = −Δ``.

  Returns updates ``−η m / (√v + τ)`` with ``m``, ``v`` as in the module docstring (``g² = Δ²``,
  and ``m`` of ``g`` is ``−m`` of ``Δ``); ``learning_rate`` may be a schedule of the round count.
  """
  if rule not in RULES:
    raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
  v0 = tau ** 2 if initial_accumulator is None else initial_accumulator
  return _reddi(rule, learning_rate, b1, b2, tau, v0, 1 - b1, 1 - b2)


def _reddi(rule, learning_rate, b1, b2, tau, v0, one_minus_b1, one_minus_b2):
  """:func:`reddi_adaptive` with ``v0``, ``1 − β1`` and ``1 − β2`` given, so that each can be a
  float32 scalar rounded from its double-precision value (see :attr:`Algorithm.derived`).
  When ``v0`` is data (swept), ``v`` is set to it in the first update (``count = 0``), so each
  run's ``v0`` applies though the state was initialized with the factory's."""

  def init(params):
    return AdaptiveState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                         jax.tree.map(lambda p: jnp.full_like(p, v0), params))

  def update(grads, state, params=None):
    del params
    v = state.v
    if not isinstance(v0, (int, float)):  # a swept v0 (data) replaces init's
      v = jax.tree.map(lambda v: jnp.where(state.count == 0, jnp.asarray(v0, v.dtype), v), v)
    m = jax.tree.map(lambda m, g: b1 * m + one_minus_b1 * g, state.m, grads)
    if rule == "adagrad":
      v = jax.tree.map(lambda v, g: v + g * g, v, grads)
    elif rule == "adam":
      v = jax.tree.map(lambda v, g: b2 * v + one_minus_b2 * g * g, v, grads)
    else:
      v = jax.tree.map(lambda v, g: v - one_minus_b2 * g * g * jnp.sign(v - g * g), v, grads)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    updates = jax.tree.map(lambda m, v: -lr * m / (jnp.sqrt(v) + tau), m, v)
    return updates, AdaptiveState(state.count + 1, m, v)

  return optax.GradientTransformation(init, update)


def _server_optimizer(rule, server_lr, b1, b2, tau, convention, initial_accumulator):
  """``(optimizer, hparams, derived)``: the server optimizer with its float hyperparameters as
  data named ``server_lr``, ``beta1``, ``beta2``, ``tau`` (and ``initial_accumulator`` when given),
  and the host-side function of the quantities the paper rule needs rounded from double."""
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be 'paper' or 'optax', got {convention!r}")
  server_lr = learning_rate("server_lr", server_lr)
  b1 = fraction("beta1", b1, closed_top=False)
  b2 = fraction("beta2", b2, closed_top=False)
  tau = positive_float("tau", tau)
  hparams = {} if callable(server_lr) else {"server_lr": server_lr}
  if convention == "paper":
    if initial_accumulator is not None:
      initial_accumulator = non_negative_float("initial_accumulator", initial_accumulator)
      hparams["initial_accumulator"] = initial_accumulator
    hparams.update({"beta1": b1, **({"beta2": b2} if rule != "adagrad" else {}), "tau": tau})

    def derived(h):
      beta1, beta2, t = h.get("beta1", b1), h.get("beta2", b2), h.get("tau", tau)
      v0 = t ** 2 if initial_accumulator is None else h.get("initial_accumulator",
                                                            initial_accumulator)
      return {"1-beta1": 1 - beta1, "1-beta2": 1 - beta2, "v0": v0}

    keys = {"learning_rate": "server_lr", "b1": "beta1", "b2": "beta2", "tau": "tau", "v0": "v0",
            "one_minus_b1": "1-beta1", "one_minus_b2": "1-beta2"}
    d = derived({})
    optimizer = hparam_optimizer(functools.partial(_reddi, rule), keys, learning_rate=server_lr,
                                 b1=b1, b2=b2, tau=tau, v0=d["v0"], one_minus_b1=d["1-beta1"],
                                 one_minus_b2=d["1-beta2"])
    return optimizer, hparams, derived
  # optax computes 1 − β1 and 1 − β2 itself, in float32 when they are data: β1, β2 stay constants
  # (bit-identical to optax.adam(…) with Python floats) and only η and τ are data.
  hparams["tau"] = tau
  keys = {"learning_rate": "server_lr", "eps": "tau"}
  if rule == "adam":
    optimizer = hparam_optimizer(optax.adam, keys, learning_rate=server_lr, b1=b1, b2=b2, eps=tau)
  elif rule == "yogi":
    optimizer = hparam_optimizer(optax.yogi, keys, learning_rate=server_lr, b1=b1, b2=b2, eps=tau)
  else:
    optimizer = hparam_optimizer(optax.adagrad, keys, learning_rate=server_lr, eps=tau)
  return optimizer, hparams, None


def _adaptive(rule: str, doc_name: str):
  def factory(server_lr=0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
              convention: str = "paper", initial_accumulator: float | None = None,
              **kwargs) -> Algorithm:
    optimizer, hparams, derived = _server_optimizer(rule, server_lr, beta1, beta2, tau,
                                                    convention, initial_accumulator)
    algo = fedavg(server_optimizer=optimizer, **kwargs)
    return algo._replace(name=doc_name.lower(), hparams={**algo.hparams, **hparams},
                         constant_hparams=algo.constant_hparams | set(hparams), derived=derived)
  factory.__name__ = doc_name.lower()
  factory.__doc__ = f"""{doc_name} (Reddi et al. 2021, arXiv:2003.00295): FedAvg clients, {rule} server.

  Args:
    server_lr: ``η`` (a float or a schedule of the round count).
    beta1, beta2: ``β1``, ``β2``{' (β2 unused by adagrad)' if rule == 'adagrad' else ''}.
    tau: ``τ``, the adaptivity floor.
    convention: ``"paper"`` (Reddi et al.'s exact rule) or ``"optax"`` (optax.{rule}); see the
      module docstring for how their first steps differ.
    initial_accumulator: starting ``v`` for the paper convention (default ``τ²``).
    **kwargs: the clients' side, as in :func:`fedavg` (``client_lr``, ``local_epochs``, ...).

  Data (:attr:`Algorithm.hparams`, sweepable): a float ``server_lr``, ``tau``, and with the paper
  convention ``beta1``{', ``beta2``' if rule != 'adagrad' else ''} and a given
  ``initial_accumulator``; with the optax convention the betas are constants of the program.
  """
  return factory


fedadagrad = _adaptive("adagrad", "FedAdagrad")
fedadam = _adaptive("adam", "FedAdam")
fedyogi = _adaptive("yogi", "FedYogi")


def fedavgm(server_lr=1.0, momentum: float = 0.9, **kwargs) -> Algorithm:
  """FedAvgM (Hsu et al. 2019, arXiv:1909.06335): server SGD with heavy-ball momentum,
  ``v ← β v + Δ̄``, ``x ← x + η v``. ``momentum=0, server_lr=1`` is FedAvg.

  Args:
    server_lr: ``η`` (a float or a schedule of the round count).
    momentum: ``β ∈ [0, 1)``.
    **kwargs: the clients' side, as in :func:`fedavg`.

  A float ``server_lr`` and a ``momentum > 0`` are data (sweepable); ``momentum = 0`` builds no
  momentum buffer.
  """
  momentum = fraction("momentum", momentum, closed_top=False)
  hparams = {}
  optimizer = sgd_optimizer("server_lr", learning_rate("server_lr", server_lr), hparams,
                            "momentum", momentum)
  algo = fedavg(server_optimizer=optimizer, **kwargs)
  return algo._replace(name="fedavgm", hparams={**algo.hparams, **hparams},
                       constant_hparams=algo.constant_hparams | set(hparams))
