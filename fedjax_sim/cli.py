"""The ``fedjax-sim`` command line: ``run`` an experiment, ``list`` what is available.

``fedjax-sim run`` with no arguments trains softmax regression with FedAvg on the embedded
5,000-client power-law population, 500 clients per round, 500 rounds (under a minute on 2 cores). ``--config FILE.toml`` and
``--set key=value`` change any key below; the run directory gets ``config.json``,
``metrics.jsonl`` (written as rounds finish), ``summary.json`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import sys
import time
import tomllib

# key -> (default, help). The value's type is checked by the factory it feeds.
CONFIG_KEYS = {
    "algorithm": ("fedavg", "federated algorithm (see `fedjax-sim list`)"),
    "algorithm_options": ({}, "table of the algorithm's own options, e.g. algorithm_options.mu=0.1 "
                          "(fedprox), .option='I' (scaffold), .momentum, .beta1, .beta2, .tau, "
                          ".convention (fedadam...), .max_local_steps, .every (local_sgd_*)"),
    "aggregator": ("mean", "how client updates are combined: mean | median | clip | dp_mean | "
                   "trimmed_mean | krum | geometric_median | centered_clip | quantize | top_k | "
                   "random_k | sign (see `fedjax-sim list`)"),
    "aggregator_options": ({}, "table of the aggregator's options, e.g. aggregator_options."
                           "max_norm=1.0, aggregator_options.inner='median' (clip); "
                           ".clip_norm, .noise_multiplier, .target_quantile, .delta, .accountant "
                           "(dp_mean); .beta (trimmed_mean); .num_byzantine, .num_selected "
                           "(krum); .tau, .iters (centered_clip); .bits (quantize); .fraction, "
                           ".error_feedback (top_k, random_k); .inner (compressors)"),
    "attack": (None, "Byzantine clients: sign_flip | gaussian | scaling | alie | ipm | label_flip "
               "(none = no attack; see `fedjax-sim list`)"),
    "attack_options": ({}, "table of the attack's options, e.g. attack_options.fraction=0.2, "
                       ".scale (sign_flip), .std (gaussian), .factor (scaling), .z (alie), "
                       ".epsilon (ipm), .ids=[0, 3] (explicit Byzantine clients)"),
    "model": ("softmax_regression", "softmax_regression | logistic_regression | linear_regression "
              "| mlp | cnn | shakespeare_lstm"),
    "dataset": ("power_law", "embedded dataset or 'npz' (see `fedjax-sim list`)"),
    "dataset_options": ({}, "table of dataset options, e.g. dataset_options.alpha=1.0"),
    "rounds": (500, "number of federated rounds"),
    "clients_per_round": (500, "cohort size m (set to 'none' for full participation)"),
    "client_fraction": (None, "fraction C of clients per round (m = max(1, int(C*K))); "
                        "use instead of clients_per_round"),
    "sampling": ("fixed", "cohort sampling: fixed (clients_per_round without replacement) | "
                 "poisson (each client independently with probability client_fraction)"),
    "local_epochs": (1, "local epochs E per round"),
    "local_steps": (None, "fixed local steps H per round instead of epochs (Local SGD)"),
    "batch_size": (16, "local mini-batch size B ('none' = full batch)"),
    "client_lr": (0.1, "client learning rate (for fedsgd: the step on the mean gradient)"),
    "server_lr": (None, "server learning rate (none = the algorithm's default; for fedavg a "
                  "server SGD step on the pseudo-gradient, 1.0 = FedAvg)"),
    "weighting": ("num_examples", "server average weights: num_examples | uniform"),
    "shuffle": (True, "reshuffle client data every epoch"),
    "hidden_sizes": ([200, 200], "hidden layer sizes of the mlp model"),
    "system": ({}, "stragglers and dropouts: system.straggler_fraction, system.straggler_policy "
               "(drop | partial), system.dropout_rate"),
    "dissimilarity": (False, "measure the gradient dissimilarity at evaluated rounds"),
    "seed": (0, "the seed all randomness derives from"),
    "eval_every": (10, "evaluate every this many rounds (and after the last)"),
    "plan": ("auto", "cohort execution plan: auto | vmap | chunked | scan | host_loop"),
    "chunk_size": (None, "clients per vmap chunk (auto when none)"),
    "rounds_per_block": (10, "rounds per compiled call"),
    "compilation_cache": ("~/.cache/fedjax_sim/xla", "directory of JAX's persistent compilation "
                          "cache, so a rerun skips compilation ('none' = off; a cache already "
                          "configured, e.g. by JAX_COMPILATION_CACHE_DIR, is kept)"),
}

MODELS = ("softmax_regression", "logistic_regression", "linear_regression", "mlp", "cnn",
          "shakespeare_lstm")
TABLES = ("dataset_options", "algorithm_options", "aggregator_options", "attack_options", "system")


class ConfigError(ValueError):
  """A bad config key or value; the message names it."""


def _parse_value(text: str):
  if text.strip().lower() in ("none", "null"):
    return None
  try:
    return tomllib.loads(f"v = {text}")["v"]
  except tomllib.TOMLDecodeError:
    return text


def resolve_config(config_file: str | None, overrides: list[str]) -> dict:
  """Defaults, then the TOML file, then ``key=value`` overrides; rejects unknown keys."""
  config = {k: (dict(v[0]) if isinstance(v[0], dict) else v[0]) for k, v in CONFIG_KEYS.items()}
  if config_file is not None:
    try:
      with open(config_file, "rb") as f:
        loaded = tomllib.load(f)
    except FileNotFoundError:
      raise ConfigError(f"config file {config_file!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
      raise ConfigError(f"config file {config_file!r} is not valid TOML: {e}") from None
    for key, value in loaded.items():
      _set(config, key, value)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    _set(config, key.strip(), _parse_value(text))
  return config


def _set(config: dict, key: str, value) -> None:
  table, _, sub = key.partition(".")
  if table in TABLES and sub:
    config[table][sub] = value
    return
  if key not in CONFIG_KEYS:
    raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(CONFIG_KEYS)}")
  if key in TABLES and not isinstance(value, dict):
    raise ConfigError(f"{key} must be a table, got {value!r}")
  if isinstance(value, str) and value.lower() in ("none", "null"):
    value = None
  config[key] = value
  if key == "client_fraction" and value is not None:
    config["clients_per_round"] = None


def build_experiment(config: dict):
  """Turns a resolved config into ``(algorithm, model, train, test)``; raises ConfigError."""
  import numpy as np
  from fedjax_sim import algorithms, datasets, models
  from fedjax_sim.data import DataError

  name = config["algorithm"]
  if name not in algorithms.REGISTRY:
    raise ConfigError(f"unknown algorithm {name!r}; choose from {', '.join(algorithms.REGISTRY)}")
  if config["model"] not in MODELS:
    raise ConfigError(f"unknown model {config['model']!r}; choose from {', '.join(MODELS)}")
  try:
    algo = build_algorithm(config)
    train, test, num_classes = load_dataset(config)
    features = int(np.prod(train.feature_shape))
    kind = config["model"]
    if kind == "linear_regression":
      model = models.linear_regression(features)
    elif kind == "logistic_regression":
      model = models.logistic_regression(features)
    elif kind == "softmax_regression":
      model = models.softmax_regression(features, num_classes or 2)
    elif kind == "mlp":
      hidden = config["hidden_sizes"]
      if not isinstance(hidden, list) or not hidden:
        raise ConfigError(f"hidden_sizes must be a non-empty list of sizes, got {hidden!r}")
      model = models.mlp(features, tuple(hidden), num_classes or 2)
    elif kind == "shakespeare_lstm":
      model = models.shakespeare_lstm(vocab_size=num_classes or datasets.VOCAB_SIZE,
                                      seq_len=train.feature_shape[0] if train.feature_shape else None)
    else:
      side = int(round(math.sqrt(features)))
      if side * side != features:
        raise ConfigError(f"model 'cnn' needs square single-channel images; dataset "
                          f"{config['dataset']!r} has {features} features")
      model = models.cnn((side, side, 1), num_classes or 2)
  except (ValueError, DataError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(str(e)) from None
  return algo, model, train, test


def build_algorithm(config: dict):
  """The configured algorithm: shared keys plus ``algorithm_options``; raises ValueError."""
  import inspect
  from fedjax_sim import algorithms
  name, options = config["algorithm"], dict(config["algorithm_options"])
  factory = algorithms.REGISTRY[name]
  if name == "fedsgd":
    shared = dict(server_lr=config["server_lr"] or config["client_lr"], weighting=config["weighting"])
  else:
    shared = dict(client_lr=config["client_lr"], batch_size=config["batch_size"],
                  shuffle=config["shuffle"], weighting=config["weighting"],
                  local_epochs=config["local_epochs"], local_steps=config["local_steps"])
    if name.startswith("local_sgd"):
      del shared["local_epochs"]
      if name != "local_sgd" or shared["local_steps"] is None:
        shared.pop("local_steps")
    if config["server_lr"] is not None:
      shared["server_lr"] = config["server_lr"]
  params = inspect.signature(factory).parameters
  takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
  if "server_lr" in shared and "server_lr" not in params:
    import optax
    from fedjax_sim._checks import positive_float
    shared["server_optimizer"] = optax.sgd(positive_float("server_lr", shared.pop("server_lr")))
  if not takes_any:  # e.g. scaffold: unweighted by definition, no client_optimizer
    shared = {k: v for k, v in shared.items() if k in params}
  try:
    return factory(**{**shared, **options})
  except TypeError as e:
    raise ConfigError(f"bad algorithm_options {options} for algorithm {name!r}: "
                      f"{str(e).split(') ', 1)[-1]}") from None


def build_aggregator(config: dict):
  """The configured aggregator: ``aggregator`` and its ``aggregator_options`` (``inner`` names
  another registered aggregator, for ``clip``); raises ConfigError."""
  from fedjax_sim import aggregators
  name, options = config["aggregator"], dict(config["aggregator_options"])
  if name not in aggregators.REGISTRY:
    raise ConfigError(f"unknown aggregator {name!r}; choose from "
                      f"{', '.join(aggregators.REGISTRY)}")
  if "inner" in options:
    inner = options["inner"]
    plain = [k for k, fn in aggregators.REGISTRY.items() if k != "clip" and not any(
        p.default is inspect.Parameter.empty for p in inspect.signature(fn).parameters.values())]
    if inner not in plain:
      raise ConfigError(f"aggregator_options.inner must name an aggregator without options of "
                        f"its own ({', '.join(plain)}), got {inner!r}")
    options["inner"] = aggregators.REGISTRY[inner]()
  return _make("aggregator", aggregators.REGISTRY[name], options, config)


def _make(kind: str, factory, options: dict, config: dict):
  """``factory(**options)`` for the ``kind`` key (aggregator, attack), its errors as ConfigError
  naming ``{kind}_options``."""
  try:
    return factory(**options)
  except TypeError as e:
    raise ConfigError(f"bad {kind}_options {config[kind + '_options']} for {kind} "
                      f"{config[kind]!r}: {str(e).split(') ', 1)[-1]}") from None
  except ValueError as e:
    raise ConfigError(f"{kind}_options.{e}") from None


def build_attack(config: dict):
  """The configured attack (``None`` without one); raises ConfigError."""
  from fedjax_sim import attacks
  name, options = config["attack"], dict(config["attack_options"])
  if name is None:
    if options:
      raise ConfigError(f"attack_options {options} given without an attack")
    return None
  if name not in attacks.REGISTRY:
    raise ConfigError(f"unknown attack {name!r}; choose from {', '.join(attacks.REGISTRY)}")
  return _make("attack", attacks.REGISTRY[name], options, config)


def build_system(options: dict):
  """The ``system`` table as a :class:`fedjax_sim.Heterogeneity` (``None`` when empty)."""
  from fedjax_sim import systems
  if not options:
    return None
  unknown = set(options) - set(systems.Heterogeneity._fields)
  if unknown:
    raise ConfigError(f"unknown system keys {sorted(unknown)}; known: "
                      f"{', '.join(systems.Heterogeneity._fields)}")
  try:
    return systems.check(systems.Heterogeneity(**options))
  except ValueError as e:
    raise ConfigError(f"system.{e}") from None


def load_dataset(config: dict):
  """``(train, test, num_classes)`` of the configured dataset; raises ConfigError."""
  from fedjax_sim import datasets
  if config["dataset"] not in datasets.REGISTRY:
    raise ConfigError(f"unknown dataset {config['dataset']!r}; choose from "
                      f"{', '.join(datasets.REGISTRY)}")
  loader = datasets.REGISTRY[config["dataset"]][0]
  try:
    return loader(config["seed"], **config["dataset_options"])
  except TypeError as e:
    raise ConfigError(f"bad dataset_options {config['dataset_options']} for dataset "
                      f"{config['dataset']!r}: {e}") from None


class Progress:
  """A one-line progress bar on stderr with the latest loss."""

  def __init__(self, total: int, stream=sys.stderr):
    self.total, self.stream, self.start = total, stream, time.perf_counter()
    self.tty = stream.isatty()

  def update(self, row: dict) -> None:
    done = row["round"]
    width = 30
    filled = int(width * done / self.total)
    loss = f"train_loss {row['train_loss']:.4f}"
    acc = f"  test_acc {row['test_accuracy']:.3f}" if "test_accuracy" in row else ""
    acc += f"  ε {row['epsilon']:.3g}" if "epsilon" in row else ""
    line = (f"[{'#' * filled}{'.' * (width - filled)}] round {done}/{self.total}  {loss}{acc}  "
            f"{time.perf_counter() - self.start:.1f}s")
    self.stream.write(("\r" + line) if self.tty else (line + "\n"))
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")


def plot_curves(history: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  acc_keys = [k for k in ("train_accuracy", "test_accuracy") if k in history]
  fig, axes = plt.subplots(1, 2 if acc_keys else 1, figsize=(10 if acc_keys else 5, 3.6))
  axes = list(axes) if acc_keys else [axes]
  for key in ("train_loss", "test_loss"):
    if key in history:
      axes[0].plot(history["round"], history[key], label=key)
  axes[0].set_xlabel("round"); axes[0].set_ylabel("loss"); axes[0].legend()
  for key in acc_keys:
    axes[1].plot(history["round"], history[key], label=key)
  if acc_keys:
    axes[1].set_xlabel("round"); axes[1].set_ylabel("accuracy"); axes[1].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _out_dir(config: dict, out: str | None) -> str:
  if out is None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.join("runs", f"{stamp}-{config['algorithm']}-{config['dataset']}")
    base, i = out, 1
    while os.path.exists(out):
      out, i = f"{base}-{i}", i + 1
  if os.path.isdir(out) and os.listdir(out):
    raise ConfigError(f"output directory {out!r} is not empty; choose another --out")
  os.makedirs(out, exist_ok=True)
  return out


def use_compilation_cache(directory) -> None:
  """Turns on JAX's persistent compilation cache in ``directory`` unless one is configured."""
  import jax
  if directory is not None and (not isinstance(directory, str) or not directory):
    raise ConfigError(f"compilation_cache must be a directory or 'none', got {directory!r}")
  if directory is None or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(args) -> int:
  config = resolve_config(args.config, args.set or [])
  algo, model, train, test = build_experiment(config)
  from fedjax_sim.simulation import TrainingDiverged, check_arguments, check_attack, simulate
  system = build_system(config["system"])
  aggregator = build_aggregator(config)
  attack = build_attack(config)
  run_args = dict(rounds=config["rounds"], clients_per_round=config["clients_per_round"],
                  client_fraction=config["client_fraction"], seed=config["seed"],
                  eval_every=config["eval_every"], plan=config["plan"],
                  chunk_size=config["chunk_size"], rounds_per_block=config["rounds_per_block"],
                  sampling=config["sampling"])
  try:  # everything that can be checked before the run directory is written
    cohort_size, _, how = check_arguments(algo, model, train, test, **run_args)
    import jax
    from fedjax_sim import aggregators
    check_attack(attack, model, model.init(jax.random.key(0)), train)
    expected = how.rate * train.num_clients if how.kind == "poisson" else cohort_size
    aggregators.prepare(aggregator, aggregators.CohortInfo(expected, train.num_clients,
                                                           cohort_size))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  use_compilation_cache(config["compilation_cache"])
  out = _out_dir(config, args.out)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  print(f"{algo.name} on {config['dataset']}: {train.num_clients} clients "
        f"({train.total_examples} examples), model {model.name}; writing {out}", file=sys.stderr)
  progress = Progress(config["rounds"]) if not args.quiet else None
  metrics_path = os.path.join(out, "metrics.jsonl")
  metrics_file = open(metrics_path, "w")

  def log(rows):
    for row in rows:
      metrics_file.write(json.dumps(row) + "\n")
      if progress:
        progress.update(row)
    metrics_file.flush()

  summary = {"status": "completed", "config": config}
  history = None
  try:
    result = simulate(algo, model, train, test=test, callback=log, system=system,
                      aggregator=aggregator, attack=attack,
                      dissimilarity=bool(config["dissimilarity"]), **run_args)
    history = result.history
    summary["engine"] = result.info
  except TrainingDiverged as e:
    history = e.history
    summary.update(status="diverged", diverged_at_round=e.round, error=str(e))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  finally:
    metrics_file.close()
    if progress:
      progress.close()
  if history and history["round"]:
    summary["final"] = {k: v[-1] for k, v in history.items()}
    plot_curves(history, os.path.join(out, "curves.png"),
                f"{algo.name} / {model.name} / {config['dataset']}")
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if summary["status"] == "diverged":
    print(f"fedjax-sim: error: {summary['error']} (metrics so far kept in {metrics_path})",
          file=sys.stderr)
    return 3
  _print_summary(history, result.info, out)
  return 0


def _print_summary(history: dict, info: dict, out: str) -> None:
  rows = [("rounds", str(history["round"][-1]))]
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
    if key in history:
      rows.append((key, f"{history[key][-1]:.4f}"))
  if "privacy" in info:
    p = info["privacy"]
    rows.append(("privacy", f"epsilon {history['epsilon'][-1]:.4g} at delta {p['delta']:.3g} "
                            f"({p['accountant']}, noise multiplier {p['noise_multiplier']:g}, "
                            f"{p['sampling']} sampling at rate {p['sampling_rate']:.4g})"))
  rows += [("wall time", f"{info['seconds']:.1f} s"),
           ("plan", f"{info['plan']} (chunk {info['chunk_size']}, {info['num_buckets']} size buckets, "
                    f"padding waste {info['padding_waste']:.0%})"),
           ("clients per round", str(info["cohort_size"]) if info.get("sampling") != "poisson"
            else f"{info['expected_clients']:.0f} expected (Poisson, {info['cohort_size']} slots)"),
           ("output", out)]
  width = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def list_available(_args) -> int:
  from fedjax_sim import algorithms, datasets
  print("algorithms:")
  for name, fn in algorithms.REGISTRY.items():
    print(f"  {name:<22} {(fn.__doc__ or '').strip().splitlines()[0]}")
  from fedjax_sim import aggregators
  print("aggregators:")
  for name, fn in aggregators.REGISTRY.items():
    print(f"  {name:<22} {(fn.__doc__ or '').strip().splitlines()[0]}")
  from fedjax_sim import attacks
  print("attacks:")
  for name, fn in attacks.REGISTRY.items():
    print(f"  {name:<22} {(fn.__doc__ or '').strip().splitlines()[0]}")
  print("models:\n  " + "\n  ".join(MODELS))
  print("datasets:")
  for name, (_, doc) in datasets.REGISTRY.items():
    print(f"  {name:<22} {doc}")
  return 0


def describe_data(args) -> int:
  """``fedjax-sim data describe``: per-client size and label statistics, and a PNG of the labels."""
  from fedjax_sim import describe
  config = resolve_config(args.config, args.set or [])
  try:
    train, test, num_classes = load_dataset(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for name, data in (("train", train), ("test", test)):
    if data is not None:
      print(f"{config['dataset']} ({name})")
      print(describe.format_description(describe.describe(data, num_classes)))
  png = args.png or f"{config['dataset']}_labels.png"
  describe.plot_label_distribution(train, png, num_classes)
  print(f"label distribution plot: {png}")
  return 0


def _parser() -> argparse.ArgumentParser:
  keys = "\n".join(f"  {k:<18} {h} (default: {json.dumps(d)})" for k, (d, h) in CONFIG_KEYS.items())
  parser = argparse.ArgumentParser(
      prog="fedjax-sim", description="Vectorized federated-learning simulator.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="commands:\n  run    run an experiment (fedjax-sim run --help for its keys)\n"
             "  list   algorithms, models and datasets\n"
             "  data describe   client sizes and label skew of a dataset")
  sub = parser.add_subparsers(dest="command", required=True)
  run_p = sub.add_parser(
      "run", help="run an experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Run a federated experiment; with no arguments, the embedded default.",
      epilog="config keys (TOML file or --set key=value; values parse as TOML, 'none' = unset):\n"
             + keys + "\n\nexample:\n  fedjax-sim run --set rounds=50 --set client_lr=0.1 "
             "--set dataset=fedprox_synthetic --set dataset_options.alpha=1.0")
  run_p.add_argument("--config", help="TOML file of config keys")
  run_p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key")
  run_p.add_argument("--out", help="run directory (default: a new one under runs/)")
  run_p.add_argument("--quiet", action="store_true", help="no progress bar")
  run_p.set_defaults(func=run)
  list_p = sub.add_parser("list", help="list algorithms, models and datasets")
  list_p.set_defaults(func=list_available)
  data_p = sub.add_parser("data", help="inspect a dataset")
  data_sub = data_p.add_subparsers(dest="data_command", required=True)
  describe_p = data_sub.add_parser(
      "describe", help="client sizes and label skew of the configured dataset, plus a PNG",
      description="Prints per-client size and label statistics of the dataset the config keys "
                  "select (dataset, dataset_options.*, seed) and saves a label-distribution PNG.")
  describe_p.add_argument("--config", help="TOML file of config keys")
  describe_p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key")
  describe_p.add_argument("--png", help="where to save the plot (default <dataset>_labels.png)")
  describe_p.set_defaults(func=describe_data)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return args.func(args)
  except ConfigError as e:
    print(f"fedjax-sim: error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # a data error from user files is still a user error
    from fedjax_sim.data import DataError
    if isinstance(e, DataError):
      print(f"fedjax-sim: error: {e}", file=sys.stderr)
      return 2
    raise


if __name__ == "__main__":
  sys.exit(main())
