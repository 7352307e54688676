"""MOON (Li, He and Song 2021, "Model-Contrastive Federated Learning", arXiv:2103.16257).

Each client adds a model-contrastive term to its supervised loss: with ``z`` the representation of
a batch under the model being trained, ``z_glob`` under the global model of this round and
``z_prev`` under the client's own model from the last round it took part in,

``ℓ_con = −log( e^{sim(z, z_glob)/τ} / (e^{sim(z, z_glob)/τ} + e^{sim(z, z_prev)/τ}) )``,

``sim`` the cosine similarity, and the local objective is ``ℓ_sup + μ ℓ_con`` (mean over the
batch's real examples). The server averages as FedAvg does. Each client's previous local model is
per-client state kept on device for the whole population (``[num_clients, ...params]``), starting
at the initial global model. The representation is ``model.represent`` (the paper's projection
head; :func:`fedjax_sim.models.from_functions` takes one) or, without one, the model's outputs.
``μ = 0`` is FedAvg.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim._checks import non_negative_float, positive_float
from fedjax_sim.algorithms._base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg


def cosine(a, b, eps: float = 1e-8):
  """Row-wise cosine similarity of ``[batch, dim]`` arrays (0 where a vector is 0; the norm is
  clamped before its square root so the gradient stays finite there)."""
  norms_sq = jnp.sum(a * a, -1) * jnp.sum(b * b, -1)
  return jnp.sum(a * b, -1) / jnp.sqrt(jnp.maximum(norms_sq, eps * eps))


def contrastive_loss(z, z_glob, z_prev, temperature: float):
  """Per-example ``ℓ_con``: cross-entropy of the pair (sim to global, sim to previous) / τ with the
  global model as the positive."""
  logits = jnp.stack([cosine(z, z_glob), cosine(z, z_prev)], axis=-1) / temperature
  return -jax.nn.log_softmax(logits, axis=-1)[:, 0]


def moon(client_lr=0.1, mu: float = 1.0, temperature: float = 0.5, **kwargs) -> Algorithm:
  """MOON: FedAvg whose clients add ``μ ℓ_con`` to their loss.

  Args:
    client_lr: the client learning rate (or use ``client_optimizer=``).
    mu: ``μ ≥ 0``, the weight of the contrastive term (data: sweeps can vary it).
    temperature: ``τ > 0``.
    **kwargs: the local schedule and optimizers, as in :func:`fedavg`.
  """
  mu = non_negative_float("mu", mu)
  temperature = positive_float("temperature", temperature)
  base = fedavg(client_lr=client_lr, **kwargs)

  def local_loss(model, params, batch, context):
    x, y, mask = batch
    supervised = model.loss(params, x, y, mask)
    z = model.representation(params, x)
    z_glob = jax.lax.stop_gradient(model.representation(context.global_params, x))
    z_prev = jax.lax.stop_gradient(model.representation(context.extra, x))
    con = contrastive_loss(z, z_glob, z_prev, temperature)
    m = mask.astype(con.dtype)
    con = jnp.sum(con * m) / jnp.maximum(jnp.sum(m), 1.0)
    return supervised + context.hparams["mu"] * con

  hooks = base.hooks._replace(
      local_loss=local_loss,
      init_client_state=lambda params: params,  # the previous local model, at first the initial one
      client_extra=lambda server_extra, previous: previous,
      client_result=lambda out: (None, out.params))
  return base._replace(name="moon", hooks=hooks, hparams={**base.hparams, "mu": mu})
