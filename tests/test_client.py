"""One client's local training (``fedjax_sim.client``): shuffles, the step schedule τ_k, and the
shuffled path against a NumPy reference that replays the engine's own epoch orders."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import client as client_lib
from fedjax_sim import reference
from helpers import (assert_close, classification_clients, cohort, random_params, replay_orders,
                     to_numpy)


@pytest.mark.parametrize("sizes,batch_size,method", [
    ([7, 12, 9, 13, 8, 10], 3, "fisher_yates"),
    ([140, 270, 200, 150], 64, "sort"),  # a client above SORT_SHUFFLE_ABOVE switches the method
])
def test_shuffled_fedavg_matches_numpy_replaying_the_engines_orders(sizes, batch_size, method):
  """E = 2 reshuffled epochs, unequal sizes with partial last batches, a sampled cohort, several
  rounds (one size bucket: tests/test_plans.py shows bucketing changes nothing):
  the reference trains on exactly the permutations the engine drew (by global client id)."""
  assert client_lib.shuffle_method(max(sizes)) == method
  xs, ys = classification_clients(sizes, seed=4)
  clients = list(zip(xs, ys))
  model = fs.models.softmax_regression(5, 3)
  init = random_params(model)
  algo = fs.algorithms.fedavg(client_lr=0.2, local_epochs=2, batch_size=batch_size)
  m, seed = len(sizes) - 2, 7
  res = fs.simulate(algo, model, fs.FederatedData.from_arrays(xs, ys), rounds=3,
                    clients_per_round=m, init_params=init, seed=seed)
  expected = reference.fedavg("softmax", to_numpy(init), clients, rounds=3, lr=0.2, epochs=2,
                              batch_size=batch_size,
                              cohort=lambda r: cohort(seed, r, len(sizes), m),
                              orders=replay_orders(seed, clients, 2, method))
  assert_close(res.params, expected)
  in_order = reference.fedavg("softmax", to_numpy(init), clients, rounds=3, lr=0.2, epochs=2,
                              batch_size=batch_size, cohort=lambda r: cohort(seed, r, len(sizes), m))
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(in_order),
                                                  jax.tree.leaves(expected))) > 1e-3


def test_sort_shuffle_is_a_stable_argsort():
  """``stable_argsort_bits`` (one sort of 64-bit keys) is ``argsort(kind="stable")`` of the 32-bit
  draws, ties broken by position included: random rows, a run of equal keys, all-padding tails
  (``0xFFFFFFFF``, as ``orders_from_draws`` sets them) and rows of only four distinct keys."""
  rng = np.random.default_rng(5)
  bits = rng.integers(0, 2**32, size=(3, 4, 300), dtype=np.uint64).astype(np.uint32)
  bits[0, 0, 40:90] = 7
  bits[1, :, 100:] = 0xFFFFFFFF
  bits[2, 1] = rng.integers(0, 4, 300)
  for packed in (True, False):  # the CPU's packed 64-bit sort, other backends' argsort
    got = np.asarray(jax.jit(lambda b: client_lib.stable_argsort_bits(b, packed))(
        jnp.asarray(bits)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argsort(bits, axis=-1, kind="stable"))


@pytest.mark.parametrize("method", ["fisher_yates", "sort"])
def test_shuffles_are_uniform_permutations(method):
  """20,000 permutations of 5 examples (in a bucket padded to 8): every permutation about equally
  often (chi-square), each example in each position 1/5 of the time, and one fixed point on
  average (a permutation with no fixed point — Sattolo's cycle — or a biased swap range fails).

  Bounds: 6 standard deviations per cell (≈ 25 · 2e-9 false failures), the chi-square of 119
  degrees of freedom below 119 + 7·√238 (p < 1e-6), the mean fixed-point count within 7 standard
  errors of 1."""
  num = 20_000
  shape = client_lib.BucketShape(max_examples=8, batch=2, num_steps=3, num_epochs=2)
  keys = jax.random.split(jax.random.key(11), num)
  orders = np.asarray(client_lib.epoch_orders(keys, jnp.full(num, 5), shape, True, method))
  perms = orders[:, 1, :5]  # the second epoch: epochs are drawn alike
  assert (np.sort(perms, axis=1) == np.arange(5)).all()
  counts = np.stack([(perms == v).sum(0) for v in range(5)]) / num  # [value, position]
  np.testing.assert_allclose(counts, 0.2, atol=6 * np.sqrt(0.16 / num))
  fixed = (perms == np.arange(5)).sum(1)
  assert abs(fixed.mean() - 1.0) < 7 / np.sqrt(num)
  index = {p: i for i, p in enumerate(itertools.permutations(range(5)))}
  observed = np.bincount([index[tuple(p)] for p in perms], minlength=120)
  expected = num / 120
  chi2 = float(((observed - expected) ** 2 / expected).sum())
  assert chi2 < 119 + 7 * np.sqrt(2 * 119), chi2


def _steps_probe(**kwargs):
  """FedAvg whose per-client state records the local steps τ_k each client took last round."""
  base = fs.algorithms.fedavg(client_lr=0.1, **kwargs)
  hooks = base.hooks._replace(init_client_state=lambda p: jnp.zeros((), jnp.int32),
                              client_result=lambda out: (None, out.num_steps))
  return base._replace(hooks=hooks)


@pytest.mark.parametrize("kwargs,expected", [
    # B divides n for 8 and 12 (no empty extra step), not for 5, 9, 1
    (dict(local_epochs=2, batch_size=4), lambda n: 2 * -(-n // 4)),
    (dict(local_epochs=3, batch_size=None), lambda n: 3),
    (dict(local_steps=5, batch_size=4), lambda n: 5),
])
def test_local_steps_per_client(kwargs, expected):
  """τ_k read back from the engine for every client: E·⌈n_k/B⌉, E full-batch steps, or H."""
  sizes = [8, 12, 5, 9, 1, 16]
  xs, ys = classification_clients(sizes)
  res = fs.simulate(_steps_probe(**kwargs), fs.models.softmax_regression(5, 3),
                    fs.FederatedData.from_arrays(xs, ys), rounds=1, bucketing=False)
  np.testing.assert_array_equal(np.asarray(res.state.client_states), [expected(n) for n in sizes])
  assert client_lib.num_local_steps(np.array(sizes), _steps_probe(**kwargs)).tolist() == [
      expected(n) for n in sizes]


def test_partial_stragglers_take_whole_epochs():
  """Partial stragglers (E = 3) take 1, 2 or 3 whole epochs; the others all E·⌈n/B⌉ steps."""
  sizes = [8, 12, 5, 9, 7, 16, 11, 4]
  xs, ys = classification_clients(sizes)
  res = fs.simulate(_steps_probe(local_epochs=3, batch_size=4), fs.models.softmax_regression(5, 3),
                    fs.FederatedData.from_arrays(xs, ys), rounds=1, seed=2, bucketing=False,
                    system=fs.Heterogeneity(0.5, "partial"))
  steps = np.asarray(res.state.client_states)
  spe = -(-np.array(sizes) // 4)
  assert set((steps / spe).tolist()) <= {1.0, 2.0, 3.0}
  assert (steps < 3 * spe).sum() >= 1 and (steps == 3 * spe).sum() >= 4
