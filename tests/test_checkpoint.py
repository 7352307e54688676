"""Checkpoint and resume through the Python API: a run stopped after a checkpoint and resumed (also
from a torn newest file, also from a state in memory) gives the uninterrupted run's numbers,
per-client SCAFFOLD control variates and error-feedback residuals included."""

import os

import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import checkpoint as ckpt
from helpers import assert_equal, classification_clients

ROUNDS = 8
# top-k with error feedback: the aggregator keeps a per-client residual as well
ARGS = dict(rounds=ROUNDS, clients_per_round=4, seed=3, eval_every=1, rounds_per_block=2,
            aggregator=fs.aggregators.top_k(0.5, error_feedback=True))


class Stop(Exception):
  pass


def _without_elapsed(history):
  return {k: v for k, v in history.items() if k != "elapsed"}


@pytest.fixture(scope="module")
def setup():
  xs, ys = classification_clients([6, 9, 12, 7, 10, 8, 5, 11, 9, 6], num_features=4)
  train = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.softmax_regression(4, 3)
  algo = fs.algorithms.scaffold(client_lr=0.1, server_lr=0.8, local_epochs=2, batch_size=4)
  full = fs.simulate(algo, model, train, **ARGS)
  return algo, model, train, full


def _stopped_run(setup, directory, stop_after):
  """Runs with checkpoints every 4 rounds and stops (as a kill would) once round
  ``stop_after``'s rows are out: checkpoints of rounds 4 (and 8) only."""
  algo, model, train, _ = setup

  def callback(rows):
    if rows[-1]["round"] >= stop_after:
      raise Stop
  with pytest.raises(Stop):
    fs.simulate(algo, model, train, checkpoint_dir=str(directory), checkpoint_every=3,
                callback=callback, **ARGS)


def test_resume_equals_uninterrupted_run_and_torn_newest_falls_back(setup, tmp_path):
  algo, model, train, full = setup
  directory = tmp_path / "ck"
  _stopped_run(setup, directory, stop_after=6)
  # checkpoint_every=3 is rounded up to 4 (two blocks of 2): rounds 4 and, after round 6, none
  assert [r for r, _ in ckpt.list_checkpoints(str(directory))] == [4]
  resumed = fs.simulate(algo, model, train, checkpoint_dir=str(directory), checkpoint_every=3,
                        resume=True, **ARGS)
  assert resumed.info["checkpoint_every"] == 4
  assert _without_elapsed(resumed.history) == _without_elapsed(full.history)
  assert_equal(resumed.state, full.state)  # params, c, every client's c_i and residual
  assert [r for r, _ in ckpt.list_checkpoints(str(directory))] == [4, 8]  # keep=2

  # the newest file torn (truncated by a kill): the previous one is loaded, with a warning
  newest = ckpt.list_checkpoints(str(directory))[-1][1]
  with open(newest, "r+b") as f:
    f.truncate(os.path.getsize(newest) // 2)
  with pytest.warns(RuntimeWarning, match="torn"):
    again = fs.simulate(algo, model, train, checkpoint_dir=str(directory), resume=True, **ARGS)
  assert _without_elapsed(again.history) == _without_elapsed(full.history)
  assert_equal(again.state, full.state)


def test_continue_from_state_in_memory(setup):
  algo, model, train, full = setup
  half = fs.simulate(algo, model, train, **{**ARGS, "rounds": 4})
  rest = fs.simulate(algo, model, train, init_state=half.state, start_round=5, **ARGS)
  assert rest.history["round"] == [5, 6, 7, 8]
  for k in ("train_loss", "train_accuracy", "drift"):
    assert rest.history[k] == full.history[k][4:]
  assert_equal(rest.state, full.state)


def test_resume_refuses_another_run_and_bad_arguments(setup, tmp_path):
  algo, model, train, _ = setup
  directory = tmp_path / "ck"
  ckpt.save(str(directory), 2, {"a": np.zeros(2)}, {"round": [2]},
            {"seed": 3})
  with pytest.raises(ValueError, match="already holds checkpoints"):
    fs.simulate(algo, model, train, checkpoint_dir=str(directory), **ARGS)
  with pytest.raises(ValueError, match=r"different run: .*seed \(checkpoint 3, now 4\)"):
    fs.simulate(algo, model, train, checkpoint_dir=str(directory), resume=True,
                **{**ARGS, "seed": 4})
  with pytest.raises(ValueError, match="need a checkpoint_dir"):
    fs.simulate(algo, model, train, checkpoint_every=2, **ARGS)
