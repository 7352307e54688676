"""Mutation check: does the test suite catch plausible bugs?

Each mutation below is a small, plausible bug (a sign, an index, a weight, a reused key, a step
count off by one). For each one this script copies the package and the tests to a temporary
directory, applies the bug there (never to the working tree), and runs the tests that should catch
it. A mutation is *caught* when those tests fail (pytest exit code 1); a mutant that cannot even be
imported or collected (exit code 2+) is reported as broken, not as caught.

Usage:
  python tools/mutation_check.py                  # every mutation, table on stdout
  python tools/mutation_check.py --only sattolo   # some of them (comma list)
  python tools/mutation_check.py --list           # names, files, tests
  python tools/mutation_check.py --out docs/mutation_check.md

Run it before closing an issue that adds an algorithm or aggregator, and add that rule's
mutations here. Every mutation must be caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutation(NamedTuple):
  name: str
  area: str
  file: str  # relative to the repository root
  old: str  # must occur exactly once in the file
  new: str
  tests: tuple  # pytest node ids or files that should fail
  why: str


M = Mutation
C, S = "fedjax_sim/client.py", "fedjax_sim/systems.py"
E = "fedjax_sim/engine/"
COHORT, JOBS, STEP = E + "cohort.py", E + "jobs.py", E + "round_step.py"
HOST, COMPILED = E + "executors/host_loop.py", E + "executors/compiled.py"
AGG = "fedjax_sim/aggregators/"
A = "fedjax_sim/algorithms/"
T_ENGINE, T_CLIENT, T_ALG = "tests/test_engine.py", "tests/test_client.py", "tests/test_algorithms.py"
T_PLANS, T_GOLD = "tests/test_plans.py", "tests/test_goldens.py"
T_DP, T_ROBUST = "tests/test_privacy.py", "tests/test_robust.py"
T_ATTACK, T_COMPRESS = "tests/test_attacks.py", "tests/test_compress.py"
T_SECURE = "tests/test_secure.py"

MUTATIONS = [
    # --- cohort sampling and round keys
    M("cohort_first_m", "sampling", COHORT,
      "_, ids = lax.top_k(jax.random.bits(key, (num_clients,)), cohort_size)",
      "ids = jnp.arange(cohort_size)",
      (f"{T_ENGINE}::test_cohort_sampling_is_uniform_without_replacement",),
      "the same first m clients every round"),
    M("cohort_with_replacement", "sampling", COHORT,
      "_, ids = lax.top_k(jax.random.bits(key, (num_clients,)), cohort_size)",
      "ids = jax.random.randint(key, (cohort_size,), 0, num_clients)",
      (f"{T_ENGINE}::test_cohort_sampling_is_uniform_without_replacement",),
      "sampling with replacement"),
    M("round_key_not_folded", "sampling", COHORT,
      "key = jax.random.fold_in(train_key, round_num)", "key = train_key",
      (T_CLIENT, T_GOLD), "every round draws the same cohort and shuffles"),
    M("client_key_is_sample_key", "sampling", COHORT,
      "sample, clients, system = jax.random.split(key, 3)",
      "sample, clients, system = jax.random.split(key, 3); clients = sample",
      (T_CLIENT, T_GOLD), "a key reused for two purposes"),
    M("client_key_by_position", "sampling", JOBS,
      "keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(d.global_id(ids_f))",
      "keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(jnp.arange(ids_f.shape[0]))",
      (f"{T_CLIENT}::test_shuffled_fedavg_matches_numpy_replaying_the_engines_orders",),
      "client keys from the slot position instead of the global id"),
    # --- weighting and the reduction
    M("weights_all_one", "weighting", STEP,
      'return jnp.where(returns, 1.0 if uniform else n.astype(jnp.float32), 0.0)',
      "return jnp.where(returns, 1.0, 0.0)",
      (f"{T_ENGINE}::test_matches_numpy_fedavg",), "FedAvg averages uniformly"),
    M("uniform_uses_counts", "weighting", STEP,
      'return jnp.where(returns, 1.0 if uniform else n.astype(jnp.float32), 0.0)',
      "return jnp.where(returns, n.astype(jnp.float32), 0.0)",
      (f"{T_ENGINE}::test_linear_regression_matches_numpy_uniform_weighting",),
      "uniform weighting ignored"),
    M("dropped_keep_weight", "weighting", STEP,
      'return jnp.where(returns, 1.0 if uniform else n.astype(jnp.float32), 0.0)',
      'return jnp.where(True, 1.0 if uniform else n.astype(jnp.float32), 0.0)',
      (f"{T_ALG}::test_drop_policy_removes_exactly_the_stragglers_weight",),
      "clients that did not return still count in the denominator"),
    M("pseudo_gradient_sign", "server", STEP,
      "pseudo_grad = jax.tree.map(lambda g, p: (-g).astype(p.dtype), delta, state.params)",
      "pseudo_grad = jax.tree.map(lambda g, p: g.astype(p.dtype), delta, state.params)",
      (f"{T_ENGINE}::test_matches_numpy_fedavg",), "the server steps away from the clients"),
    M("empty_round_moves_server", "server", STEP,
      "jnp.where(sums.count > 0, a, b)", "jnp.where(True, a, b)",
      (f"{T_ALG}::test_a_round_nobody_returns_from_keeps_the_moving_server_still",),
      "a round with no returning client still applies the optimizer"),
    M("drift_without_mean_term", "metrics", STEP,
      "sums.sq_norm / total - sum(jnp.sum(a * a) for a in jax.tree.leaves(mean_delta))",
      "sums.sq_norm / total",
      (f"{T_ALG}::test_drift_and_update_norms_match_their_formulas",),
      "drift reported as Σp‖Δ‖² instead of the spread around the mean"),
    M("update_norm_mean_by_weight", "metrics", STEP,
      "sums.norm_sum / jnp.maximum(sums.count, 1.0)",
      "sums.norm_sum / jnp.maximum(sums.weight, 1.0)",
      (f"{T_ALG}::test_drift_and_update_norms_match_their_formulas",),
      "mean update norm divided by the example count"),
    M("host_loop_drops_state_writes", "plans", HOST,
      "rs.scatter_states(spec, states, ids, returns, result.new_states), collected)",
      "states, collected)",
      (f"{T_PLANS}::test_host_loop_and_compiled_plans_agree",),
      "host_loop never writes SCAFFOLD's c_i back"),
    M("scatter_ignores_returns", "plans", STEP,
      "idx = jnp.where(returns, ids, spec.num_clients)", "idx = ids",
      (f"{T_ALG}::test_scaffold_server_control_is_mean_of_client_controls", T_GOLD),
      "empty slots (id 0) overwrite client 0's state"),
    # --- the local schedule
    M("floor_steps_per_epoch", "steps", C,
      "return (num_examples + batch_size - 1) // batch_size",
      "return num_examples // batch_size",
      (f"{T_CLIENT}::test_local_steps_per_client", f"{T_ENGINE}::test_matches_numpy_fedavg"),
      "⌈n/B⌉ replaced by ⌊n/B⌋ (the short last batch is skipped)"),
    M("extra_empty_step", "steps", C,
      "return (num_examples + batch_size - 1) // batch_size",
      "return num_examples // batch_size + 1",
      (f"{T_CLIENT}::test_local_steps_per_client",),
      "an extra empty step when B divides n (τ_k off by one)"),
    M("epochs_ignored", "steps", C,
      "return algo.local_epochs * steps_per_epoch(num_examples, algo.batch_size)",
      "return steps_per_epoch(num_examples, algo.batch_size)",
      (f"{T_CLIENT}::test_local_steps_per_client",), "one epoch whatever E"),
    M("masked_step_not_kept", "steps", C,
      "keep = lambda new, old: jnp.where(active, new, old)", "keep = lambda new, old: new",
      (f"{T_ENGINE}::test_masked_steps_leave_adaptive_optimizer_state_alone",),
      "padding steps move Adam clients"),
    M("last_batch_padded_with_row0", "steps", C,
      "real = (pos < n) & active", "real = (pos < pos + 1) & active",
      (f"{T_ENGINE}::test_matches_numpy_fedavg",),
      "the short last batch is padded with real rows"),
    # --- shuffles
    M("ignore_shuffle_order", "shuffles", C,
      "local = job.orders[jnp.minimum(epoch, shape.num_epochs - 1),\n"
      "                     jnp.minimum(pos, shape.max_examples - 1)]",
      "local = jnp.minimum(pos, shape.max_examples - 1)",
      (f"{T_CLIENT}::test_shuffled_fedavg_matches_numpy_replaying_the_engines_orders",),
      "the local step trains in storage order"),
    M("sattolo", "shuffles", C,
      "j = jnp.minimum((u[i] * (i + 1)).astype(jnp.int32), i)",
      "j = jnp.minimum((u[i] * i).astype(jnp.int32), i - 1)",
      (f"{T_CLIENT}::test_shuffles_are_uniform_permutations",),
      "Sattolo's algorithm: no element ever stays in place"),
    M("biased_swap_range", "shuffles", C,
      "j = jnp.minimum((u[i] * (i + 1)).astype(jnp.int32), i)",
      "j = jnp.minimum((u[i] * length).astype(jnp.int32), i)",
      (f"{T_CLIENT}::test_shuffles_are_uniform_permutations",),
      "swap partner drawn from the whole array, then clipped"),
    M("same_order_every_epoch", "shuffles", C,
      "jax.random.uniform(jax.random.fold_in(k, e), (length,))",
      "jax.random.uniform(jax.random.fold_in(k, 0), (length,))",
      (f"{T_ENGINE}::test_shuffled_epochs_are_permutations_of_each_client",),
      "Fisher–Yates epochs reuse one permutation"),
    M("sort_same_order_every_epoch", "shuffles", C,
      "jax.random.bits(jax.random.fold_in(k, e), (length,))",
      "jax.random.bits(jax.random.fold_in(k, 0), (length,))",
      (f"{T_ENGINE}::test_shuffled_epochs_are_permutations_of_each_client",),
      "sorted shuffles reuse one permutation"),
    M("sort_padding_first", "shuffles", C,
      "bits = jnp.where(jnp.arange(length) < n, bits, jnp.uint32(0xFFFFFFFF))",
      "bits = jnp.where(jnp.arange(length) < n, bits, jnp.uint32(0))",
      (f"{T_ENGINE}::test_shuffled_epochs_are_permutations_of_each_client",),
      "padding positions sort before the real examples"),
    M("sort_ties_reversed", "shuffles", C,
      "| lax.broadcasted_iota(jnp.uint64, bits.shape, axis))",
      "| (bits.shape[axis] - 1 - lax.broadcasted_iota(jnp.uint64, bits.shape, axis)))",
      (f"{T_CLIENT}::test_sort_shuffle_is_a_stable_argsort",),
      "the sort's 64-bit keys carry reversed positions (still a permutation, not the argsort)"),
    # --- algorithms
    M("fedprox_sign", "fedprox", A + "fedprox.py",
      "g + (mu * (w - w0)).astype(g.dtype)", "g - (mu * (w - w0)).astype(g.dtype)",
      (f"{T_ALG}::test_fedprox_local_optimum_on_a_quadratic",), "proximal term pushes away"),
    M("scaffold_option_i_at_y", "scaffold", A + "scaffold.py",
      "new_c_i = out.full_gradient(out.context.global_params)",
      "new_c_i = out.full_gradient(out.params)",
      (f"{T_ALG}::test_scaffold_option_i_control_is_the_full_gradient_at_the_server_model",),
      "option I's c_i at the client's final point instead of x"),
    M("scaffold_ii_sign", "scaffold", A + "scaffold.py",
      "-e + (x - y) * scale", "-e + (y - x) * scale",
      (f"{T_ALG}::test_scaffold_matches_numpy_with_epochs_and_unequal_sizes",),
      "option II's (x − y) reversed"),
    M("scaffold_static_k", "scaffold", A + "scaffold.py",
      "jnp.maximum(out.num_steps, 1).astype(jnp.float32)",
      "jnp.maximum(out.num_examples, 1).astype(jnp.float32)",
      (f"{T_ALG}::test_scaffold_matches_numpy_with_epochs_and_unequal_sizes",),
      "K taken as the number of examples"),
    M("scaffold_correction_sign", "scaffold", A + "scaffold.py",
      "client_extra=lambda c, c_i: jax.tree.map(jnp.subtract, c, c_i)",
      "client_extra=lambda c, c_i: jax.tree.map(jnp.subtract, c_i, c)",
      (f"{T_ALG}::test_scaffold_matches_numpy_with_epochs_and_unequal_sizes",),
      "the correction is c_i − c"),
    M("scaffold_full_share", "scaffold", A + "scaffold.py",
      "share = summary.participants / summary.num_clients", "share = 1.0",
      (f"{T_ALG}::test_scaffold_server_control_is_mean_of_client_controls",),
      "c moves by mean Δc instead of |S|/N · mean Δc"),
    M("fednova_tau_eff_one", "fednova", A + "fednova.py",
      'tau_eff = summary.mean_message["a"]', "tau_eff = 1.0",
      (f"{T_ALG}::test_fednova_matches_numpy_with_epochs_and_unequal_sizes",),
      "normalized updates never rescaled by τ_eff"),
    M("fednova_not_normalized", "fednova", A + "fednova.py",
      "a = jnp.maximum(a, 1e-12)", "a = jnp.ones_like(a)",
      (f"{T_ALG}::test_fednova_matches_numpy_with_epochs_and_unequal_sizes",),
      "a_k = 1 (FedNova becomes τ_eff-scaled FedAvg)"),
    M("fednova_momentum_norm", "fednova", A + "fednova.py",
      "return (tau - rho * (1 - rho ** tau) / one_minus_rho) / one_minus_rho",
      "return (tau - rho * (1 - rho ** tau) / one_minus_rho)",
      (f"{T_ALG}::test_fednova_aggregation_norms",), "a_k with momentum not divided by 1 − ρ"),
    M("yogi_sign", "fedopt", A + "fedopt.py",
      "v - one_minus_b2 * g * g * jnp.sign(v - g * g)",
      "v + one_minus_b2 * g * g * jnp.sign(v - g * g)",
      (f"{T_ALG}::test_paper_convention_first_server_steps",), "Yogi's sign flipped"),
    M("adam_v_no_decay", "fedopt", A + "fedopt.py",
      "b2 * v + one_minus_b2 * g * g", "v + one_minus_b2 * g * g",
      (f"{T_ALG}::test_paper_convention_first_server_steps",), "FedAdam's v never decays"),
    M("adam_tau_inside_sqrt", "fedopt", A + "fedopt.py",
      "-lr * m / (jnp.sqrt(v) + tau)", "-lr * m / jnp.sqrt(v + tau)",
      (f"{T_ALG}::test_paper_convention_first_server_steps",), "τ inside the square root"),
    M("growing_h_off_by_one", "local_sgd", A + "local_sgd.py",
      "stage = (r - 1) // every", "stage = r // every",
      (f"{T_ALG}::test_growing_local_steps_schedule",), "H grows one round early"),
    M("moon_positive_swapped", "moon", A + "moon.py",
      "return -jax.nn.log_softmax(logits, axis=-1)[:, 0]",
      "return -jax.nn.log_softmax(logits, axis=-1)[:, 1]",
      (f"{T_ALG}::test_moon_local_objective_matches_numpy",),
      "the previous local model taken as the positive pair"),
    M("local_loss_hook_ignored", "moon", C,
      "  if hooks.local_loss is not None:", "  if False:",
      (f"{T_ALG}::test_moon_with_mu_zero_is_fedavg",), "the engine never calls the local objective"),
    M("custom_loss_ignored", "models", "fedjax_sim/models.py",
      "    return self.loss_fn(out, y) if self.loss_fn is not None else loss_from_outputs(",
      "    return self.loss_fn(out, y) if False else loss_from_outputs(",
      (f"{T_ALG}::test_custom_model_loss_is_trained",), "a model's own loss is ignored"),
    # --- stragglers and dropouts
    M("dropout_inverted", "systems", S,
      "returns = jax.random.uniform(k_drop, (cohort_size,)) >= system.dropout_rate",
      "returns = jax.random.uniform(k_drop, (cohort_size,)) < system.dropout_rate",
      (f"{T_ALG}::test_drop_policy_removes_exactly_the_stragglers_weight",
       f"{T_ALG}::test_bad_heterogeneity_is_named", T_GOLD),
      "dropout_rate is the probability of returning"),
    M("partial_zero_epochs", "systems", S,
      "steps = (1 + jnp.floor(u * local_epochs).astype(jnp.int32)) * steps_per_epoch",
      "steps = jnp.floor(u * local_epochs).astype(jnp.int32) * steps_per_epoch",
      (f"{T_CLIENT}::test_partial_stragglers_take_whole_epochs",),
      "partial stragglers may run zero epochs"),
    M("drop_policy_keeps_stragglers", "systems", S,
      "    returns = returns & ~straggler", "    returns = returns",
      (f"{T_ALG}::test_drop_policy_removes_exactly_the_stragglers_weight",),
      "policy 'drop' keeps the stragglers' updates"),
    # --- aggregators
    M("median_ignores_mask", "aggregators", AGG + "median.py",
      "below = jnp.sum((keys < candidate[None]) & valid, axis=0)",
      "below = jnp.sum(keys < candidate[None], axis=0)",
      ("tests/test_aggregators.py::test_median_is_numpy_median_over_unmasked_clients",),
      "empty slots and dropped clients enter the median"),
    M("median_lower_middle", "aggregators", AGG + "median.py",
      "hi = jnp.where(at_or_below > hi_rank, lo, above)", "hi = lo",
      ("tests/test_aggregators.py::test_median_is_numpy_median_over_unmasked_clients",),
      "even cohorts take the lower middle value"),
    M("radix_select_off_by_one", "aggregators", AGG + "median.py",
      "return jnp.where(below <= k, candidate, found)",
      "return jnp.where(below < k, candidate, found)",
      ("tests/test_aggregators.py::test_median_is_numpy_median_over_unmasked_clients",),
      "the radix selection returns the (k−1)-th key"),
    M("collect_chunks_overwrite", "aggregators", COMPILED,
      "offsets[b] + c * bucket.chunk", "offsets[b]",
      ("tests/test_aggregators.py::test_median_in_the_engine_is_the_median_of_the_client_models",),
      "every chunk of a bucket writes the same collect slots"),
    M("mean_divides_by_count", "aggregators", AGG + "mean.py",
      "total = jnp.maximum(sums.weight, 1e-30)", "total = jnp.maximum(sums.count, 1e-30)",
      ("tests/test_aggregators.py::test_mean_is_the_weighted_mean_and_stream_equals_collect",
       f"{T_ENGINE}::test_matches_numpy_fedavg"), "the weighted sum divided by the client count"),
    M("clip_scales_up", "aggregators", AGG + "clip.py",
      "scale = jnp.minimum(1.0, max_norm / jnp.maximum(tree_norm(update), 1e-30))",
      "scale = max_norm / jnp.maximum(tree_norm(update), 1e-30)",
      ("tests/test_aggregators.py::test_clip_bounds_every_contribution_and_keeps_small_updates",),
      "updates inside the ball are scaled up to the bound"),
    M("clip_per_leaf", "aggregators", AGG + "clip.py",
      "scale = jnp.minimum(1.0, max_norm / jnp.maximum(tree_norm(update), 1e-30))\n"
      "  return jax.tree.map(lambda a: (a * scale).astype(a.dtype), update)",
      "return jax.tree.map(lambda a: (a * jnp.minimum(1.0, max_norm / jnp.maximum(\n"
      "      tree_norm(a), 1e-30))).astype(a.dtype), update)",
      ("tests/test_aggregators.py::test_clip_bounds_every_contribution_and_keeps_small_updates",
       "tests/test_aggregators.py::test_every_aggregator_with_every_algorithm_family"),
      "each leaf clipped on its own instead of the whole update"),
    # --- differential privacy: dp_mean, the accountant, Poisson sampling
    M("dp_adaptive_sign_inverted", "privacy", AGG + "dp.py",
      "-state[\"clip_learning_rate\"] * (fraction_unclipped - state[\"target_quantile\"])",
      "state[\"clip_learning_rate\"] * (fraction_unclipped - state[\"target_quantile\"])",
      (f"{T_DP}::test_adaptive_clip_norm_rises_when_most_updates_are_clipped_and_falls_otherwise",
       f"{T_DP}::test_adaptive_clip_norm_converges_to_the_target_quantile"),
      "the clip norm shrinks when most updates are clipped (a published implementation's bug)"),
    M("dp_counts_clipped", "privacy", AGG + "dp.py",
      "(tree_norm(update) <= state[\"clip_norm\"])", "(tree_norm(update) > state[\"clip_norm\"])",
      (f"{T_DP}::test_adaptive_clip_norm_converges_to_the_target_quantile",),
      "the fraction of clipped, not unclipped, updates drives the clip norm"),
    M("dp_denominator_returned", "privacy", AGG + "dp.py",
      "return jax.tree.map(lambda a: a / expected, sums.weighted_sum)",
      "return jax.tree.map(lambda a: a / jnp.maximum(sums.count, 1.0), sums.weighted_sum)",
      (f"{T_DP}::test_without_noise_and_clipping_dp_mean_is_the_uniform_mean",),
      "divides by the clients that returned, not the fixed expected cohort (sensitivity breaks)"),
    M("dp_noise_not_over_m", "privacy", AGG + "dp.py",
      "aggregate = _gaussian_like(noise_key, aggregate, z * c / expected)",
      "aggregate = _gaussian_like(noise_key, aggregate, z * c)",
      (f"{T_DP}::test_noise_on_the_mean_has_std_z_c_over_m",),
      "noise std z·C on the mean instead of on the sum"),
    M("dp_noise_no_clip_norm", "privacy", AGG + "dp.py",
      "aggregate = _gaussian_like(noise_key, aggregate, z * c / expected)",
      "aggregate = _gaussian_like(noise_key, aggregate, z / expected)",
      (f"{T_DP}::test_noise_on_the_mean_has_std_z_c_over_m",),
      "noise not scaled by the clip norm"),
    M("dp_no_clip", "privacy", AGG + "dp.py",
      "scale = jnp.minimum(1.0, clip_norm / jnp.maximum(tree_norm(update), 1e-30))",
      "scale = jnp.maximum(1.0, clip_norm / jnp.maximum(tree_norm(update), 1e-30))",
      (f"{T_DP}::test_clipping_bounds_a_huge_clients_contribution",),
      "updates scaled up to the clip norm, large ones untouched"),
    M("dp_weights_kept", "privacy", STEP,
      'uniform = spec.algo.weighting == "uniform" or spec.aggregator.weighting == "uniform"',
      'uniform = spec.algo.weighting == "uniform"',
      (f"{T_DP}::test_dp_mean_without_noise_is_uniform_fedavg_and_sweeps_take_dp_options_as_data",),
      "the engine weighs DP sums by n_k (a client's weight is unbounded)"),
    M("dp_adaptive_noise_not_raised", "privacy", AGG + "dp.py",
      "z = update_noise_multiplier(z, sigma_b)", "z = z",
      (f"{T_DP}::test_update_noise_is_raised_for_the_released_count",),
      "adaptive clipping's count spends privacy that the update noise does not pay back"),
    M("sweep_dp_options_ignored", "privacy", "fedjax_sim/engine/__init__.py",
      "  if len(runs) > 1:\n    init_state = _per_run_aggregator_states(spec, init_state, runs)", "",
      (f"{T_DP}::test_dp_mean_without_noise_is_uniform_fedavg_and_sweeps_take_dp_options_as_data",),
      "every run of a sweep uses run 0's clip norm and noise"),
    M("fixed_sampling_add_remove", "privacy", "fedjax_sim/privacy.py",
      "num_clients, cohort, dp_accounting.GaussianDpEvent(z / 2))",
      "num_clients, cohort, dp_accounting.GaussianDpEvent(z))",
      (f"{T_DP}::test_fixed_size_cohorts_use_replace_one_with_twice_the_sensitivity",),
      "replace-one neighbours accounted with the add/remove sensitivity C"),
    M("poisson_ignores_membership", "privacy", COHORT,
      "conditions = conditions._replace(returns=conditions.returns & member)", "pass",
      (f"{T_DP}::test_dp_run_with_poisson_sampling_records_epsilon_and_reports_overflow",),
      "empty Poisson slots train and return as if drawn"),
    M("poisson_members_not_first", "privacy", COHORT,
      "bits | jnp.uint32(1 << 31), bits & jnp.uint32((1 << 31) - 1)",
      "bits, bits",
      (f"{T_DP}::test_poisson_cohorts_include_each_client_with_probability_q",),
      "members and non-members ranked alike: members lose their slots"),
    M("poisson_capacity_too_small", "privacy", COHORT,
      "return max(1, min(num_clients, c))",
      "return max(1, min(num_clients, int(num_clients * rate)))",
      (f"{T_DP}::test_poisson_cohorts_include_each_client_with_probability_q",),
      "slots for the mean cohort only: half the rounds overflow"),
    M("overflow_silent", "privacy", "fedjax_sim/simulation.py",
      "over = [int(r) for r, a, n in zip(round_nums, active, metrics[\"drawn\"]) if a and n > capacity]",
      "over = []",
      (f"{T_DP}::test_dp_run_with_poisson_sampling_records_epsilon_and_reports_overflow",),
      "clients drawn beyond the slots are dropped silently"),
    # --- robust rules
    M("trimmed_rounds_up", "robust", AGG + "robust.py",
      "trim = jnp.floor(beta * count.astype(jnp.float32)).astype(jnp.int32)",
      "trim = jnp.ceil(beta * count.astype(jnp.float32)).astype(jnp.int32)",
      (f"{T_ROBUST}::test_trimmed_mean_is_numpy_over_unmasked_clients",),
      "⌈β·n⌉ trimmed at each end instead of ⌊β·n⌋"),
    M("trimmed_ties_miscounted", "robust", AGG + "robust.py",
      "lo_copies = at_or_below_lo - trim", "lo_copies = jnp.minimum(at_or_below_lo - trim, 1)",
      (f"{T_ROBUST}::test_trimmed_mean_is_numpy_over_unmasked_clients",),
      "one copy of the lower cut value kept, however many lie inside the kept ranks"),
    M("krum_counts_itself", "robust", AGG + "robust.py",
      "others = mask[:, None] & (jnp.arange(slots)[:, None] != c[None])",
      "others = mask[:, None] & (c[None] >= 0)",
      (f"{T_ROBUST}::test_krum_and_multi_krum_are_numpy",),
      "a slot's zero distance to itself counted among its neighbours"),
    M("krum_one_neighbour_more", "robust", AGG + "robust.py",
      "k = jnp.maximum(count - num_byzantine - 2, 1)", "k = jnp.maximum(count - num_byzantine - 1, 1)",
      (f"{T_ROBUST}::test_krum_and_multi_krum_are_numpy",),
      "n − f − 1 neighbours scored instead of n − f − 2"),
    M("geomedian_unweighted", "robust", AGG + "robust.py",
      "w = jnp.where(mask, weights.astype(jnp.float32), 0.0)", "w = jnp.where(mask, 1.0, 0.0)",
      (f"{T_ROBUST}::test_geometric_median_reaches_the_minimum",),
      "RFA's weights ignored"),
    M("cclip_forgets", "robust", AGG + "robust.py",
      "return aggregate, last[:state.shape[0]]",
      "return aggregate, state",
      (f"{T_ROBUST}::test_centered_clip_is_the_numpy_iteration_and_remembers_the_last_aggregate",),
      "centered clipping restarts from zero every round"),
    M("cclip_global_norm", "robust", AGG + "robust.py",
      "scale = jnp.minimum(1.0, tau / jnp.maximum(jnp.linalg.norm(diff, axis=1), 1e-30))",
      "scale = jnp.minimum(1.0, tau / jnp.maximum(jnp.linalg.norm(diff), 1e-30))",
      (f"{T_ROBUST}::test_centered_clip_is_the_numpy_iteration_and_remembers_the_last_aggregate",),
      "one clip factor for the whole cohort instead of one per client"),
    # --- attacks
    M("attack_on_honest_clients", "attacks", STEP,
      "pick = lambda b, a: jnp.where(is_attacker, b.astype(a.dtype), a)",
      "pick = lambda b, a: jnp.where(~is_attacker, b.astype(a.dtype), a)",
      (f"{T_ATTACK}::test_robust_rules_resist_a_scaled_sign_flip_that_breaks_the_mean",),
      "the honest clients are the ones replaced"),
    M("byzantine_set_per_round", "attacks", COHORT,
      "byzantine = attacks.members(spec.attack, jax.random.fold_in(train_key, 0), spec.num_clients)",
      "byzantine = attacks.members(spec.attack, keys.attack, spec.num_clients)",
      (f"{T_ATTACK}::test_label_flip_trains_attackers_on_flipped_labels",
       f"{T_ATTACK}::test_robust_rules_resist_a_scaled_sign_flip_that_breaks_the_mean"),
      "a new Byzantine set every round"),
    M("honest_stats_include_attackers", "attacks", "fedjax_sim/attacks.py",
      "honest = mask & ~attackers", "honest = mask",
      (f"{T_ATTACK}::test_each_attack_replaces_only_attackers_by_its_formula",
       f"{T_ATTACK}::test_omniscient_attack_on_the_mean_is_exact"),
      "the omniscient statistics include the attackers' own updates"),
    M("alie_s_off_by_one", "attacks", "fedjax_sim/attacks.py",
      "s = jnp.floor(n / 2 + 1) - f", "s = jnp.floor(n / 2) - f",
      (f"{T_ATTACK}::test_each_attack_replaces_only_attackers_by_its_formula",),
      "Baruch et al.'s s = ⌊n/2 + 1⌋ − f off by one"),
    M("omniscient_not_applied", "attacks", STEP,
      "  if spec.attack is not None and spec.attack.omniscient:  # attackers read the honest slots",
      "  if False:",
      (f"{T_ATTACK}::test_omniscient_attack_on_the_mean_is_exact",),
      "omniscient attackers send their honest updates"),
    M("label_map_ignored", "attacks", C,
      "    y = job.label_map[y]", "    y = y",
      (f"{T_ATTACK}::test_label_flip_trains_attackers_on_flipped_labels",),
      "label flipping trains on the true labels"),
    # --- compression
    M("quantize_rounds_down", "compression", AGG + "compress.py",
      "level = low + (jax.random.uniform(key, v.shape) < t - low)", "level = low",
      (f"{T_COMPRESS}::test_quantization_is_unbiased_and_on_the_grid",),
      "deterministic rounding down: biased toward −r"),
    M("random_k_unscaled", "compression", AGG + "compress.py",
      "scale = 1.0 if error_feedback else flat.size / k", "scale = 1.0",
      (f"{T_COMPRESS}::test_sparsifiers_and_sign_are_their_definitions",),
      "random-k without the size/k scale is biased"),
    M("error_feedback_drops_residual", "compression", AGG + "compress.py",
      "residual = jax.tree.map(jnp.subtract, target, sent)",
      "residual = jax.tree.map(jnp.zeros_like, target)",
      (f"{T_COMPRESS}::test_error_feedback_sends_everything_eventually",
       f"{T_COMPRESS}::test_error_feedback_makes_top_k_converge_and_bytes_follow_the_encoding"),
      "the unsent remainder is forgotten"),
    M("top_k_smallest", "compression", AGG + "compress.py",
      "_, idx = lax.top_k(jnp.abs(flat), _kept(flat.size, fraction))",
      "_, idx = lax.top_k(-jnp.abs(flat), _kept(flat.size, fraction))",
      (f"{T_COMPRESS}::test_sparsifiers_and_sign_are_their_definitions",),
      "the smallest coordinates are kept"),
    M("bytes_dense_always", "compression", "fedjax_sim/simulation.py",
      "up = (agg.encoded_bytes or dense_bytes)(template)", "up = dense_bytes(template)",
      (f"{T_COMPRESS}::test_error_feedback_makes_top_k_converge_and_bytes_follow_the_encoding",),
      "compressed runs report dense traffic"),
    # --- secure aggregation
    M("secure_masks_one_sided", "secure", AGG + "secure.py",
      "signed = jnp.where((q > p)[:, None], prg, -prg)", "signed = prg",
      (f"{T_SECURE}::test_the_server_recovers_the_field_sum_of_the_returned_parties",),
      "both parties of a pair add the mask: nothing cancels"),
    M("secure_dropped_masks_kept", "secure", AGG + "secure.py",
      "return (total - leftover) & field", "return total & field",
      (f"{T_SECURE}::test_the_server_recovers_the_field_sum_of_the_returned_parties",
       f"{T_SECURE}::test_secure_mean_is_the_plain_mean_to_fixed_point_precision_with_dropouts"),
      "the dropped parties' partners keep uncancelled masks"),
    M("secure_no_saturation", "secure", AGG + "secure.py",
      "ints = jnp.clip(scaled, -bound, bound).astype(jnp.int32)",
      "ints = scaled.astype(jnp.int32)",
      (f"{T_SECURE}::test_saturated_coordinates_are_counted_not_wrapped",),
      "a huge coordinate wraps around the field"),
    M("secure_unsigned_decode", "secure", AGG + "secure.py",
      "signed = lax.bitcast_convert_type(field_sum << shift, jnp.int32) >> (32 - bits)",
      "signed = (field_sum << shift) >> (32 - bits)",
      (f"{T_SECURE}::test_secure_mean_is_the_plain_mean_to_fixed_point_precision_with_dropouts",),
      "negative sums decoded as large positive numbers"),
    # --- data and loaders
    M("offsets_off_by_one", "data", "fedjax_sim/data.py",
      "np.concatenate([[0], np.cumsum(self.num_examples)[:-1]])",
      "np.concatenate([[0], np.cumsum(self.num_examples)[:-1] + 1])[:len(self.num_examples)]",
      ("tests/test_data_models.py::test_from_arrays_round_trip_and_ids",),
      "client k starts one row late"),
    M("float_labels_stay_float", "data", "fedjax_sim/data.py",
      "y_all.dtype == np.bool_ or integral(y_all):", "y_all.dtype == np.bool_:",
      ("tests/test_loaders.py::test_leaf_labels_written_as_floats_load_as_classes_and_train",),
      "LEAF's 3.0 labels are refused by classifiers"),
    M("sqlite_key_order", "loaders", "fedjax_sim/datasets/fedjax_sqlite.py",
      'return conn.execute(query.format("rowid")).fetchall()',
      'return conn.execute(query.format("client_id")).fetchall()',
      ("tests/test_loaders.py::test_fedjax_sqlite_reads_hand_built_emnist_file_in_rowid_order",),
      "FedJAX files read in key order, not insertion order"),
    M("leaf_files_unsorted", "loaders", "fedjax_sim/datasets/leaf.py",
      'files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))',
      'files = sorted((os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json")), '
      'reverse=True)',
      ("tests/test_loaders.py::test_leaf_directory_merges_files_in_name_order_and_skips_empty_users",),
      "LEAF directory files merged in the wrong order"),
    M("iid_sizes_uneven", "partition", "fedjax_sim/partition.py",
      "sizes = np.full(k, len(y) // k) + (np.arange(k) < len(y) % k)",
      "sizes = np.full(k, len(y) // k); sizes[-1] += len(y) % k",
      ("tests/test_partition.py::test_iid_sizes_differ_by_at_most_one",),
      "the remainder all goes to the last client"),
    M("per_client_accuracy_unnormalized", "metrics", "fedjax_sim/metrics.py",
      "counts = jnp.maximum(counts, 1.0)",
      "counts = jnp.maximum(counts.mean(), 1.0)",
      (f"{T_ALG}::test_per_client_accuracy_percentiles",
       f"{T_ALG}::test_per_client_metric_arrays_are_each_clients_own"),
      "per-client accuracy and loss divided by the mean client size"),
    M("per_client_loss_of_row_owner", "metrics", "fedjax_sim/metrics.py",
      "jax.ops.segment_sum(losses, client_of_row[rows], num_segments=num_clients)",
      "jax.ops.segment_sum(losses, client_of_row[rows][::-1], num_segments=num_clients)",
      (f"{T_ALG}::test_per_client_metric_arrays_are_each_clients_own",),
      "per-client losses credited to the wrong clients"),
    M("schedule_rate_sum_first_rate", "scaffold", A + "_base.py",
      "acc + jnp.asarray(client_lr(t), jnp.float32)",
      "acc + jnp.asarray(client_lr(0), jnp.float32)",
      (f"{T_ALG}::test_scaffold_option_ii_with_a_step_schedule_matches_numpy",),
      "SCAFFOLD option II divides by K times the first rate of a schedule"),
    M("fednova_schedule_first_rate", "fednova", A + "fednova.py",
      "lr = jnp.asarray(client_lr(t), jnp.float32)",
      "lr = jnp.asarray(client_lr(0), jnp.float32)",
      (f"{T_ALG}::test_fednova_with_a_step_schedule_matches_numpy",
       f"{T_ALG}::test_fednova_aggregation_norms_of_a_schedule_are_rate_sums"),
      "FedNova's a_k uses the first rate of a schedule for every step"),
    M("whole_float_labels_in_partition", "data", "fedjax_sim/partition.py",
      "  if integral(y):\n    y = y.astype(np.int32)", "",
      ("tests/test_loaders.py::test_centralized_float_labels_partition_by_class",),
      "partitioners refuse class labels written as floats"),
    # --- the built-in dense layer's derivative rule
    M("dense_jvp_drops_input_term", "models", "fedjax_sim/models.py",
      "terms = [] if zero(dx) else [dx @ kernel]", "terms = []",
      ("tests/test_data_models.py::test_dense_layer_derivatives_equal_the_plain_product",),
      "the dense layer's derivative loses its input's term (no gradient reaches hidden layers)"),
    M("dense_jvp_transpose_rows", "models", "fedjax_sim/models.py",
      "terms.append(jnp.swapaxes(x_t, -1, -2) @ dkernel)",
      "terms.append(jnp.swapaxes(x_t, -1, -2)[::-1] @ dkernel)",
      ("tests/test_data_models.py::test_dense_layer_derivatives_equal_the_plain_product",),
      "the materialized xᵀ is multiplied back with its examples out of order"),
    # --- stateful Flax models, local parameters, auto bucketing, the collect buffer
    M("dropout_key_reused", "flax state", C,
      "key=jax.random.fold_in(job.key, t)),", "key=job.key),",
      ("tests/test_data_models.py::test_dropout_and_batch_norm_replay_one_round",),
      "every local step draws the same dropout mask"),
    M("batch_stats_not_replaced", "flax state", C,
      "  if updated:  # batch statistics", "  if False:  # batch statistics",
      ("tests/test_data_models.py::test_dropout_and_batch_norm_replay_one_round",),
      "batch statistics never updated by the forward pass"),
    M("batch_stats_through_optimizer", "flax state", STEP,
      "  if spec.model.state_collections:  # batch statistics",
      "  if False:  # batch statistics",
      ("tests/test_data_models.py::test_dropout_and_batch_norm_replay_one_round",),
      "the server optimizer steps on averaged batch statistics"),
    M("batch_norm_sees_padding", "flax state", "fedjax_sim/models.py",
      "    if mask is None:\n      return call()", "    if True:\n      return call()",
      ("tests/test_data_models.py::test_dropout_and_batch_norm_replay_one_round",),
      "padding rows enter the batch statistics"),
    M("local_update_sent", "personal", STEP,
      "      delta, local_k = personal.zero_local(delta, spec.local), personal.split(w, spec.local)",
      "      local_k = personal.split(w, spec.local)",
      ("tests/test_personal.py::test_personalization_on_conflicting_labels",),
      "local parameters' updates reach the server"),
    M("personal_eval_global", "personal", "fedjax_sim/metrics.py",
      "        owners = jnp.minimum(client_of_row[rows], num_clients - 1)",
      "        owners = jnp.zeros_like(client_of_row[rows])",
      ("tests/test_personal.py::test_fedbn_keeps_batch_norm_local_and_evaluates_each_client_with_its_own",),
      "personalized evaluation scores every example with client 0's model"),
    M("auto_buckets_always_merge", "buckets", E + "buckets.py",
      "    if costs[i] >= BUCKET_COMPILE_SECONDS:", "    if costs[i] >= 1e30:",
      (f"{T_ENGINE}::test_auto_bucketing_merges_groups_that_do_not_pay_for_their_compilation",),
      "auto bucketing merges every size group whatever the run's length"),
    M("collect_memory_unchecked", "memory", "fedjax_sim/simulation.py",
      "  if need and budget and need > budget // 2:", "  if need and budget and need > budget * 2:",
      ("tests/test_aggregators.py::test_a_collect_buffer_larger_than_the_device_is_refused",),
      "a collect buffer larger than the device is not refused"),
    # --- several devices
    M("device_sums_not_added", "devices", E + "mesh.py",
      "    total = jax.lax.psum(sums._replace(norm_max=0.0), AXIS)",
      "    total = sums._replace(norm_max=0.0)",
      ("tests/test_devices.py::test_four_devices_equal_one",),
      "each device keeps only its own share of a chunk's sums"),
    M("device_norm_max_local", "devices", E + "mesh.py",
      "norm_max=jax.lax.pmax(sums.norm_max, AXIS)", "norm_max=sums.norm_max",
      ("tests/test_devices.py::test_four_devices_equal_one",),
      "the largest update norm of one device's share, not of the chunk"),
    # --- flattened sweeps
    M("flat_run_0_state", "sweeps", E + "executors/flat_sweep.py",
      "        params, extra, aggregator = at(light, k_run)",
      "        params, extra, aggregator = at(light, 0)",
      ("tests/test_flat_sweeps.py::test_flattened_fedprox_sweep_equals_separate_runs_and_lockstep",),
      "every slot of a flattened sweep trains from run 0's model"),
    M("flat_sums_to_run_0", "sweeps", E + "executors/flat_sweep.py",
      "      seg = lambda a: jax.ops.segment_sum(a, run_c, num_segments=runs)",
      "      seg = lambda a: jax.ops.segment_sum(a, run_c * 0, num_segments=runs)",
      ("tests/test_flat_sweeps.py::test_flattened_fedprox_sweep_equals_separate_runs_and_lockstep",),
      "every run's clients are summed into run 0"),
    M("flat_unsorted", "sweeps", E + "executors/flat_sweep.py",
      "  score = jnp.where(member, n, -1)", "  score = jnp.where(member, 0, -1)",
      ("tests/test_flat_sweeps.py::test_bucket_slots_are_sorted_by_size_and_padded_with_the_empty_slot",),
      "flattened chunks are not sorted by size (each chunk runs its largest member's steps)"),
    # --- batch statistics of personal models, the shared bucket's padding, sweeps by memory
    M("full_gradient_steps_statistics", "personalization", C,
      "lax.stop_gradient(p[c]) for c in model.state_collections", "p[c] for c in model.state_collections",
      ("tests/test_personal.py::test_ditto_personal_models_keep_their_clients_batch_statistics",),
      "the full gradient reaches batch statistics (Ditto's solver steps them like weights)"),
    M("ditto_keeps_old_statistics", "personalization", A + "ditto.py",
      "stats = {c: out.params[c] for c in out.state_collections}",
      "stats = {c: out.client_state[c] for c in out.state_collections}",
      ("tests/test_personal.py::test_ditto_personal_models_keep_their_clients_batch_statistics",),
      "a personal model never takes its client's batch statistics"),
    M("shared_padding_unsorted", "buckets", E + "buckets.py",
      "s = np.sort(steps[rng.choice(steps.size, m, replace=False)])",
      "s = steps[rng.choice(steps.size, m, replace=False)]",
      (f"{T_ENGINE}::test_shared_bucket_padding_is_its_sorted_chunks_rounding",),
      "the shared bucket's padding estimate ignores the size ordering of its chunks"),
    M("stream_rows_replicated", "devices", E + "population.py",
      "sharding = NamedSharding(self.mesh, PartitionSpec(None, AXIS))",
      "sharding = NamedSharding(self.mesh, PartitionSpec())",
      ("tests/test_devices.py::test_four_devices_equal_one",),
      "a streamed block's rows sent whole to every device instead of each device's share"),
    M("run_groups_not_fewest", "memory", E + "memory.py",
      "    size = -(-runs // count)", "    size = max(1, runs // (count + 1))",
      ("tests/test_memory.py::test_a_sweep_too_large_for_the_budget_runs_in_groups_of_runs",),
      "a sweep split into more groups of runs than the budget needs"),
]


def check_patterns(mutations) -> list[str]:
  """Mutations whose ``old`` text does not occur exactly once (the code moved: update them)."""
  stale = []
  for m in mutations:
    with open(os.path.join(ROOT, m.file)) as f:
      count = f.read().count(m.old)
    if count != 1:
      stale.append(f"{m.name}: pattern occurs {count}× in {m.file}")
  return stale


def run_one(m: Mutation, timeout: int) -> tuple[str, float, str]:
  """Applies ``m`` to a temporary copy and runs its tests: ``(verdict, seconds, detail)``."""
  with tempfile.TemporaryDirectory(prefix="fedjax_sim_mutant_") as tmp:
    for part in ("fedjax_sim", "tests"):
      shutil.copytree(os.path.join(ROOT, part), os.path.join(tmp, part),
                      ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp)
    path = os.path.join(tmp, m.file)
    with open(path) as f:
      text = f.read()
    with open(path, "w") as f:
      f.write(text.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=tmp, PYTHONDONTWRITEBYTECODE="1")
    where = subprocess.run([sys.executable, "-c", "import fedjax_sim; print(fedjax_sim.__file__)"],
                           cwd=tmp, env=env, capture_output=True, text=True)
    if not where.stdout.startswith(tmp):
      return "broken", 0.0, f"the mutant is not what imports: {where.stdout or where.stderr}"
    start = time.perf_counter()
    try:
      # -n 0: one process (the suite's default of two xdist workers would only add start-up)
      out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p",
                            "no:cacheprovider", *m.tests], cwd=tmp, env=env, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return "timeout", time.perf_counter() - start, ""
    seconds = time.perf_counter() - start
    last = (out.stdout.strip().splitlines() or [""])[-1]
    if out.returncode == 1:
      return "caught", seconds, last
    if out.returncode == 0:
      return "NOT CAUGHT", seconds, last
    return "broken", seconds, (out.stdout + out.stderr)[-400:]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", help="comma-separated mutation names")
  parser.add_argument("--list", action="store_true")
  parser.add_argument("--out", help="also write the table (Markdown) to this file")
  parser.add_argument("--timeout", type=int, default=600)
  args = parser.parse_args()
  chosen = MUTATIONS
  if args.only:
    names = args.only.split(",")
    unknown = sorted(set(names) - {m.name for m in MUTATIONS})
    if unknown:
      sys.exit(f"mutation_check: unknown mutation(s) {unknown}")
    chosen = [m for m in MUTATIONS if m.name in names]
  if args.list:
    for m in chosen:
      print(f"{m.name:<32} {m.file:<40} {' '.join(m.tests)}")
    return
  stale = check_patterns(chosen)
  if stale:
    sys.exit("mutation_check: stale patterns:\n  " + "\n  ".join(stale))
  rows = ["| mutation | area | bug | tests | verdict | s |", "|---|---|---|---|---|---|"]
  missed = 0
  for m in chosen:
    verdict, seconds, detail = run_one(m, args.timeout)
    missed += verdict != "caught"
    tests = ", ".join(t.split("::")[-1] if "::" in t else t for t in m.tests)
    rows.append(f"| `{m.name}` | {m.area} | {m.why} | {tests} | {verdict} | {seconds:.0f} |")
    print(f"{m.name:<32} {verdict:<10} {seconds:6.1f}s  {detail if verdict != 'caught' else ''}",
          flush=True)
  summary = f"{len(chosen) - missed} of {len(chosen)} mutations caught"
  print(summary)
  if args.out:
    with open(args.out, "w") as f:
      f.write("# Mutation check\n\nPlausible bugs applied one at a time to a temporary copy of the "
              "package by `python tools/mutation_check.py`; each row names the tests that must "
              "fail.\n\n" + "\n".join(rows) + f"\n\n{summary}.\n")
  sys.exit(1 if missed else 0)


if __name__ == "__main__":
  main()
