"""Flattened sweeps (issue 11, item 4): the runs' cohorts as one cohort per round equal separate
simulations and the lockstep sweep, compile once, and fall back (or refuse) by name where they
cannot apply."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import algorithms as alg
from fedjax_sim import aggregators, client
from fedjax_sim.engine import Bucket
from fedjax_sim.engine.executors import flat_sweep


@pytest.fixture(scope="module")
def populations():
  """Two datasets of 12 clients whose sizes span several size buckets (the second the first's
  clients in reverse order, so the same id has another size there)."""
  rng = np.random.default_rng(4)
  w = rng.normal(size=(5, 3))
  sizes = [3, 5, 8, 8, 12, 20, 30, 45, 9, 4, 60, 7]
  xs = [rng.normal(loc=0.2 * i, size=(n, 5)).astype(np.float32) for i, n in enumerate(sizes)]
  ys = [np.argmax(x @ w + rng.normal(size=(n, 3)), 1).astype(np.int32) for x, n in zip(xs, sizes)]
  return (fs.FederatedData.from_arrays(xs, ys), fs.FederatedData.from_arrays(xs[::-1], ys[::-1]),
          fs.models.softmax_regression(5, 3))


ARGS = dict(rounds=4, clients_per_round=5, eval_every=1, rounds_per_block=2)
LOCAL = dict(local_epochs=2, batch_size=4)


def _same(a, b, what):
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=what)
  for k in ("train_loss", "drift", "update_norm_mean", "participants"):
    np.testing.assert_allclose(a.history[k], b.history[k], rtol=1e-5, atol=1e-6,
                               err_msg=f"{what}: {k}")


def test_flattened_fedprox_sweep_equals_separate_runs_and_lockstep(populations):
  """Three runs (two datasets, two seeds; FedProx's mu and client_lr per run, mu = 0 being
  FedAvg) over two blocks: one compilation; every run equals the lockstep sweep's (whose FedProx
  runs equal ``fs.simulate``: tests/test_sweeps.py; a flattened run against ``fs.simulate``
  directly: the SCAFFOLD test below)."""
  fd, fd2, model = populations
  points = [{}, {"mu": 1.0, "client_lr": 0.03}, {"mu": 0.0}]
  kwargs = dict(seeds=[1, 2, 1], hparams=points, **ARGS)
  flat = fs.simulate_sweep(alg.fedprox(mu=0.1, **LOCAL), model, [fd, fd2, fd], **kwargs)
  info = flat[0].info
  assert info["flattened"] and info["flatten_fallback"] is None
  assert info["compilations"] == 1 and len(info["block_seconds"]) == 2
  lock = fs.simulate_sweep(alg.fedprox(mu=0.1, **LOCAL), model, [fd, fd2, fd], flatten=False,
                           **kwargs)
  assert not lock[0].info["flattened"]
  for i in range(3):
    _same(flat[i], lock[i], f"run {i} against lockstep")
  # the runs differ (the test would not notice a run reading another's state otherwise)
  assert not np.allclose(flat[0].history["train_loss"], flat[2].history["train_loss"])


def test_flattened_scaffold_keeps_each_runs_client_states(populations):
  """SCAFFOLD's per-client control variates are gathered and scattered by (run, global id): a
  flattened run equals its separate simulation, state included."""
  fd, fd2, model = populations
  flat = fs.simulate_sweep(alg.scaffold(**LOCAL), model, [fd2, fd], seeds=[3, 4],
                           hparams=[{}, {"client_lr": 0.03}], **ARGS)
  alone = fs.simulate(alg.scaffold(client_lr=0.03, **LOCAL), model, fd, seed=4, **ARGS)
  _same(flat[1], alone, "SCAFFOLD run against simulate")
  for x, y in zip(jax.tree.leaves(flat[1].state.client_states),
                  jax.tree.leaves(alone.state.client_states)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_collect_aggregators_fall_back_to_lockstep_by_name(populations):
  fd, _, model = populations
  assert flat_sweep.unsupported(aggregators.check(aggregators.mean()), None) is None
  reason = flat_sweep.unsupported(aggregators.check(aggregators.median()), None)
  assert "collect aggregator 'median'" in reason
  two_devices = types.SimpleNamespace(devices=np.empty(2))  # a mesh's device count, here faked
  mean = aggregators.check(aggregators.mean())
  assert flat_sweep.unsupported(mean, None, two_devices, runs=4) is None  # 2 runs per device
  assert "3 runs do not divide over 2 devices" in flat_sweep.unsupported(mean, None, two_devices,
                                                                          runs=3)
  with pytest.raises(ValueError, match="flatten=True: the collect aggregator 'median'"):
    fs.simulate_sweep(alg.fedavg(), model, fd, seeds=[0, 1], aggregator=aggregators.median(),
                      flatten=True, rounds=1)
  with pytest.raises(ValueError, match="flatten must be True, False or 'auto', got 'yes'"):
    fs.simulate_sweep(alg.fedavg(), model, fd, seeds=[0, 1], flatten="yes", rounds=1)


def test_bucket_slots_are_sorted_by_size_and_padded_with_the_empty_slot():
  """Bucket 0's members come largest first; other buckets' and non-returning slots are left out,
  and the unused positions of the last chunk point at the empty slot (the last index)."""
  shape = client.BucketShape(8, 2, 8, 1)
  bucket = Bucket(shape, capacity=5, chunk=2, members=5)
  bucket_col = jnp.array([0, 1, 0, -1, 0, 0, -1])  # the last slot is the empty one
  n = jnp.array([3, 9, 7, 8, 5, 7, 0])
  pos = np.asarray(flat_sweep._bucket_positions(bucket_col, n, 0, bucket))
  assert pos.tolist() == [[2, 5], [4, 0], [6, 6]]
