"""The memory planner (issue 11, item 5): XLA's memory analysis of the compiled block in
``info["peak_bytes"]``, the planner's estimate against it, and the chunk a memory budget allows."""

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import simulation as sim
from fedjax_sim.engine import memory


def _population(clients=16, examples=8, features=100, seed=0):
  rng = np.random.default_rng(seed)
  xs = [rng.standard_normal((examples, features)).astype(np.float32) for _ in range(clients)]
  ys = [rng.integers(0, 10, examples).astype(np.int32) for _ in range(clients)]
  return fs.FederatedData.from_arrays(xs, ys)


MODEL = fs.models.mlp(100, (128,), 10)  # 14k parameters: a chunk's training outweighs evaluation
ALGO = fs.algorithms.fedavg(client_lr=0.05, local_epochs=1, batch_size=4)


@pytest.fixture(scope="module")
def runs():
  """The same round compiled with chunks of 1 and of 16 clients."""
  fd = _population()
  return {chunk: fs.simulate(ALGO, MODEL, fd, rounds=1, plan="chunked", chunk_size=chunk)
          for chunk in (1, 16)}


def test_peak_bytes_from_xla_grows_with_the_chunk(runs):
  for res in runs.values():
    parts = res.info["memory"]
    assert res.info["compilations"] == 1  # compiled ahead of time, once
    assert res.info["peak_bytes"] == (parts["argument"] + parts["output"] - parts["alias"]
                                      + parts["temp"]) > 0
    assert parts["argument"] > 2 * 16 * 8 * 100 * 4  # the population, and again to evaluate
  # 15 more clients training at once: at least one more copy of the model each
  assert runs[16].info["peak_bytes"] - runs[1].info["peak_bytes"] > 15 * 4 * 14_000


def test_planner_estimate_bounds_the_measured_peak(runs):
  for chunk, res in runs.items():
    assert res.info["chunk_size"] == chunk
    ratio = res.info["estimated_bytes"] / res.info["peak_bytes"]
    assert 1.0 <= ratio < 3.0, (chunk, ratio)


def _memory(cohort=16):
  fd = _population()
  params = sim.initial_params(MODEL, 0)
  return memory.working_memory(MODEL, ALGO, params, fd, cohort, eval_bytes=0), params, fd


def test_a_smaller_budget_gives_a_smaller_chunk():
  mem, params, fd = _memory()
  choose = lambda budget, backend="gpu", plan="auto": sim.choose_plan(
      plan, None, MODEL, params, fd.feature_shape, 4, backend, memory=mem, budget=budget,
      cohort_size=16)
  ample = choose(10 * mem.bytes(16))
  assert (ample.name, ample.chunk_size) == ("vmap", None)  # the whole cohort fits
  tight = choose(int((mem.bytes(5) + 1) / memory.HEADROOM))
  # at most 5 fit: 4 even chunks of 4 rather than 5 + 5 + 5 + 1
  assert (tight.name, tight.chunk_size) == ("chunked", 4)
  assert mem.bytes(tight.chunk_size) <= memory.HEADROOM * int((mem.bytes(5) + 1) / memory.HEADROOM)
  # on the CPU the cache-sized chunk is kept when it fits and capped when it does not
  assert choose(10 * mem.bytes(16), "cpu").chunk_size == sim.auto_chunk_size(14_000 + 1_290, 4)
  assert choose(int(mem.bytes(2) / memory.HEADROOM), "cpu").chunk_size <= 2
  # an explicit chunk size is the caller's
  assert sim.choose_plan("chunked", 8, MODEL, params, fd.feature_shape, 4, "gpu", memory=mem,
                         budget=mem.bytes(1), cohort_size=16).chunk_size == 8


def test_a_budget_below_one_client_is_refused_with_the_numbers():
  mem, params, fd = _memory()
  budget = mem.bytes(1) // 2
  with pytest.raises(ValueError, match=f"budget of {budget:,} bytes.*{mem.bytes(1):,} bytes"):
    sim.choose_plan("auto", None, MODEL, params, fd.feature_shape, 4, "gpu", memory=mem,
                    budget=budget, cohort_size=16)


def test_working_memory_counts_per_client_states_and_collect_buffers():
  mem, params, fd = _memory()
  param_bytes = memory.tree_bytes(params)
  scaffold = memory.working_memory(MODEL, fs.algorithms.scaffold(client_lr=0.1), params, fd, 16)
  assert scaffold.parts["per-client states"] == 16 * param_bytes  # every client's c_i
  median = memory.working_memory(MODEL, ALGO, params, fd, 16,
                                 aggregator=fs.aggregators.median())
  assert median.parts["collected updates"] == 2 * 16 * param_bytes
  assert mem.parts["collected updates"] == 0
  sweep = memory.working_memory(MODEL, ALGO, params, fd, 16, runs=3)
  assert sweep.bytes(4) == 3 * mem.bytes(4)


def test_a_sweep_too_large_for_the_budget_runs_in_groups_of_runs():
  one = memory.WorkingMemory(fixed=100, per_client=10, parts={})  # 200 bytes at a cohort of 10
  fit = lambda runs: int(runs * 200 / memory.HEADROOM) + 1  # a budget that holds `runs` runs
  groups = lambda runs, budget, devices=1: [list(g) for g in memory.run_groups(
      one, runs, 10, budget, devices)]
  assert groups(5, None) == [[0, 1, 2, 3, 4]]
  assert groups(5, fit(5)) == [[0, 1, 2, 3, 4]]
  assert groups(5, fit(2)) == [[0, 1], [2, 3], [4]]  # the fewest groups, evened out
  assert groups(5, fit(3)) == [[0, 1, 2], [3, 4]]
  # two devices: a group of 2 runs puts one run on each device
  assert groups(4, fit(1), devices=2) == [[0, 1], [2, 3]]
  with pytest.raises(ValueError, match=r"one run of this sweep needs about 200 bytes.*budget of "
                                       r"100 bytes"):
    memory.run_groups(one, 3, 10, 100)


def test_a_sweep_split_by_the_memory_budget_equals_one_sweep(monkeypatch):
  fd = _population(clients=6, examples=4, features=10)
  model = fs.models.softmax_regression(10, 10)
  kw = dict(hparams=[{"client_lr": 0.1}, {"client_lr": 0.05}], rounds=2, clients_per_round=3)
  per_run = sim.plan_memory(model, ALGO, sim.initial_params(model, 0), fd, 3, [fd],
                            fs.aggregators.check(None))
  budget = int(1.5 * per_run.bytes(3) / memory.HEADROOM)  # one run fits, two do not
  monkeypatch.setattr(sim, "memory_budget", lambda: budget)
  split = fs.simulate_sweep(ALGO, model, fd, [0, 1], **kw)
  monkeypatch.setattr(sim, "memory_budget", lambda: None)
  whole = fs.simulate_sweep(ALGO, model, fd, [0, 1], **kw)
  assert [r.info["run_groups"] for r in split] == [[1, 1]] * 2
  assert whole[0].info["run_groups"] == [2] and split[0].info["runs"] == 1
  for a, b in zip(split, whole):
    np.testing.assert_allclose(a.history["train_loss"], b.history["train_loss"], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
