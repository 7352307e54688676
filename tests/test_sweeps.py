"""Learning rates and optimizer hyperparameters as sweep data (issue 11): a sweep's run equals a
separate simulation whose factory got that value, and a key the algorithm cannot vary is refused
by name."""

import csv
import json
import re

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import algorithms as alg
from fedjax_sim import cli, grid


@pytest.fixture(scope="module")
def population():
  rng = np.random.default_rng(4)
  w = rng.normal(size=(5, 3))
  sizes = [8] * 10  # one size bucket: the smallest program
  xs = [rng.normal(loc=0.2 * i, size=(n, 5)).astype(np.float32) for i, n in enumerate(sizes)]
  ys = [np.argmax(x @ w + rng.normal(size=(n, 3)), 1).astype(np.int32) for x, n in zip(xs, sizes)]
  return fs.FederatedData.from_arrays(xs, ys), fs.models.softmax_regression(5, 3)


ARGS = dict(rounds=2, clients_per_round=4, eval_every=1, rounds_per_block=2)
LOCAL = dict(local_epochs=2, batch_size=4)


def _leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


# FedAvg's client_lr: test_sweep_command_end_to_end below compares a grid point of
# `fedjax-sim sweep` with fs.simulate of the same config.
@pytest.mark.parametrize("factory, base, point", [
    (alg.fedadam, dict(client_lr=0.05, server_lr=0.03),
     {"server_lr": 0.1, "beta1": 0.5, "tau": 0.01}),
    (alg.fedprox, dict(mu=0.1), {"client_lr": 0.03, "mu": 1.0}),
])
def test_swept_hyperparameters_reproduce_separate_runs(population, factory, base, point):
  """Run 1 of a two-run sweep (the factory's values, then ``point``) equals ``fs.simulate`` with
  ``point`` passed to the factory, whose program has the values written in as constants (two
  compilations per case: the sweep's and the separate run's)."""
  fd, model = population
  swept = fs.simulate_sweep(factory(**LOCAL, **base), model, fd, seeds=[1, 1],
                            hparams=[{}, point], **ARGS)
  assert swept[0].info["compilations"] == 1
  assert swept[0].info["peak_bytes"] > swept[0].info["memory"]["argument"] > 0  # XLA's analysis
  alone = fs.simulate(factory(**LOCAL, **{**base, **point}), model, fd, seed=1, **ARGS)
  for a, b in zip(_leaves(alone.params), _leaves(swept[1].params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(swept[1].history["train_loss"], alone.history["train_loss"],
                             rtol=1e-5)
  # the values took effect: the run with the factory's values ended elsewhere
  assert not np.allclose(_leaves(swept[0].params)[0], _leaves(swept[1].params)[0], rtol=1e-3)


def test_every_algorithm_holds_its_learning_rates_as_data():
  for name, factory in alg.REGISTRY.items():
    algo = factory()
    assert "server_lr" in algo.hparams, name
    assert ("client_lr" in algo.hparams) == (name != "fedsgd"), name
    assert set(algo.constant_hparams) <= set(algo.hparams), name


@pytest.mark.parametrize("algo, key, why", [
    (alg.fedavg(client_optimizer=optax.adam(0.01)), "client_lr", "client_optimizer"),
    (alg.fedavg(client_lr=optax.constant_schedule(0.1)), "client_lr", "schedule"),
    (alg.fedadam(convention="optax"), "beta1", "optax"),
    (alg.fedavgm(momentum=0.0), "momentum", "momentum of 0"),
    (alg.fedavg(), "learning_rate", "sweepable hyperparameters: client_lr, server_lr"),
])
def test_unsweepable_keys_are_refused_by_name(population, algo, key, why):
  fd, model = population
  with pytest.raises(ValueError, match=f"'{key}'.*{why}"):
    fs.simulate_sweep(algo, model, fd, seeds=[0, 1], hparams=[{key: 0.1}, {}], rounds=1)


def test_swept_values_must_be_finite_numbers(population):
  fd, model = population
  with pytest.raises(ValueError, match=r"hparams\[1\]\['client_lr'\] must be a finite number"):
    fs.simulate_sweep(alg.fedavg(), model, fd, seeds=[0, 1],
                      hparams=[{"client_lr": 0.1}, {"client_lr": "fast"}], rounds=1)


GRID = """dataset = "logistic_demo"
model = "logistic_regression"
rounds = 2
clients_per_round = 3
batch_size = 4
eval_every = 1
rounds_per_block = 2
compilation_cache = "none"

[grid]
seed = [0, 1]
client_lr = [0.1, 0.03]
"""


def test_sweep_command_end_to_end(tmp_path, capsys):
  """2 seeds × 2 client learning rates: one compiled sweep, a run directory per point, the
  results table and the figure; the point (seed 1, client_lr 0.03) equals fs.simulate of its
  config (FedAvg's client_lr as sweep data)."""
  path = tmp_path / "grid.toml"
  path.write_text(GRID)
  out = tmp_path / "sweep"
  assert cli.main(["sweep", "--config", str(path), "--out", str(out), "--quiet"]) == 0
  names = ["000-seed=0-client_lr=0.1", "001-seed=0-client_lr=0.03", "002-seed=1-client_lr=0.1",
           "003-seed=1-client_lr=0.03"]
  assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == names
  assert [(r["seed"], r["client_lr"]) for r in rows] == [("0", "0.1"), ("0", "0.03"), ("1", "0.1"),
                                                         ("1", "0.03")]
  assert all(r["status"] == "completed" and r["rounds"] == "2" for r in rows)
  assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
  printed = capsys.readouterr().out
  assert all(n in printed for n in names) and "train_loss" in printed
  point = out / names[3]
  config = json.loads((point / "config.json").read_text())
  assert config["seed"] == 1 and config["client_lr"] == 0.03
  summary = json.loads((point / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["engine"]["runs"] == 4
  assert summary["engine"]["compilations"] == 1
  assert (point / "curves.png").exists()
  metrics = [json.loads(l) for l in (point / "metrics.jsonl").read_text().splitlines()]
  assert [m["round"] for m in metrics] == [1, 2]
  algo, model, train, test = cli.build_experiment(config)
  alone = fs.simulate(algo, model, train, test=test, seed=1, rounds=2, clients_per_round=3,
                      eval_every=1, rounds_per_block=2)
  np.testing.assert_allclose([m["train_loss"] for m in metrics], alone.history["train_loss"],
                             rtol=1e-5)
  assert float(rows[3]["train_loss"]) == pytest.approx(metrics[-1]["train_loss"])
  # a finished sweep is not overwritten
  assert cli.main(["sweep", "--config", str(path), "--out", str(out), "--quiet"]) == 2
  assert "not empty" in capsys.readouterr().err


def test_grid_points_share_a_sweep_unless_something_compiled_differs(tmp_path):
  """Seeds and data hyperparameters share a sweep; datasets, and values the algorithm does not
  hold as data (FedAvgM's momentum 0 builds no momentum buffer), start another (no run here)."""
  config = cli.resolve_config(None, ["algorithm=fedavgm", "model=softmax_regression"])
  points = grid.grid_points(config, grid._flatten_grid({
      "dataset": ["logistic_demo", "fedprox_synthetic_iid"], "seed": [0, 1],
      "server_lr": [1.0, 0.5], "algorithm_options": {"momentum": [0.0, 0.9]}}))
  assert len(points) == 16
  groups = {}
  for p in points:
    groups.setdefault(p.group_key(), []).append(p)
  by_members = [[(p.config["dataset"], p.config["algorithm_options"]["momentum"])
                 for p in members] for members in groups.values()]
  # per dataset: the momentum-0.9 points (2 seeds × 2 server_lr) and the momentum-0 ones
  assert all(len(m) == 4 and len({d for d, _ in m}) == 1 and len({mom for _, mom in m}) == 1
             for m in by_members)
  assert len(groups) == 4
  at = {tuple(p.values.values()): p for p in points}
  assert at["logistic_demo", 1, 0.5, 0.9].hparams() == {"server_lr": 0.5, "momentum": 0.9}
  assert at["logistic_demo", 1, 0.5, 0.0].hparams() == {"server_lr": 0.5}  # no buffer: not data


@pytest.mark.parametrize("text, message", [
    ("[grid]\nclient_rate = [0.1]\n", "unknown grid key 'client_rate'"),
    ("[grid]\nseed = 3\n", "grid key 'seed' must be a non-empty list"),
    ("rounds = 2\n", "needs a \\[grid\\] table"),
    ("[grid]\nclient_lr = [0.1, -1.0]\n", "client_lr=-1.0.*client_lr"),
    ("[grid.algorithm_options]\nmu = [0.1]\n", "algorithm_options"),
])
def test_bad_grids_get_one_line_errors(tmp_path, capsys, text, message):
  path = tmp_path / "grid.toml"
  path.write_text('dataset = "logistic_demo"\nmodel = "logistic_regression"\n' + text)
  out = tmp_path / "out"
  assert cli.main(["sweep", "--config", str(path), "--out", str(out), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("fedjax-sim: error:") and len(err.strip().splitlines()) == 1
  assert re.search(message, err), err
  assert not out.exists()
