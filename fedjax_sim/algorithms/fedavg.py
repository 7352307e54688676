"""FedAvg and FedSGD.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data", arXiv:1602.05629). Each sampled client ``k`` starts from the global weights ``w`` and runs
``E`` epochs of mini-batch SGD on its ``n_k`` examples (reshuffled every epoch, batches of ``B``, the
last one smaller), ``w_k ← w_k − η ∇ℓ(w_k; batch)``; the server sets
``w ← Σ_{k∈S} n_k w_k / Σ_{k∈S} n_k`` over the sampled cohort ``S``.

Datacenter Local SGD and its schedules live in :mod:`fedjax_sim.algorithms.local_sgd`.
"""

from __future__ import annotations

import optax

from fedjax_sim._checks import positive_int
from fedjax_sim.algorithms._base import (Algorithm, Hooks, check_optimizer, check_weighting,
                                         hparam_optimizer, learning_rate)

LR_UNITS = ("step", "round")


def fedavg(client_lr=0.1, local_epochs: int = 1, batch_size: int | None = 32,
           local_steps: int | None = None, shuffle: bool = True, weighting: str = "num_examples",
           client_optimizer: optax.GradientTransformation | None = None,
           server_optimizer: optax.GradientTransformation | None = None,
           client_lr_per: str = "step", server_lr=1.0) -> Algorithm:
  """Federated Averaging.

  Args:
    client_lr: ``η``, the client SGD learning rate (ignored when ``client_optimizer`` is given):
      a float, or a schedule (any optax schedule / callable of an integer count).
    client_lr_per: what a schedule's count counts: ``"step"`` (local steps within each round,
      restarting every round, as optax counts updates of a fresh client optimizer) or ``"round"``
      (the 0-based round number; warm-up and decay across rounds).
    local_epochs: ``E``.
    batch_size: ``B``; ``None`` is full-batch (one step per epoch).
    local_steps: ``H`` fixed steps per round instead of ``E`` epochs.
    shuffle: reshuffle every epoch (``False``: examples in their given order).
    weighting: ``"num_examples"`` (FedAvg) or ``"uniform"``.
    client_optimizer: any optax transformation; default ``optax.sgd(client_lr)``.
    server_optimizer: any optax transformation of the pseudo-gradient; default
      ``optax.sgd(server_lr)``.
    server_lr: the server's SGD step on the pseudo-gradient (ignored when ``server_optimizer`` is
      given); ``1.0`` makes the new global model the weighted mean of the client models.

  A float ``client_lr`` and ``server_lr`` are data (:attr:`Algorithm.hparams`), so a sweep can
  vary them without recompiling; a schedule or a given optimizer is part of the program.

  Returns:
    The :class:`Algorithm` to pass to :func:`fedjax_sim.simulate`.
  """
  check_optimizer("client_optimizer", client_optimizer)
  check_optimizer("server_optimizer", server_optimizer)
  if client_lr_per not in LR_UNITS:
    raise ValueError(f"client_lr_per must be one of {', '.join(LR_UNITS)}, got {client_lr_per!r}")
  hooks, hparams = Hooks(), {}
  if client_optimizer is None:
    client_lr = learning_rate("client_lr", client_lr)
    if callable(client_lr) and client_lr_per == "round":
      client_optimizer = optax.sgd(1.0)
      hooks = Hooks(update_scale=lambda r: client_lr(r - 1))
    else:
      client_optimizer = sgd_optimizer("client_lr", client_lr, hparams)
  if server_optimizer is None:
    server_optimizer = sgd_optimizer("server_lr", learning_rate("server_lr", server_lr), hparams)
  return Algorithm(
      name="fedavg",
      client_optimizer=client_optimizer,
      server_optimizer=server_optimizer,
      local_epochs=positive_int("local_epochs", local_epochs),
      batch_size=positive_int("batch_size", batch_size, allow_none=True),
      local_steps=positive_int("local_steps", local_steps, allow_none=True),
      shuffle=bool(shuffle),
      weighting=check_weighting(weighting),
      hooks=hooks,
      hparams=hparams,
      constant_hparams=frozenset(hparams))


def sgd_optimizer(lr_key: str, lr, hparams: dict, momentum_key: str | None = None,
                  momentum: float = 0.0):
  """``optax.sgd(lr, momentum)`` whose float ``lr`` (and ``momentum`` when it is > 0) are
  sweepable hyperparameters named ``lr_key`` (``momentum_key``), recorded in ``hparams`` (the
  caller adds them to :attr:`Algorithm.constant_hparams`). ``momentum = 0`` builds no momentum
  buffer, so it is not sweepable there."""
  keys = {"learning_rate": lr_key, "momentum": momentum_key}
  if not callable(lr):
    hparams[lr_key] = lr
  if momentum > 0:
    hparams[momentum_key] = momentum
  return hparam_optimizer(optax.sgd, keys, learning_rate=lr, momentum=momentum or None)


def fedsgd(server_lr: float = 0.1, **kwargs) -> Algorithm:
  """FedSGD: each client computes one full-batch gradient ``g_k``; the server steps
  ``w ← w − η Σ n_k g_k / Σ n_k`` (``η`` a float or a schedule of the round count). Implemented as
  a client taking one full-batch step of size 1 and a server SGD of size ``η`` on the pseudo-gradient, which is exactly the mean gradient."""
  algo = fedavg(client_lr=1.0, local_epochs=1, batch_size=None,
                server_lr=learning_rate("server_lr", server_lr), **kwargs)
  # the client's step of 1 is what makes this FedSGD: a constant, not a hyperparameter
  return algo._replace(name="fedsgd",
                       hparams={k: v for k, v in algo.hparams.items() if k != "client_lr"},
                       constant_hparams=algo.constant_hparams - {"client_lr"})
