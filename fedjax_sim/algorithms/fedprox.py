"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", arXiv:1812.06127).

Client ``k`` approximately minimizes ``F_k(w) + (μ/2) ‖w − w^t‖²`` from the global model ``w^t``:
every local step adds the proximal gradient ``μ (w − w^t)`` to the mini-batch gradient,
``w ← w − η (∇ℓ(w; batch) + μ (w − w^t))``. The server averages like FedAvg (weights ``n_k``).
``μ = 0`` is FedAvg bit for bit. The paper lets stragglers send partial work; pass
``system=fedjax_sim.Heterogeneity(fraction, "partial")`` to :func:`fedjax_sim.simulate` for that.
"""

from __future__ import annotations

import jax

from fedjax_sim._checks import non_negative_float
from fedjax_sim.algorithms._base import Hooks
from fedjax_sim.algorithms.fedavg import fedavg


def proximal_gradient(grads, params, context):
  """``∇ + μ (w − w^t)`` with ``μ = context.hparams["mu"]``."""
  mu = context.hparams["mu"]
  return jax.tree.map(lambda g, w, w0: g + (mu * (w - w0)).astype(g.dtype), grads, params,
                      context.global_params)


def fedprox(mu: float = 0.01, **kwargs):
  """FedProx: FedAvg whose clients add the proximal term ``(μ/2)‖w − w^t‖²`` to their loss.

  Args:
    mu: ``μ ≥ 0``, the proximal coefficient (a hyperparameter passed to the compiled round as
      data: changing it does not recompile).
    **kwargs: everything :func:`fedavg` takes (``client_lr``, ``local_epochs``, ``batch_size``, ...).
  """
  algo = fedavg(**kwargs)
  return algo._replace(name="fedprox", hooks=Hooks(gradient=proximal_gradient),
                       hparams={**algo.hparams, "mu": non_negative_float("mu", mu)})
