"""The command line end to end, and its one-line errors for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fedjax_sim.cli import CONFIG_KEYS, main

SMALL = ["--set", "dataset=logistic_demo", "--set", "model=logistic_regression",
         "--set", "clients_per_round=3", "--set", "batch_size=64", "--set", "rounds=4",
         "--set", "eval_every=2", "--quiet"]


def test_run_writes_run_directory(tmp_path, capsys):
  config = tmp_path / "exp.toml"
  config.write_text('local_epochs = 2\nclient_lr = 0.1\n')
  out = tmp_path / "run"
  assert main(["run", "--config", str(config), "--out", str(out), *SMALL]) == 0
  resolved = json.loads((out / "config.json").read_text())
  assert resolved["local_epochs"] == 2 and resolved["rounds"] == 4
  rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [2, 4]
  assert {"train_loss", "train_accuracy", "elapsed"} <= rows[0].keys()
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["final"]["round"] == 4
  assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
  printed = capsys.readouterr().out
  assert "train_loss" in printed and "clients per round" in printed
  chunks = summary["engine"]["bucket_chunks"]  # the summary names the chunks actually vmapped
  assert f"(chunks of {min(chunks)}" in printed
  # the same --out again must not overwrite the finished run
  assert main(["run", "--out", str(out), *SMALL]) == 2
  assert "not empty" in capsys.readouterr().err


def _error(args, capsys, tmp_path):
  code = main(["run", "--out", str(tmp_path / "r"), *SMALL, *args])
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert "Traceback" not in err and err.startswith("fedjax-sim: error:")
  return err


@pytest.mark.parametrize("setting,expected", [
    ("colour=blue", "unknown config key 'colour'"),
    ("rounds=0", "rounds must be a positive integer, got 0"),
    ("batch_size=-4", "batch_size must be a positive integer or None, got -4"),
    ("local_epochs=0", "local_epochs must be a positive integer"),
    ("client_lr=-1", "client_lr must be a positive finite number, got -1"),
    ("clients_per_round=9", "clients_per_round=9 is larger than the population of 5"),
    ("client_fraction=1.5", "client_fraction must be in (0, 1], got 1.5"),
    ("algorithm=fedmagic", "unknown algorithm 'fedmagic'"),
    ("model=transformer", "unknown model 'transformer'"),
    ("plan=warp", "plan must be one of"),
])
def test_bad_values_get_one_line_errors(setting, expected, capsys, tmp_path):
  assert expected in _error(["--set", setting], capsys, tmp_path)


def _npz(tmp_path, **arrays):
  path = tmp_path / "data.npz"
  np.savez(path, **arrays)
  return ["--set", "dataset=npz", "--set", f"dataset_options.path='{path}'",
          "--set", "clients_per_round=none"]


@pytest.mark.parametrize("arrays,expected", [
    ({"x/a": np.zeros((0, 4)), "y/a": np.zeros(0, int)}, "client 'a' has no examples"),
    ({"x/a": np.zeros((3, 4)), "y/a": np.zeros(2, int)}, "x has 3 examples but y has 2"),
    ({"x/a": np.full((2, 4), np.nan), "y/a": np.zeros(2, int)}, "NaN"),
])
def test_bad_data_files_get_one_line_errors(arrays, expected, capsys, tmp_path):
  assert expected in _error(_npz(tmp_path, **arrays), capsys, tmp_path)


def test_diverging_learning_rate_stops_and_keeps_metrics(tmp_path, capsys):
  out = tmp_path / "run"
  code = main(["run", "--out", str(out), "--quiet", "--set", "dataset=linear_regression",
               "--set", "model=linear_regression", "--set", "client_lr=100",
               "--set", "rounds=20", "--set", "eval_every=1", "--set", "clients_per_round=none"])
  err = capsys.readouterr().err
  assert code == 3
  assert "diverged at round" in err and "Traceback" not in err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "diverged"
  rows = (out / "metrics.jsonl").read_text().splitlines()
  assert len(rows) == summary["diverged_at_round"] - 1 >= 1


def test_help_lists_every_key():
  text = subprocess.run([sys.executable, "-m", "fedjax_sim.cli", "run", "--help"],
                        capture_output=True, text=True, check=True).stdout
  for key in CONFIG_KEYS:
    assert key in text
  top = subprocess.run([sys.executable, "-m", "fedjax_sim.cli", "--help"], capture_output=True,
                       text=True, check=True).stdout
  assert "run" in top and "list" in top


def test_list_names_registered_algorithms_and_datasets(capsys, monkeypatch):
  import re
  from fedjax_sim import aggregators, algorithms, attacks, datasets
  from fedjax_sim.cli import CLIENT_OPTIMIZERS, LR_SCHEDULES, MODELS
  monkeypatch.setenv("COLUMNS", "100")
  assert main(["list"]) == 0
  out = capsys.readouterr().out
  entries = re.findall(r"^  (\w+) +(.*?)(?=^\S|^  \w|\Z)", out, re.S | re.M)
  names = [n for n, _ in entries]
  assert names == [*algorithms.REGISTRY, *aggregators.REGISTRY, *attacks.REGISTRY, *MODELS,
                   *datasets.REGISTRY, *CLIENT_OPTIMIZERS, *LR_SCHEDULES]
  for name, text in entries:  # whole sentences, no reST roles, lines within the width
    assert text.rstrip().endswith((".", ")")), (name, text)
    assert ":func:" not in text and "``" not in text
  assert max(map(len, out.splitlines())) <= 100
  described = {n: " ".join(text.split()) for n, text in entries}
  assert "mu=0.01" in described["fedprox"] and "max_norm (required)" in described["clip"]
  assert "num_clients=5000" in described["power_law"] and "path (required)" in described["npz"]
  assert "decay_steps (required), alpha=0.0" in described["cosine"]


def test_default_config_is_the_documented_scale():
  from fedjax_sim.cli import resolve_config
  config = resolve_config(None, [])
  assert config["dataset"] == "power_law" and config["clients_per_round"] >= 100
  from fedjax_sim import datasets
  train, _, _ = datasets.REGISTRY["power_law"][0](0)
  assert train.num_clients >= 1000


@pytest.mark.parametrize("algorithm,options", [
    ("fedprox", ["--set", "algorithm_options.mu=0.1"]),
    ("scaffold", ["--set", "algorithm_options.option='I'", "--set", "aggregator=clip",
                  "--set", "aggregator_options.max_norm=5.0",
                  "--set", "aggregator_options.inner=median"]),
    ("fedadam", ["--set", "server_lr=0.05", "--set", "algorithm_options.convention='optax'",
                 "--set", "aggregator=dp_mean", "--set", "aggregator_options.clip_norm=1.0",
                 "--set", "aggregator_options.noise_multiplier=0.5", "--set", "sampling='poisson'",
                 "--set", "client_fraction=0.6"]),
    ("local_sgd_growing", ["--set", "algorithm_options.max_local_steps=4",
                           "--set", "algorithm_options.every=2", "--set", "attack=sign_flip",
                           "--set", "attack_options.ids=[1]", "--set", "aggregator=trimmed_mean",
                           "--set", "aggregator_options.beta=0.34"]),
])
def test_run_every_algorithm_family_from_the_config(algorithm, options, tmp_path):
  out = tmp_path / algorithm
  assert main(["run", "--out", str(out), *SMALL, "--set", f"algorithm={algorithm}", *options,
               "--set", "system.straggler_fraction=0.3", "--set", "system.straggler_policy='partial'",
               "--set", "dissimilarity=true"]) == 0
  rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert {"drift", "grad_dissimilarity", "participants", "train_client_accuracy_p10"} <= rows[-1].keys()
  summary = json.loads((out / "summary.json").read_text())
  assert summary["engine"]["aggregator"] == {"scaffold": "clip(median)", "fedadam": "dp_mean",
                                             "local_sgd_growing": "trimmed_mean(0.34)"
                                             }.get(algorithm, "mean")
  if algorithm == "local_sgd_growing":  # an attack from the config: attackers counted per round
    assert summary["engine"]["attack"] == "sign_flip" and "attackers" in rows[-1]
  if algorithm == "fedadam":  # DP: ε recorded per evaluated round and in the summary
    assert summary["final"]["epsilon"] == rows[-1]["epsilon"] > rows[0]["epsilon"] > 0
    assert summary["engine"]["privacy"]["sampling"] == "poisson"


@pytest.mark.parametrize("args,message", [
    (["--set", "algorithm=fedprox", "--set", "algorithm_options.mu=-1"], "mu must be"),
    (["--set", "algorithm=fedprox", "--set", "algorithm_options.nu=1"], "algorithm_options"),
    (["--set", "system.straggler_policy='wait'"], "straggler_policy"),
    (["--set", "system.speed=1"], "unknown system keys"),
    (["--set", "aggregator=trimmed"], "unknown aggregator 'trimmed'"),
    (["--set", "aggregator=median", "--set", "aggregator_options.beta=0.1"],
     "aggregator 'median' has no option 'beta'; its options: none"),
    (["--set", "aggregator=clip"],
     "aggregator 'clip' needs option 'max_norm' (aggregator_options.max_norm=...)"),
    (["--set", "attack=sign_flip", "--set", "attack_options.std=1"],
     "attack 'sign_flip' has no option 'std'; its options: fraction, scale, ids"),
    (["--set", "dataset=npz"], "dataset 'npz' needs option 'path' (dataset_options.path=...)"),
    (["--set", "aggregator=clip", "--set", "aggregator_options.max_norm=-2"],
     "max_norm must be a positive finite number, got -2"),
    (["--set", "aggregator=clip", "--set", "aggregator_options.max_norm=1",
      "--set", "aggregator_options.inner=clip"], "aggregator_options.inner must name"),
    (["--set", "aggregator=clip", "--set", "aggregator_options.max_norm=1",
      "--set", "aggregator_options.inner=dp_mean"], "aggregator_options.inner must name"),
    (["--set", "aggregator=dp_mean", "--set", "aggregator_options.clip_norm=1",
      "--set", "aggregator_options.noise_multiplier=-1"], "noise_multiplier must be a finite "
     "number >= 0, got -1"),
    (["--set", "sampling=bernoulli"], "sampling must be 'fixed' or 'poisson', got 'bernoulli'"),
    (["--set", "sampling=poisson"], "give client_fraction"),
    (["--set", "attack=sybil"], "unknown attack 'sybil'"),
    (["--set", "attack=sign_flip", "--set", "attack_options.fraction=1.5"],
     "attack_options.fraction must be in [0, 1), got 1.5"),
    (["--set", "attack_options.fraction=0.1"], "given without an attack"),
    (["--set", "attack=ipm", "--set", "attack_options.ids=[7]"],
     "attack ids must be below the population size 5, got 7"),
    (["--set", "aggregator=krum", "--set", "aggregator_options.num_byzantine=1"],
     "needs more than 2·1 + 2 = 4 clients per round, the cohort has 3"),
])
def test_bad_algorithm_and_system_options_are_named(args, message, capsys, tmp_path):
  assert message in _error(args, capsys, tmp_path)


def test_partitioned_npz_and_data_describe(tmp_path, capsys):
  rng = np.random.default_rng(0)
  path = tmp_path / "central.npz"
  np.savez(path, x=rng.normal(size=(300, 4)).astype(np.float32), y=rng.integers(0, 3, 300))
  keys = ["--set", "dataset=npz", "--set", f"dataset_options.path='{path}'",
          "--set", "dataset_options.partition='dirichlet'", "--set", "dataset_options.num_clients=6",
          "--set", "dataset_options.alpha=0.3"]
  png = tmp_path / "labels.png"
  assert main(["data", "describe", *keys, "--png", str(png)]) == 0
  printed = capsys.readouterr().out
  assert "6" in printed and png.read_bytes()[:4] == b"\x89PNG"
  out = tmp_path / "run"
  assert main(["run", "--out", str(out), *SMALL[4:], "--set", "model=softmax_regression", *keys]) == 0
  bad = ["--set", "dataset_options.partition='zipf'"]
  assert main(["data", "describe", *keys, *bad]) == 2
  assert "partition must be one of" in capsys.readouterr().err


def test_compilation_cache_is_turned_on_unless_configured(tmp_path):
  import jax
  from fedjax_sim.cli import ConfigError, use_compilation_cache
  configured = jax.config.jax_compilation_cache_dir  # the test session's own cache
  assert configured
  use_compilation_cache(str(tmp_path))
  assert jax.config.jax_compilation_cache_dir == configured  # an existing cache is kept
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    use_compilation_cache(str(tmp_path / "xla"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
  finally:
    jax.config.update("jax_compilation_cache_dir", configured)
  with pytest.raises(ConfigError, match="compilation_cache.*5"):
    use_compilation_cache(5)


def test_every_public_module_is_reachable_from_the_package():
  import pkgutil
  import fedjax_sim as fs
  public = [m.name for m in pkgutil.iter_modules(fs.__path__) if not m.name.startswith("_")]
  assert {"partition", "datasets", "cli", "simulation"} <= set(public)
  for name in public:
    assert name in fs.__all__ and getattr(fs, name).__name__ == f"fedjax_sim.{name}"
  assert fs.ServerState is fs.engine.ServerState and "ServerState" in fs.__all__


def test_optimizer_and_schedules_from_the_config_are_optax_ones():
  import jax.numpy as jnp
  import optax
  from fedjax_sim.cli import build_algorithm, build_lr_schedule, resolve_config
  config = resolve_config(None, ["client_lr=0.2", "client_lr_schedule='warmup_cosine'",
                                 "client_lr_schedule_options.warmup_steps=3",
                                 "client_lr_schedule_options.decay_steps=10",
                                 "client_optimizer='adam'", "client_optimizer_options.b2=0.9",
                                 "server_lr_schedule='cosine'",
                                 "server_lr_schedule_options.decay_steps=4"])
  want = optax.warmup_cosine_decay_schedule(0.0, 0.2, 3, 10, 0.0)
  got = build_lr_schedule("client", 0.2, config)
  for count in (0, 1, 3, 7, 12):
    assert float(got(count)) == float(want(count))
  algo = build_algorithm(config)
  assert build_algorithm({**config, "algorithm": "fedsgd", "client_optimizer": "sgd",
                          "client_lr_schedule": "constant", "client_lr_schedule_options": {},
                          "client_optimizer_options": {}}).name == "fedsgd"  # server schedule
  reference = optax.adam(want, b2=0.9)
  params, grads = {"w": jnp.ones(3)}, [{"w": jnp.array([1.0, -2.0, 0.5]) * i} for i in (1, 2, 3)]
  s1, s2 = algo.client_optimizer.init(params), reference.init(params)
  for g in grads:
    (u1, s1), (u2, s2) = algo.client_optimizer.update(g, s1, params), reference.update(g, s2, params)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)
  server = optax.sgd(optax.cosine_decay_schedule(1.0, 4))  # fedavg's default server step 1.0
  st1, st2 = algo.server_optimizer.init(params), server.init(params)
  for g in grads:
    (u1, st1), (u2, st2) = algo.server_optimizer.update(g, st1), server.update(g, st2)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["client_lr_schedule='cosine'"], "client_lr_schedule 'cosine' needs option 'decay_steps' "
     "(client_lr_schedule_options.decay_steps=...)"),
    (["client_lr_schedule='warmup'", "client_lr_schedule_options.warmup_steps=0"],
     "client_lr_schedule_options.warmup_steps must be a positive integer, got 0"),
    (["client_lr_schedule='step'"], "unknown client_lr_schedule 'step'"),
    (["client_optimizer='adamm'"], "unknown client_optimizer 'adamm'"),
    (["client_optimizer='adam'", "client_optimizer_options.beta1=0.9"],
     "client_optimizer 'adam' has no option 'beta1'; its options: b1, b2"),
    (["client_optimizer='adam'", "algorithm='scaffold'"],
     "algorithm 'scaffold' takes no client_optimizer"),
    (["client_optimizer='adam'", "client_lr_per='round'"], "client_lr_per='round' scales plain"),
    (["algorithm='fedsgd'", "client_lr_schedule='warmup'",
      "client_lr_schedule_options.warmup_steps=2"], "fedsgd's one step is the server's"),
    (["server_lr_schedule_options.decay_steps=2"], "given without a server_lr_schedule"),
    (["population='cloud'"], "population must be 'device' or 'host', got 'cloud'"),
    (["bucketing=2"], "bucketing must be 'auto', true or false, got 2"),
    (["population='host'", "dissimilarity=true"], "population='host' streams cohorts"),
    (["dataset_options.foo=1"], "dataset 'logistic_demo' has no option 'foo'; its options: none"),
])
def test_bad_optimizer_schedule_and_engine_keys_are_named(args, message, capsys, tmp_path):
  assert message in _error([a for kv in args for a in ("--set", kv)], capsys, tmp_path)


def test_missing_partition_option_is_named(tmp_path, capsys):
  path = tmp_path / "central.npz"
  np.savez(path, x=np.zeros((20, 2), np.float32), y=np.arange(20) % 3)
  keys = ["--set", "dataset=npz", "--set", f"dataset_options.path='{path}'",
          "--set", "dataset_options.num_clients=4"]
  assert main(["data", "describe", *keys, "--set", "dataset_options.partition='dirichlet'"]) == 2
  assert ("partition 'dirichlet' needs option(s) 'alpha' (in the CLI: dataset_options.alpha=...)"
          in capsys.readouterr().err)
  assert main(["data", "describe", *keys, "--set", "dataset_options.alpha=0.5"]) == 2
  assert ("dataset_options ['alpha', 'num_clients'] split a centralized file: they need "
          "dataset_options.partition" in capsys.readouterr().err)
