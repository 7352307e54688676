"""``fedjax-sim sweep --config grid.toml``: a grid of experiments (seeds × hyperparameters ×
datasets) run as few compiled sweeps as the grid allows.

The TOML file holds a base config (the keys of ``fedjax-sim run``) and a ``[grid]`` table mapping
config keys to lists of values, e.g. ``seed = [0, 1]``, ``client_lr = [0.1, 0.03]``,
``dataset = ["fedprox_synthetic", "fedprox_synthetic_iid"]`` or, for an algorithm option,
``[grid.algorithm_options] mu = [0.0, 1.0]``. Every point of the Cartesian product is one run.
Points that differ only in their seed and in hyperparameters the algorithm holds as data
(:attr:`fedjax_sim.algorithms.Algorithm.hparams`: ``client_lr``, ``server_lr``, ``mu``, ``beta1``,
``tau``, ...) run together as one :func:`fedjax_sim.simulate_sweep` (one compilation); any other
difference (a dataset, a model, the number of local epochs) starts another sweep.

Output: one run directory per point (``config.json``, ``metrics.jsonl``, ``summary.json``,
``curves.png``, as ``fedjax-sim run`` writes them), ``results.csv`` with each point's final
metrics (also printed as a table), and ``comparison.png`` with one training-loss curve per point.
"""

from __future__ import annotations

import copy
import csv
import datetime
import itertools
import json
import os
import sys
import tomllib

from fedjax_sim import cli

# Config keys whose value reaches the algorithm as a hyperparameter of the same name (with
# ``algorithm_options.<name>``); they share a sweep when the algorithm holds that name as data.
HPARAM_KEYS = ("client_lr", "server_lr")
FINAL_COLUMNS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def load_grid(path: str, overrides: list[str]) -> tuple[dict, dict]:
  """``(base config, grid)`` from a TOML file; ``overrides`` (``key=value``) change the base.
  The grid maps each config key (``table.option`` for a table's option) to its list of values."""
  try:
    with open(path, "rb") as f:
      loaded = tomllib.load(f)
  except FileNotFoundError:
    raise cli.ConfigError(f"grid file {path!r} does not exist") from None
  except tomllib.TOMLDecodeError as e:
    raise cli.ConfigError(f"grid file {path!r} is not valid TOML: {e}") from None
  grid = loaded.pop("grid", None)
  if not isinstance(grid, dict) or not grid:
    raise cli.ConfigError(f"grid file {path!r} needs a [grid] table of lists, e.g. "
                          "[grid] seed = [0, 1]")
  config = cli.resolve_config(None, [])
  for key, value in loaded.items():
    cli._set(config, key, value)
  for item in overrides:
    if "=" not in item:
      raise cli.ConfigError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    cli._set(config, key.strip(), cli._parse_value(text))
  return config, _flatten_grid(grid)


def _flatten_grid(grid: dict) -> dict:
  flat = {}
  for key, values in grid.items():
    if key in cli.TABLES and isinstance(values, dict):
      flat.update({f"{key}.{sub}": v for sub, v in values.items()})
    else:
      flat[key] = values
  for key, values in flat.items():
    table, _, sub = key.partition(".")
    if not ((table in cli.TABLES and sub) or (key in cli.CONFIG_KEYS and not sub)):
      raise cli.ConfigError(f"unknown grid key {key!r}: grid keys are the config keys of "
                            f"`fedjax-sim run` ({', '.join(cli.CONFIG_KEYS)}) or "
                            f"<table>.<option> for {', '.join(cli.TABLES)}")
    if not isinstance(values, list) or not values:
      raise cli.ConfigError(f"grid key {key!r} must be a non-empty list of values, got "
                            f"{values!r}")
  return flat


class Point:
  """One grid point: its grid values, resolved config and built experiment."""

  def __init__(self, index: int, values: dict, config: dict):
    self.index, self.values, self.config = index, values, config
    self.name = f"{index:03d}-" + "-".join(
        f"{k.rsplit('.', 1)[-1]}={_slug(v)}" for k, v in values.items())
    self.algo, self.model, self.train, self.test = cli.build_experiment(config)
    # grid keys this point's algorithm holds as data: they may vary within one sweep
    self.data_keys = {k: _hparam_name(k) for k in values
                      if _hparam_name(k) in self.algo.hparams}

  def hparams(self) -> dict:
    return {h: self.algo.hparams[h] for h in self.data_keys.values()}

  def group_key(self) -> str:
    shared = copy.deepcopy(self.config)
    shared.pop("seed")
    for key in self.data_keys:
      table, _, sub = key.partition(".")
      (shared[table].pop(sub, None) if sub else shared.pop(key))
    shape = (self.train.num_clients, list(self.train.feature_shape), self.test is None)
    return json.dumps([shared, shape], sort_keys=True, default=str)


def _hparam_name(key: str) -> str | None:
  if key in HPARAM_KEYS:
    return key
  table, _, sub = key.partition(".")
  return sub if table == "algorithm_options" and sub else None


def _slug(value) -> str:
  text = json.dumps(value) if not isinstance(value, str) else value
  return "".join(c if c.isalnum() or c in "._+" else "_" for c in text)[:40]


def grid_points(config: dict, grid: dict) -> list[Point]:
  """Every point of the grid, each built (so that a bad value fails before anything runs)."""
  points = []
  for i, combo in enumerate(itertools.product(*grid.values())):
    values = dict(zip(grid, combo))
    point_config = copy.deepcopy(config)
    for key, value in values.items():
      cli._set(point_config, key, value)
    try:
      points.append(Point(i, values, point_config))
    except cli.ConfigError as e:
      raise cli.ConfigError(f"grid point {_describe(values)}: {e}") from None
  return points


def _describe(values: dict) -> str:
  return ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _run_args(config: dict) -> dict:
  keys = ("rounds", "clients_per_round", "client_fraction", "eval_every", "plan", "chunk_size",
          "rounds_per_block", "sampling")
  return {k: config[k] for k in keys}


def _check(points: list[Point]) -> None:
  from fedjax_sim.simulation import check_arguments
  from fedjax_sim.sweep import check_hparams
  for p in points:
    try:
      check_arguments(p.algo, p.model, p.train, p.test, seed=p.config["seed"],
                      **_run_args(p.config))
      check_hparams(p.algo, p.hparams(), "grid point")
    except ValueError as e:
      raise cli.ConfigError(f"grid point {_describe(p.values)}: {e}") from None


def run_group(points: list[Point]):
  """One :func:`fedjax_sim.simulate_sweep` over ``points`` (which share everything but their
  seed and their data hyperparameters); returns one result per point."""
  from fedjax_sim.sweep import simulate_sweep
  first = points[0].config
  tests = [p.test for p in points]
  try:
    return simulate_sweep(
        points[0].algo, points[0].model, [p.train for p in points],
        seeds=[p.config["seed"] for p in points], hparams=[p.hparams() for p in points],
        tests=None if tests[0] is None else tests, system=cli.build_system(first["system"]),
        aggregator=cli.build_aggregator(first), attack=cli.build_attack(first),
        dissimilarity=bool(first["dissimilarity"]), **_run_args(first))
  except ValueError as e:
    if isinstance(e, cli.ConfigError):
      raise
    raise cli.ConfigError(f"sweep of {len(points)} grid points from "
                          f"{_describe(points[0].values)}: {e}") from None


def write_point(out: str, point: Point, result) -> dict:
  """The point's run directory, as ``fedjax-sim run`` writes it; returns its results row."""
  directory = os.path.join(out, point.name)
  os.makedirs(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(point.config, f, indent=2)
  history = result.history
  rows = [{k: v[i] for k, v in history.items()} for i in range(len(history["round"]))]
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  diverged = result.info.get("diverged_at_round")
  summary = {"status": "completed" if diverged is None else "diverged", "config": point.config,
             "engine": result.info}
  if diverged is not None:
    summary["diverged_at_round"] = diverged
  if rows:
    summary["final"] = rows[-1]
    cli.plot_curves(history, os.path.join(directory, "curves.png"),
                    f"{point.algo.name} / {point.model.name} / {_describe(point.values)}")
  with open(os.path.join(directory, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  final = rows[-1] if rows else {}
  return {"point": point.name, **{k: json.dumps(v) if not isinstance(v, (int, float, str))
                                  else v for k, v in point.values.items()},
          "status": summary["status"], "rounds": final.get("round", 0),
          **{k: final[k] for k in FINAL_COLUMNS if k in final},
          "seconds": round(result.info["seconds"], 3)}


def plot_comparison(points: list[Point], results: list, path: str) -> None:
  """One training-loss curve per point (and test or train accuracy where measured)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  acc = next((k for k in ("test_accuracy", "train_accuracy")
              if all(k in r.history for r in results)), None)
  fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(11 if acc else 6, 4), squeeze=False)
  for p, r in zip(points, results):
    label = p.name.split("-", 1)[1] if "-" in p.name else p.name
    axes[0, 0].plot(r.history["round"], r.history["train_loss"], label=label)
    if acc:
      axes[0, 1].plot(r.history["round"], r.history[acc], label=label)
  axes[0, 0].set_xlabel("round"); axes[0, 0].set_ylabel("train_loss")
  if acc:
    axes[0, 1].set_xlabel("round"); axes[0, 1].set_ylabel(acc)
  fig.tight_layout()
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def format_table(rows: list[dict]) -> str:
  columns = list(dict.fromkeys(k for row in rows for k in row))
  cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
  return "\n".join(lines)


def sweep(args) -> int:
  """``fedjax-sim sweep``: every grid point, grouped into compiled sweeps."""
  config, grid = load_grid(args.config, args.set or [])
  points = grid_points(config, grid)
  _check(points)
  groups: dict[str, list[Point]] = {}
  for p in points:
    groups.setdefault(p.group_key(), []).append(p)
  cli.use_compilation_cache(config["compilation_cache"])
  out = args.out
  if out is None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.join("runs", f"{stamp}-sweep")
  out = cli._out_dir(config, out)
  if not args.quiet:
    print(f"{len(points)} grid points in {len(groups)} compiled sweep(s); writing {out}",
          file=sys.stderr)
  rows, results = {}, {}
  for g, members in enumerate(groups.values()):
    if not args.quiet:
      print(f"sweep {g + 1}/{len(groups)}: {len(members)} runs of {members[0].algo.name} on "
            f"{members[0].config['dataset']}", file=sys.stderr)
    for p, result in zip(members, run_group(members)):
      rows[p.index], results[p.index] = write_point(out, p, result), result
  table = [rows[p.index] for p in points]
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in table for k in r)))
    writer.writeheader()
    writer.writerows(table)
  plot_comparison(points, [results[p.index] for p in points], os.path.join(out, "comparison.png"))
  print(format_table(table))
  print(f"output: {out} (results.csv, comparison.png, one directory per point)")
  diverged = [r["point"] for r in table if r["status"] != "completed"]
  if diverged:
    print(f"fedjax-sim: {len(diverged)} point(s) diverged: {', '.join(diverged)}", file=sys.stderr)
  return 0
