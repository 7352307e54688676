"""Every ``fedjax-sim`` command in the README's code blocks runs as written.

Commands run in-process (``fedjax_sim.cli.main``) in a fresh directory holding the files the
README names (``exp.toml``, ``data.npz``, ``clients.npz``). Every ``run`` gets ``--set rounds=1``
(one round exercises the same configuration), ``--set bucketing=false`` (size buckets change no
number, only speed, and one bucket compiles once instead of once per bucket) and, where the
command leaves the cohort at the default 500 of 5,000 clients, 5 clients per round (a fraction
of 0.001 where it gives ``client_fraction``).
"""

import json
import pathlib
import re
import shlex
import shutil

import numpy as np
import pytest

from fedjax_sim.cli import main

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_commands(text: str) -> list[list[str]]:
  """The argv (after ``fedjax-sim``) of every ``fedjax-sim`` command in the ``` blocks, in order,
  each once; ``\\``-continued lines are joined and split as a POSIX shell would."""
  commands = []
  for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
    for line in block.replace("\\\n", " ").splitlines():
      if "fedjax-sim " not in line and not line.rstrip().endswith("fedjax-sim"):
        continue
      argv = shlex.split(line[line.index("fedjax-sim"):], comments=True)[1:]
      if argv not in commands:
        commands.append(argv)
  return commands


def test_readme_commands_are_found():
  commands = readme_commands(README.read_text())
  assert [] in [c[1:] for c in commands if c[:1] == ["run"]]  # the default run
  assert ["list"] in commands and ["run", "--help"] in commands
  assert any("dataset=npz" in c for c in commands)
  assert readme_commands("```\nfedjax-sim run --set a=\\\"b\\\" \\\n  --set c=1  # note\n```\n") \
      == [["run", "--set", 'a="b"', "--set", "c=1"]]


def _files(directory: pathlib.Path) -> None:
  """The inputs the README's commands name, as a user would have them (the TOML files the README
  shows, e.g. ``grid.toml``, from its own code blocks)."""
  for block in re.findall(r"^```toml\n(.*?)^```", README.read_text(), re.S | re.M):
    name = re.match(r"#\s*(\S+\.toml)", block)
    if name:
      (directory / name.group(1)).write_text(block)
  rng = np.random.default_rng(0)
  (directory / "exp.toml").write_text("local_epochs = 1\nbatch_size = 16\n")
  np.savez(directory / "data.npz", x=rng.normal(size=(1000, 8)).astype(np.float32),
           y=rng.integers(0, 4, 1000))
  clients = {}
  for k, n in enumerate(rng.integers(5, 40, 30)):
    clients[f"x/u{k}"] = rng.normal(size=(n, 8)).astype(np.float32)
    clients[f"y/u{k}"] = rng.integers(0, 4, n).astype(np.float64)  # labels written as 3.0
  np.savez(directory / "clients.npz", **clients)


def _small(argv: list[str]) -> list[str]:
  """``argv`` with the overrides that keep a README command to one small round (a resume runs
  one more round: it may change nothing else)."""
  if argv[:1] == ["sweep"]:
    return [*argv, "--set", "rounds=1", "--quiet"]
  if argv[:1] != ["run"] or "--help" in argv:
    return argv
  if "--resume" in argv:
    return [*argv, "--set", "rounds=2", "--quiet"]
  keys = {a.split("=", 1)[0] for a in argv}
  cohort = ("client_fraction=0.001" if "client_fraction" in keys else
            "clients_per_round=5" if "clients_per_round" not in keys else "rounds=1")
  return [*argv, "--set", "rounds=1", "--set", "bucketing=false", "--set", cohort, "--quiet"]


def _needs(argv: list[str]) -> list[str]:
  """The run directories a command reads (``--resume DIR``, ``compare RUN...``)."""
  if argv[:1] == ["compare"]:
    return [a for a in argv[1:argv.index("--metric")] if not a.startswith("-")]
  return [argv[argv.index("--resume") + 1]] if "--resume" in argv else []


# The processes of a multi-process run must start together: tests/test_distributed.py runs them.
COMMANDS = [c for c in readme_commands(README.read_text()) if "--coordinator" not in c]
_MADE: dict[str, pathlib.Path] = {}  # run directories the README's commands wrote, for reuse


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_readme_command_runs_as_written(argv, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  _files(tmp_path)
  for run_dir in _needs(argv):  # first the README's commands that write them (once per worker)
    if run_dir not in _MADE:
      maker = next(c for c in COMMANDS if c[:1] == ["run"] and c[-2:] == ["--out", run_dir])
      assert main(_small(maker)) == 0
      _MADE[run_dir] = tmp_path / "made" / run_dir
      shutil.copytree(tmp_path / run_dir, _MADE[run_dir])
    else:
      shutil.copytree(_MADE[run_dir], tmp_path / run_dir)
  capsys.readouterr()
  argv = _small(argv)
  try:
    code = main(argv)
  except SystemExit as e:  # --help
    code = e.code
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert "Traceback" not in captured.err and captured.out
  if "--resume" in argv:  # the resumed run's rows continue the first one's
    rows = (tmp_path / _needs(argv)[0] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [1, 2]
  elif argv[:1] == ["run"] and "--help" not in argv:  # the run directory the README describes
    out = pathlib.Path(argv[argv.index("--out") + 1]) if "--out" in argv else \
        next((tmp_path / "runs").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and (out / "curves.png").exists()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [1]
    if "per_client_metrics=true" in argv:  # every client's metrics, one line per data set
      lines = [json.loads(l) for l in (out / "clients.jsonl").read_text().splitlines()]
      assert {l["split"] for l in lines} == set(["test"] if "population=\"host\"" in argv
                                               else ["train", "test"])
      for line in lines:
        assert len(line["client_ids"]) == len(line["loss"]) == len(line["accuracy"])
      final = summary["final"]
      test = next(l for l in lines if l["split"] == "test")
      np.testing.assert_allclose(np.mean(test["accuracy"]), final["test_client_accuracy_mean"],
                                 rtol=1e-6)
