"""The engine: one federated round, written once as a pipeline of stages, and its executors.

```
plan (cohort.py) ─▶ slots and client jobs (jobs.py) ─▶ local training (client.py, vmapped)
  ─▶ algorithm's per-client result ─▶ aggregator's per-client transform ─▶ reduction (stream a
  weighted sum, or collect the cohort) ─▶ aggregator's server transform ─▶ algorithm's server rule
  ─▶ server optimizer                                            (round_step.py)
```
Buckets (``buckets.py``) give clients of similar size one compiled shape; the population lives on
the device or is streamed from host memory (``population.py``); ``executors/compiled.py`` runs a
block of rounds in one program (also vmapped over a sweep's runs), ``executors/host_loop.py``
drives the same stages from Python. :func:`build_engine` composes them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import aggregators as aggregators_lib
from fedjax_sim import client as client_lib
from fedjax_sim import systems
from fedjax_sim.algorithms import Algorithm, run_hparams
from fedjax_sim.engine.buckets import (Bucket, make_buckets, padding_waste, shared_padding_waste,
                                      size_buckets)
from fedjax_sim.engine.cohort import (RoundKeys, Sampling, poisson_capacity, round_keys,
                                     sample_cohort)
from fedjax_sim.engine.executors import compiled, flat_sweep, host_loop
from fedjax_sim.engine.population import CohortStream, DeviceData, device_data
from fedjax_sim.engine import memory, mesh as mesh_lib, personal_eval, round_step
from fedjax_sim.engine.round_step import ROUND_STATS, ServerState
from fedjax_sim.engine.spec import PLANS, Plan, RoundSpec


class Engine(NamedTuple):
  """The compiled pieces of a simulation (built by :func:`build_engine`)."""
  run_block: Callable  # (state, rounds[R], active[R], evaluate[R]) -> (state, metrics dict of [R])
  init_state: Callable  # params -> ServerState
  buckets: list
  groups: list  # client indices of each bucket
  plan: Plan
  spec: RoundSpec
  aggregators: list  # the aggregator set up for these cohorts, per run of a sweep (else one)


def step_flops(model, algo: Algorithm, sizes) -> float:
  """About ``6 · parameters · batch`` FLOPs, a local step's forward and backward pass."""
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
  return 6.0 * count * (algo.batch_size or int(np.max(sizes)))


def build_engine(model, algo: Algorithm, train, plan: Plan, cohort_size: int, train_key,
                 evaluate: Callable, eval_data, bucketing: bool = True,
                 system: systems.Heterogeneity | None = None,
                 population_metrics: Callable | None = None, hparams: dict | None = None,
                 streaming: bool = False, aggregator=None, sampling: Sampling | None = None,
                 aggregator_hparams: list | None = None, attack=None,
                 local: tuple | None = None, rounds: int | None = None,
                 client_sets: list | None = None, finetune_steps: int | None = None,
                 mesh=None, flatten: bool = False) -> Engine:
  """Builds the round for one (model, algorithm, aggregator, dataset, plan), or for a sweep.

  A sweep (``train`` a list of datasets with the same number of clients; ``train_key``,
  ``eval_data``, ``hparams`` and the state stacked on a leading run axis) runs every run in the
  same compiled program, vmapped over runs.

  Args:
    model, algo: the model and the algorithm.
    train: the training :class:`~fedjax_sim.data.FederatedData` (a list for a sweep).
    plan: the execution :class:`Plan`.
    cohort_size: clients per round (for Poisson sampling, the slot capacity).
    train_key: the training randomness stream (``[runs]`` keys for a sweep).
    evaluate: ``fn(params, eval_data, local_clients) -> {name: scalar}``, the metrics of
      evaluated rounds (``local_clients``: the population's local parameters, or ``None``).
    eval_data: the arrays ``evaluate`` reads (passed to the compiled block as an argument).
    bucketing: group clients by size (``False``: one bucket padded to the largest client;
      ``"auto"``: the size groups in one shared bucket ordered by size,
      :func:`~fedjax_sim.engine.buckets.shared_bucket`, or merged where compiling them would cost
      more than it saves over ``rounds`` rounds, :func:`~fedjax_sim.engine.buckets.merge_groups`).
    system: stragglers and dropouts.
    population_metrics: ``fn(params, device_data, buckets) -> {name: scalar}``, more metrics of
      evaluated rounds that read the training population (e.g. gradient dissimilarity).
    hparams: the algorithm's hyperparameters (default ``algo.hparams``; ``[runs]`` for a sweep).
    streaming: keep the population on the host and stream each block's cohorts in.
    aggregator: a :class:`fedjax_sim.aggregators.Aggregator` (default ``mean()``).
    sampling: how cohorts are drawn (:class:`~fedjax_sim.engine.cohort.Sampling`; default
      fixed-size).
    local: which leaves of the model stay on each client (:func:`fedjax_sim.personal.local_mask`),
      or ``None``.
    aggregator_hparams: a sweep's per-run overrides of the aggregator's ``hparams`` (each run's
      aggregator state starts from its own values; the functions read them from the state).
    attack: Byzantine clients (:class:`fedjax_sim.attacks.Attack`, checked), or ``None``.
    client_sets: the evaluation sets made of the training clients
      (:class:`~fedjax_sim.engine.personal_eval.ClientSet`), where evaluated rounds also score
      each client's own model: fine-tuned for ``finetune_steps`` local steps, and the
      algorithm's personal model (``Hooks.personal_params``) if it has one.
    finetune_steps: ``k`` for the fine-tuned metrics, or ``None`` (not measured).
    mesh: a ``clients`` :class:`jax.sharding.Mesh` to split each chunk of clients over
      (:mod:`fedjax_sim.engine.mesh`), or ``None`` (one device). A sweep whose run count is a
      multiple of the device count splits its runs over the devices instead.
    flatten: run a sweep flattened (:mod:`~fedjax_sim.engine.executors.flat_sweep`: the runs'
      cohorts as one cohort per round) rather than vmapped in lockstep; the caller checks
      :func:`~fedjax_sim.engine.executors.flat_sweep.unsupported` first (collect aggregators,
      omniscient attacks, and run counts that do not divide over several devices run in
      lockstep).
  """
  sweep = isinstance(train, (list, tuple))
  num_clients = train[0].num_clients if sweep else train.num_clients
  if sweep and plan.name == "host_loop":
    raise ValueError("a sweep runs inside one compiled program; plan 'host_loop' cannot run it")
  runs_mesh = None  # a sweep whose runs divide evenly over the devices splits runs, not chunks
  if sweep and mesh is not None and len(train) % mesh_lib.size(mesh) == 0:
    runs_mesh, mesh = mesh, None
  if mesh is not None and plan.name == "host_loop":
    raise ValueError("plan 'host_loop' runs on one device; use plan vmap/chunked/scan with "
                     "several devices")
  if streaming and (sweep or plan.name == "host_loop" or population_metrics is not None):
    raise ValueError("a streamed population runs with plan vmap/chunked/scan, without sweeps or "
                     "population metrics (dissimilarity)")
  system = systems.check(system)
  sampling = sampling or Sampling()
  expected = sampling.rate * num_clients if sampling.kind == "poisson" else cohort_size
  info = aggregators_lib.CohortInfo(expected, num_clients, cohort_size)
  runs = [aggregators_lib.prepare(aggregator, info, h) for h in (aggregator_hparams or [None])]
  aggregator = runs[0]
  sizes = np.stack([t.num_examples for t in train]) if sweep else train.num_examples
  buckets, bucket_of, groups = make_buckets(sizes, algo, cohort_size, plan.chunk_size, bucketing,
                                            variable_steps=system.partial, rounds=rounds,
                                            step_flops=step_flops(model, algo, sizes),
                                            devices=mesh_lib.size(mesh))
  flatten = sweep and flatten
  if flatten:
    buckets = flat_sweep.flat_buckets(buckets, bucket_of, cohort_size, plan.chunk_size)
  spec = RoundSpec(model, algo, aggregator, buckets, num_clients, cohort_size, system, plan,
                   client_lib.shuffle_method(int(np.max(sizes))), streaming, sampling, attack,
                   local, mesh)
  hparams = {k: jnp.asarray(v, jnp.float32)
             for k, v in (run_hparams(algo) if hparams is None else hparams).items()}
  client_metrics = None
  if not sweep:
    client_metrics = personal_eval.build(spec, groups, train.num_examples, client_sets or [],
                                         finetune_steps)
  if flatten:
    run_block, init_state = flat_sweep.build(spec, device_data(train, bucket_of), train_key,
                                             evaluate, eval_data, population_metrics, hparams,
                                             runs_mesh)
  elif plan.name == "host_loop":
    run_block, init_state = host_loop.build(spec, device_data(train, bucket_of), train_key,
                                            evaluate, eval_data, population_metrics, hparams,
                                            client_metrics)
  else:
    stream = CohortStream(train, bucket_of, cohort_size, sampling, mesh) if streaming else None
    data = None if streaming else device_data(train, bucket_of)
    run_block, init_state = compiled.build(spec, data, train_key, evaluate, eval_data,
                                           population_metrics, hparams, sweep, stream,
                                           client_metrics, runs_mesh)
  if len(runs) > 1:
    init_state = _per_run_aggregator_states(spec, init_state, runs)
  return Engine(run_block, init_state, buckets, groups, plan, spec, runs)


def _per_run_aggregator_states(spec, init_state, runs):
  """A sweep's ``init_state`` whose aggregator state is each run's own (its hparams)."""
  def init(params):
    state = init_state(params)
    update = round_step.update_template(spec, jax.tree.map(lambda a: a[0], params))
    per_run = [agg.init(update) for agg in runs]
    return state._replace(aggregator=jax.tree.map(lambda *xs: jnp.stack(xs), *per_run))
  return init


__all__ = ["Bucket", "CohortStream", "DeviceData", "Engine", "PLANS", "Plan", "ROUND_STATS",
           "RoundKeys", "RoundSpec", "Sampling", "ServerState", "build_engine", "device_data",
           "make_buckets", "padding_waste", "poisson_capacity", "round_keys", "sample_cohort",
           "shared_padding_waste", "size_buckets"]
