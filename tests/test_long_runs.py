"""Long runs from the command line: a run killed with SIGKILL resumes to the uninterrupted run's
metrics; Ctrl-C (SIGINT) stops with a summary and a resume hint; metrics.csv and TensorBoard
events; `fedjax-sim compare`. Real subprocesses, sharing one compilation cache."""

import csv
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from fedjax_sim.cli import main

SMALL = ["--set", "dataset=logistic_demo", "--set", "model=logistic_regression",
         "--set", "clients_per_round=3", "--set", "batch_size=64", "--set", "eval_every=1",
         "--set", "rounds_per_block=2", "--quiet"]


def _cli(tmp, *args):
  cache = ["--set", f"compilation_cache='{tmp / 'xla'}'"]
  return [sys.executable, "-m", "fedjax_sim.cli", "run", *SMALL, *cache, *args]


def _rows(run_dir):
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _no_elapsed(rows):
  return [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]


def _events(directory):
  """``{tag: {step: value}}`` of the scalar events in a TensorBoard directory (TFRecord frames
  read by hand, events parsed with tensorboardX's protobuf classes: no TensorFlow needed)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 10-round run, and the same run killed (SIGKILL) after round 6 with a
  checkpoint of round 4 only, then resumed with --resume."""
  tmp = tmp_path_factory.mktemp("long")
  common = ["--set", "rounds=10", "--set", "checkpoint_every=4", "--set", "tensorboard=true"]
  full, killed = tmp / "full", tmp / "killed"
  subprocess.run(_cli(tmp, "--out", str(full), *common), check=True, capture_output=True)
  env = {**os.environ, "FEDJAX_SIM_TEST_KILL_AFTER_ROUND": "6"}
  proc = subprocess.run(_cli(tmp, "--out", str(killed), *common), env=env, capture_output=True,
                        text=True)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  before = {"rows": [r["round"] for r in _rows(killed)],
            "checkpoints": sorted(os.listdir(killed / "checkpoints"))}
  resumed = subprocess.run([sys.executable, "-m", "fedjax_sim.cli", "run", "--resume",
                            str(killed), "--quiet"], capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr
  return tmp, full, killed, before, resumed.stderr


def test_killed_run_resumes_to_the_uninterrupted_metrics(runs):
  _, full, killed, before, stderr = runs
  # killed after round 6's rows were written, with the checkpoint of round 4 the newest
  assert before["rows"] == [1, 2, 3, 4, 5, 6]
  assert before["checkpoints"] == ["ckpt-000000004.msgpack"]
  assert "resuming" in stderr and "after round 4" in stderr
  assert [r["round"] for r in _rows(killed)] == list(range(1, 11))  # none lost or duplicated
  assert _no_elapsed(_rows(killed)) == _no_elapsed(_rows(full))
  with open(killed / "metrics.csv") as f, open(full / "metrics.csv") as g:
    got, want = list(csv.DictReader(f)), list(csv.DictReader(g))
  assert _no_elapsed(got) == _no_elapsed(want) and len(got) == 10
  assert json.loads((killed / "summary.json").read_text())["status"] == "completed"


def test_csv_and_tensorboard_hold_the_metrics(runs):
  _, full, _, _, _ = runs
  rows = _rows(full)
  with open(full / "metrics.csv") as f:
    table = list(csv.DictReader(f))
  assert [float(r["train_loss"]) for r in table] == [r["train_loss"] for r in rows]
  scalars = _events(full / "tensorboard")
  assert sorted(scalars["train_loss"]) == list(range(1, 11))
  assert scalars["train_loss"] == pytest.approx({r["round"]: r["train_loss"] for r in rows},
                                                rel=1e-6)
  assert "train_accuracy" in scalars and "round" not in scalars


def test_resume_with_a_changed_config_is_refused(runs, capsys):
  _, _, killed, _, _ = runs
  code = main(["run", "--resume", str(killed), "--set", "client_lr=0.5", "--set", "seed=1",
               "--set", "rounds=12", "--quiet"])
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err
  assert "client_lr (0.1 -> 0.5)" in err and "seed (0 -> 1)" in err and "rounds (" not in err
  assert main(["run", "--resume", str(killed / "nowhere"), "--quiet"]) == 2
  assert "no config.json" in capsys.readouterr().err


def test_ctrl_c_stops_with_summary_plot_and_resume_hint(runs):
  tmp = runs[0]
  out = tmp / "interrupted"
  # the fixture's program (blocks of 2 rounds) comes from the shared compilation cache
  proc = subprocess.Popen(_cli(tmp, "--out", str(out), "--set", "rounds=1000000"),
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
    assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "Traceback" not in err and f"fedjax-sim run --resume {out}" in err
  summary = json.loads((out / "summary.json").read_text())
  stopped = summary["interrupted_after_round"]
  assert summary["status"] == "interrupted" and stopped % 2 == 0  # at a block boundary
  assert _rows(out)[-1]["round"] == stopped == summary["final"]["round"]
  assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert f"ckpt-{stopped:09d}.msgpack" in os.listdir(out / "checkpoints")


def _fake_run(directory, rows, status="completed"):
  directory.mkdir()
  (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (directory / "summary.json").write_text(json.dumps({"status": status}))
  return str(directory)


def test_compare_overlays_runs_and_prints_final_metrics(tmp_path, capsys):
  a = _fake_run(tmp_path / "fedavg", [
      {"round": 1, "train_loss": 1.0, "test_accuracy": 0.5},
      {"round": 2, "train_loss": 0.8, "test_accuracy": 0.75}])
  b = _fake_run(tmp_path / "fedprox", [
      {"round": 1, "train_loss": 1.1, "test_accuracy": 0.6},
      {"round": 2, "train_loss": 0.9, "test_accuracy": 0.55}], status="interrupted")
  fig = tmp_path / "fig.png"
  assert main(["compare", a, b, "--out", str(fig)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split()[:4] == ["run", "status", "rounds", "final"]
  assert lines[1].split() == ["fedavg", "completed", "2", "0.75", "0.8", "0.75"]
  assert lines[2].split() == ["fedprox", "interrupted", "2", "0.55", "0.9", "0.6"]
  assert fig.read_bytes()[:4] == b"\x89PNG"
  assert main(["compare", a, b, "--metric", "test_loss", "--out", str(fig)]) == 2
  assert "run 'fedavg' has no metric 'test_loss'; it has: test_accuracy, train_loss" in \
      capsys.readouterr().err
