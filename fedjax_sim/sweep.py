"""``simulate_sweep``: many runs (seeds × datasets × hyperparameters) as one compiled program.

A convergence study repeats one experiment over seeds, data draws and hyperparameter values. Run
one after another, each run pays its own compilation and, worse, its own sequence of local steps:
federated rounds are sequential chains of small steps that leave most of a machine idle. Here
the runs are stacked on a leading axis and the whole block of rounds is vmapped over it, so they
compile once and advance in lockstep; a round costs about what the slowest run's round costs.

Every run ``i`` reproduces ``simulate(algorithm with hparams[i], model, trains[i],
seed=seeds[i], ...)`` (same cohorts, shuffles and stragglers; floats agree up to reassociation).
The algorithm's numeric hyperparameters (:attr:`~fedjax_sim.algorithms.Algorithm.hparams`: those
the hooks read, e.g. FedProx's ``mu``, and those of the factories' default optimizers, e.g.
``client_lr``, ``server_lr``, ``momentum``, ``beta1``, ``tau``) can differ per run; everything else
(model, schedule, cohort size, user-supplied optimizers) is shared.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp

from fedjax_sim import aggregators as aggregators_lib
from fedjax_sim import metrics as metrics_lib
from fedjax_sim import engine as engine_lib
from fedjax_sim import simulation as sim
from fedjax_sim import systems
from fedjax_sim.algorithms import Algorithm, run_hparams
from fedjax_sim.engine.executors import flat_sweep
from fedjax_sim.models import Model


def _per_run(name: str, value, runs: int) -> list:
  if isinstance(value, (list, tuple)):
    if len(value) != runs:
      raise ValueError(f"{name} has {len(value)} entries for {runs} runs")
    return list(value)
  return [value] * runs


def check_hparams(algorithm: Algorithm, overrides: dict, where: str = "hparams") -> None:
  """Raises ValueError naming any key of ``overrides`` that is not one of the algorithm's
  hyperparameters held as data, or whose value is not a finite number."""
  import math
  for key, value in overrides.items():
    if key not in algorithm.hparams:
      raise ValueError(
          f"{where} sets {key!r}, which {algorithm.name!r} does not hold as data; its sweepable "
          f"hyperparameters: {', '.join(sorted(algorithm.hparams)) or 'none'}. (A schedule, a "
          f"given client_optimizer/server_optimizer, convention='optax' betas and a momentum of 0 "
          f"are part of the compiled program: set those in the algorithm's factory.)")
    try:
      number = float(value)
    except (TypeError, ValueError):
      number = math.nan
    if isinstance(value, (bool, str)) or not math.isfinite(number):
      raise ValueError(f"{where}[{key!r}] must be a finite number, got {value!r}")


def _run_groups(model, algorithm, params, trains, tests, cohort_size, aggregator, attack,
                block_len, devices) -> list[range]:
  """:func:`fedjax_sim.engine.memory.run_groups` of a sweep, each run estimated as its largest
  dataset's (the runs' examples are held together on the device)."""
  i = max(range(len(trains)), key=lambda j: trains[j].total_examples)
  per_run = sim.plan_memory(model, algorithm, params, trains[i], cohort_size,
                            [d for d in (trains[i], tests[i]) if d is not None], aggregator,
                            attack, block_len=block_len)
  return engine_lib.memory.run_groups(per_run, len(trains), cohort_size, sim.memory_budget(),
                                      devices)


def simulate_sweep(algorithm: Algorithm, model: Model, trains, seeds: Sequence[int],
                   hparams: Sequence[dict] | None = None, tests=None, rounds: int = 100,
                   clients_per_round: int | None = None, client_fraction: float | None = None,
                   eval_every: int = 1, plan: str = "auto", chunk_size: int | None = None,
                   rounds_per_block: int | None = None, bucketing: bool | str = "auto",
                   system: systems.Heterogeneity | None = None,
                   dissimilarity: bool = False, aggregator=None, sampling: str = "fixed",
                   aggregator_hparams: Sequence[dict] | None = None, attack=None,
                   devices=None, flatten: bool | str = "auto") -> list[sim.SimulationResult]:
  """Runs ``len(seeds)`` simulations in one compiled, vmapped program.

  Args:
    algorithm, model: shared by every run.
    trains: one :class:`FederatedData` per run (or one for all); all with the same number of
      clients and feature shape.
    seeds: one seed per run (initial model, cohorts, shuffles, stragglers).
    hparams: per run, a dict overriding some of ``algorithm.hparams`` (e.g. ``{"mu": 1.0}`` or
      ``{"client_lr": 0.03}``); a key the algorithm does not hold as data is refused by name.
    tests: held-out data per run (or one for all, or ``None``).
    rounds, clients_per_round, client_fraction, eval_every, plan, chunk_size, rounds_per_block,
    bucketing, system, dissimilarity, aggregator, sampling, attack, devices: as in
      :func:`fedjax_sim.simulate` (each run draws its Byzantine set from its own seed).
    aggregator_hparams: per run, a dict overriding some of ``aggregator.hparams`` (e.g.
      ``{"noise_multiplier": 0.5}`` for :func:`~fedjax_sim.aggregators.dp_mean`).
    flatten: ``"auto"`` (default): the runs' cohorts are flattened into one cohort per round
      (:mod:`fedjax_sim.engine.executors.flat_sweep`), except with a collect aggregator or an
      omniscient attack, or on several devices a run count that is not a multiple of theirs,
      which run in lockstep (``info["flatten_fallback"]`` says why; on several devices a
      flattened sweep splits whole runs over them);
      ``True``: flattened, or a ValueError naming what prevents it; ``False``: the whole block
      vmapped over runs, which advance in lockstep.

  Memory: a sweep holds all its runs at once, each with its whole cohort in one chunk. When the
  estimate (:mod:`fedjax_sim.engine.memory`) exceeds the device's memory budget, the runs are cut
  into the fewest even groups that fit, run one sweep after another (``info["run_groups"]``: the
  groups' sizes); a run that does not fit alone is refused with the numbers.

  Returns:
    One :class:`~fedjax_sim.simulation.SimulationResult` per run. A run whose model becomes
    non-finite stops recording at that round (``info["diverged_at_round"]``) while the others go
    on; no exception is raised.
  """
  given = dict(system=system, aggregator=aggregator, attack=attack)  # before they are checked
  seeds = list(seeds)
  runs = len(seeds)
  if runs == 0:
    raise ValueError("seeds is empty: a sweep needs at least one run")
  trains = _per_run("trains", trains, runs)
  tests = _per_run("tests", tests, runs)
  overrides = _per_run("hparams", hparams if hparams is not None else {}, runs)
  agg_overrides = _per_run("aggregator_hparams",
                           aggregator_hparams if aggregator_hparams is not None else {}, runs)
  for i, h in enumerate(overrides):
    check_hparams(algorithm, h, f"hparams[{i}]")
  shapes = []
  for i, (train, test, seed) in enumerate(zip(trains, tests, seeds)):
    shapes.append(sim.check_arguments(algorithm, model, train, test, rounds, clients_per_round,
                                       client_fraction, seed, eval_every, plan, chunk_size,
                                      rounds_per_block, sampling))
    if (train.num_clients, train.feature_shape) != (trains[0].num_clients, trains[0].feature_shape):
      raise ValueError(f"trains[{i}] has {train.num_clients} clients of feature shape "
                       f"{train.feature_shape}; trains[0] has {trains[0].num_clients} of "
                       f"{trains[0].feature_shape}: a sweep needs them equal")
    if (test is None) != (tests[0] is None):
      raise ValueError("give a test set for every run or for none")
  cohort_size, block_len, how = shapes[0]
  system = systems.check(system)
  aggregator = aggregators_lib.check(aggregator)
  if flatten not in (True, False, "auto"):
    raise ValueError(f"flatten must be True, False or 'auto', got {flatten!r}")

  params = [sim.initial_params(model, seed) for seed in seeds]
  for i, (train, test) in enumerate(zip(trains, tests)):
    sim._check_labels(model, params[0], train, f"trains[{i}]")
    if test is not None:
      sim._check_labels(model, params[0], test, f"tests[{i}]")
  attack = sim.check_attack(attack, model, params[0], trains[0])
  mesh = engine_lib.mesh.make_mesh(devices)
  groups = _run_groups(model, algorithm, params[0], trains, tests, cohort_size, aggregator,
                       attack, block_len, engine_lib.mesh.size(mesh))
  if len(groups) > 1:  # one sweep per group of runs that fits the device's memory
    results = []
    for group in groups:
      pick = lambda values: [values[i] for i in group]
      results += simulate_sweep(
          algorithm, model, pick(trains), pick(seeds), hparams=pick(overrides), tests=pick(tests),
          rounds=rounds, clients_per_round=clients_per_round, client_fraction=client_fraction,
          eval_every=eval_every, plan=plan, chunk_size=chunk_size,
          rounds_per_block=rounds_per_block, bucketing=bucketing, dissimilarity=dissimilarity,
          sampling=sampling, aggregator_hparams=pick(agg_overrides), devices=devices,
          flatten=flatten, **given)
    for result in results:
      result.info["run_groups"] = [len(g) for g in groups]
    return results
  fallback = (flat_sweep.unsupported(aggregator, attack, mesh, runs) if flatten is not False
              else None)
  if flatten is True and fallback is not None:
    raise ValueError(f"flatten=True: {fallback}; use flatten=False or 'auto' (lockstep)")
  flattened = flatten is not False and fallback is None
  backend = jax.default_backend()
  batch = algorithm.batch_size or max(int(t.num_examples.max()) for t in trains)
  chosen = sim.choose_plan(plan, chunk_size, model, params[0], trains[0].feature_shape, batch,
                           backend, trains[0].x.dtype, compiled_block=True)

  names = ["train"] + (["test"] if tests[0] is not None else [])
  sets = [trains] + ([tests] if tests[0] is not None else [])
  rows = [max(d.total_examples for d in data) for data in sets]
  evaluate = sim.evaluator(model, {n: data[0] for n, data in zip(names, sets)}, chosen.unroll,
                           dict(zip(names, rows)))
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  eval_data = [stack([metrics_lib.eval_arrays(d, r) for d in data]) for data, r in zip(sets, rows)]
  keys = jnp.stack([jax.random.fold_in(jax.random.key(int(s)), sim.STREAM_TRAIN) for s in seeds])
  swept = set().union(*overrides)
  values = [run_hparams(algorithm, h, swept) for h in overrides]
  stacked_hparams = {k: jnp.asarray([v[k] for v in values], jnp.float32) for k in values[0]}
  engine = engine_lib.build_engine(model, algorithm, trains, chosen, cohort_size, keys, evaluate,
                                  eval_data, bucketing, system,
                                  metrics_lib.gradient_dissimilarity(model) if dissimilarity else None,
                                  hparams=stacked_hparams, aggregator=aggregator, sampling=how,
                                  aggregator_hparams=agg_overrides, attack=attack, rounds=rounds,
                                  mesh=mesh, flatten=flattened)
  num_clients = trains[0].num_clients
  columns = [sim.derived_columns(engine, params[0], sim.epsilon_of(a, how, cohort_size,
                                                                    num_clients), cohort_size)
             for a in engine.aggregators]
  collect = sim.check_collect_memory(engine, params[0], runs)

  histories = [{"round": []} for _ in range(runs)]
  diverged: list[int | None] = [None] * runs
  overflow: list[list[int]] = [[] for _ in range(runs)]
  block_seconds = []
  state = engine.init_state(stack(params))
  start = time.perf_counter()
  for round_nums, active, do_eval in sim.blocks(rounds, block_len, eval_every):
    state, metrics = engine.run_block(state, jnp.asarray(round_nums), jnp.asarray(active),
                                      jnp.asarray(do_eval))
    metrics = engine_lib.mesh.to_host(metrics, mesh)
    elapsed = time.perf_counter() - start
    block_seconds.append(elapsed - sum(block_seconds))
    for i in range(runs):
      if diverged[i] is not None:
        continue
      metrics_i = {k: v[i] for k, v in metrics.items()}
      rows_i, diverged[i] = sim.history_rows(metrics_i, round_nums, active, do_eval, elapsed,
                                             columns[i])
      overflow[i] += sim.check_overflow(metrics_i, round_nums, active, cohort_size)
      for row in rows_i:
        for k, v in row.items():
          histories[i].setdefault(k, []).append(v)
  info = {"plan": chosen.name, "chunk_size": chosen.chunk_size, "backend": backend, "runs": runs,
          "devices": engine_lib.mesh.size(mesh), "flattened": flattened,
          "flatten_fallback": fallback,
          "aggregator": engine.spec.aggregator.name, "sampling": how.kind,
          "attack": None if attack is None else attack.name,
          "cohort_size": cohort_size, "rounds_per_block": block_len, "run_groups": [runs],
          "num_buckets": len(engine.buckets), "collect_bytes": collect,
          "bucket_max_examples": [b.shape.max_examples for b in engine.buckets],
          "seconds": time.perf_counter() - start, "block_seconds": block_seconds,
          "compilations": sim.compilations(engine), **sim.memory_info(engine)}
  if mesh is not None and mesh.is_multi_process:  # runs split over other processes' devices
    state = engine_lib.mesh.to_host(state, mesh)
  results = []
  for i in range(runs):
    run_state = jax.tree.map(lambda a: a[i], state)
    results.append(sim.SimulationResult(run_state.params, histories[i],
                                        dict(info, seed=seeds[i], hparams=dict(overrides[i]),
                                             aggregator_hparams=dict(agg_overrides[i]),
                                             overflow_rounds=overflow[i],
                                             diverged_at_round=diverged[i]), run_state))
  return results
