"""Helpers shared by the test files: small datasets, params, comparisons, and replays of the
engine's own randomness (cohorts, client keys, epoch orders) for the NumPy references."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sim as fs
from fedjax_sim import client as client_lib
from fedjax_sim.simulation import STREAM_TRAIN

TOL = dict(rtol=1e-5, atol=1e-5)

# The test session's XLA flags (set by conftest.py before JAX starts, inherited by the child
# processes the tests start). Tests compile far more than they run, and XLA:CPU's backend at
# optimization level 0 compiles about a quarter faster (measured: test_plans_agree + the goldens,
# 72 s -> 53 s) while computing the same functions; only float rounding may differ from the
# default level, so the goldens record these flags in their fingerprint.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0",)


def use_test_xla_flags() -> None:
  """Adds :data:`TEST_XLA_FLAGS` to ``XLA_FLAGS`` (before JAX creates its CPU client)."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in TEST_XLA_FLAGS if f not in flags])


def forced_devices_flags(devices: int) -> str:
  """``XLA_FLAGS`` for a child process with ``devices`` forced CPU devices and the session's
  flags."""
  return " ".join([*TEST_XLA_FLAGS, f"--xla_force_host_platform_device_count={devices}"])


def classification_clients(sizes, num_features=5, num_classes=3, seed=0):
  """One ``(x, y)`` pair per client, labels from a shared noisy linear rule."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(num_features, num_classes))
  xs = [rng.normal(size=(n, num_features)).astype(np.float32) for n in sizes]
  ys = [np.argmax(x @ w + rng.normal(size=(len(x), num_classes)), 1).astype(np.int32) for x in xs]
  return xs, ys


def random_params(model, seed=1, scale=0.3):
  params = model.init(jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [rng.normal(0, scale, l.shape).astype(np.float32)
                                      for l in leaves])


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def assert_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                        **(tol or TOL)), a, b)


def assert_equal(a, b):
  """Same tree structure and bit-identical leaves."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, (ta, tb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def round_keys(seed: int, round_num: int):
  """The named keys of round ``round_num`` (see ``fedjax_sim.engine.cohort``)."""
  train_key = jax.random.fold_in(jax.random.key(seed), STREAM_TRAIN)
  return fs.engine.round_keys(train_key, round_num)


def cohort(seed: int, round_num: int, num_clients: int, cohort_size: int) -> list[int]:
  """The global ids the engine samples in round ``round_num``, sorted."""
  ids = fs.engine.sample_cohort(round_keys(seed, round_num)[0], num_clients, cohort_size)
  return sorted(np.asarray(ids).tolist())


_epoch_orders = jax.jit(client_lib.epoch_orders, static_argnums=(2, 3, 4))


def epoch_orders(seed: int, round_num: int, sizes, epochs: int,
                 method: str = "fisher_yates") -> list[np.ndarray]:
  """``[epochs, n_k]`` for every client ``k``: its example order in each epoch of round
  ``round_num``, drawn with the engine's key derivation (``fold_in(clients_key, global id)``).
  One call for the whole population (a client's permutation does not depend on the padding)."""
  sizes = np.asarray(sizes)
  keys = jax.vmap(lambda k: jax.random.fold_in(round_keys(seed, round_num)[1], k))(
      jnp.arange(len(sizes)))
  shape = client_lib.BucketShape(max_examples=int(sizes.max()), batch=1, num_steps=1,
                                 num_epochs=epochs)
  orders = np.asarray(_epoch_orders(keys, jnp.asarray(sizes), shape, True, method))
  return [o[:, :n] for o, n in zip(orders, sizes)]


def replay_orders(seed: int, clients, epochs: int, method: str = "fisher_yates"):
  """``fn(round, client) -> [epochs, n]`` for the NumPy references' ``orders=``."""
  sizes = [len(x) for x, _ in clients]
  cache = {}
  def orders(r, k):
    if r not in cache:
      cache[r] = epoch_orders(seed, r, sizes, epochs, method)
    return cache[r][k]
  return orders
