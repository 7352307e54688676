"""Several processes through ``jax.distributed`` (``fs.distributed``, ``fedjax-sim run
--coordinator``).

Multi-process runs start real processes: each ``fedjax-sim`` command in its own subprocess with
two forced CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``), the coordinator
on 127.0.0.1 at a free port. Argument checks and the reading of JAX's failure messages are tested
in this process.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import distributed
from fedjax_sim.cli import main
from tests.helpers import forced_devices_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "fedjax_sim.cli"]
HANG_GUARD = 300  # seconds: a subprocess still running then is a hang, and fails the test


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  path = os.pathsep.join([str(ROOT)] + inherited)
  return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu",
              XLA_FLAGS=forced_devices_flags(devices), **extra)


def _start(argv, env, cwd):
  return subprocess.Popen([*CLI, *argv], env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(processes):
  """``[(returncode, stdout, stderr)]``; every process killed if one outlives the hang guard."""
  try:
    outs = [p.communicate(timeout=HANG_GUARD) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(processes, outs)]


def _history(run_dir: pathlib.Path) -> dict:
  history = {}
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    for k, v in json.loads(line).items():
      history.setdefault(k, []).append(v)
  return history


def _readme_processes():
  """The README's multi-process commands (argv after ``fedjax-sim``, the ``&`` dropped) and the
  ``XLA_FLAGS`` its block exports."""
  text = (ROOT / "README.md").read_text()
  block = next(b for b in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
               if "--coordinator" in b)
  flags = re.search(r"export XLA_FLAGS=(\S+)", block).group(1)
  commands = []
  for line in block.splitlines():
    if "fedjax-sim run" in line:
      argv = shlex.split(line[line.index("fedjax-sim"):], comments=True)[1:]
      commands.append([a for a in argv if a != "&"])
  return flags, commands


def _replace(argv, flag, value):
  i = argv.index(flag)
  return [*argv[:i + 1], value, *argv[i + 2:]]


# Small enough for the test, the rest of the README's command as written.
SMALL = ["--set", "rounds=4", "--set", "eval_every=2", "--set", "rounds_per_block=2",
         "--set", "clients_per_round=8", "--set", "bucketing=false",
         "--set", "compilation_cache=none", "--quiet"]


def _in_process(argv, devices, monkeypatch, capsys):
  """``fedjax-sim ARGV`` run by this process (its training in a child process with ``devices``
  CPU devices, as every multi-process run): ``(returncode, stdout, stderr)``."""
  for key, value in _env(devices).items():
    if key in ("PYTHONPATH", "JAX_PLATFORMS", "XLA_FLAGS"):
      monkeypatch.setenv(key, value)
  capsys.readouterr()
  code = main(argv)
  out, err = capsys.readouterr()
  return code, out, err


def test_readme_processes_equal_one_process_with_four_devices(tmp_path, monkeypatch, capsys):
  flags, commands = _readme_processes()
  assert flags == "--xla_force_host_platform_device_count=2"
  commands = sorted(commands, key=lambda c: c[c.index("--process-id") + 1], reverse=True)
  assert [c[c.index("--process-id") + 1] for c in commands] == ["1", "0"]
  port = str(_free_port())  # the README's port may be taken on this machine
  commands = [_replace(c, "--coordinator", f"127.0.0.1:{port}") + SMALL for c in commands]
  # the same run as one process with four devices, its population on the device, while the two
  # processes stream theirs from host memory (each gathers and sends its devices' rows only)
  single = commands[0]
  for flag in ("--coordinator", "--num-processes", "--process-id"):
    single = single[:single.index(flag)] + single[single.index(flag) + 2:]
  commands = [c + ["--set", "population=host"] for c in commands]
  others = [_start(commands[0], _env(2), tmp_path),
            _start(_replace(single, "--out", "one_process"), _env(4), tmp_path)]
  monkeypatch.chdir(tmp_path)
  code, out0, err0 = _in_process(commands[1], 2, monkeypatch, capsys)  # process 0
  results = _finish(others)
  assert code == 0, err0[-3000:]
  for code, _, err in results:
    assert code == 0, err[-3000:]
  assert results[0][1] == "" and results[0][2] == ""  # process 1 is silent
  assert "test_loss" in out0  # a streamed population evaluates the test set only
  out = tmp_path / commands[1][commands[1].index("--out") + 1]
  # only process 0 wrote, into --out; nothing else appeared next to it
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.parts[-2], "one_process"])
  assert [p.name for p in out.parent.iterdir()] == [out.name]
  two_runs, one_run = _history(out), _history(tmp_path / "one_process")
  assert two_runs["round"] == one_run["round"] == [2, 4]
  assert {"test_loss", "update_norm_mean", "drift"} <= set(two_runs) <= set(one_run)
  for key in two_runs:
    if key != "elapsed":
      np.testing.assert_allclose(two_runs[key], one_run[key], rtol=1e-4, atol=1e-6, err_msg=key)
  for run, processes in ((out, 2), (tmp_path / "one_process", None)):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"]["devices"] == 4
    assert summary.get("processes") == processes and (run / "curves.png").exists()


def test_a_sweep_over_two_processes_equals_one_process(tmp_path, monkeypatch, capsys):
  """``fedjax-sim sweep`` with --coordinator: four grid points on 2 processes × 2 devices (a
  flattened sweep, one run per device) write the same results as one process with 4 devices;
  only process 0 writes and prints."""
  from tests.test_sweeps import GRID
  (tmp_path / "grid.toml").write_text(GRID)
  port = str(_free_port())
  argv = ["sweep", "--config", "grid.toml", "--quiet", "--coordinator", f"127.0.0.1:{port}",
          "--num-processes", "2", "--out", "two"]
  others = [_start([*argv, "--process-id", "1"], _env(2), tmp_path),
            _start(["sweep", "--config", "grid.toml", "--quiet", "--out", "one"], _env(4),
                   tmp_path)]
  monkeypatch.chdir(tmp_path)
  code, out0, err0 = _in_process([*argv, "--process-id", "0"], 2, monkeypatch, capsys)
  results = _finish(others)
  assert code == 0, err0[-3000:]
  for code, _, err in results:
    assert code == 0, err[-3000:]
  assert results[0][1] == "" and results[0][2] == ""  # process 1 is silent
  assert "train_loss" in out0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.toml", "one", "two"]
  rows = {}
  for name in ("two", "one"):
    with open(tmp_path / name / "results.csv") as f:
      rows[name] = list(csv.DictReader(f))
  assert [r["point"] for r in rows["two"]] == [r["point"] for r in rows["one"]] and rows["one"]
  for a, b in zip(rows["two"], rows["one"]):
    assert a["status"] == b["status"] == "completed"
    np.testing.assert_allclose(float(a["train_loss"]), float(b["train_loss"]), rtol=1e-4)
  point = tmp_path / "two" / rows["two"][0]["point"]
  engine = json.loads((point / "summary.json").read_text())["engine"]
  assert engine["devices"] == 4 and engine["flattened"] and engine["runs"] == 4


def test_a_killed_process_and_a_silent_coordinator_give_named_errors(tmp_path, monkeypatch,
                                                                     capsys):
  port = str(_free_port())
  argv = ["run", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
          "--peer-timeout", "5", "--set", "dataset=fedprox_synthetic", "--set", "rounds=200",
          "--set", "clients_per_round=8", "--set", "rounds_per_block=2", "--set", "eval_every=2",
          "--set", "checkpoint_every=none", "--set", "compilation_cache=none", "--quiet",
          "--out", "run"]
  # process 1 kills itself (SIGKILL) once round 2's metrics are written
  victim = _start([*argv, "--process-id", "1"], _env(2, FEDJAX_SIM_TEST_KILL_AFTER_ROUND="2",
                                                   TMPDIR=str(tmp_path)),
                  tmp_path)
  # meanwhile, a process whose coordinator never answers (nothing listens at that address)
  silent = f"127.0.0.1:{_free_port()}"
  lonely = _start(["run", "--coordinator", silent, "--num-processes", "2", "--process-id", "1",
                   "--connect-timeout", "1", "--out", "lonely"], _env(2), tmp_path)
  monkeypatch.chdir(tmp_path)
  code0, _, err0 = _in_process([*argv, "--process-id", "0"], 2, monkeypatch, capsys)
  (code1, _, err1), (code2, _, err2) = _finish([victim, lonely])
  assert code1 == 4 and "process 1's training was killed by SIGKILL" in err1, err1[-3000:]
  assert code0 == 4, err0[-3000:]
  assert "fedjax-sim: error: PeerLost: " in err0 and "this is process 0 of 2" in err0
  assert "Traceback" not in err0 and "Check failure stack trace" not in err0
  rounds = _history(tmp_path / "run")["round"]  # what process 0 wrote is kept
  assert rounds[0] == 2 and rounds[-1] < 200
  assert code2 == 4, err2[-3000:]
  assert f"fedjax-sim: error: CoordinatorUnreachable: the coordinator at {silent} did not " \
         "answer within 1 s" in err2
  assert "Traceback" not in err2 and not (tmp_path / "lonely").exists()


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:8476", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be an integer in 0..1 (num_processes=2), got 2"),
    (["--coordinator", "127.0.0.1:8476", "--num-processes", "2", "--process-id", "-1"],
     "--process-id must be an integer in 0..1"),
    (["--coordinator", "127.0.0.1:8476", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be an integer >= 1, got 0"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     "--coordinator must be HOST:PORT (e.g. 127.0.0.1:8476 or [::1]:8476), got 'localhost'"),
    (["--coordinator", "10.0.0.1:70000", "--num-processes", "2", "--process-id", "0"],
     "--coordinator port must be in 1..65535, got 70000"),
    (["--coordinator", "127.0.0.1:8476", "--process-id", "0"],
     "a multi-process run needs --coordinator HOST:PORT, --num-processes N and --process-id I; "
     "missing --num-processes"),
    (["--coordinator", "127.0.0.1:8476", "--num-processes", "2", "--process-id", "0",
      "--peer-timeout", "0"], "--peer-timeout must be a positive number of seconds, got 0.0"),
    (["--connect-timeout", "5"], "--connect-timeout is for a multi-process run"),
])
def test_bad_process_flags_are_named(flags, message, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "grid.toml").write_text('dataset = "logistic_demo"\n[grid]\nseed = [0, 1]\n')
  for command in (["run"], ["sweep", "--config", "grid.toml"]):  # the flags both commands take
    assert main([*command, *flags, "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert f"fedjax-sim: error: {message}" in err and "Traceback" not in err, command
    assert not (tmp_path / "out").exists()


def test_initialize_checks_its_arguments_and_when_it_is_called():
  for args, kwargs, message in [
      (("127.0.0.1:1", 2, 2), {}, r"process_id must be an integer in 0\.\.1 .*got 2"),
      (("127.0.0.1:1", 2, True), {}, "process_id .* got True"),
      (("127.0.0.1:1", 0, 0), {}, "num_processes must be an integer >= 1, got 0"),
      (("127.0.0.1", 1, 0), {}, "coordinator must be HOST:PORT .* got '127.0.0.1'"),
      (("host:0", 1, 0), {}, "port must be in 1..65535, got 0"),
      ((8476, 1, 0), {}, "got 8476"),
      (("[::1]:1", 1, 0), {"timeout": -1}, "timeout must be a positive number of seconds"),
      (("[::1]:1", 1, 0), {"local_devices": [0, 0]}, "local_devices .* got \\[0, 0\\]"),
      (("[::1]:1", 1, 0), {"cpu_devices": 0}, "cpu_devices must be an integer >= 1, got 0")]:
    with pytest.raises(ValueError, match=message):
      fs.distributed.initialize(*args, **kwargs)
  assert distributed.parse_address("[::1]:8476") == ("::1", 8476)
  assert str(distributed.parse_address("[::1]:8476")) == "[::1]:8476"
  jax.devices()  # JAX has started in this process: too late to join a multi-process run
  with pytest.raises(distributed.DistributedError, match="before anything runs on a JAX device"):
    fs.distributed.initialize("127.0.0.1:8476", 2, 1)
  assert not distributed.is_initialized() and distributed.is_main()
  assert distributed.process_count() == 1


def test_a_port_in_use_and_a_silent_address_are_named():
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = distributed.Address("127.0.0.1", taken.getsockname()[1])
    with pytest.raises(distributed.DistributedError, match=f"cannot listen on port {address.port}"):
      distributed._check_port_free(address)
    distributed._wait_for_coordinator(address, 1)  # it answers: returns
  with pytest.raises(distributed.CoordinatorUnreachable,
                     match=f"coordinator at {address} did not answer within 0.5 s"):
    distributed._wait_for_coordinator(address, 0.5)


# What JAX 0.10.2 prints before it aborts a process (abridged from real runs).
JAX_DEAD_PEER = """E1130 coordination_service.cc:1549] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed.
F1130 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error.
"""
JAX_DEAD_COORDINATOR = """F1130 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues.
"""
JAX_NOT_ALL_CONNECTED = """F1130 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died. absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded

RPC: /xla.coordination.CoordinationService/RegisterTask
"""
JAX_SHUTDOWN_DEAD_PEER = """F1130 client.h:80] Terminating process because the JAX distributed service detected fatal errors. absl::Status: INTERNAL: Shutdown barrier has failed.
Barrier result: 'INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat timeout. This indicates that the remote task has failed.
"""


def test_jax_failure_messages_become_named_errors():
  explain = lambda log: distributed.explain_failure(log, "127.0.0.1:8476", 0, 2, timeout=9,
                                                    peer_timeout=5)
  error = explain("round 10/50\n" + JAX_DEAD_PEER)
  assert isinstance(error, distributed.PeerLost)
  assert str(error).startswith("process 1 stopped sending heartbeats for 5 s")
  assert isinstance(explain(JAX_SHUTDOWN_DEAD_PEER), distributed.PeerLost)
  assert str(explain(JAX_SHUTDOWN_DEAD_PEER)).startswith("process 1 stopped sending heartbeats")
  error = distributed.explain_failure(JAX_DEAD_COORDINATOR, "127.0.0.1:8476", 1, 2)
  assert isinstance(error, distributed.PeerLost)
  assert "the coordinator (process 0 at 127.0.0.1:8476) died" in str(error)
  error = explain(JAX_NOT_ALL_CONNECTED)
  assert isinstance(error, distributed.CoordinatorUnreachable)
  assert "not all 2 processes connected to the coordinator at 127.0.0.1:8476 within 9 s" \
      in str(error)
  assert explain("fedjax-sim: error: clients_per_round=20 is larger than the population") is None
  gloo = RuntimeError("UNKNOWN: Gloo AllGather failed: [pair.cc:538] Read error [127.0.0.1]:"
                      "15261: Connection reset by peer")
  error = distributed.explain_exception(gloo, "127.0.0.1:8476", 0, 2)
  assert isinstance(error, distributed.PeerLost) and "Connection reset by peer" in str(error)
  assert distributed.explain_exception(ValueError("bad shape"), "127.0.0.1:8476", 0, 2) is None
