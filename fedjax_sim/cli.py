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
import re
import sys
import time
import tomllib
from typing import NamedTuple

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
    "client_lr": (0.1, "client learning rate (for fedsgd: the step on the mean gradient); the "
                  "peak of client_lr_schedule"),
    "client_lr_schedule": ("constant", "client learning-rate schedule: constant | warmup | cosine "
                           "| warmup_cosine | exponential | linear (see `fedjax-sim list`)"),
    "client_lr_schedule_options": ({}, "table of the schedule's options, e.g. "
                                   "client_lr_schedule_options.warmup_steps=10, .decay_steps, "
                                   ".transition_steps, .decay_rate, .end_value, .alpha"),
    "client_lr_per": ("step", "what the client schedule counts: step (local steps, restarting "
                      "every round, as a fresh optax optimizer counts) | round (rounds, 0-based)"),
    "client_optimizer": ("sgd", "client optimizer, by optax name: sgd | adam | adamw | adagrad | "
                         "yogi | rmsprop | ... (see `fedjax-sim list`), stepping with client_lr"),
    "client_optimizer_options": ({}, "table of the optimizer's options, e.g. "
                                 "client_optimizer_options.momentum=0.9 (sgd), .b1, .b2, .eps "
                                 "(adam)"),
    "server_lr": (None, "server learning rate (none = the algorithm's default; for fedavg a "
                  "server SGD step on the pseudo-gradient, 1.0 = FedAvg)"),
    "server_lr_schedule": ("constant", "server learning-rate schedule over rounds, with "
                           "server_lr (or the algorithm's default) as its peak: same names as "
                           "client_lr_schedule"),
    "server_lr_schedule_options": ({}, "table of the server schedule's options (as "
                                   "client_lr_schedule_options, counted in rounds)"),
    "weighting": ("num_examples", "server average weights: num_examples | uniform"),
    "shuffle": (True, "reshuffle client data every epoch"),
    "hidden_sizes": ([200, 200], "hidden layer sizes of the mlp model"),
    "system": ({}, "stragglers and dropouts: system.straggler_fraction, system.straggler_policy "
               "(drop | partial), system.dropout_rate"),
    "dissimilarity": (False, "measure the gradient dissimilarity at evaluated rounds"),
    "per_client_metrics": (False, "also write every client's loss and accuracy at evaluated "
                           "rounds to clients.jsonl in the run directory (fairness plots)"),
    "finetune_steps": (None, "also evaluate each training client's model fine-tuned with this "
                       "many local steps on its own training data (train/test_finetuned_* "
                       "metrics; the test split must hold the training clients)"),
    "seed": (0, "the seed all randomness derives from"),
    "eval_every": (10, "evaluate every this many rounds (and after the last)"),
    "plan": ("auto", "cohort execution plan: auto | vmap | chunked | scan | host_loop"),
    "chunk_size": (None, "clients per vmap chunk (auto when none)"),
    "rounds_per_block": (10, "rounds per compiled call"),
    "population": ("device", "where the training population lives: device | host (stays in host "
                   "memory, each block's cohorts streamed in; only test data is evaluated)"),
    "bucketing": ("auto", "group clients by size so small clients do not pay for the largest "
                  "one's local steps: auto (size groups in one compiled bucket ordered by "
                  "size, or merged where one more compiled bucket would cost more than it saves "
                  "over the run's rounds) | true | false"),
    "devices": ("all", "devices each cohort chunk is split over: all (every device of the default "
                "backend, of every process in a multi-process run) | a count k (the first k)"),
    "compilation_cache": ("~/.cache/fedjax_sim/xla", "directory of JAX's persistent compilation "
                          "cache, so a rerun skips compilation ('none' = off; a cache already "
                          "configured, e.g. by JAX_COMPILATION_CACHE_DIR, is kept)"),
    "checkpoint_every": (100, "write a checkpoint (run directory's checkpoints/) every this many "
                         "rounds, rounded up to a multiple of rounds_per_block, and after the "
                         "last round and on Ctrl-C; 'none' = no checkpoints (no --resume)"),
    "checkpoint_keep": (2, "how many of the newest checkpoints to keep"),
    "tensorboard": (False, "also write TensorBoard event files to the run directory's "
                    "tensorboard/ (needs the tensorboard extra: pip install 'fedjax_sim[tensorboard]')"),
}
# keys a resumed run may change: they do not change the numbers of the rounds already run
RESUMABLE_CHANGES = ("rounds", "checkpoint_every", "checkpoint_keep", "compilation_cache",
                     "tensorboard", "devices")

MODELS = ("softmax_regression", "logistic_regression", "linear_regression", "mlp", "cnn",
          "shakespeare_lstm")
TABLES = ("dataset_options", "algorithm_options", "aggregator_options", "attack_options", "system",
          "client_optimizer_options", "client_lr_schedule_options", "server_lr_schedule_options")
CLIENT_OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "yogi", "rmsprop", "lamb", "lion", "nadam",
                     "adabelief", "adamax", "amsgrad", "novograd")


def _warmup(lr, warmup_steps):
  """Linear warm-up from 0 to the learning rate over ``warmup_steps``, then constant."""
  import optax
  return optax.linear_schedule(0.0, lr, warmup_steps)


def _cosine(lr, decay_steps, alpha=0.0):
  """Cosine decay from the learning rate to ``alpha`` times it over ``decay_steps``."""
  import optax
  return optax.cosine_decay_schedule(lr, decay_steps, alpha)


def _warmup_cosine(lr, warmup_steps, decay_steps, init_value=0.0, end_value=0.0):
  """Linear warm-up from ``init_value`` to the learning rate over ``warmup_steps``, then cosine
  decay to ``end_value`` by step ``decay_steps`` (counted from 0, warm-up included)."""
  import optax
  return optax.warmup_cosine_decay_schedule(init_value, lr, warmup_steps, decay_steps, end_value)


def _exponential(lr, transition_steps, decay_rate, transition_begin=0, staircase=False,
                 end_value=None):
  """The learning rate times ``decay_rate ** (count / transition_steps)`` (``staircase``: integer
  powers), starting after ``transition_begin``, bounded by ``end_value``."""
  import optax
  return optax.exponential_decay(lr, transition_steps, decay_rate, transition_begin, staircase,
                                 end_value)


def _linear(lr, transition_steps, end_value=0.0):
  """Linear from the learning rate to ``end_value`` over ``transition_steps``, then constant."""
  import optax
  return optax.linear_schedule(lr, end_value, transition_steps)


# name -> fn(lr, **options) -> optax schedule (``constant``: the float itself)
LR_SCHEDULES = {"constant": lambda lr: lr, "warmup": _warmup, "cosine": _cosine,
                "warmup_cosine": _warmup_cosine, "exponential": _exponential, "linear": _linear}
LR_SCHEDULE_DOCS = {"constant": "The learning rate itself, at every step.",
                    **{k: fn.__doc__ for k, fn in LR_SCHEDULES.items() if k != "constant"}}


class ConfigError(ValueError):
  """A bad config key or value; the message names it."""


def _parse_value(text: str):
  if text.strip().lower() in ("none", "null"):
    return None
  try:
    return tomllib.loads(f"v = {text}")["v"]
  except tomllib.TOMLDecodeError:
    return text


def resolve_config(config_file: str | None, overrides: list[str], base: dict | None = None) -> dict:
  """Defaults (or ``base``), then the TOML file, then ``key=value`` overrides; rejects unknown
  keys."""
  if base is None:
    base = {k: v[0] for k, v in CONFIG_KEYS.items()}
  config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
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


def _check_option_names(what: str, options_key: str, fn, skip: int, options: dict) -> None:
  """Raises ConfigError naming a required option of ``fn`` (after its first ``skip`` parameters)
  missing from ``options``, or an option it does not take (unless it takes ``**kwargs``)."""
  params = [p for p in inspect.signature(fn).parameters.values()][skip:]
  names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
  missing = [p.name for p in params if p.default is p.empty and p.kind != p.VAR_KEYWORD
             and p.kind != p.VAR_POSITIONAL and p.name not in options]
  if missing:
    raise ConfigError(f"{what} needs option {missing[0]!r} ({options_key}.{missing[0]}=...)")
  unknown = sorted(set(options) - set(names))
  if unknown and not any(p.kind == p.VAR_KEYWORD for p in params):
    raise ConfigError(f"{what} has no option {unknown[0]!r}; its options: "
                      f"{', '.join(names) or 'none'}")


def _call_with_options(what: str, options_key: str, fn, args: tuple, options: dict):
  """``fn(*args, **options)``, with missing and unknown options named by their config keys."""
  _check_option_names(what, options_key, fn, len(args), options)
  for key, value in options.items():
    if key.endswith("_steps") and (isinstance(value, bool) or not isinstance(value, int)
                                   or value <= 0):
      raise ConfigError(f"{options_key}.{key} must be a positive integer, got {value!r}")
  try:
    return fn(*args, **options)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"bad {options_key} {options} for {what}: {e}") from None


def build_lr_schedule(side: str, lr, config: dict):
  """``lr`` (a float) under the ``{side}_lr_schedule`` key: the float itself for ``constant``,
  else an optax schedule with ``lr`` as its peak; raises ConfigError."""
  name, key = config[f"{side}_lr_schedule"], f"{side}_lr_schedule_options"
  options = dict(config[key])
  if name is None:
    name = "constant"
  if name not in LR_SCHEDULES:
    raise ConfigError(f"unknown {side}_lr_schedule {name!r}; choose from "
                      f"{', '.join(LR_SCHEDULES)}")
  from fedjax_sim._checks import positive_float
  try:
    lr = positive_float(f"{side}_lr", lr)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return _call_with_options(f"{side}_lr_schedule {name!r}", key, LR_SCHEDULES[name], (lr,),
                            options)


def build_client_optimizer(lr, config: dict):
  """The ``client_optimizer`` (an optax optimizer stepping with ``lr``, a float or schedule), or
  ``None`` for plain SGD without options (the algorithm's own default); raises ConfigError."""
  import optax
  name, options = config["client_optimizer"], dict(config["client_optimizer_options"])
  if name not in CLIENT_OPTIMIZERS:
    raise ConfigError(f"unknown client_optimizer {name!r}; choose from "
                      f"{', '.join(CLIENT_OPTIMIZERS)}")
  if name == "sgd" and not options:
    return None
  return _call_with_options(f"client_optimizer {name!r}", "client_optimizer_options",
                            getattr(optax, name), (lr,), options)


# algorithms whose client update is derived for plain SGD: no client_optimizer key
SGD_ONLY = {"scaffold": "its control variates are defined for SGD steps",
            "fednova": "its normalization a_k is derived for SGD (momentum: "
                       "algorithm_options.momentum)",
            "fedsgd": "its clients take one full-batch gradient step of size 1"}


def build_algorithm(config: dict):
  """The configured algorithm: shared keys plus ``algorithm_options``; raises ValueError."""
  from fedjax_sim import algorithms
  name, options = config["algorithm"], dict(config["algorithm_options"])
  factory = algorithms.REGISTRY[name]
  params = inspect.signature(factory).parameters
  takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
  client_lr = build_lr_schedule("client", config["client_lr"], config)
  optimizer = build_client_optimizer(client_lr, config)
  per = config["client_lr_per"]
  if per not in ("step", "round"):
    raise ConfigError(f"client_lr_per must be 'step' or 'round', got {per!r}")
  if optimizer is not None and name in SGD_ONLY:
    raise ConfigError(f"algorithm {name!r} takes no client_optimizer: {SGD_ONLY[name]}")
  if optimizer is not None and per == "round":
    raise ConfigError("client_lr_per='round' scales plain SGD steps; with client_optimizer "
                      f"{config['client_optimizer']!r} use a schedule per step")
  if name == "fedsgd" and (callable(client_lr) or per != "step"):
    raise ConfigError("fedsgd's one step is the server's: use server_lr and server_lr_schedule")
  server_lr = config["server_lr"]
  if config["server_lr_schedule"] not in (None, "constant"):
    if server_lr is None:  # the schedule's peak: the algorithm's own default server step
      default = params.get("server_lr")
      server_lr = default.default if default is not None else 1.0
    server_lr = build_lr_schedule("server", server_lr, config)
  elif config["server_lr_schedule_options"]:
    raise ConfigError(f"server_lr_schedule_options {config['server_lr_schedule_options']} given "
                      "without a server_lr_schedule")
  if name == "fedsgd":
    shared = dict(server_lr=server_lr or config["client_lr"], weighting=config["weighting"])
  else:
    shared = dict(client_lr=client_lr, batch_size=config["batch_size"],
                  shuffle=config["shuffle"], weighting=config["weighting"],
                  local_epochs=config["local_epochs"], local_steps=config["local_steps"])
    if name.startswith("local_sgd"):
      del shared["local_epochs"]
      if name != "local_sgd" or shared["local_steps"] is None:
        shared.pop("local_steps")
    if server_lr is not None:
      shared["server_lr"] = server_lr
    if optimizer is not None:
      shared["client_optimizer"] = optimizer
    if per != "step":
      shared["client_lr_per"] = per
  if "server_lr" in shared and "server_lr" not in params and not takes_any:
    import optax
    from fedjax_sim.algorithms._base import learning_rate
    shared["server_optimizer"] = optax.sgd(learning_rate("server_lr", shared.pop("server_lr")))
  if not takes_any:  # e.g. scaffold: unweighted by definition, no client_optimizer
    dropped = [k for k in ("client_lr_per",) if k in shared and k not in params]
    if dropped:
      raise ConfigError(f"algorithm {name!r} takes no {dropped[0]}")
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
  _check_option_names(f"{kind} {config[kind]!r}", f"{kind}_options", factory, 0, options)
  try:
    return factory(**options)
  except TypeError as e:
    raise ConfigError(f"bad {kind}_options {config[kind + '_options']} for {kind} "
                      f"{config[kind]!r}: {e}") from None
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


def engine_options(config: dict) -> dict:
  """``population``, ``bucketing`` and ``devices`` for :func:`fedjax_sim.simulate`, checked;
  raises ConfigError."""
  population, bucketing, devices = config["population"], config["bucketing"], config["devices"]
  if devices == "all":
    devices = None
  elif isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
    raise ConfigError(f"devices must be 'all' or a positive integer, got {devices!r}")
  else:
    try:
      from fedjax_sim.engine.mesh import resolve_devices
      resolve_devices(devices)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if population not in ("device", "host"):
    raise ConfigError(f"population must be 'device' or 'host', got {population!r}")
  if bucketing not in (True, False, "auto") or isinstance(bucketing, (int, float)) and not \
      isinstance(bucketing, bool):
    raise ConfigError(f"bucketing must be 'auto', true or false, got {bucketing!r}")
  if population == "host" and (config["dissimilarity"] or config["plan"] == "host_loop"):
    raise ConfigError("population='host' streams cohorts into compiled blocks: it cannot run "
                      "plan='host_loop' or measure the dissimilarity (dissimilarity=true)")
  return {"population": population, "bucketing": bucketing, "devices": devices}


def load_dataset(config: dict):
  """``(train, test, num_classes)`` of the configured dataset; raises ConfigError."""
  from fedjax_sim import datasets
  if config["dataset"] not in datasets.REGISTRY:
    raise ConfigError(f"unknown dataset {config['dataset']!r}; choose from "
                      f"{', '.join(datasets.REGISTRY)}")
  loader = datasets.REGISTRY[config["dataset"]][0]
  options = dict(config["dataset_options"])
  _check_option_names(f"dataset {config['dataset']!r}", "dataset_options", loader, 1, options)
  return loader(config["seed"], **options)


class ClientMetricsLog:
  """Writes ``clients.jsonl``: one line per evaluated round and data set, ``{"round", "split",
  "client_ids", "loss", "accuracy"}`` (lists in the set's client order; accuracy for
  classifiers), flushed as rounds finish."""

  def __init__(self, path: str, sets: dict, keep_until: int | None = None):
    """``keep_until``: a resumed run keeps the lines of rounds up to its checkpoint's."""
    kept = []
    if keep_until is not None and os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            if json.loads(line)["round"] <= keep_until:
              kept.append(line)
          except (json.JSONDecodeError, KeyError):
            break  # a line torn by the kill, and everything after it
    self.file, self.ids = open(path, "w"), {k: v.client_ids for k, v in sets.items() if v}
    self.file.writelines(kept)

  def __call__(self, rows: list[dict]) -> None:
    for row in rows:
      for split, ids in self.ids.items():
        if f"{split}_loss" not in row:
          continue
        line = {"round": row["round"], "split": split, "client_ids": ids,
                **{m: [float(v) for v in row[f"{split}_{m}"]] for m in ("loss", "accuracy")
                   if f"{split}_{m}" in row}}
        self.file.write(json.dumps(line) + "\n")
    self.file.flush()

  def close(self) -> None:
    self.file.close()


class Progress:
  """Progress on stderr with rate and ETA (tqdm): a live bar on a terminal; otherwise one plain
  line at each tenth of the run (and at least every 30 s), so logs stay short. The postfix shows
  the latest train loss, test accuracy and ε."""

  def __init__(self, total: int, initial: int = 0, stream=sys.stderr, every_s: float = 30.0):
    from tqdm import tqdm
    self.total, self.initial, self.stream, self.every_s = total, initial, stream, every_s
    self.tty = stream.isatty()
    self.start = time.perf_counter()
    self._last_line, self._next_mark = -math.inf, initial
    self.bar = (tqdm(total=total, initial=initial, unit="round", file=stream, dynamic_ncols=True,
                     leave=True) if self.tty else None)
    self._format = tqdm.format_meter

  @staticmethod
  def postfix(row: dict) -> str:
    parts = [f"train_loss {row['train_loss']:.4f}"] if "train_loss" in row else []
    if "test_accuracy" in row:
      parts.append(f"test_acc {row['test_accuracy']:.3f}")
    if "epsilon" in row:
      parts.append(f"ε {row['epsilon']:.3g}")
    return "  ".join(parts)

  def update(self, row: dict) -> None:
    done = row["round"]
    if self.bar is not None:
      self.bar.set_postfix_str(self.postfix(row), refresh=False)
      self.bar.update(done - self.bar.n)
      return
    now = time.perf_counter()
    if done < self.total and done < self._next_mark and now - self._last_line < self.every_s:
      return
    self._last_line = now
    while self._next_mark <= done:
      self._next_mark += max(1, self.total // 10)
    line = self._format(done, self.total, now - self.start, unit="round", initial=self.initial,
                        bar_format="round {n_fmt}/{total_fmt} ({percentage:.0f}%) "
                                   "[{elapsed}<{remaining}, {rate_fmt}]  " + self.postfix(row))
    self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class RunLog:
  """The metrics files of a run directory: ``metrics.jsonl`` (one JSON object per evaluated round),
  ``metrics.csv`` (the same rows; columns are the union of the rows' keys, header once) and, with
  ``tensorboard``, TensorBoard event files under ``tensorboard/`` (one scalar per metric, step =
  round).

  ``rows`` are the rows already logged (a resumed run's checkpoint history): both files are
  rewritten to exactly these rows first, so rows written after that checkpoint by a killed run
  are neither lost nor duplicated, and TensorBoard hides its events past them (``purge_step``).
  """

  def __init__(self, out: str, rows=(), tensorboard: bool = False, resumed_round: int | None = None):
    self.out = out
    self.jsonl_path = os.path.join(out, "metrics.jsonl")
    self.csv_path = os.path.join(out, "metrics.csv")
    self.rows = [dict(r) for r in rows]
    self.columns = []
    for row in self.rows:
      self.columns += [k for k in row if k not in self.columns]
    _write_atomic(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self.rows))
    self._rewrite_csv()
    self.jsonl = open(self.jsonl_path, "a")
    self.writer = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(os.path.join(out, "tensorboard"),
                                  purge_step=None if resumed_round is None else resumed_round + 1)

  def _rewrite_csv(self) -> None:
    import csv, io
    text = io.StringIO()
    writer = csv.DictWriter(text, self.columns, lineterminator="\n")
    if self.columns:
      writer.writeheader()
      writer.writerows(self.rows)
    _write_atomic(self.csv_path, text.getvalue())

  def write(self, rows: list[dict]) -> None:
    import csv
    self.rows += rows
    for row in rows:
      self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    new = [k for row in rows for k in row if k not in self.columns]
    if new:  # a new column (or the first rows): the header changes, write the file anew
      self.columns += list(dict.fromkeys(new))
      self._rewrite_csv()
    else:
      with open(self.csv_path, "a") as f:
        csv.DictWriter(f, self.columns, lineterminator="\n").writerows(rows)
    if self.writer is not None:
      for row in rows:
        for key, value in row.items():
          if key not in ("round", "elapsed") and isinstance(value, (int, float)):
            self.writer.add_scalar(key, value, row["round"])
      self.writer.flush()

  def close(self) -> None:
    self.jsonl.close()
    if self.writer is not None:
      self.writer.close()


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _history(rows: list[dict]) -> dict:
  history = {}
  for row in rows:
    for k, v in row.items():
      history.setdefault(k, []).append(v)
  return history


def _rows(history: dict) -> list[dict]:
  keys = list(history)
  return [dict(zip(keys, values)) for values in zip(*(history[k] for k in keys))]


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


def _resume_config(run_dir: str, config_file: str | None, overrides: list[str]) -> dict:
  """The config of the run in ``run_dir`` with the allowed changes (:data:`RESUMABLE_CHANGES`)
  from ``--config`` / ``--set``; any other change is refused, naming the keys."""
  path = os.path.join(run_dir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"--resume {run_dir!r}: no config.json there; it is not a fedjax-sim run "
                      "directory") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"--resume {run_dir!r}: config.json is not valid JSON ({e})") from None
  unknown = sorted(set(saved) - set(CONFIG_KEYS))
  if unknown:
    raise ConfigError(f"--resume {run_dir!r}: config.json has keys this version does not know: "
                      f"{', '.join(unknown)}")
  saved = {**{k: v[0] for k, v in CONFIG_KEYS.items()}, **saved}
  config = resolve_config(config_file, overrides, base=saved)
  from fedjax_sim.checkpoint import differing_keys
  changed = differing_keys(saved, config, ignore=RESUMABLE_CHANGES)
  if changed:
    raise ConfigError(
        f"cannot resume {run_dir!r} with a changed config: "
        + ", ".join(f"{k} ({json.dumps(saved.get(k))} -> {json.dumps(config.get(k))})"
                    for k in changed)
        + f"; only {', '.join(RESUMABLE_CHANGES)} may change")
  return config


def _checkpoint_options(config: dict):
  every, keep = config["checkpoint_every"], config["checkpoint_keep"]
  for key, value in (("checkpoint_every", every), ("checkpoint_keep", keep)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
      raise ConfigError(f"{key} must be a positive integer{' or none' if key == 'checkpoint_every' else ''}, "
                        f"got {value!r}")
  if keep is None:
    raise ConfigError("checkpoint_keep must be a positive integer, got None")
  if not isinstance(config["tensorboard"], bool):
    raise ConfigError(f"tensorboard must be true or false, got {config['tensorboard']!r}")
  if config["tensorboard"]:
    try:
      import tensorboardX  # noqa: F401
    except ImportError:
      raise ConfigError("tensorboard=true needs tensorboardX: pip install "
                        "'fedjax_sim[tensorboard]'") from None
  return every, keep


def _load_checkpoint(run_dir: str):
  """The newest whole checkpoint of ``run_dir`` (torn newer files reported, not loaded)."""
  import warnings
  from fedjax_sim import checkpoint as checkpoint_lib
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      checkpoint = checkpoint_lib.load_latest(os.path.join(run_dir, "checkpoints"))
    except checkpoint_lib.CheckpointError as e:
      raise ConfigError(f"--resume {run_dir!r}: {e}") from None
  for w in caught:
    print(f"fedjax-sim: warning: {w.message}", file=sys.stderr)
  if checkpoint is None:
    raise ConfigError(f"--resume {run_dir!r}: no checkpoint in {os.path.join(run_dir, 'checkpoints')} "
                      "(was it run with checkpoint_every=none?)")
  return checkpoint


# A test hook: kill this process with SIGKILL once the metrics of this round are written (how the
# tests interrupt a run for real at a known point).
_KILL_AFTER_ROUND = "FEDJAX_SIM_TEST_KILL_AFTER_ROUND"


# Set in the child process that ``fedjax-sim run/sweep --coordinator ...`` trains in (_supervise).
_CHILD = "FEDJAX_SIM_DISTRIBUTED_CHILD"
_NOISE = re.compile(r"^(\s+@\s+0x[0-9a-f]+\s|\*\*\* Check failure stack trace|\[Gloo\] Rank \d+ "
                    r"is connected to)")
# Exit status of a process whose multi-process run failed (coordinator unreachable, peer lost).
EXIT_DISTRIBUTED = 4


class _Processes(NamedTuple):
  coordinator: str
  num_processes: int
  process_id: int
  connect_timeout: float
  peer_timeout: float


def _distributed_arguments(args) -> _Processes | None:
  """The checked ``--coordinator``, ``--num-processes``, ``--process-id`` and timeouts, or None
  for a single-process run; raises ConfigError."""
  given = {"--coordinator": getattr(args, "coordinator", None),
           "--num-processes": getattr(args, "num_processes", None),
           "--process-id": getattr(args, "process_id", None)}
  if all(v is None for v in given.values()):
    for flag in ("connect_timeout", "peer_timeout"):
      if getattr(args, flag, None) is not None:
        raise ConfigError(f"--{flag.replace('_', '-')} is for a multi-process run; give "
                          "--coordinator, --num-processes and --process-id too")
    return None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ConfigError(f"a multi-process run needs --coordinator HOST:PORT, --num-processes N and "
                      f"--process-id I; missing {', '.join(missing)}")
  from fedjax_sim import distributed
  processes = _Processes(args.coordinator, args.num_processes, args.process_id,
                         distributed.DEFAULT_TIMEOUT if args.connect_timeout is None
                         else args.connect_timeout,
                         distributed.DEFAULT_PEER_TIMEOUT if args.peer_timeout is None
                         else args.peer_timeout)
  try:
    distributed.check_arguments(processes.coordinator, processes.num_processes,
                                processes.process_id, timeout=processes.connect_timeout,
                                peer_timeout=processes.peer_timeout)
  except ValueError as e:
    flags = {"coordinator": "--coordinator", "num_processes": "--num-processes",
             "process_id": "--process-id", "peer_timeout": "--peer-timeout",
             "timeout": "--connect-timeout"}
    message = str(e)
    for name, flag in flags.items():
      if message.startswith(name + " "):
        message = flag + message[len(name):]
        break
    raise ConfigError(message) from None
  return processes


def _supervise(args, processes: _Processes) -> int:
  """Runs this ``fedjax-sim run`` (or ``sweep``) in a child process and waits for it.

  JAX terminates a process of a multi-process run (``SIGABRT``, a C++ message and stack trace)
  when another process dies or the coordinator goes away; it has no Python hook for this. The
  child's output is passed through; when JAX terminated it, this prints the named error
  (:func:`fedjax_sim.distributed.explain_failure`) and exits with status 4.
  """
  import pathlib
  import subprocess
  import threading
  from fedjax_sim import distributed
  env = dict(os.environ, **{_CHILD: "1"})
  package_root = str(pathlib.Path(__file__).resolve().parent.parent)
  env["PYTHONPATH"] = os.pathsep.join(
      [package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  env.setdefault("PYTHONUNBUFFERED", "1")
  # its own session: a Ctrl-C reaches it once, forwarded below, not also from the terminal
  child = subprocess.Popen([sys.executable, "-m", "fedjax_sim.cli", *args.argv],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                           start_new_session=True)
  tail = []

  def forward(source, sink, keep):
    for raw in iter(source.readline, b""):
      line = raw.decode("utf-8", errors="replace")
      if keep:
        tail.append(line)
        if len(tail) > 200:
          del tail[:-200]
      if _NOISE.match(line):  # the C++ stack trace of JAX's abort, gloo's connection notes
        continue
      sink.write(line)
      sink.flush()

  threads = [threading.Thread(target=forward, args=(child.stdout, sys.stdout, False), daemon=True),
             threading.Thread(target=forward, args=(child.stderr, sys.stderr, True), daemon=True)]
  for t in threads:
    t.start()
  while True:
    try:
      code = child.wait()
      break
    except KeyboardInterrupt:  # the child stops after its current block, keeping what it wrote
      import signal
      child.send_signal(signal.SIGINT)
  for t in threads:
    t.join()
  error = distributed.explain_failure("".join(tail), processes.coordinator, processes.process_id,
                                      processes.num_processes,
                                      timeout=processes.connect_timeout,
                                      peer_timeout=processes.peer_timeout)
  if error is not None:
    print(f"fedjax-sim: error: {type(error).__name__}: {error}", file=sys.stderr)
    return EXIT_DISTRIBUTED
  if code < 0:
    import signal
    print(f"fedjax-sim: error: process {processes.process_id}'s training was killed by "
          f"{signal.Signals(-code).name}; the other processes stop within --peer-timeout "
          f"({processes.peer_timeout:g} s)", file=sys.stderr)
    return EXIT_DISTRIBUTED
  return code


def _watch_parent() -> None:
  """In the child of :func:`_supervise`: exit at once if the supervising process dies (killed),
  so that the other processes see this one die too instead of waiting on it."""
  import threading
  parent = os.getppid()

  def watch():
    while True:
      time.sleep(0.5)
      if os.getppid() != parent:
        os._exit(EXIT_DISTRIBUTED)

  threading.Thread(target=watch, daemon=True, name="fedjax-sim-parent-watch").start()


def run(args) -> int:
  processes = _distributed_arguments(args)
  if processes is not None and os.environ.get(_CHILD) != "1":
    return _supervise(args, processes)
  resume_dir = getattr(args, "resume", None)
  if resume_dir is not None:
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(resume_dir):
      raise ConfigError("--resume continues the run in its own directory; drop --out")
    config = _resume_config(resume_dir, args.config, args.set or [])
  else:
    config = resolve_config(args.config, args.set or [])
  if processes is not None and not _join(processes):  # before anything runs on a JAX device
    return _in_scratch(processes, lambda scratch: _run(args, config, resume_dir, scratch,
                                                       main_process=False))
  return _run(args, config, resume_dir, args.out, main_process=True)


def _join(processes: _Processes) -> bool:
  """In the training child of a multi-process command: joins the other processes
  (``jax.distributed``); returns whether this is the main process, the one that writes."""
  from fedjax_sim import distributed
  _watch_parent()
  distributed.initialize(processes.coordinator, processes.num_processes, processes.process_id,
                         timeout=processes.connect_timeout, peer_timeout=processes.peer_timeout)
  return distributed.is_main()


def _in_scratch(processes: _Processes, command) -> int:
  """``command(directory)`` for a process other than the main one: the same program, its files
  in a scratch directory deleted at the end, nothing printed on stdout."""
  import contextlib
  import shutil
  import tempfile
  scratch = tempfile.mkdtemp(prefix=f"fedjax_sim_process{processes.process_id}_")
  try:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
      return command(scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _run(args, config: dict, resume_dir: str | None, out: str | None, main_process: bool) -> int:
  """``fedjax-sim run`` once the config is resolved. A process other than the main one of a
  multi-process run writes everything into ``out`` (a scratch directory) and prints nothing."""
  quiet = args.quiet or not main_process
  algo, model, train, test = build_experiment(config)
  from fedjax_sim.simulation import (SimulationInterrupted, TrainingDiverged, check_arguments,
                                     check_attack, check_finetune, simulate)
  system = build_system(config["system"])
  aggregator = build_aggregator(config)
  attack = build_attack(config)
  checkpoint_every, checkpoint_keep = _checkpoint_options(config)
  engine = engine_options(config)
  if not isinstance(config["per_client_metrics"], bool):
    raise ConfigError(f"per_client_metrics must be true or false, got "
                      f"{config['per_client_metrics']!r}")
  run_args = dict(rounds=config["rounds"], clients_per_round=config["clients_per_round"],
                  client_fraction=config["client_fraction"], seed=config["seed"],
                  eval_every=config["eval_every"], plan=config["plan"],
                  chunk_size=config["chunk_size"], rounds_per_block=config["rounds_per_block"],
                  sampling=config["sampling"])
  try:  # everything that can be checked before the run directory is written
    cohort_size, block_len, how = check_arguments(algo, model, train, test, **run_args)
    import jax
    from fedjax_sim import aggregators
    check_attack(attack, model, model.init(jax.random.key(0)), train)
    check_finetune(config["finetune_steps"], train, test, False)
    expected = how.rate * train.num_clients if how.kind == "poisson" else cohort_size
    aggregators.prepare(aggregator, aggregators.CohortInfo(expected, train.num_clients,
                                                           cohort_size))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  use_compilation_cache(config["compilation_cache"])
  checkpoint, rows = None, []
  if resume_dir is not None:
    checkpoint = _load_checkpoint(resume_dir)
    if checkpoint.round > config["rounds"]:
      raise ConfigError(f"--resume {resume_dir!r}: its checkpoint is of round {checkpoint.round}, "
                        f"past rounds={config['rounds']}")
    rows = _rows(checkpoint.history)
    if main_process:
      out = resume_dir
  elif main_process:
    out = _out_dir(config, out)
  _write_atomic(os.path.join(out, "config.json"), json.dumps(config, indent=2))
  checkpoint_dir = os.path.join(out, "checkpoints") if checkpoint_every is not None else None
  first = 1 if checkpoint is None else checkpoint.round + 1
  every = None if checkpoint_every is None else -(-checkpoint_every // block_len) * block_len
  if main_process:
    print(f"{algo.name} on {config['dataset']}: {train.num_clients} clients "
          f"({train.total_examples} examples), model {model.name}; "
          + (f"resuming {out} after round {checkpoint.round}" if checkpoint else f"writing {out}")
          + ("" if every is None else f"; checkpoint every {every} rounds"
             + (f" (checkpoint_every={checkpoint_every} rounded up to whole blocks of "
                f"{block_len})" if every != checkpoint_every else "")),
          file=sys.stderr)
  log = RunLog(out, rows, tensorboard=config["tensorboard"],
               resumed_round=None if checkpoint is None else checkpoint.round)
  progress = Progress(config["rounds"], initial=first - 1) if not quiet else None
  kill_after = os.environ.get(_KILL_AFTER_ROUND)

  def on_rows(new_rows):
    log.write(new_rows)
    if progress:
      progress.update(new_rows[-1])
    if kill_after is not None and new_rows[-1]["round"] >= int(kill_after):
      import signal
      os.kill(os.getpid(), signal.SIGKILL)

  summary = {"status": "completed", "config": config}
  if jax.process_count() > 1:
    summary["processes"] = jax.process_count()
  history, info = None, {}
  client_log = (ClientMetricsLog(os.path.join(out, "clients.jsonl"), {"train": train, "test": test},
                                 keep_until=None if checkpoint is None else checkpoint.round)
                if config["per_client_metrics"] else None)
  try:
    result = simulate(algo, model, train, test=test, callback=on_rows, system=system,
                      aggregator=aggregator, attack=attack,
                      dissimilarity=bool(config["dissimilarity"]),
                      finetune_steps=config["finetune_steps"], checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, checkpoint_keep=checkpoint_keep,
                      resume=checkpoint or False, **engine, **run_args,
                      per_client_metrics=client_log is not None, client_callback=client_log)
    history, info = result.history, result.info
  except TrainingDiverged as e:
    history = e.history
    summary.update(status="diverged", diverged_at_round=e.round, error=str(e))
  except SimulationInterrupted as e:
    history, info = e.history, e.result.info
    summary.update(status="interrupted", interrupted_after_round=e.round)
  except KeyboardInterrupt:  # a second Ctrl-C, inside a block: what was logged is kept
    history = _history(log.rows)
    summary.update(status="interrupted",
                   interrupted_after_round=history["round"][-1] if log.rows else first - 1)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  finally:
    log.close()
    if client_log is not None:
      client_log.close()
    if progress:
      progress.close()
  if info:
    summary["engine"] = info
  if history and history["round"]:
    summary["final"] = {k: v[-1] for k, v in history.items()}
    plot_curves(history, os.path.join(out, "curves.png"),
                f"{algo.name} / {model.name} / {config['dataset']}")
  _write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
  if summary["status"] == "diverged":
    print(f"fedjax-sim: error: {summary['error']} (metrics so far kept in {log.jsonl_path})",
          file=sys.stderr)
    return 3
  if summary["status"] == "interrupted":
    from fedjax_sim.checkpoint import list_checkpoints
    saved = list_checkpoints(checkpoint_dir) if checkpoint_dir else []
    how_to = (f"; continue from round {saved[-1][0]} with: fedjax-sim run --resume {out}"
              if saved else " (no checkpoint: checkpoint_every=none)")
    print(f"fedjax-sim: interrupted after round {summary['interrupted_after_round']}; metrics, "
          f"summary.json and curves.png kept in {out}{how_to}", file=sys.stderr)
    return 130
  if main_process:
    _print_summary(history, info, out)
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
           ("plan", f"{info['plan']} ({_chunks(info['bucket_chunks'])}, {info['num_buckets']} size "
                    f"bucket{'s' * (info['num_buckets'] != 1)}, "
                    f"padding waste {info['padding_waste']:.0%})"),
           ("clients per round", str(info["cohort_size"]) if info.get("sampling") != "poisson"
            else f"{info['expected_clients']:.0f} expected (Poisson, {info['cohort_size']} slots)"),
           ("output", out)]
  width = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _chunks(sizes: list[int]) -> str:
  """``"chunks of 32"`` or ``"chunks of 4-64"``: the clients each bucket vmaps together."""
  low, high = min(sizes), max(sizes)
  return f"chunks of {low}" if low == high else f"chunks of {low}-{high}"


def _read_run(run_dir: str) -> tuple[list[dict], dict]:
  """``(metrics rows, summary or {})`` of a run directory (a torn last line is skipped)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  try:
    with open(path) as f:
      lines = [l for l in f.read().splitlines() if l.strip()]
  except FileNotFoundError:
    raise ConfigError(f"{run_dir!r} is not a run directory: no metrics.jsonl") from None
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ConfigError(f"{path}: line {i + 1} is not JSON") from None
  if not rows:
    raise ConfigError(f"{path} has no rows yet")
  summary = {}
  try:
    with open(os.path.join(run_dir, "summary.json")) as f:
      summary = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    pass
  return rows, summary


def compare(args) -> int:
  """``fedjax-sim compare RUN... --metric M --out FIG``: one curve per run, and a table of each
  run's final metrics."""
  runs = {}
  for run_dir in args.runs:
    label = os.path.basename(os.path.normpath(run_dir)) or run_dir
    if label in runs:
      label = run_dir
    runs[label] = _read_run(run_dir)
  has = lambda key: all(any(key in r for r in rows) for rows, _ in runs.values())
  metric = args.metric or ("test_accuracy" if has("test_accuracy") else "train_loss")
  for label, (rows, _) in runs.items():
    if not any(metric in r for r in rows):
      keys = sorted({k for r in rows for k in r} - {"round", "elapsed"})
      raise ConfigError(f"run {label!r} has no metric {metric!r}; it has: {', '.join(keys)}")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for label, (rows, _) in runs.items():
    points = [(r["round"], r[metric]) for r in rows if metric in r]
    ax.plot(*zip(*points), label=label)
  ax.set_xlabel("round"); ax.set_ylabel(metric); ax.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  plt.close(fig)
  columns = [metric] + [k for k in ("train_loss", "test_loss", "test_accuracy", "epsilon")
                        if k != metric and has(k)]
  best = max if "accuracy" in metric else min
  table = [["run", "status", "rounds", *[f"final {c}" for c in columns], f"best {metric}"]]
  for label, (rows, summary) in runs.items():
    last = rows[-1]
    values = [r[metric] for r in rows if metric in r]
    table.append([label, summary.get("status", "running?"), str(last["round"]),
                  *[f"{last[c]:.4g}" if c in last else "-" for c in columns],
                  f"{best(values):.4g}"])
  widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
  for row in table:
    print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
  print(f"figure: {args.out}")
  return 0


# keys every algorithm factory gets from top-level config keys, not from algorithm_options
_SHARED_KEYS = {"client_lr", "local_epochs", "batch_size", "local_steps", "shuffle", "weighting",
                "client_optimizer", "server_optimizer", "client_lr_per", "server_lr"}


def _summary(doc: str | None) -> str:
  """The first paragraph of a docstring, on one line, without reST markup."""
  paragraph = (doc or "").strip().split("\n\n")[0]
  return re.sub(r":\w+:`", "`", " ".join(paragraph.split()).replace("``", "`"))


def _options(fn, skip: int = 0, exclude=()) -> str:
  """``a=1, b (required)``: the keyword options of ``fn`` after its first ``skip`` parameters."""
  out = []
  for p in list(inspect.signature(fn).parameters.values())[skip:]:
    if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in exclude:
      continue
    out.append(p.name + (" (required)" if p.default is p.empty else f"={p.default!r}"))
  return ", ".join(out)


def _entry(name: str, text: str, options: str | None = None, key: str = "") -> str:
  import shutil
  import textwrap
  width = max(60, min(120, shutil.get_terminal_size((100, 20)).columns))
  if options:
    text += f" Options ({key}.*): {options}."
  elif options is not None:
    text += " No options."
  return textwrap.fill(text, width, initial_indent=f"  {name:<22} ",
                       subsequent_indent=" " * 25, break_on_hyphens=False,
                       break_long_words=False)


def list_available(_args) -> int:
  """Everything a config can name, each with its whole summary and its options' defaults."""
  import optax
  from fedjax_sim import aggregators, algorithms, attacks, datasets
  lines = ["algorithms (the shared keys client_lr, local_epochs, batch_size, ... are top-level):"]
  lines += [_entry(n, _summary(fn.__doc__), _options(fn, exclude=_SHARED_KEYS),
                   "algorithm_options") for n, fn in algorithms.REGISTRY.items()]
  lines.append("aggregators:")
  lines += [_entry(n, _summary(fn.__doc__), _options(fn), "aggregator_options")
            for n, fn in aggregators.REGISTRY.items()]
  lines.append("attacks:")
  lines += [_entry(n, _summary(fn.__doc__), _options(fn), "attack_options")
            for n, fn in attacks.REGISTRY.items()]
  lines.append("models:")
  lines += [_entry(n, _summary(getattr(models_module(), n).__doc__)) for n in MODELS]
  lines.append("datasets:")
  lines += [_entry(n, doc.rstrip(".") + ".", _options(fn, skip=1), "dataset_options")
            for n, (fn, doc) in datasets.REGISTRY.items()]
  lines.append("client optimizers (client_optimizer; options are optax's own keywords):")
  lines += [_entry(n, _summary(getattr(optax, n).__doc__), _options(getattr(optax, n), skip=1),
                   "client_optimizer_options") for n in CLIENT_OPTIMIZERS]
  lines.append("learning-rate schedules (client_lr_schedule, server_lr_schedule; the peak is "
               "client_lr / server_lr):")
  lines += [_entry(n, _summary(LR_SCHEDULE_DOCS[n]), _options(fn, skip=1),
                   "*_lr_schedule_options") for n, fn in LR_SCHEDULES.items()]
  print("\n".join(lines))
  return 0


def models_module():
  from fedjax_sim import models
  return models


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


def _sweep(args) -> int:
  from fedjax_sim import grid
  processes = _distributed_arguments(args)
  if processes is None:
    return grid.sweep(args)
  if os.environ.get(_CHILD) != "1":
    return _supervise(args, processes)
  if _join(processes):
    return grid.sweep(args)
  return _in_scratch(processes, lambda scratch: grid.sweep(
      argparse.Namespace(**{**vars(args), "out": scratch, "quiet": True})))


def _distributed_flags(parser, command: str) -> None:
  """``--coordinator`` and the other flags of a command that can span several processes."""
  dist = parser.add_argument_group(
      "several processes (jax.distributed; start one per process, same flags but --process-id)")
  dist.add_argument("--coordinator", metavar="HOST:PORT",
                    help="address of process 0, reachable from every process")
  dist.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
  dist.add_argument("--process-id", type=int, metavar="I",
                    help=f"this process's index, 0..N-1; only process 0 writes the {command}'s "
                         "output directory")
  dist.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                    help="how long to wait for the coordinator and all processes to connect "
                         "(default 120)")
  dist.add_argument("--peer-timeout", type=float, metavar="SECONDS",
                    help="a process silent this long is declared dead, and the others exit "
                         "with an error (default 30; at once when process 0 dies)")


def _parser() -> argparse.ArgumentParser:
  keys = "\n".join(f"  {k:<18} {h} (default: {json.dumps(d)})" for k, (d, h) in CONFIG_KEYS.items())
  parser = argparse.ArgumentParser(
      prog="fedjax-sim", description="Vectorized federated-learning simulator.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="commands:\n  run    run an experiment (fedjax-sim run --help for its keys)\n"
             "  compare   overlay runs and print their final metrics\n"
             "  sweep  run a grid of experiments from a TOML file (fedjax-sim sweep --help)\n"
             "  list   algorithms, models and datasets\n"
             "  data describe   client sizes and label skew of a dataset")
  sub = parser.add_subparsers(dest="command", required=True)
  run_p = sub.add_parser(
      "run", help="run an experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Run a federated experiment; with no arguments, the embedded default.",
      epilog="config keys (TOML file or --set key=value; values parse as TOML, 'none' = unset):\n"
             + keys + "\n\nexample:\n  fedjax-sim run --set rounds=50 --set client_lr=0.1 "
             "--set dataset=fedprox_synthetic --set dataset_options.beta=1.0")
  run_p.add_argument("--config", help="TOML file of config keys")
  run_p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key")
  run_p.add_argument("--out", help="run directory (default: a new one under runs/)")
  run_p.add_argument("--quiet", action="store_true", help="no progress bar")
  run_p.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR from its newest checkpoint (its config, with "
                          "only rounds, checkpoint_*, compilation_cache or tensorboard changed "
                          "by --set/--config)")
  _distributed_flags(run_p, "run")
  run_p.set_defaults(func=run)
  compare_p = sub.add_parser(
      "compare", help="overlay runs' curves and print their final metrics",
      description="Plots one metric of several run directories against the round and prints a "
                  "table of each run's final metrics.")
  compare_p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
  compare_p.add_argument("--metric", help="metric to plot (default test_accuracy when every run "
                                          "has it, else train_loss)")
  compare_p.add_argument("--out", default="compare.png", help="figure path (default compare.png)")
  compare_p.set_defaults(func=compare)
  sweep_p = sub.add_parser(
      "sweep", help="run a grid of experiments (seeds x hyperparameters x datasets)",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Runs every point of a grid: the TOML file holds the base config (the keys "
                  "of `fedjax-sim run`) and a [grid] table of lists. Points that differ only in "
                  "seed and in hyperparameters the algorithm holds as data share one compiled "
                  "sweep.",
      epilog="example grid.toml:\n  dataset = \"logistic_demo\"\n  model = "
             "\"logistic_regression\"\n  rounds = 20\n  [grid]\n  seed = [0, 1]\n  "
             "client_lr = [0.1, 0.03]\n\nwrites one run directory per point, results.csv and "
             "comparison.png")
  sweep_p.add_argument("--config", required=True, help="TOML file: base config and [grid]")
  sweep_p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one base key")
  sweep_p.add_argument("--out", help="output directory (default: a new one under runs/)")
  sweep_p.add_argument("--quiet", action="store_true", help="no progress lines")
  _distributed_flags(sweep_p, "sweep")
  sweep_p.set_defaults(func=_sweep)
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
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if os.environ.get(_CHILD) != "1":
    return _main(args)
  # The training process of a multi-process run: a failure exits at once, without JAX's shutdown
  # barrier (which would wait for the other processes), so that they see it and stop too.
  try:
    code = _main(args)
  except BaseException as e:
    from fedjax_sim import distributed
    processes = _distributed_arguments(args)
    error = None if processes is None else distributed.explain_exception(
        e, processes.coordinator, processes.process_id, processes.num_processes)
    if error is not None:
      print(f"fedjax-sim: error: {type(error).__name__}: {error}", file=sys.stderr)
      code = EXIT_DISTRIBUTED
    else:
      import traceback
      traceback.print_exc()
      code = 1
  if code != 0:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code


def _main(args) -> int:
  try:
    return args.func(args)
  except ConfigError as e:
    print(f"fedjax-sim: error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # a data error from user files is still a user error
    from fedjax_sim.data import DataError
    from fedjax_sim.distributed import DistributedError
    if isinstance(e, DataError):
      print(f"fedjax-sim: error: {e}", file=sys.stderr)
      return 2
    if isinstance(e, DistributedError):
      print(f"fedjax-sim: error: {type(e).__name__}: {e}", file=sys.stderr)
      return EXIT_DISTRIBUTED
    raise


if __name__ == "__main__":
  sys.exit(main())
