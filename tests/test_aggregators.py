"""Aggregators (``fedjax_sim.aggregators``): each rule against NumPy through ``aggregate``, the
stages alone, every registered aggregator inside the engine, and the README's custom rule."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators as agg
from fedjax_sim import reference
from helpers import assert_close, assert_equal, classification_clients, to_numpy

README = __file__.rsplit("/tests/", 1)[0] + "/README.md"


def _stacked(num, seed=0):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.normal(size=(num, 3, 2)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(num,)), jnp.float32)}


@pytest.mark.parametrize("num", [5, 6])
def test_median_is_numpy_median_over_unmasked_clients(num):
  updates = _stacked(num + 2)
  mask = np.array([True] * num + [False, False])
  rng = np.random.default_rng(1)
  mask = mask[rng.permutation(num + 2)]
  garbage = jnp.where(jnp.arange(num + 2) % 2 == 0, 1e9, -1e9)  # above and below every value
  poisoned = jax.tree.map(lambda a: jnp.where(mask.reshape(-1, *[1] * (a.ndim - 1)), a,
                                              garbage.reshape(-1, *[1] * (a.ndim - 1))),
                          updates)  # masked slots hold garbage that must not matter
  got = agg.aggregate(agg.median(), poisoned, jnp.ones(num + 2), mask=mask)
  want = jax.tree.map(lambda a: np.median(np.asarray(a)[mask], axis=0), updates)
  assert_close(got, want, rtol=1e-6, atol=1e-6)
  # ties: a coordinate where most clients agree
  tied = {"a": jnp.array([[1.0], [1.0], [1.0], [7.0]])}
  assert float(agg.aggregate(agg.median(), tied, jnp.ones(4))["a"][0]) == 1.0
  # signs, zeros of both signs, huge and tiny magnitudes (the order-preserving integer keys)
  odd = np.array([-0.0, 0.0, -3.5, 1e30, -1e-30, 2.0, -7e25], np.float32)
  for values in (odd, odd[:6]):
    got = agg.aggregate(agg.median(), {"a": jnp.asarray(values)[:, None]}, jnp.ones(len(values)))
    np.testing.assert_array_equal(got["a"], [np.median(values)])


def test_mean_is_the_weighted_mean_and_stream_equals_collect():
  updates, weights = _stacked(7), jnp.arange(1.0, 8.0)
  mask = jnp.array([True, True, False, True, True, True, False])
  got = agg.aggregate(agg.mean(), updates, weights, mask=mask)
  w = np.where(mask, weights, 0.0)
  want = jax.tree.map(lambda a: np.tensordot(w, np.asarray(a), axes=1) / w.sum(), updates)
  assert_close(got, want)
  # the stream stage (weighted sums, then finalize) equals collecting then averaging
  collect_mean = agg.Aggregator("collect_mean", "collect", reduce=lambda u, w_, m, s, *, key:
                                agg.weighted_mean(agg.weighted_sums(u, w_, m)))
  assert_close(agg.aggregate(collect_mean, updates, weights, mask=mask), got, rtol=1e-6, atol=1e-7)


def test_clip_bounds_every_contribution_and_keeps_small_updates():
  updates = {"a": jnp.array([[0.3, 0.4], [30.0, 40.0], [0.0, 0.1]])}  # norms 0.5, 50, 0.1
  clipped = agg.aggregate(agg.clip(1.0), updates, jnp.ones(3))
  np.testing.assert_allclose(clipped["a"], (np.array([0.3, 0.4]) + [0.6, 0.8] + [0.0, 0.1]) / 3,
                             rtol=1e-6)
  big = agg.clip_by_norm({"a": updates["a"][1]}, 1.0)["a"]
  np.testing.assert_allclose(np.linalg.norm(big), 1.0, rtol=1e-6)
  np.testing.assert_allclose(big / np.linalg.norm(big), [0.6, 0.8], rtol=1e-6)  # direction kept
  assert_equal(agg.clip_by_norm({"a": updates["a"][0]}, 1.0), {"a": updates["a"][0]})
  # the norm is over the whole update (every leaf), not per leaf
  two = agg.aggregate(agg.clip(1.0), {"a": jnp.array([[3.0, 0.0]]), "b": jnp.array([[4.0]])},
                      jnp.ones(1))
  np.testing.assert_allclose(np.concatenate([two["a"], two["b"]]), [0.6, 0.0, 0.8], rtol=1e-6)
  # composition: clip then median
  inner = agg.aggregate(agg.clip(1.0, agg.median()), updates, jnp.ones(3))
  np.testing.assert_allclose(inner["a"], [0.3, 0.4], rtol=1e-6)


@pytest.fixture(scope="module")
def population():
  xs, ys = classification_clients([6, 8, 7, 5, 8, 6], seed=2)
  return fs.FederatedData.from_arrays(xs, ys), fs.models.softmax_regression(5, 3)


def test_median_equals_mean_on_identical_clients(population):
  fd, model = population
  x, y = fd.client(1)
  same = fs.FederatedData.from_arrays([x] * 5, [y] * 5)
  algo = fs.algorithms.fedavg(client_lr=0.2, local_epochs=2, batch_size=3, shuffle=False)
  args = dict(rounds=2, clients_per_round=3, seed=0)
  a = fs.simulate(algo, model, same, **args)
  b = fs.simulate(algo, model, same, aggregator=agg.median(), **args)
  assert b.info["aggregator"] == "median"
  assert_close(a.params, b.params, rtol=1e-6, atol=1e-7)


def test_default_and_explicit_mean_are_bit_identical(population):
  fd, model = population
  algo = fs.algorithms.scaffold(client_lr=0.1, local_epochs=2, batch_size=4)
  args = dict(rounds=2, clients_per_round=4, seed=3)
  assert_equal(fs.simulate(algo, model, fd, **args).state,
               fs.simulate(algo, model, fd, aggregator=agg.mean(), **args).state)


# what the factories that need options get (adaptive DP: its state changes every round)
REQUIRED_OPTIONS = {"clip": {"max_norm": 10.0},
                    "dp_mean": {"clip_norm": 1.0, "noise_multiplier": 0.01, "target_quantile": 0.5},
                    "trimmed_mean": {"beta": 0.25}, "krum": {"num_byzantine": 0},
                    "centered_clip": {"tau": 1.0, "iters": 2}, "quantize": {"bits": 8},
                    "top_k": {"fraction": 0.5, "error_feedback": True},
                    "random_k": {"fraction": 0.5}}
FAMILIES = ("fedavg", "scaffold", "fednova")
# One rule of each engine path meets every algorithm family (the message of SCAFFOLD and FedNova
# goes through it): the collect path (median), a stream rule with a server state, an extra leaf
# and uniform weights (adaptive dp_mean), a per-client state (top_k with error feedback). The
# other rules meet one family each, in turn (each case costs a compilation; the suite has a time
# budget).
WITH_STATE = ("median", "dp_mean", "top_k")
STATELESS = sorted(set(agg.REGISTRY) - set(WITH_STATE))
CONTRACT = ([(name, family) for name in WITH_STATE for family in FAMILIES]
            + [(name, FAMILIES[i % 3]) for i, name in enumerate(STATELESS)])


def test_the_contract_covers_every_registered_aggregator_and_family():
  assert {name for name, _ in CONTRACT} == set(agg.REGISTRY)
  assert {family for _, family in CONTRACT} == set(FAMILIES)


@pytest.mark.parametrize("name,algorithm", CONTRACT)
def test_every_aggregator_with_every_algorithm_family(population, name, algorithm):
  """The loss falls and two blocks compile once: the second block takes the first one's output
  state, so one compilation also shows the state kept its tree, shapes and dtypes (a changed
  aval would have compiled again; inside a block, lax.scan enforces it)."""
  fd, model = population
  aggregator = agg.REGISTRY[name](**REQUIRED_OPTIONS.get(name, {}))
  algo = fs.algorithms.REGISTRY[algorithm](client_lr=0.2, local_epochs=2, batch_size=4)
  res = fs.simulate(algo, model, fd, rounds=4, rounds_per_block=2, clients_per_round=4, seed=1,
                    aggregator=aggregator, eval_every=4)
  loss = res.history["train_loss"]
  start = float(model.loss(fs.simulation.initial_params(model, 1), jnp.asarray(fd.x),
                           jnp.asarray(fd.y)))
  assert len(loss) == 1 and loss[0] < 0.95 * start, (name, algorithm, start, loss)
  assert res.info["compilations"] == 1


@pytest.mark.parametrize("plan", ["chunked", "host_loop"])
def test_median_in_the_engine_is_the_median_of_the_client_models(plan):
  """Full participation over two size buckets in chunks of two (six chunks of collect slots):
  the new model is w + median_k(w_k − w) with w_k trained by the NumPy loop."""
  xs, ys = classification_clients([3, 4, 3, 9, 12, 10, 11], seed=6)
  fd, model = fs.FederatedData.from_arrays(xs, ys), fs.models.softmax_regression(5, 3)
  init = to_numpy(fs.simulation.initial_params(model, 0))
  res = fs.simulate(fs.algorithms.fedavg(client_lr=0.3, local_epochs=2, batch_size=4,
                                         shuffle=False), model, fd, rounds=1, plan=plan,
                    chunk_size=2, aggregator=agg.median(), bucketing=True)
  assert res.info["num_buckets"] == 2
  trained = [reference.local_sgd("softmax", init, x, y, 0.3, 2, 4) for x, y in zip(xs, ys)]
  want = jax.tree.map(lambda w, *ws: w + np.median(np.stack(ws) - w, axis=0), init, *trained)
  assert_close(res.params, want)
  # The collect buffer: 8 slots (4 + 4 in chunks of two) × 18 float32 parameters.
  slots = sum(-(-n // 2) * 2 for n in (4, 3))
  assert res.info["collect_bytes"] == slots * 18 * 4


def test_a_collect_buffer_larger_than_the_device_is_refused(population, monkeypatch):
  fd, model = population
  monkeypatch.setattr(fs.simulation, "memory_budget", lambda: 400)  # 4 slots × 72 bytes > 200
  # (a given chunk size: the memory planner, which would refuse this budget first, is not asked)
  with pytest.raises(ValueError, match=r"'median' holds every cohort update at once: 4 slots × 72 bytes = 288 bytes"):
    fs.simulate(fs.algorithms.fedavg(), model, fd, rounds=1, clients_per_round=4,
                aggregator=agg.median(), chunk_size=4)


def test_median_in_sweeps_and_streamed_populations_matches_simulate(population):
  fd, model = population
  algo = fs.algorithms.fedavg(client_lr=0.2, local_epochs=1, batch_size=4)
  args = dict(rounds=3, clients_per_round=4, aggregator=agg.median())
  alone = fs.simulate(algo, model, fd, seed=5, **args)
  streamed = fs.simulate(algo, model, fd, seed=5, population="host", **args)
  assert_equal(alone.params, streamed.params)
  swept = fs.simulate_sweep(algo, model, fd, seeds=[5, 6], **args)
  assert_close(swept[0].params, alone.params, rtol=1e-6, atol=1e-7)


def test_bad_aggregators_are_named(population):
  fd, model = population
  algo = fs.algorithms.fedavg()
  with pytest.raises(ValueError, match="aggregator must be .*got str"):
    fs.simulate(algo, model, fd, rounds=1, aggregator="median")
  with pytest.raises(ValueError, match="reduction must be 'stream' or 'collect', got 'sort'"):
    fs.simulate(algo, model, fd, rounds=1, aggregator=agg.Aggregator("x", "sort"))
  with pytest.raises(ValueError, match="no reduce function"):
    agg.aggregate(agg.Aggregator("x", "collect"), _stacked(3), jnp.ones(3))
  with pytest.raises(ValueError, match="max_norm must be a positive finite number, got -1.0"):
    agg.clip(-1.0)
  with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
    agg.aggregate(agg.mean(), _stacked(3), jnp.ones(4))


def test_readme_custom_aggregator_runs_as_written(population, capsys):
  """The README's custom rule, executed exactly as printed, then used in simulations: a bound no
  update reaches is FedAvg, a bound every update exceeds leaves the model where it started."""
  text = open(README).read()
  block = re.search(r"<!-- custom-aggregator:start -->\n```python\n(.*?)```", text, re.S).group(1)
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)
  printed = [float(v) for v in re.findall(r"[-\d.]+e?-?\d*", capsys.readouterr().out.split("[")[1])]
  np.testing.assert_allclose(printed[:2], [0.7 / 3, 0.2 / 3], rtol=1e-5)
  fd, model = population
  algo = fs.algorithms.fedavg(client_lr=0.2, batch_size=4)
  args = dict(rounds=2, clients_per_round=4)
  rule = namespace["norm_bounded_mean"]
  assert_close(fs.simulate(algo, model, fd, aggregator=rule(1e9), **args).params,
               fs.simulate(algo, model, fd, **args).params, rtol=1e-6, atol=1e-7)
  assert_equal(fs.simulate(algo, model, fd, aggregator=rule(1e-9), **args).params,
               fs.simulation.initial_params(model, 0))
