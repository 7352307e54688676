"""Differential privacy: the accountant (``fedjax_sim.privacy``) against dp-accounting and the
analytic Gaussian mechanism, ``dp_mean`` alone (through ``aggregate``) and in the engine, and
Poisson sampling."""

import math
import warnings

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy import optimize, stats

import fedjax_sim as fs
from fedjax_sim import aggregators as agg
from fedjax_sim import privacy
from helpers import assert_close, classification_clients

# --- accounting -------------------------------------------------------------------------------


def test_epsilon_is_dp_accountings_own_number():
  """The issue's reference point: q = 0.01, z = 1.1, 10,000 rounds, δ = 1e-5."""
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 10_000)
  for name, accountant, published in [("rdp", rdp.RdpAccountant(), 5.63),
                                      ("pld", pld.PLDAccountant(), 5.19)]:
    direct = accountant.compose(event).get_epsilon(1e-5)
    ours = privacy.epsilon(1.1, 0.01, 10_000, 1e-5, accountant=name)
    assert ours == pytest.approx(direct, rel=1e-9)
    assert ours == pytest.approx(published, abs=0.01), name


def test_full_participation_is_the_analytic_gaussian_mechanism():
  """q = 1: T rounds of noise z compose to a Gaussian mechanism with μ = √T / z, whose exact
  δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Balle & Wang 2018). PLD is tight; RDP is an upper
  bound that is not far off."""
  z, steps, delta = 5.0, 25, 1e-5
  mu = math.sqrt(steps) / z
  gap = lambda eps: (stats.norm.cdf(-eps / mu + mu / 2)
                     - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta)
  exact = optimize.brentq(gap, 1e-6, 50)
  assert privacy.epsilon(z, 1.0, steps, delta, accountant="pld") == pytest.approx(exact, rel=0.01)
  ours_rdp = privacy.epsilon(z, 1.0, steps, delta)
  assert exact < ours_rdp < 1.3 * exact


def test_fixed_size_cohorts_use_replace_one_with_twice_the_sensitivity():
  relation = dp_accounting.NeighboringRelation.REPLACE_ONE
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
      1000, 10, dp_accounting.GaussianDpEvent(1.1 / 2)), 200)
  direct = rdp.RdpAccountant(neighboring_relation=relation).compose(event).get_epsilon(1e-5)
  fixed = privacy.epsilon(1.1, 0.01, 200, 1e-5, sampling="fixed", num_clients=1000)
  assert fixed == pytest.approx(direct, rel=1e-9)
  assert fixed > privacy.epsilon(1.1, 0.01, 200, 1e-5)  # Poisson, add/remove: less


def test_noise_multiplier_for_inverts_epsilon():
  z = privacy.noise_multiplier_for(2.0, 1e-5, 0.02, 500)
  assert privacy.epsilon(z, 0.02, 500, 1e-5) == pytest.approx(2.0, rel=1e-3)
  assert privacy.epsilon(0.98 * z, 0.02, 500, 1e-5) > 2.0  # the smallest such z


def test_bad_privacy_arguments_are_named():
  cases = [
      (lambda: privacy.epsilon(-1.0, 0.1, 10, 1e-5), "noise_multiplier must be .* got -1.0"),
      (lambda: privacy.epsilon(1.0, 1.5, 10, 1e-5), r"sampling_rate must be in \(0, 1\], got 1.5"),
      (lambda: privacy.epsilon(1.0, 0.0, 10, 1e-5), r"sampling_rate must be in \(0, 1\], got 0.0"),
      (lambda: privacy.epsilon(1.0, 0.1, 10, 1.0), r"delta must be in \(0, 1\), got 1.0"),
      (lambda: privacy.epsilon(1.0, 0.1, 10, 1e-5, accountant="moments"), "accountant must be"),
      (lambda: privacy.epsilon(1.0, 0.1, 10, 1e-5, sampling="fixed", accountant="pld",
                               num_clients=100), "'pld' cannot account fixed-size"),
      (lambda: privacy.noise_multiplier_for(1e-9, 1e-5, 1.0, 1000), "epsilon=1e-09 is unreachable"),
      (lambda: privacy.noise_multiplier_for(-2.0, 1e-5, 0.1, 10), "epsilon must be .* got -2.0"),
      (lambda: agg.dp_mean(-1.0, 1.0), "clip_norm must be a positive finite number, got -1.0"),
      (lambda: agg.dp_mean(1.0, -0.5), "noise_multiplier must be .* got -0.5"),
      (lambda: agg.dp_mean(1.0, 1.0, target_quantile=1.5), r"target_quantile must be in \[0, 1\]"),
      (lambda: agg.dp_mean(1.0, 1.0, delta=0.0), r"delta must be in \(0, 1\), got 0.0"),
      (lambda: agg.aggregate(agg.dp_mean(1.0, 1.0, target_quantile=0.5), _updates(4), jnp.ones(4)),
       r"noise_multiplier=1.0 must be below 2 \* clipped_count_stddev = 0.4"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()


# --- dp_mean alone ----------------------------------------------------------------------------

def _updates(num, dim=6, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"delta": {"w": jnp.asarray(scale * rng.normal(size=(num, dim)), jnp.float32),
                    "b": jnp.asarray(scale * rng.normal(size=(num, 2)), jnp.float32)},
          "message": None}


def test_without_noise_and_clipping_dp_mean_is_the_uniform_mean():
  updates = _updates(5)
  weights = jnp.arange(1.0, 6.0)  # ignored: DP weighs every client equally
  got = agg.aggregate(agg.dp_mean(1e6, 0.0), updates, weights)
  assert_close(got, agg.aggregate(agg.mean(), updates, jnp.ones(5)), rtol=1e-6, atol=1e-7)
  # the fixed denominator: 5 updates over an expected cohort of 8
  fixed = agg.aggregate(agg.dp_mean(1e6, 0.0), updates, weights, expected_clients=8)
  assert_close(fixed["delta"], jax.tree.map(lambda a: a.sum(0) / 8, updates["delta"]))


def test_clipping_bounds_a_huge_clients_contribution():
  updates = _updates(4)
  huge = jax.tree.map(lambda a: a.at[0].multiply(1e6), updates)
  clip, expected = 0.5, 4
  got = agg.aggregate(agg.dp_mean(clip, 0.0), huge, jnp.ones(4))
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
  rows = np.stack([flat(jax.tree.map(lambda a: a[k], huge)) for k in range(4)])
  clipped = rows * np.minimum(1.0, clip / np.linalg.norm(rows, axis=1, keepdims=True))
  np.testing.assert_allclose(flat(got), clipped.sum(0) / expected, rtol=1e-5, atol=1e-7)
  without = agg.aggregate(agg.dp_mean(clip, 0.0), jax.tree.map(lambda a: a.at[0].set(0.0), huge),
                          jnp.ones(4))
  assert np.linalg.norm(flat(got) - flat(without)) <= clip / expected * (1 + 1e-6)
  # per-layer: each of the L = 2 leaves within C / √2
  layered = agg.aggregate(agg.dp_mean(clip, 0.0, per_layer=True), huge, jnp.ones(4),
                          mask=jnp.array([True, False, False, False]), expected_clients=1)
  for leaf in jax.tree.leaves(layered):
    assert np.linalg.norm(leaf) == pytest.approx(clip / math.sqrt(2), rel=1e-5)


def _noise(rule, expected):
  updates = {"delta": jnp.zeros((3, 200_000), jnp.float32), "message": None}
  return np.asarray(agg.aggregate(rule, updates, jnp.ones(3), expected_clients=expected,
                                  key=jax.random.key(4))["delta"])


def test_noise_on_the_mean_has_std_z_c_over_m():
  """200,000 noised coordinates of a zero mean: the sample std's relative standard error is
  1/√(2n) = 0.16%; the test allows 6 of them (false-failure rate ~2e-9), and the mean 6 SEs."""
  z, clip, expected = 1.5, 2.0, 8.0
  got = _noise(agg.dp_mean(clip, z), expected)
  std = z * clip / expected
  n = got.size
  assert abs(got.std() / std - 1) < 6 / math.sqrt(2 * n)
  assert abs(got.mean()) < 6 * std / math.sqrt(n)


def test_update_noise_is_raised_for_the_released_count():
  """Adaptive clipping with z = 1 and σ_b = 1: the updates get z_Δ = (1 − 1/4)^(−½) = 1.1547
  (same statistical tolerance as above), so that the round as a whole stays at z = 1."""
  got = _noise(agg.dp_mean(2.0, 1.0, target_quantile=0.5, clipped_count_stddev=1.0), 8.0)
  assert abs(got.std() / (2.0 / 8.0 / math.sqrt(0.75)) - 1) < 6 / math.sqrt(2 * got.size)


def test_adaptive_clip_norm_rises_when_most_updates_are_clipped_and_falls_otherwise():
  updates = _updates(50, scale=1.0)  # norms around 2.8
  step = lambda c: agg.aggregate(agg.dp_mean(c, 0.0, target_quantile=0.5, clipped_count_stddev=1.0),
                                 updates, jnp.ones(50), return_state=True)[1]["clip_norm"]
  assert float(step(0.1)) > 0.1 * math.exp(0.2 * 0.4)  # b̄ ≈ 0 < γ: C·exp(+η·γ) up to noise
  assert float(step(100.0)) < 100.0 * math.exp(-0.2 * 0.4)  # b̄ ≈ 1 > γ


def test_adaptive_clip_norm_converges_to_the_target_quantile():
  """Update norms ~ Exp(1) each round; C must settle at their γ-quantile −log(1 − γ)."""
  gamma, clients = 0.7, 500
  rule = agg.dp_mean(0.05, 0.5, target_quantile=gamma, clip_learning_rate=0.2)

  @jax.jit
  def one_round(state, key):
    k_dir, k_norm, k_agg = jax.random.split(key, 3)
    direction = jax.random.normal(k_dir, (clients, 4))
    norms = jax.random.exponential(k_norm, (clients, 1))
    u = {"delta": direction / jnp.linalg.norm(direction, axis=1, keepdims=True) * norms,
         "message": None}
    return agg.aggregate(rule, u, jnp.ones(clients), key=k_agg, state=state,
                         return_state=True)[1]

  state = agg.prepare(rule, agg.CohortInfo(clients, clients, clients)).init(None)
  trace = []
  for key in jax.random.split(jax.random.key(0), 400):
    state = one_round(state, key)
    trace.append(float(state["clip_norm"]))
  assert np.mean(trace[-150:]) == pytest.approx(-math.log(1 - gamma), rel=0.08)


# --- Poisson sampling -------------------------------------------------------------------------

def test_poisson_cohorts_include_each_client_with_probability_q():
  num, q, rounds = 40, 0.2, 4000
  capacity = fs.engine.poisson_capacity(num, q)
  assert stats.binom.sf(capacity, num, q) <= 1e-9 < stats.binom.sf(capacity - 1, num, q)
  draw = jax.jit(jax.vmap(lambda k: fs.engine.cohort.poisson_cohort(k, num, capacity, q)))
  keys = jax.random.split(jax.random.key(1), rounds)
  ids, member, drawn = map(np.asarray, draw(keys))
  counts = np.zeros(num)
  for i, m in zip(ids, member):
    assert len(set(i.tolist())) == capacity  # no client twice
    assert m[:m.sum()].all() and not m[m.sum():].any()  # members first
    counts[i[m]] += 1
  np.testing.assert_array_equal(member.sum(1), drawn)
  # per-client inclusion: binomial(4000, 0.2) sd = 25.3; 6 sd over 40 clients
  assert np.all(np.abs(counts - q * rounds) < 6 * math.sqrt(rounds * q * (1 - q)))
  # the cohort size varies like Binomial(N, q)
  assert drawn.std() == pytest.approx(math.sqrt(num * q * (1 - q)), rel=0.1)
  again = np.asarray(draw(keys)[0])
  np.testing.assert_array_equal(ids, again)


# --- in the engine ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clients():
  xs, ys = classification_clients([5, 9, 6, 12, 7, 8, 10, 6] * 4, seed=3)
  return fs.FederatedData.from_arrays(xs, ys), fs.models.softmax_regression(5, 3)


def test_dp_run_with_poisson_sampling_records_epsilon_and_reports_overflow(clients, monkeypatch):
  """Capacity forced to the mean cohort (q·N = 8 slots) so that some rounds overflow: those
  rounds warn, are listed, and train exactly the slots they have; ε follows the accountant.
  The streamed population gives the same numbers."""
  fd, model = clients
  monkeypatch.setattr(fs.engine, "poisson_capacity", lambda n, q: 8)
  algo = fs.algorithms.fedavg(client_lr=0.2, batch_size=4)
  args = dict(rounds=6, client_fraction=0.25, sampling="poisson", seed=3,
              aggregator=agg.dp_mean(1.0, 0.3, delta=1e-4))
  with pytest.warns(RuntimeWarning, match="drew more clients than the 8 cohort slots"):
    res = fs.simulate(algo, model, fd, **args)
  h = res.history
  drawn = np.array(h["drawn"])
  assert drawn.min() < 8 < drawn.max()  # empty slots in some rounds, overflow in others
  np.testing.assert_array_equal(h["participants"], np.minimum(drawn, 8))
  assert res.info["overflow_rounds"] == [r for r, n in zip(h["round"], drawn) if n > 8] != []
  want = [privacy.epsilon(0.3, 0.25, r, 1e-4) for r in h["round"]]
  np.testing.assert_allclose(h["epsilon"], want, rtol=1e-9)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    streamed = fs.simulate(algo, model, fd, population="host", **args)
  assert_close(streamed.params, res.params, rtol=1e-6, atol=1e-7)


def test_dp_mean_without_noise_is_uniform_fedavg_and_sweeps_take_dp_options_as_data(clients):
  """Run 0 of the sweep (z = 0, a clip norm nothing reaches) equals uniform FedAvg; run 1 is
  noised and clipped, its own ε recorded; the clip norm and noise are per-run data. Secure
  aggregation, also a uniform mean, equals the same run to fixed-point precision."""
  fd, model = clients
  args = dict(rounds=3, clients_per_round=10)
  uniform = fs.simulate(fs.algorithms.fedavg(client_lr=0.2, batch_size=4, weighting="uniform"),
                        model, fd, seed=4, **args)
  runs = fs.simulate_sweep(fs.algorithms.fedavg(client_lr=0.2, batch_size=4), model, fd,
                           seeds=[4, 4], aggregator=agg.dp_mean(1.0, 1.0),
                           aggregator_hparams=[{"noise_multiplier": 0.0, "clip_norm": 1e6}, {}],
                           **args)
  assert_close(runs[0].params, uniform.params, rtol=1e-5, atol=1e-6)
  # secure aggregation's uniform mean, to its fixed-point step (2^-16 per round)
  secure = fs.simulate(fs.algorithms.fedavg(client_lr=0.2, batch_size=4), model, fd, seed=4,
                       aggregator=agg.secure_mean(), **args)
  assert_close(secure.params, uniform.params, rtol=0, atol=1e-4)
  assert secure.history["saturated"] == [0.0] * 3
  assert runs[0].history["epsilon"] == [math.inf] * 3
  assert runs[1].history["epsilon"][-1] == pytest.approx(
      privacy.epsilon(1.0, 10 / 32, 3, 1 / 32 ** 1.1, sampling="fixed", num_clients=32))
  assert float(runs[1].state.aggregator["clip_norm"]) == 1.0
  flat = lambda p: np.concatenate([np.ravel(a) for a in jax.tree.leaves(p)])
  assert np.abs(flat(runs[1].params) - flat(uniform.params)).max() > 1e-2
  with pytest.raises(ValueError, match="has no hparam.*'clip'"):
    fs.simulate_sweep(fs.algorithms.fedavg(), model, fd, seeds=[0], rounds=1,
                      aggregator=agg.dp_mean(1.0, 1.0), aggregator_hparams=[{"clip": 2.0}])


def test_bad_sampling_arguments_are_named(clients):
  fd, model = clients
  algo = fs.algorithms.fedavg()
  with pytest.raises(ValueError, match="sampling must be 'fixed' or 'poisson', got 'bernoulli'"):
    fs.simulate(algo, model, fd, rounds=1, sampling="bernoulli")
  with pytest.raises(ValueError, match="give client_fraction"):
    fs.simulate(algo, model, fd, rounds=1, sampling="poisson", clients_per_round=4)
  with pytest.raises(ValueError, match=r"client_fraction must be in \(0, 1\], got 1.5"):
    fs.simulate(algo, model, fd, rounds=1, sampling="poisson", client_fraction=1.5)
