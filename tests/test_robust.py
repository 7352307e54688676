"""Byzantine-robust aggregators (``fedjax_sim.aggregators.robust``) against plain NumPy, through
``aggregate``: odd and even cohorts, masked slots, ties."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from fedjax_sim import aggregators as agg

# the module (``agg.median`` is the aggregator factory of the same name)
median_module = importlib.import_module("fedjax_sim.aggregators.median")


def _cohort(num, seed, ties=False):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(num, 3, 2))
  b = rng.normal(size=(num,))
  if ties:  # few distinct values: many equal entries per coordinate
    a, b = np.round(a), np.round(b)
  mask = rng.permutation(np.arange(num) < num - 2)  # two masked slots
  updates = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  return updates, mask


def _flat_rows(updates):
  return np.concatenate([np.asarray(a).reshape(a.shape[0], -1)
                         for a in jax.tree.leaves(updates)], axis=1).astype(np.float64)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def numpy_trimmed_mean(rows, beta):
  n = len(rows)
  t = int(math.floor(beta * n))
  return np.sort(rows, axis=0)[t:n - t].mean(axis=0)


@pytest.mark.parametrize("num,ties", [(9, False), (10, False), (12, True)])
@pytest.mark.parametrize("beta", [0.0, 0.2, 0.45])
def test_trimmed_mean_is_numpy_over_unmasked_clients(num, ties, beta):
  updates, mask = _cohort(num, seed=num, ties=ties)
  weights = jnp.asarray(np.arange(1.0, num + 1))  # ignored
  got = agg.aggregate(agg.trimmed_mean(beta), updates, weights, mask=mask)
  want = numpy_trimmed_mean(_flat_rows(updates)[mask], beta)
  np.testing.assert_allclose(_flat(got), want, rtol=1e-5, atol=1e-6)
  if beta == 0.0:  # the unweighted mean
    np.testing.assert_allclose(_flat(got), _flat_rows(updates)[mask].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed", [True, False])
def test_trimmed_mean_counts_pairs_packed_or_not(packed, monkeypatch):
  # below PACKED_COUNT_ROWS rows two counts share one int32 sum; above, two sums: same result
  if not packed:
    monkeypatch.setattr(median_module, "PACKED_COUNT_ROWS", 0)
  updates, mask = _cohort(40, seed=7, ties=True)
  got = agg.aggregate(agg.trimmed_mean(0.2), updates, jnp.ones(40), mask=mask)
  want = numpy_trimmed_mean(_flat_rows(updates)[mask], 0.2)
  np.testing.assert_allclose(_flat(got), want, rtol=1e-5, atol=1e-6)
  lo, hi = median_module.kth_smallest_keys_pair(
      median_module.sortable_keys(updates["a"].reshape(40, -1)), jnp.asarray(mask),
      jnp.int32(3), jnp.int32(30))
  rows = np.sort(np.asarray(updates["a"]).reshape(40, -1)[mask], axis=0)
  np.testing.assert_array_equal(np.asarray(median_module.from_sortable_keys(lo)), rows[3])
  np.testing.assert_array_equal(np.asarray(median_module.from_sortable_keys(hi)), rows[30])


def numpy_krum_scores(rows, f):
  n = len(rows)
  d = ((rows[:, None] - rows[None]) ** 2).sum(-1)
  return np.array([np.sort(np.delete(d[i], i))[:n - f - 2].sum() for i in range(n)])


@pytest.mark.parametrize("num,ties", [(9, False), (10, True)])
def test_krum_and_multi_krum_are_numpy(num, ties, monkeypatch):
  monkeypatch.setattr(agg.robust, "KRUM_CHUNK", 4)  # several chunks of pairwise distances
  updates, mask = _cohort(num, seed=3 + num, ties=ties)
  rows = _flat_rows(updates)[mask]
  scores = numpy_krum_scores(rows, f=2)
  got = agg.robust.krum_scores(jnp.asarray(_flat_rows(updates), jnp.float32), jnp.asarray(mask), 2)
  np.testing.assert_allclose(np.asarray(got)[mask], scores, rtol=1e-4)
  assert np.all(np.isinf(np.asarray(got)[~mask]))
  if not ties:  # (tied scores make the choice ambiguous)
    krum = agg.aggregate(agg.krum(2), updates, jnp.ones(num), mask=mask)
    np.testing.assert_allclose(_flat(krum), rows[np.argmin(scores)], rtol=1e-6)
    multi = agg.aggregate(agg.krum(2, num_selected=3), updates, jnp.ones(num), mask=mask)
    np.testing.assert_allclose(_flat(multi), rows[np.argsort(scores)[:3]].mean(0), rtol=1e-5)


def test_krum_selects_from_the_honest_cluster():
  """f = 4 of m = 12 (f < (m − 2)/2) send a tight cluster far away: Krum picks an honest one."""
  rng = np.random.default_rng(0)
  honest = rng.normal(0.0, 0.1, size=(8, 20))
  byzantine = 5.0 + rng.normal(0.0, 0.01, size=(4, 20))
  rows = np.concatenate([byzantine, honest])
  got = agg.aggregate(agg.krum(4), {"w": jnp.asarray(rows, jnp.float32)}, jnp.ones(12))
  assert any(np.allclose(np.asarray(got["w"]), h, atol=1e-6) for h in honest)


def test_geometric_median_reaches_the_minimum():
  """The weighted objective Σ w_i ‖x_i − v‖ within 1e-5 (relative) of the float64 minimum."""
  updates, mask = _cohort(11, seed=5)
  weights = np.random.default_rng(1).uniform(0.5, 2.0, 11)
  rows, w = _flat_rows(updates)[mask], weights[mask]
  objective = lambda v: np.sum(w * np.linalg.norm(rows - v, axis=1))
  best = optimize.minimize(objective, rows.mean(0), method="Nelder-Mead",
                           options=dict(xatol=1e-10, fatol=1e-12, maxiter=200_000, maxfev=200_000))
  best = optimize.minimize(objective, best.x, method="BFGS", options=dict(gtol=1e-10))
  got = agg.aggregate(agg.geometric_median(max_iter=500, eps=1e-8), updates,
                      jnp.asarray(weights, jnp.float32), mask=mask)
  assert objective(_flat(got)) <= best.fun * (1 + 1e-5)


def test_centered_clip_is_the_numpy_iteration_and_remembers_the_last_aggregate():
  updates, mask = _cohort(10, seed=7)
  rows = _flat_rows(updates)[mask]
  tau, iters = 0.8, 3

  def numpy_cclip(v):
    for _ in range(iters):
      diff = rows - v
      v = v + (diff * np.minimum(1.0, tau / np.linalg.norm(diff, axis=1, keepdims=True))).mean(0)
    return v
  rule = agg.centered_clip(tau, iters)
  first, state = agg.aggregate(rule, updates, jnp.ones(10), mask=mask, return_state=True)
  want = numpy_cclip(np.zeros(rows.shape[1]))
  np.testing.assert_allclose(_flat(first), want, rtol=1e-5, atol=1e-6)
  second = agg.aggregate(rule, updates, jnp.ones(10), mask=mask, state=state)
  np.testing.assert_allclose(_flat(second), numpy_cclip(want), rtol=1e-5, atol=1e-6)


def test_bad_robust_options_are_named():
  updates, _ = _cohort(5, seed=0)
  cases = [
      (lambda: agg.trimmed_mean(0.5), r"beta must be in \[0, 0.5\), got 0.5"),
      (lambda: agg.trimmed_mean(-0.1), r"beta must be in \[0, 0.5\), got -0.1"),
      (lambda: agg.krum(-1), "num_byzantine must be an integer >= 0, got -1"),
      (lambda: agg.aggregate(agg.krum(2), updates, jnp.ones(5)),
       r"num_byzantine=2 needs more than 2·2 \+ 2 = 6 clients per round, the cohort has 5"),
      (lambda: agg.aggregate(agg.krum(1, num_selected=6), updates, jnp.ones(5)),
       "num_selected=6 exceeds the 5 clients"),
      (lambda: agg.geometric_median(max_iter=0), "max_iter must be a positive integer, got 0"),
      (lambda: agg.centered_clip(0.0), "tau must be a positive finite number, got 0.0"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
