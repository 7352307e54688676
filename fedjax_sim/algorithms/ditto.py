"""Ditto (Li, Hu, Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, arXiv:2012.04938, Algorithm 1).

Ditto solves, for every client ``k``, ``min_v F_k(v) + (λ/2) ‖v − w*‖²`` where ``w*`` is the
global model that FedAvg trains. Each round, every sampled client

* trains the global model exactly as FedAvg does (local SGD from ``w^t``; the server averages the
  deltas, weights ``n_k``), and
* updates its own personal model ``v_k``, kept on the device for the whole population
  (``[num_clients, ...]``, initialized to the initial global model ``w^0``), with ``s`` steps of

  ``v_k ← v_k − η_p (∇F_k(v_k) + λ (v_k − w^t))``

  where ``w^t`` is the global model the client received this round.

Here ``∇F_k`` is the gradient of the client's mean loss over *all* its examples (a full-batch
solver: the engine's per-client hook sees the client's full gradient, not its mini-batches; the
paper's Algorithm 1 takes stochastic steps). ``s`` defaults to ``τ_k``, the number of local steps
the client took on the global model this round (fewer for a partial straggler; a client that
drops out keeps its ``v_k``). ``λ = 0`` trains each personal model alone from ``w^0``; ``λ → ∞``
pins it to the global model. Clients never sampled keep ``v_k = w^0``.

Batch normalization: statistics are not trained by gradients, so the solver steps only the trained
parameters (``∇F_k`` is zero on the model's state collections), under the statistics that the
client's own data produced in this round's local training (``y_k``'s), which the personal model
keeps (as FedBN keeps statistics local).

Evaluation: besides the global model's metrics, evaluated rounds score every example of an
evaluation set made of the training clients with its own client's ``v_k``
(``{train,test}_personal_*``; :attr:`Hooks.personal_params`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim._checks import non_negative_float, positive_float, positive_int
from fedjax_sim.algorithms._base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg


def personal_step(v, w_global, grad_fn, lam, lr):
  """One Ditto personal step ``v − η (∇F_k(v) + λ (v − w^t))``."""
  grads = grad_fn(v)
  return jax.tree.map(lambda a, g, w: (a - lr * (g + lam * (a - w))).astype(a.dtype), v, grads,
                      w_global)


def ditto(lam: float = 0.1, personal_lr: float | None = None, personal_steps: int | None = None,
          client_lr=0.1, **kwargs) -> Algorithm:
  """Ditto: FedAvg for the global model plus a personal model ``v_k`` per client.

  Args:
    lam: ``λ ≥ 0``, the pull of each personal model towards the global one (data: sweeps can vary
      it without recompiling).
    personal_lr: ``η_p``, the personal solver's step (default ``client_lr``, which must then be a
      float).
    personal_steps: ``s``, full-batch personal steps per round; ``None``: ``τ_k``, as many as the
      client's local steps on the global model.
    client_lr: the global model's local SGD step, as in :func:`fedavg`.
    **kwargs: the local schedule and optimizers, as in :func:`fedavg` (``local_epochs``,
      ``batch_size``, ``client_optimizer``, ...).
  """
  lam = non_negative_float("lam", lam)
  if personal_lr is None:
    if callable(client_lr) or not isinstance(client_lr, (int, float)):
      raise ValueError(f"ditto needs a float personal_lr when client_lr is not a number "
                       f"(got client_lr={client_lr!r})")
    personal_lr = client_lr
  personal_lr = positive_float("personal_lr", personal_lr)
  steps = positive_int("personal_steps", personal_steps, allow_none=True)
  base = fedavg(client_lr=client_lr, **kwargs)

  def client_result(out):
    hp, w_global = out.context.hparams, out.context.global_params
    count = out.num_steps if steps is None else steps
    # batch statistics: the client's own (y_k's), never stepped by the solver
    stats = {c: out.params[c] for c in out.state_collections}
    with_stats = (lambda v: {**v, **stats}) if stats else (lambda v: v)
    step = lambda _, v: with_stats(personal_step(v, w_global, out.full_gradient, hp["lam"],
                                                 hp["personal_lr"]))
    return None, lax.fori_loop(0, count, step, with_stats(out.client_state))

  hooks = base.hooks._replace(
      init_client_state=lambda params: jax.tree.map(jnp.array, params),  # v_k = w^0
      client_result=client_result,
      personal_params=lambda v: v)
  return base._replace(name="ditto", hooks=hooks,
                       hparams={**base.hparams, "lam": lam, "personal_lr": personal_lr})
