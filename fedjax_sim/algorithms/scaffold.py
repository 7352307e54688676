"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", arXiv:1910.06378, Algorithm 1).

The server keeps a control variate ``c`` and every client ``i`` of the population its own ``c_i``
(all zero at the start; ``c_i`` persists across rounds on device, ``[num_clients, ...]``). A sampled
client starts from ``y = x`` and takes its ``K`` local steps with the corrected gradient
``y ← y − η_l (g_i(y) − c_i + c)``, then updates its control variate:

* option I:  ``c_i⁺ = ∇f_i(x)``, the full gradient of its loss at the server model;
* option II: ``c_i⁺ = c_i − c + (x − y) / (K η_l)``; with a learning-rate schedule ``η_t`` over
  the local steps, ``K η_l`` becomes ``Σ_{t<K} η_t`` (``K`` times the mean rate over the steps
  taken), so that ``c_i⁺`` is again ``c_i − c`` plus the mean corrected gradient along the path:
  ``x − y = Σ_t η_t (g_t − c_i + c)`` gives ``c_i⁺ = Σ_t η_t g_t / Σ_t η_t``, the rate-weighted
  mean of the client's gradients (the paper's rule when the rate is constant);

and sends ``(Δy, Δc) = (y − x, c_i⁺ − c_i)``. Over the ``|S|`` clients that returned, with
unweighted means, the server sets ``x ← x + η_g mean(Δy)`` and ``c ← c + (|S| / N) mean(Δc)``, so
``c = mean_i c_i`` over the whole population after every round. ``K`` is the number of steps the
client actually took (fewer for a partial straggler).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim.algorithms._base import Algorithm, learning_rate, step_lr_sum
from fedjax_sim.algorithms.fedavg import fedavg

OPTIONS = ("I", "II")


def scaffold(client_lr=0.1, server_lr=1.0, option: str = "II",
             local_epochs: int = 1, batch_size: int | None = 32, local_steps: int | None = None,
             shuffle: bool = True, client_lr_per: str = "step") -> Algorithm:
  """SCAFFOLD with client SGD of step ``η_l = client_lr`` and server step ``η_g = server_lr``.

  Args:
    client_lr: ``η_l``: a float (data, like ``server_lr``: a sweep can vary both), or an optax
      schedule (option II then divides by the sum of the rates of the steps taken, see the
      module docstring).
    server_lr: ``η_g`` (a float or a schedule of the round count).
    client_lr_per: what a client schedule counts, as in :func:`fedavg`: ``"step"`` or
      ``"round"``.
    option: ``"I"`` (control variate = full local gradient at ``x``, one extra pass over the
      client's data) or ``"II"`` (from the local progress, no extra pass).
    local_epochs, batch_size, local_steps, shuffle: the local schedule, as in :func:`fedavg`.
  """
  if option not in OPTIONS:
    raise ValueError(f"option must be 'I' or 'II', got {option!r}")
  client_lr = learning_rate("client_lr", client_lr)
  base = fedavg(client_lr=client_lr, local_epochs=local_epochs, batch_size=batch_size,
                local_steps=local_steps, shuffle=shuffle, weighting="uniform",
                server_lr=learning_rate("server_lr", server_lr), client_lr_per=client_lr_per)
  zeros = lambda params: jax.tree.map(jnp.zeros_like, params)

  def corrected(grads, params, context):  # g − c_i + c, with context.extra = c − c_i
    return jax.tree.map(lambda g, e: g + e.astype(g.dtype), grads, context.extra)

  def client_result(out):
    c_i = out.client_state
    if option == "I":
      new_c_i = out.full_gradient(out.context.global_params)
    elif not callable(client_lr):  # c_i − c + (x − y)/(K η_l), and c − c_i = context.extra
      lr = out.context.hparams.get("client_lr", client_lr)
      scale = 1.0 / (jnp.maximum(out.num_steps, 1).astype(jnp.float32) * lr)
    else:  # K η_l → Σ_{t<K} η_t
      rates = step_lr_sum(client_lr, out.num_steps, out.context.round, client_lr_per)
      scale = 1.0 / jnp.maximum(rates, 1e-30)
    if option == "II":
      new_c_i = jax.tree.map(lambda e, x, y: -e + (x - y) * scale, out.context.extra,
                             out.context.global_params, out.params)
    new_c_i = jax.tree.map(lambda n, o: n.astype(o.dtype), new_c_i, c_i)
    return jax.tree.map(jnp.subtract, new_c_i, c_i), new_c_i

  def server_update(summary, hparams, c):
    share = summary.participants / summary.num_clients
    new_c = jax.tree.map(lambda c, dc: c + (share * dc).astype(c.dtype), c, summary.mean_message)
    return summary.mean_delta, new_c

  hooks = base.hooks._replace(  # keeps fedavg's update_scale of a per-round schedule
      gradient=corrected, init_client_state=zeros, init_server_extra=zeros,
      client_extra=lambda c, c_i: jax.tree.map(jnp.subtract, c, c_i),
      client_result=client_result, server_update=server_update)
  return base._replace(name="scaffold", hooks=hooks)
