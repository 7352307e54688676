"""Byzantine attacks (``fedjax_sim.attacks``): each replacement against its formula, the fixed
Byzantine set, and in the engine: robust rules under attack, the omniscient path and label
flipping against exact oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import fedjax_sim as fs
from fedjax_sim import aggregators as agg
from fedjax_sim import attacks
from helpers import assert_close, classification_clients


def _stacked(num=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"delta": {"w": jnp.asarray(rng.normal(size=(num, 4, 3)), jnp.float32)},
          "message": None}


def test_each_attack_replaces_only_attackers_by_its_formula():
  updates = _stacked()
  w = np.asarray(updates["delta"]["w"])
  bad = np.array([1, 0, 0, 1, 0, 0, 0, 0], bool)
  mask = np.array([1, 1, 1, 1, 1, 1, 0, 1], bool)  # slot 6 did not return
  honest = mask & ~bad
  got = lambda attack: np.asarray(attacks.apply(attack, updates, bad, mask=mask,
                                                key=jax.random.key(1))["delta"]["w"])
  np.testing.assert_array_equal(got(attacks.sign_flip(scale=3.0))[~bad], w[~bad])
  np.testing.assert_allclose(got(attacks.sign_flip(scale=3.0))[bad], -3.0 * w[bad], rtol=1e-6)
  np.testing.assert_allclose(got(attacks.scaling(factor=10.0))[bad], 10.0 * w[bad], rtol=1e-6)
  noise = np.asarray(attacks.apply(attacks.gaussian(std=2.0),
                                   {"w": jnp.zeros((2, 50_000))}, np.array([True, False]))["w"])
  assert noise[0].std() == pytest.approx(2.0, rel=0.02) and not noise[1].any()
  mu, sigma = w[honest].mean(0), w[honest].std(0)
  np.testing.assert_allclose(got(attacks.ipm(epsilon=0.5))[bad], np.stack([-0.5 * mu] * 2),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got(attacks.alie(z=1.5))[bad], np.stack([mu - 1.5 * sigma] * 2),
                             rtol=1e-5, atol=1e-6)
  # the default z: n = 7 returned, f = 2 attackers: s = ⌊7/2 + 1⌋ − 2 = 2, z = Φ⁻¹(5/7)
  z = stats.norm.ppf(5 / 7)
  np.testing.assert_allclose(got(attacks.alie())[bad], np.stack([mu - z * sigma] * 2),
                             rtol=1e-5, atol=1e-5)


def test_the_byzantine_set_is_fixed_exact_and_drawn_from_the_key():
  key = jax.random.key(3)
  a = np.asarray(attacks.members(attacks.sign_flip(0.3), key, 50))
  assert a.sum() == 15
  np.testing.assert_array_equal(a, np.asarray(attacks.members(attacks.sign_flip(0.3), key, 50)))
  assert not np.array_equal(a, np.asarray(attacks.members(attacks.sign_flip(0.3),
                                                          jax.random.key(4), 50)))
  explicit = np.asarray(attacks.members(attacks.ipm(ids=[2, 7]), key, 10))
  np.testing.assert_array_equal(np.flatnonzero(explicit), [2, 7])


@pytest.fixture(scope="module")
def population():
  xs, ys = classification_clients([20] * 30, seed=0)
  return fs.FederatedData.from_arrays(xs, ys), fs.models.softmax_regression(5, 3)


def test_robust_rules_resist_a_scaled_sign_flip_that_breaks_the_mean(population):
  """20 % of the population flips and scales its updates by 4: the mean's accuracy collapses,
  the median and the trimmed mean stay within a few points of the clean run (Krum's selection is
  checked against NumPy in tests/test_robust.py, its robustness in benchmarks/robustness.py)."""
  fd, model = population
  algo = fs.algorithms.fedavg(client_lr=0.2, batch_size=10)
  run = lambda aggregator=None, attack=None: fs.simulate(
      algo, model, fd, rounds=12, clients_per_round=15, seed=0, eval_every=12,
      aggregator=aggregator, attack=attack)
  accuracy = lambda res: res.history["train_accuracy"][-1]
  flip = attacks.sign_flip(0.2, scale=4.0)
  clean = accuracy(run())
  attacked = run(attack=flip)
  assert attacked.history["attackers"][-1] > 0
  assert accuracy(attacked) < clean - 0.3
  for rule in [agg.median(), agg.trimmed_mean(0.25)]:
    assert accuracy(run(rule, flip)) > clean - 0.04, rule.name


@pytest.fixture(scope="module")
def small():
  xs, ys = classification_clients([6, 9, 7, 5, 8, 6], seed=4)
  return xs, ys, fs.models.softmax_regression(5, 3)


def test_omniscient_attack_on_the_mean_is_exact(small):
  """IPM with ε = −1 sends the honest mean; under uniform weights and full participation the
  aggregate is then the honest clients' mean: the run equals FedAvg on the honest clients alone."""
  xs, ys, model = small
  algo = fs.algorithms.fedavg(client_lr=0.3, batch_size=4, shuffle=False, weighting="uniform")
  attacked = fs.simulate(algo, model, fs.FederatedData.from_arrays(xs, ys), rounds=2,
                         attack=attacks.ipm(epsilon=-1.0, ids=[0, 3]))
  honest = fs.simulate(algo, model, fs.FederatedData.from_arrays(
      [x for i, x in enumerate(xs) if i not in (0, 3)],
      [y for i, y in enumerate(ys) if i not in (0, 3)]), rounds=2)
  assert attacked.history["attackers"] == [2.0, 2.0]
  assert_close(attacked.params, honest.params, rtol=1e-5, atol=1e-6)


def test_label_flip_trains_attackers_on_flipped_labels(small):
  xs, ys, model = small
  algo = fs.algorithms.fedavg(client_lr=0.3, batch_size=4)
  poisoned = fs.simulate(algo, model, fs.FederatedData.from_arrays(xs, ys), rounds=2,
                         clients_per_round=4, seed=1, attack=attacks.label_flip(ids=[1, 4]))
  flipped = [2 - y if i in (1, 4) else y for i, y in enumerate(ys)]
  by_hand = fs.simulate(algo, model, fs.FederatedData.from_arrays(xs, flipped), rounds=2,
                        clients_per_round=4, seed=1)
  assert_close(poisoned.params, by_hand.params, rtol=1e-6, atol=1e-7)


def test_bad_attacks_are_named(small):
  xs, ys, model = small
  fd = fs.FederatedData.from_arrays(xs, ys)
  algo = fs.algorithms.fedavg()
  cases = [
      (lambda: attacks.sign_flip(1.0), r"fraction must be in \[0, 1\), got 1.0"),
      (lambda: attacks.alie(-0.1), r"fraction must be in \[0, 1\), got -0.1"),
      (lambda: attacks.scaling(0.1, factor=-2.0), "factor must be a positive finite number"),
      (lambda: fs.simulate(algo, model, fd, rounds=1, attack="sign_flip"),
       "attack must be a fedjax_sim.attacks.Attack"),
      (lambda: fs.simulate(algo, model, fd, rounds=1, attack=attacks.ipm(ids=[9])),
       "attack ids must be below the population size 6, got 9"),
      (lambda: fs.simulate(algo, fs.models.logistic_regression(5), fs.FederatedData.from_arrays(
          xs, [(y > 0).astype(np.int32) for y in ys]), rounds=1, attack=attacks.label_flip(0.2)),
       "needs a multiclass model"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
