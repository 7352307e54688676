"""Plans, blocks and buckets change speed, never results; the block compiles once."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  sizes = [3, 5, 8, 13, 2, 6, 9, 4, 11, 7]  # three size buckets
  w = rng.normal(size=(4, 3))
  xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]
  ys = [np.argmax(x @ w, 1).astype(np.int32) for x in xs]
  fd = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.mlp(4, (8,), 3)
  algo = fs.algorithms.fedavg(client_lr=0.1, local_epochs=2, batch_size=4)
  return fd, model, algo


def _run(setup, **kw):
  fd, model, algo = setup
  args = dict(rounds=5, clients_per_round=6, seed=3, eval_every=2, bucketing=True)
  args.update(kw)
  return fs.simulate(algo, model, fd, **args)


@pytest.fixture(scope="module")
def base(setup):
  """The reference run: five rounds over three size buckets, plan ``vmap``, one block. Shared by
  the tests below that compare with it (each would otherwise compile and run it again)."""
  return _run(setup, plan="vmap")


def _assert_same(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)
  np.testing.assert_allclose(a.history["train_loss"], b.history["train_loss"], rtol=tol)


def test_plans_agree(setup, base):
  assert base.info["num_buckets"] > 1
  for plan, chunk in [("chunked", 2), ("scan", None), ("host_loop", 3)]:
    # One bucket, which compiles once (the goldens cover chunked plans over three buckets).
    other = _run(setup, plan=plan, chunk_size=chunk, bucketing=False)
    assert other.info["plan"] == plan
    _assert_same(base, other)


def _assert_same_state(a, b, tol=1e-5):
  """Params, server extra state and every per-client state agree."""
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


HOST_LOOP_CASES = {  # case: the algorithm it runs (every hook of every registered one is covered)
    "scaffold": "scaffold", "fedprox_partial": "fedprox", "cnn": "fedavg",
    "local_sgd_adaptive": "local_sgd_adaptive", "moon": "moon", "fedadam_fedbn": "fedadam",
    "ditto": "ditto", "fedbuff": "fedbuff"}


def test_host_loop_cases_cover_every_hook_of_every_algorithm():
  hooks = lambda name: {h for h in fs.algorithms.Hooks._fields
                        if getattr(fs.algorithms.REGISTRY[name]().hooks, h) is not None}
  covered = set().union(*(hooks(a) for a in HOST_LOOP_CASES.values())) | {"update_scale"}
  for name in fs.algorithms.REGISTRY:
    assert hooks(name) <= covered, (name, hooks(name) - covered)


@pytest.mark.parametrize("case", list(HOST_LOOP_CASES))
def test_host_loop_and_compiled_plans_agree(case):
  """The Python-driven round and the compiled one, for per-client state (SCAFFOLD's c_i are
  written back by both), partial stragglers with a proximal term, a convolutional model, a
  Local-SGD schedule in the server state, MOON's own local loss, FedAdam with a per-round
  client schedule (update_scale) on a model with dropout and local batch normalization,
  Ditto's personal models (with the fine-tuned and personal metrics), and FedBuff's stale
  starting models (client_start) read from its ring buffer of server models."""
  rng = np.random.default_rng(2)
  sizes = [4, 6, 3, 7, 5, 9]  # two size groups
  xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 3, n).astype(np.int32) for n in sizes]
  fd, model = fs.FederatedData.from_arrays(xs, ys), fs.models.softmax_regression(4, 3)
  # Two size buckets for SCAFFOLD and Ditto (per-client states and the per-client evaluation
  # across buckets); one for the others (each bucket compiles its own programs).
  args = dict(rounds=2, clients_per_round=4, seed=1, bucketing=case in ("scaffold", "ditto"))
  if case == "scaffold":
    algo, compiled = fs.algorithms.scaffold(client_lr=0.1, local_epochs=2, batch_size=4), "vmap"
  elif case == "fedprox_partial":
    algo, compiled = fs.algorithms.fedprox(mu=0.5, client_lr=0.1, local_epochs=3,
                                           batch_size=4), "chunked"
    args["system"] = fs.Heterogeneity(0.6, "partial")
  elif case == "local_sgd_adaptive":
    algo, compiled = fs.algorithms.local_sgd_adaptive(client_lr=0.1, max_local_steps=4,
                                                      batch_size=2), "chunked"
    args["rounds"] = 3
  elif case == "fedbuff":
    algo, compiled = fs.algorithms.fedbuff(client_lr=0.1, batch_size=4, max_staleness=2), "vmap"
    args["rounds"] = 4
  elif case == "moon":
    algo, compiled = fs.algorithms.moon(client_lr=0.1, batch_size=4), "chunked"
  elif case == "ditto":  # personal models: a full-gradient solver per client, and their metrics
    algo, compiled = fs.algorithms.ditto(lam=0.5, client_lr=0.1, batch_size=4), "vmap"
    args["finetune_steps"] = 0  # per-client scoring of the global model itself
  elif case == "fedadam_fedbn":
    from tests.test_data_models import _DropoutBN
    model = fs.models.from_linen(_DropoutBN.module(), xs[0], "multiclass")
    algo = fs.algorithms.fedadam(server_lr=0.05, client_lr=optax.linear_schedule(0.2, 0.05, 2),
                                 client_lr_per="round", batch_size=4)
    compiled, args["local_params"] = "chunked", "batch_norm"
  else:
    xs = [rng.normal(size=(n, 4, 4, 1)).astype(np.float32) for n in (4, 5, 3)]
    ys = [rng.integers(0, 3, len(x)).astype(np.int32) for x in xs]
    fd = fs.FederatedData.from_arrays(xs, ys)
    model = fs.models.cnn((4, 4, 1), 3, conv_features=(2,), dense_size=4)
    algo, compiled = fs.algorithms.fedavg(client_lr=0.1, local_epochs=1, batch_size=2), "chunked"
    args.update(clients_per_round=2)
  loop = fs.simulate(algo, model, fd, plan="host_loop", chunk_size=2, **args)
  other = fs.simulate(algo, model, fd, plan=compiled, chunk_size=2, **args)
  assert loop.info["plan"] == "host_loop" and other.info["plan"] == compiled
  _assert_same_state(loop, other)
  if case == "ditto":  # and the per-client metrics agree; fine-tuned with k = 0 is the plain one
    for key in ("train_personal_accuracy", "train_personal_loss"):
      np.testing.assert_allclose(loop.history[key], other.history[key], rtol=1e-5)
    for run in (loop, other):
      for key in ("loss", "accuracy", "client_accuracy_mean", "client_accuracy_p10",
                  "client_accuracy_p90"):
        np.testing.assert_allclose(run.history[f"train_finetuned_{key}"],
                                   run.history[f"train_{key}"], rtol=1e-5, atol=1e-6)
  if case in ("scaffold", "moon", "ditto"):  # the per-client states really moved
    assert np.abs(np.asarray(jax.tree.leaves(loop.state.client_states)[0])).max() > 1e-4
  if case == "local_sgd_adaptive":
    assert loop.history["local_steps"] == other.history["local_steps"]
  if case == "fedbuff":  # four server steps, and the ring holds two different past models
    models = jax.tree.leaves(loop.state.extra["models"])[0]
    assert int(loop.state.extra["steps"]) == 4 and not np.allclose(models[0], models[1])


def test_bucketing_and_block_size_do_not_change_results_nor_recompile(setup, base):
  """Buckets and blocks of 1 and 2 rounds give the reference run's numbers; blocks of 2 over five
  rounds (the last one partial) over the shared bucket compile once: every block after the first
  took the previous one's output state, so it kept its tree, shapes and dtypes."""
  one = _run(setup, plan="vmap", bucketing=False)
  _assert_same(base, one)
  fd, _, algo = setup  # "auto" merges the three groups for five rounds: one bucket, as False
  assert base.info["num_buckets"] == 3
  assert len(fs.engine.make_buckets(fd.num_examples, algo, 6, None, "auto", rounds=5)[0]) == 1
  # passed in explicitly (the seed's own initial model): the caller's arrays survive the donation
  # of the server state to the compiled block
  init = fs.simulation.initial_params(setup[1], 3)
  _assert_same(one, _run(setup, rounds_per_block=1, bucketing=False, init_params=init))
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(init))  # still readable
  # More slots than one chunk: "auto" shares one compiled body over the three size groups, slots
  # ordered by size; in blocks of 2 over five rounds (the last one partial) it compiles once.
  [shared], _, _ = fs.engine.make_buckets(fd.num_examples, algo, 6, 2, "auto", rounds=5)
  assert shared.chunk == 2 and len(shared.parts) == 3
  blocks = _run(setup, bucketing="auto", chunk_size=2, rounds_per_block=2)
  _assert_same(base, blocks)
  assert blocks.info["num_buckets"] == 1 and blocks.info["compilations"] == 1


def test_same_seed_same_numbers_other_seed_other_numbers(setup, base):
  a, b = base, _run(setup, plan="vmap")
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert a.history == {k: v for k, v in b.history.items() if k != "elapsed"} | {
      "elapsed": a.history["elapsed"]}
  c = _run(setup, plan="vmap", seed=4)
  assert not np.allclose(c.history["train_loss"], a.history["train_loss"])


def test_eval_schedule(base):
  assert base.history["round"] == [2, 4, 5]  # every second round and the last one
  assert set(base.history) >= {"round", "train_loss", "train_accuracy", "elapsed"}


def test_sparse_buckets_match_one_dense_bucket():
  """Three equal-count size buckets, 4 of 12 clients per round: each bucket's capacity (4) is
  more than twice its expected share (1.33), so its shuffles are drawn per chunk."""
  rng = np.random.default_rng(1)
  sizes = [3] * 4 + [10] * 4 + [30] * 4
  xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 3, n).astype(np.int32) for n in sizes]
  fd = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.softmax_regression(4, 3)
  algo = fs.algorithms.fedavg(client_lr=0.1, batch_size=4)
  sparse = fs.simulate(algo, model, fd, rounds=3, clients_per_round=4, seed=2, chunk_size=1,
                       bucketing=True)
  dense = fs.simulate(algo, model, fd, rounds=3, clients_per_round=4, seed=2, bucketing=False)
  assert sparse.info["num_buckets"] == 3
  _assert_same(sparse, dense)


def test_streamed_population_gives_the_device_path_numbers(setup):
  """population='host' gathers each round's cohort on the host; same cohorts, keys and buckets."""
  fd, model, algo = setup
  args = dict(rounds=5, clients_per_round=4, seed=3, eval_every=2, rounds_per_block=2,
              system=fs.Heterogeneity(0.3, "partial", 0.2))
  # FedAvg's streamed path is also pinned by the golden runs (tests/test_goldens.py)
  for algorithm in (fs.algorithms.scaffold(client_lr=0.1, local_epochs=2, batch_size=4),):
    device = fs.simulate(algorithm, model, fd, test=fd, **args)
    host = fs.simulate(algorithm, model, fd, test=fd, population="host", **args)
    assert host.info["population"] == "host" and "train_loss" not in host.history
    for x, y in zip(jax.tree.leaves(device.state), jax.tree.leaves(host.state)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert device.history["test_loss"] == host.history["test_loss"]
  with pytest.raises(ValueError, match="population"):
    fs.simulate(algo, model, fd, population="disk")
