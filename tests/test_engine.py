"""The engine against a plain NumPy FedAvg and the reference identities I1–I4."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import reference
from fedjax_sim.datasets import logistic_demo
from fedjax_sim.simulation import STREAM_TRAIN

from helpers import assert_close as _close
from helpers import classification_clients as _classification_clients
from helpers import random_params as _random_params
from helpers import to_numpy as _np


def test_worked_single_step():
  fd = fs.FederatedData.from_arrays([np.array([[2.0]])], [np.array([3.0])])
  model = fs.models.linear_regression(1, use_bias=False)
  algo = fs.algorithms.fedavg(client_lr=0.1, batch_size=1)
  res = fs.simulate(algo, model, fd, rounds=1, init_params={"kernel": jnp.array([[0.5]])})
  np.testing.assert_allclose(res.params["kernel"], [[0.9]], rtol=1e-6)


@pytest.mark.parametrize("batch_size,epochs", [(4, 2), (None, 1)])
def test_matches_numpy_fedavg(batch_size, epochs):
  """In-order batches, unequal client sizes, partial last batches, several rounds."""
  sizes = [7, 12, 3, 9]
  xs, ys = _classification_clients(sizes)
  fd = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.softmax_regression(5, 3)
  init = _random_params(model)
  algo = fs.algorithms.fedavg(client_lr=0.3, local_epochs=epochs, batch_size=batch_size,
                              shuffle=False)
  res = fs.simulate(algo, model, fd, rounds=4, init_params=init)
  expected = reference.fedavg("softmax", _np(init), list(zip(xs, ys)), rounds=4, lr=0.3,
                              epochs=epochs, batch_size=batch_size)
  _close(res.params, expected)


def test_matches_numpy_mlp_with_sampled_cohort():
  """A 2-layer MLP, 3 of 6 clients per round: the reference replays the engine's cohorts."""
  sizes = [5, 9, 6, 11, 4, 8]
  xs, ys = _classification_clients(sizes, seed=3)
  fd = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.mlp(5, (8,), 3)
  init = _random_params(model)
  algo = fs.algorithms.fedavg(client_lr=0.2, local_epochs=2, batch_size=4, shuffle=False)
  res = fs.simulate(algo, model, fd, rounds=3, clients_per_round=3, init_params=init, seed=5)
  train_key = jax.random.fold_in(jax.random.key(5), STREAM_TRAIN)
  def cohort(r):
    key = jax.random.split(jax.random.fold_in(train_key, r), 3)[0]
    return sorted(np.asarray(fs.engine.sample_cohort(key, 6, 3)).tolist())
  expected = reference.fedavg("mlp", _np(init), list(zip(xs, ys)), rounds=3, lr=0.2, epochs=2,
                              batch_size=4, cohort=cohort)
  _close(res.params, expected)


def test_linear_regression_matches_numpy_uniform_weighting():
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (5, 8, 13)]
  ys = [(x @ np.array([1.0, -2.0, 0.5]) + 0.1).astype(np.float32) for x in xs]
  fd = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.linear_regression(3)
  algo = fs.algorithms.fedavg(client_lr=0.05, local_epochs=3, batch_size=3, shuffle=False,
                              weighting="uniform")
  res = fs.simulate(algo, model, fd, rounds=3)
  init = _np(model.init(jax.random.key(0)))
  expected = reference.fedavg("linear", init, list(zip(xs, ys)), rounds=3, lr=0.05, epochs=3,
                              batch_size=3, weighting="uniform")
  _close(res.params, expected)


def _pooled_gd_step(model, params, fd, lr):
  g = jax.grad(model.loss)(params, jnp.asarray(fd.x), jnp.asarray(fd.y))
  return jax.tree.map(lambda p, q: p - lr * q, params, g)


def test_i1_full_batch_fedavg_is_one_gd_step_and_two_epochs_are_not():
  xs, ys = _classification_clients([6, 10, 3])
  fd = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.softmax_regression(5, 3)
  init = _random_params(model)
  expected = _pooled_gd_step(model, init, fd, 0.5)
  one = fs.simulate(fs.algorithms.fedavg(client_lr=0.5, batch_size=None), model, fd, rounds=1,
                    init_params=init)
  _close(one.params, expected)
  two = fs.simulate(fs.algorithms.fedavg(client_lr=0.5, batch_size=None, local_epochs=2), model,
                    fd, rounds=1, init_params=init)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(two.params), jax.tree.leaves(expected)))
  assert diff > 1e-3, "two local steps must drift away from one pooled GD step"


def test_i2_fedsgd_equals_full_batch_fedavg():
  xs, ys = _classification_clients([6, 10, 3, 7])
  fd = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.softmax_regression(5, 3)
  init = _random_params(model)
  a = fs.simulate(fs.algorithms.fedsgd(server_lr=0.4), model, fd, rounds=3, init_params=init)
  b = fs.simulate(fs.algorithms.fedavg(client_lr=0.4, batch_size=None), model, fd, rounds=3,
                  init_params=init)
  _close(a.params, b.params)


def test_i3_local_sgd_h1_is_one_sgd_step_on_union_batch():
  xs, ys = _classification_clients([4, 4, 4, 4])
  fd = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.softmax_regression(5, 3)
  init = _random_params(model)
  res = fs.simulate(fs.algorithms.local_sgd(client_lr=0.7, local_steps=1, batch_size=4), model, fd,
                    rounds=1, init_params=init)
  _close(res.params, _pooled_gd_step(model, init, fd, 0.7))


def test_i4_identical_clients_equal_single_client_sgd():
  xs, ys = _classification_clients([9])
  model = fs.models.mlp(5, (6,), 3)
  init = _random_params(model)
  algo = fs.algorithms.fedavg(client_lr=0.3, local_epochs=2, batch_size=4, shuffle=False)
  many = fs.simulate(algo, model, fs.FederatedData.from_arrays(xs * 5, ys * 5), rounds=2,
                     init_params=init)
  one = fs.simulate(algo, model, fs.FederatedData.from_arrays(xs, ys), rounds=2, init_params=init)
  _close(many.params, one.params, rtol=1e-6, atol=1e-6)


def test_logistic_demo_reaches_documented_loss():
  fd = logistic_demo()
  model = fs.models.logistic_regression(4, use_bias=False)
  algo = fs.algorithms.fedavg(client_lr=0.1, local_epochs=2, batch_size=64)
  res = fs.simulate(algo, model, fd, rounds=12, client_fraction=0.6)
  assert res.info["cohort_size"] == 3
  assert 0.57 < res.history["train_loss"][0] < 0.65
  assert 0.38 < res.history["train_loss"][-1] < 0.45
  assert res.history["round"] == list(range(1, 13))
  assert res.history["train_accuracy"][-1] > 0.75


@pytest.mark.parametrize("method", ["fisher_yates", "sort"])
def test_shuffled_epochs_are_permutations_of_each_client(method):
  """Every example of a client is used exactly once per epoch, in a random order."""
  from fedjax_sim import client as client_lib
  shape = client_lib.BucketShape(max_examples=11, batch=4, num_steps=9, num_epochs=3)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(4))
  n = jnp.array([11, 7, 1, 0])
  orders = np.asarray(client_lib.epoch_orders(keys, n, shape, True, method))
  for c, n_c in enumerate([11, 7, 1]):
    for e in range(3):
      assert sorted(orders[c, e, :n_c]) == list(range(n_c))
  assert not np.array_equal(orders[0, 0], orders[0, 1]), "epochs must reshuffle"
  # A client's permutation does not depend on the padded length of its bucket.
  wider = np.asarray(client_lib.epoch_orders(keys, n, shape._replace(max_examples=20), True,
                                             method))
  np.testing.assert_array_equal(wider[1, :, :7], orders[1, :, :7])


def test_shared_bucket_chunks_draw_each_clients_own_permutation():
  """A shared bucket draws a chunk's orders at the width of the smallest part that fits it; every
  client still gets the permutation it gets at any other width, e.g. in its own size group's
  bucket.
  (The sort and Fisher–Yates permutations themselves are :func:`client.orders_from_draws`,
  shared with ``epoch_orders`` and tested above.)"""
  from fedjax_sim import client as client_lib
  from fedjax_sim.engine import jobs
  algo = fs.algorithms.fedavg(batch_size=4, local_steps=6)
  sizes = np.array([2, 3, 5, 9, 17, 30, 31])
  groups = fs.engine.size_buckets(sizes)
  [bucket], _, _ = fs.engine.make_buckets(sizes, algo, 7, 2, "auto", rounds=10)
  assert len(bucket.parts) == len(groups) > 2 and bucket.shape.max_examples == 31
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(7))
  draw = jax.jit(lambda k, n: jobs.chunk_orders(k, n, bucket.shape, bucket.parts, True, "sort"))
  # Drawn at the full width (the same as at its own group's width: tested above).
  want = np.asarray(jax.jit(lambda k, n: client_lib.epoch_orders(k, n, bucket.shape, True, "sort"))(
      keys, jnp.asarray(sizes)))
  for chunk in ([0, 1], [2, 3], [3, 4], [5, 6]):  # small chunks, a chunk across two parts
    got = np.asarray(draw(keys[np.array(chunk)], jnp.asarray(sizes[chunk])))
    assert got.shape == want[:2].shape
    for i, c in enumerate(chunk):
      np.testing.assert_array_equal(got[i, :, :sizes[c]], want[c, :, :sizes[c]])


def test_shared_bucket_slots_are_ordered_by_size():
  from fedjax_sim.engine import buckets
  sizes = np.array([40, 3, 9, 3, 25, 6, 1, 12])
  algo = fs.algorithms.fedavg(batch_size=4)
  [bucket], bucket_of, _ = fs.engine.make_buckets(sizes, algo, 6, 2, "auto", rounds=10)
  cohort = jnp.array([0, 2, 3, 4, 6, 7])
  ids, pos = buckets.bucket_slots(cohort, jnp.asarray(bucket_of), 0, bucket, jnp.asarray(sizes))
  assert ids.shape == (3, 2)
  np.testing.assert_array_equal(np.asarray(ids).ravel(), [6, 3, 2, 7, 4, 0])
  np.testing.assert_array_equal(np.asarray(cohort)[np.asarray(pos).ravel()], [6, 3, 2, 7, 4, 0])


def test_sort_shuffle_is_uniform_over_positions():
  """Across many keys, each example lands in each position about equally often."""
  from fedjax_sim import client as client_lib
  shape = client_lib.BucketShape(max_examples=6, batch=2, num_steps=3, num_epochs=1)
  keys = jax.random.split(jax.random.key(1), 6000)
  orders = np.asarray(client_lib.epoch_orders(keys, jnp.full(6000, 5), shape, True, "sort"))
  counts = np.stack([(orders[:, 0, :5] == v).sum(0) for v in range(5)])  # [value, position]
  np.testing.assert_allclose(counts / 6000, 0.2, atol=0.025)


def test_cohort_sampling_is_uniform_without_replacement():
  keys = jax.random.split(jax.random.key(0), 4000)
  cohorts = np.asarray(jax.vmap(lambda k: fs.engine.sample_cohort(k, 10, 3))(keys))
  assert all(len(set(c)) == 3 for c in cohorts)
  counts = np.bincount(cohorts.ravel(), minlength=10) / len(cohorts)
  np.testing.assert_allclose(counts, 0.3, atol=0.03)


def test_size_buckets_bound_padding():
  sizes = np.array([3, 4, 5, 9, 17, 30, 120, 400, 401, 800])
  algo = fs.algorithms.fedavg(batch_size=4)
  groups = fs.engine.size_buckets(sizes)
  assert sorted(np.concatenate(groups).tolist()) == list(range(len(sizes)))
  for g in groups:
    assert sizes[g].max() <= 2 * sizes[g].min()
  assert fs.engine.padding_waste(sizes, groups, algo) < 0.5 < fs.engine.padding_waste(
      sizes, [np.arange(len(sizes))], algo)


def test_shared_bucket_padding_is_its_sorted_chunks_rounding():
  """A shared bucket pads a client only to its chunk's largest (the cohort sorted by size)."""
  algo = fs.algorithms.fedavg(local_epochs=1, batch_size=1)  # steps = examples
  sizes = np.array([5, 1, 7, 3, 2, 6, 4])
  # whole population each round, chunks of 3: [1 2 3] [4 5 6] [7] -> 3·3 + 6·3 + 7 = 34 of 28
  waste = fs.engine.shared_padding_waste(sizes, algo, cohort_size=7, chunk=3)
  np.testing.assert_allclose(waste, 34 / 28 - 1)
  assert fs.engine.shared_padding_waste(sizes, algo, cohort_size=7, chunk=1) == 0.0
  power_law = np.random.default_rng(0).pareto(1.5, 2000).astype(int) * 4 + 4
  one_bucket = fs.engine.padding_waste(power_law, [np.arange(power_law.size)], algo)
  shared = fs.engine.shared_padding_waste(power_law, algo, cohort_size=200, chunk=32)
  assert 0 < shared < one_bucket / 10


def test_auto_bucketing_merges_groups_that_do_not_pay_for_their_compilation():
  """A short run compiles one bucket; a long one keeps the groups whose smaller clients would
  otherwise run many padded steps, merging only where the saving is below one compilation."""
  from fedjax_sim.engine import buckets
  sizes = np.random.default_rng(0).integers(8, 800, 2000)
  algo = fs.algorithms.fedavg(batch_size=8)
  groups = fs.engine.size_buckets(sizes)
  merge = lambda rounds, flops=0.0: buckets.merge_groups(groups, sizes, algo, 200, rounds, flops)
  assert len(groups) > 3 and len(merge(5)) == 1
  long = merge(2000)
  assert 1 < len(long) < len(groups)
  assert len(merge(2000, flops=1e7)) > len(long)  # costlier steps keep more buckets
  steps = lambda g: -(-sizes[g].max() // 8)
  for a, b in zip(long, long[1:]):  # every kept split saves more than a compilation
    saved = 2000 * 200 * len(a) / len(sizes) * (steps(b) - steps(a)) * buckets.STEP_SECONDS
    assert saved >= buckets.BUCKET_COMPILE_SECONDS
  assert sorted(np.concatenate(long).tolist()) == list(range(len(sizes)))


def test_local_steps_cycle_through_in_order_epochs():
  """H = 5 steps of B = 3 on clients of 4 and 7 examples: batches wrap into the next epoch."""
  xs, ys = _classification_clients([4, 7])
  fd = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.softmax_regression(5, 3)
  init = _random_params(model)
  algo = fs.algorithms.local_sgd(client_lr=0.3, local_steps=5, batch_size=3, shuffle=False)
  res = fs.simulate(algo, model, fd, rounds=2, init_params=init)
  w = _np(init)
  for _ in range(2):
    finals = []
    for x, y in zip(xs, ys):
      batches = [(s, min(s + 3, len(x))) for s in range(0, len(x), 3)]
      wk = w
      for t in range(5):
        lo, hi = batches[t % len(batches)]
        g = reference.grad("softmax", wk, x[lo:hi], y[lo:hi])
        wk = jax.tree.map(lambda p, q: p - 0.3 * q, wk, g)
      finals.append(wk)
    w = jax.tree.map(lambda a, b: (a + b) / 2, *finals)  # uniform weighting
  _close(res.params, w)


def test_masked_steps_leave_adaptive_optimizer_state_alone():
  """Adam on the clients, momentum on the server: padding a small client into a big client's
  bucket (bucketing=False) must not change anything."""
  xs, ys = _classification_clients([3, 5, 20, 41])
  fd = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.softmax_regression(5, 3)
  algo = fs.algorithms.fedavg(batch_size=4, local_epochs=2, client_optimizer=optax.adam(0.05),
                              server_optimizer=optax.sgd(1.0, momentum=0.9))
  a = fs.simulate(algo, model, fd, rounds=3, clients_per_round=3, seed=1, bucketing=True)
  b = fs.simulate(algo, model, fd, rounds=3, clients_per_round=3, seed=1, bucketing=False)
  assert a.info["num_buckets"] > 1 and b.info["num_buckets"] == 1
  _close(a.params, b.params)
