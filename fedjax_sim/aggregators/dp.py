"""``dp_mean``: DP-FedAvg's aggregation (McMahan et al. 2018, arXiv:1710.06963), with optional
adaptive clipping (Andrew et al. 2021, arXiv:1905.03871).

Each round:

1. every client's update ``u_k`` (delta and algorithm message as one flat vector) is clipped to
   norm ``C``: ``u_k · min(1, C / ‖u_k‖)`` (``per_layer``: each leaf to ``C / √L``, which bounds
   the whole update by ``C`` as well);
2. the clipped updates are summed with **uniform weights** and divided by the **fixed
   denominator** ``E``, the expected cohort size (``m`` for fixed-size cohorts, ``q·N`` under
   Poisson sampling), not by the number that returned: this is McMahan et al.'s fixed-denominator
   estimator ``f̃_f``, unbiased for the uniform mean under Poisson sampling, and its sensitivity
   is ``C / E`` whatever the cohort drawn. (Their bounded-weight estimator, which keeps ``n_k``
   weighting, is not offered.)
3. Gaussian noise of std ``z_Δ · C`` is added to the sum, i.e. ``z_Δ · C / E`` per coordinate of
   the mean, drawn from the aggregator's server key.

Adaptive clipping (``target_quantile=γ``): each client also reports ``b_k = 1[‖u_k‖ ≤ C]``; the
server releases the noised fraction ``b̄ = (Σ_k (b_k − ½) + N(0, σ_b²)) / E + ½`` of *unclipped*
updates and moves the clip norm geometrically, ``C ← C · exp(−η_C (b̄ − γ))``: when fewer than
``γ`` of the updates fit (most are clipped) ``b̄ < γ`` and ``C`` grows. Releasing ``b̄`` costs
privacy; as in Andrew et al., the update noise is raised to ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−½)`` so
that the round as a whole is a Gaussian mechanism with multiplier ``z`` (the one accounted;
``σ_b`` defaults to ``E / 20``). Without adaptive clipping ``z_Δ = z``.

The DP guarantee covers everything a client sends (the whole update is clipped and noised). Its
accounting is in :mod:`fedjax_sim.privacy`; a simulation records ``epsilon`` at each evaluated
round.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_sim._checks import fraction, non_negative_float, positive_float
from fedjax_sim.aggregators._base import Aggregator, CohortInfo, StreamSums, tree_norm
from fedjax_sim.privacy import ACCOUNTANTS, Accounting

UNCLIPPED = "dp_unclipped"  # the extra leaf each client sends with adaptive clipping


def _options(hparams: dict, adaptive: bool, expected: float | None) -> dict:
  """Checks the numeric options (naming bad values); fills σ_b's default ``E / 20`` (unchecked
  while the expected cohort size ``expected`` is not known)."""
  out = {"clip_norm": positive_float("clip_norm", hparams["clip_norm"]),
         "noise_multiplier": non_negative_float("noise_multiplier", hparams["noise_multiplier"])}
  if not adaptive:
    return out
  out["target_quantile"] = fraction("target_quantile", hparams["target_quantile"])
  out["clip_learning_rate"] = positive_float("clip_learning_rate", hparams["clip_learning_rate"])
  sigma_b = hparams.get("clipped_count_stddev")
  if sigma_b is None and expected is None:
    return out
  sigma_b = expected / 20 if sigma_b is None else sigma_b
  out["clipped_count_stddev"] = positive_float("clipped_count_stddev", sigma_b)
  z = out["noise_multiplier"]
  if z > 0 and not z < 2 * sigma_b:
    raise ValueError(f"noise_multiplier={z!r} must be below 2 * clipped_count_stddev = "
                     f"{2 * sigma_b:g}: adaptive clipping spends part of the budget on the "
                     f"noised count (Andrew et al. 2021); raise clipped_count_stddev")
  return out


def update_noise_multiplier(z, sigma_b):
  """``z_Δ = (z⁻² − (2σ_b)⁻²)^(−½)``, the update noise that leaves a total multiplier ``z``."""
  safe = jnp.maximum(z, 1e-30)
  return jnp.where(z > 0, (safe ** -2 - (2.0 * sigma_b) ** -2) ** -0.5, 0.0)


def clip_update(update, clip_norm, per_layer: bool):
  """``update`` clipped to norm ``clip_norm`` (flat, or each leaf to ``clip_norm / √L``)."""
  leaves = jax.tree.leaves(update)
  if per_layer:
    bound = clip_norm / math.sqrt(len(leaves))
    return jax.tree.map(lambda a: a * jnp.minimum(1.0, bound / jnp.maximum(
        jnp.sqrt(jnp.sum(jnp.square(a))), 1e-30)), update)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(tree_norm(update), 1e-30))
  return jax.tree.map(lambda a: a * scale, update)


def _gaussian_like(key, tree, std):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [a + std * jax.random.normal(k, a.shape, a.dtype)
                                      for a, k in zip(leaves, keys)])


def dp_mean(clip_norm: float, noise_multiplier: float, *, target_quantile: float | None = None,
            clip_learning_rate: float = 0.2, clipped_count_stddev: float | None = None,
            per_layer: bool = False, delta: float | None = None,
            accountant: str = "rdp") -> Aggregator:
  """The DP-FedAvg aggregate: clip, uniform sum over the expected cohort size, Gaussian noise.

  Args:
    clip_norm: ``C > 0``, each client's update norm bound (the initial one when adaptive).
    noise_multiplier: ``z ≥ 0``, the round's noise std over ``C`` (the accounted multiplier).
    target_quantile: ``γ ∈ [0, 1]``: adapt ``C`` toward this quantile of the update norms
      (``None``: a fixed clip norm).
    clip_learning_rate: ``η_C`` of the geometric clip-norm update.
    clipped_count_stddev: ``σ_b``, the noise std on the count of unclipped updates (default
      ``E / 20``).
    per_layer: clip each leaf to ``C / √L`` instead of the flat update to ``C``.
    delta: the δ of the ε the simulation records (default ``1 / N^1.1``).
    accountant: ``"rdp"`` or ``"pld"`` for the recorded ε.

  ``clip_norm``, ``noise_multiplier``, ``target_quantile``, ``clip_learning_rate`` and
  ``clipped_count_stddev`` are hparams: a sweep may vary them per run.
  """
  adaptive = target_quantile is not None
  hparams = {"clip_norm": clip_norm, "noise_multiplier": noise_multiplier}
  if adaptive:
    hparams.update(target_quantile=target_quantile, clip_learning_rate=clip_learning_rate,
                   clipped_count_stddev=clipped_count_stddev)
  if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float))
                            or not 0 < delta < 1):
    raise ValueError(f"delta must be in (0, 1), got {delta!r}")
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
  _options(hparams, adaptive, None)  # bad values fail here, before any engine is built
  name = "dp_mean" + ("(adaptive)" if adaptive else "")
  privacy = Accounting(delta, accountant)

  def setup(info: CohortInfo, hp: dict) -> Aggregator:
    options = _options(hp, adaptive, float(info.expected_clients))
    expected = float(info.expected_clients)

    def init(update):
      del update
      return {k: jnp.float32(v) for k, v in options.items()}

    def client(update, client_state, state, *, key):
      del key
      out = dict(clip_update(update, state["clip_norm"], per_layer))
      if adaptive:
        out[UNCLIPPED] = (tree_norm(update) <= state["clip_norm"]).astype(jnp.float32) - 0.5
      return out, client_state

    def finalize(sums: StreamSums, state):
      del state
      return jax.tree.map(lambda a: a / expected, sums.weighted_sum)

    def server(aggregate, state, *, key):
      noise_key, count_key = jax.random.split(key)
      z, c = state["noise_multiplier"], state["clip_norm"]
      if adaptive:
        sigma_b = state["clipped_count_stddev"]
        z = update_noise_multiplier(z, sigma_b)
        aggregate = dict(aggregate)
        unclipped = aggregate.pop(UNCLIPPED) * expected  # Σ (b_k − ½)
        noised = unclipped + sigma_b * jax.random.normal(count_key, ())
        fraction_unclipped = noised / expected + 0.5
        state = dict(state, clip_norm=c * jnp.exp(
            -state["clip_learning_rate"] * (fraction_unclipped - state["target_quantile"])))
      aggregate = _gaussian_like(noise_key, aggregate, z * c / expected)
      return aggregate, state

    return Aggregator(name=name, reduction="stream", init=init, client=client,
                      finalize=finalize, server=server, weighting="uniform", hparams=hp,
                      privacy=privacy, report=("clip_norm",))

  # Its functions exist once setup knows the expected cohort size (engine, aggregate()).
  return Aggregator(name=name, reduction="stream", weighting="uniform", hparams=hparams,
                    setup=setup, privacy=privacy)
