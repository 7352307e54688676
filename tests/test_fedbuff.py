"""FedBuff: zero staleness is FedAvg, a round replayed from the buffered models, the staleness
distributions and their key stream, convergence against synchronous FedAvg at equal client work,
and bad options named. (Host loop ≡ compiled: ``tests/test_plans.py::HOST_LOOP_CASES``.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import algorithms as alg
from fedjax_sim.algorithms.fedbuff import draw_staleness, staleness_probabilities
from helpers import assert_equal, round_keys

ROUNDS, COHORT, EPOCHS, LR = 30, 5, 3, 0.05
S, MEAN = 4, 1.5  # geometric staleness, truncated at S


def _least_squares_clients(num_clients=20, n=12, dim=5, seed=0):
  """Heterogeneous linear-regression clients (each its own true weights): a convex problem."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=dim)
  xs = [rng.normal(scale=1.0 + 0.05 * i, size=(n, dim)).astype(np.float32)
        for i in range(num_clients)]
  ys = [(x @ (base + 0.2 * rng.normal(size=dim)) + 0.1 * rng.normal(size=n)).astype(np.float32)
        for x in xs]
  return xs, ys


@pytest.fixture(scope="module")
def convex():
  xs, ys = _least_squares_clients()
  fd, model = fs.FederatedData.from_arrays(xs, ys), fs.models.linear_regression(5)
  run = lambda algo, rounds=ROUNDS: fs.simulate(algo, model, fd, rounds=rounds,
                                                clients_per_round=COHORT, seed=4)
  # Equal client work: same rounds, cohort and local epochs (full-batch GD, EPOCHS steps).
  kw = dict(client_lr=LR, local_epochs=EPOCHS, batch_size=None, weighting="uniform")
  buff = alg.fedbuff(max_staleness=S, staleness="geometric", mean_staleness=MEAN, **kw)
  return dict(xs=xs, ys=ys, model=model, run=run, fedavg=run(alg.fedavg(**kw)),
              fedbuff=run(buff), fedbuff_prev=run(buff, ROUNDS - 1))


def test_zero_staleness_is_fedavg_bit_for_bit(convex):
  kw = dict(client_lr=LR, local_epochs=EPOCHS, batch_size=None)
  for buff in (alg.fedbuff(max_staleness=0, **kw),  # no buffer at all
               # a buffer of 3 models, but every arrival fresh: s(0) = 1 and w^{t-0} = w^t
               alg.fedbuff(max_staleness=3, staleness=[1, 0, 0, 0], **kw)):
    res = convex["run"](buff)
    assert_equal(convex["fedavg"].params, res.params)
    assert convex["fedavg"].history["train_loss"] == res.history["train_loss"]


def test_a_round_replayed_from_the_buffered_models(convex):
  """Round T (the last) by hand: each cohort client draws τ from its own key of the documented
  stream, starts from the buffered w^{T−1−τ} (read from the run that stopped one round
  earlier), takes EPOCHS full-batch GD steps; the server adds mean_k s(τ_k) Δ_k."""
  prev, last, model = convex["fedbuff_prev"], convex["fedbuff"], convex["model"]
  t = ROUNDS
  # The ring after T−1 steps: slot n mod S holds w^n; w^{T−1} is the current model.
  assert int(prev.state.extra["steps"]) == t - 1 and int(last.state.extra["steps"]) == t
  ring = prev.state.extra["models"]
  model_at = lambda n: (prev.params if n == t - 1 else
                        jax.tree.map(lambda m: m[n % S], ring))
  # ... and after step T it holds w^{T−1} in slot (T−1) mod S, the other slots unchanged.
  pushed = jax.tree.map(lambda m, p: m.at[(t - 1) % S].set(p), ring, prev.params)
  assert_equal(pushed, last.state.extra["models"])

  keys = round_keys(4, t)
  ids = np.asarray(fs.engine.sample_cohort(keys.sample, 20, COHORT))
  probs = staleness_probabilities("geometric", S, MEAN)
  taus = [int(draw_staleness(jax.random.fold_in(keys.client_start, int(k)), probs, t - 1))
          for k in ids]
  assert max(taus) >= 2, taus  # the round really mixes stale starts

  grad = jax.jit(jax.grad(model.loss))
  def delta(k, start):
    x, y = convex["xs"][k], convex["ys"][k]
    w = start
    for _ in range(EPOCHS):
      w = jax.tree.map(lambda p, g: p - LR * g, w, grad(w, x, y, jnp.ones(len(x), bool)))
    return jax.tree.map(jnp.subtract, w, start)

  def replay(taus):
    terms = [jax.tree.map(lambda d, s=(1.0 + tau) ** -0.5: s * d, delta(k, model_at(t - 1 - tau)))
             for k, tau in zip(ids, taus)]
    mean = jax.tree.map(lambda *d: sum(d) / len(d), *terms)
    return jax.tree.map(jnp.add, prev.params, mean)

  for a, b in zip(jax.tree.leaves(replay(taus)), jax.tree.leaves(last.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  fresh = replay([0] * COHORT)  # had every client started from w^{T−1}: another model
  assert not np.allclose(jax.tree.leaves(fresh)[0], jax.tree.leaves(last.params)[0], rtol=1e-4)


def test_staleness_still_converges_at_equal_client_work(convex):
  """FedBuff with geometric staleness (mean 1.5, at most 4 server steps) against synchronous
  FedAvg, both ROUNDS rounds × COHORT clients × EPOCHS full-batch steps, measured by the gap to
  the least-squares optimum of the whole population (mean over the last 10 rounds: a sampled
  cohort of heterogeneous clients keeps both jittering around it)."""
  x, y = np.concatenate(convex["xs"]), np.concatenate(convex["ys"])
  a = np.c_[x, np.ones(len(x))].astype(np.float64)
  best = 0.5 * np.mean((a @ np.linalg.lstsq(a, y, rcond=None)[0] - y) ** 2)
  start = 0.5 * np.mean(y.astype(np.float64) ** 2)  # the model starts at zero
  gap = lambda res: np.mean(res.history["train_loss"][-10:]) - best
  sync, buff = gap(convex["fedavg"]), gap(convex["fedbuff"])
  print(f"loss at start {start:.4f}, optimum {best:.4f}; gap over the last 10 rounds: "
        f"FedAvg {sync:.4f}, FedBuff {buff:.4f}")
  assert np.all(np.isfinite(convex["fedbuff"].history["train_loss"]))
  assert 0 < buff < 0.05 * (start - best)  # it converges ...
  assert buff < 1.5 * sync  # ... about as close as synchronous FedAvg at equal client work
  assert convex["fedbuff"].history["train_loss"] != convex["fedavg"].history["train_loss"]


def test_staleness_distributions_and_their_draws():
  np.testing.assert_allclose(staleness_probabilities("uniform", 3), [0.25] * 4)
  geo = np.array([1, 1 / 2, 1 / 4, 1 / 8])
  np.testing.assert_allclose(staleness_probabilities("geometric", 3, 1.0), geo / geo.sum())
  poi = np.array([2.0 ** k / math.factorial(k) for k in range(5)])
  np.testing.assert_allclose(staleness_probabilities("poisson", 4, 2.0), poi / poi.sum())
  np.testing.assert_allclose(staleness_probabilities([1, 3], 1), [0.25, 0.75])
  keys = jax.random.split(jax.random.key(0), 20000)
  probs = staleness_probabilities("poisson", 4, 2.0)
  draws = np.asarray(jax.vmap(lambda k: draw_staleness(k, probs, 100))(keys))
  np.testing.assert_allclose(np.bincount(draws, minlength=5) / len(draws), probs, atol=0.015)
  early = np.asarray(jax.vmap(lambda k: draw_staleness(k, probs, 1))(keys))  # one step so far
  assert set(early.tolist()) == {0, 1}
  np.testing.assert_array_equal(early, np.minimum(draws, 1))  # the same draws, truncated


@pytest.mark.parametrize("kwargs, message", [
    (dict(staleness="normal"), "'normal'"),
    (dict(staleness="geometric"), "needs mean_staleness"),
    (dict(staleness="uniform", mean_staleness=2.0), "mean_staleness=2.0"),
    (dict(staleness="poisson", mean_staleness=-1.0), "mean_staleness must be"),
    (dict(max_staleness=-1), "max_staleness must be an integer >= 0, got -1"),
    (dict(max_staleness=2.5), "got 2.5"),
    (dict(max_staleness=2, staleness=[0.5, 0.5]), "3 non-negative numbers"),
    (dict(max_staleness=1, staleness=[1.0, -0.5]), "[1.0, -0.5]"),
    (dict(staleness_exponent=-1), "staleness_exponent must be"),
    (dict(server_lr=0.0), "server_lr must be"),
    (dict(weighting="sizes"), "'sizes'"),
])
def test_bad_options_are_named(kwargs, message):
  with pytest.raises(ValueError, match=None) as err:
    alg.fedbuff(**kwargs)
  assert message in str(err.value), str(err.value)
