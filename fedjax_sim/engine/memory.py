"""The memory planner: a compiled block's device memory, estimated before it is built, and the
largest chunk of clients that fits a device's memory budget.

A block's memory is a fixed part (the population and evaluation arrays, the server state, the
per-client population states, a collect aggregator's buffer, the cohort's shuffles, evaluation's
work space) plus, for the one chunk of clients training at a time, a part per client (copies of
the model and of its optimizer state, the batch, the activations). :func:`working_memory` adds
these up from shapes alone (``jax.eval_shape`` / ``jax.make_jaxpr``, nothing is compiled);
:func:`fit_chunk` solves ``fixed + chunk · per_client ≤ HEADROOM · budget`` for the chunk. The
estimate is checked against XLA's memory analysis of the compiled block
(``result.info["peak_bytes"]``, :class:`fedjax_sim.engine.executors.aot.MemoryUse`): see
docs/design.md, "Memory planner", for the measured ratios.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import NamedTuple

import jax
import numpy as np

from fedjax_sim import client as client_lib

# Model-sized float32 copies each training client holds at once (its params, its gradient, the
# updated params, its delta and update), per byte of its update. Measured as the slope of XLA's
# temporary memory in the chunk size on the CPU: 2.3 for the 2NN (199k parameters) and 1.6 for
# softmax regression (610); 3 bounds both.
PARAM_COPIES = 3.0
# The share of the budget a plan may fill (XLA's own buffers and fragmentation need the rest).
HEADROOM = 0.8
# Rows one evaluation batch holds (fedjax_sim.metrics.EVAL_BATCH).
_EVAL_BATCH = 4096


class WorkingMemory(NamedTuple):
  """A block's estimated memory on each device: ``bytes(chunk, devices) = fixed + ⌈chunk /
  devices⌉ · per_client`` (on several devices everything but the chunk's clients is replicated).

  ``parts`` names each term (bytes): the fixed ones and the per-client ones (``per client: ...``).
  """
  fixed: int
  per_client: int
  parts: dict

  def bytes(self, chunk: int, devices: int = 1) -> int:
    return int(self.fixed + -(-chunk // devices) * self.per_client)


def tree_bytes(tree) -> int:
  """Bytes of the leaves of ``tree`` (arrays or shape structs)."""
  return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def activation_bytes(model, params, x: jax.ShapeDtypeStruct) -> int:
  """Bytes of every intermediate value of ``model.apply(params, x)`` (each equation's outputs
  in its jaxpr, none freed): an upper bound of what the forward pass keeps for the backward one."""
  try:
    jaxpr = jax.make_jaxpr(model.apply)(params, x)
  except Exception:  # a model whose apply cannot be traced alone: count its output only
    return tree_bytes(jax.eval_shape(model.apply, params, x))
  return int(sum(math.prod(v.aval.shape) * np.dtype(v.aval.dtype).itemsize
                 for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")))


def working_memory(model, algorithm, params, train, cohort_size: int, *, eval_bytes: int = 0,
                   aggregator=None, collect: bool | None = None, streaming: bool = False,
                   block_len: int = 1, local_bytes: int = 0, runs: int = 1) -> WorkingMemory:
  """Estimates a compiled block's device memory as ``fixed + chunk · per_client`` bytes.

  Args:
    model, algorithm, params: what trains (``params`` may be shape structs).
    train: the training :class:`~fedjax_sim.data.FederatedData`.
    cohort_size: clients per round (cohort slots).
    eval_bytes: the evaluation arrays passed to the block.
    aggregator: the (checked) aggregator; ``None`` for the mean.
    collect: the cohort's updates are held at once (default: the aggregator's reduction is
      ``"collect"``; an omniscient attack also collects).
    streaming: the population stays in host memory and each block's cohort rows are sent in
      (two blocks on the device: the one running and the next).
    block_len: rounds per block.
    local_bytes: bytes of one client's local parameters (``local_params``), kept per client.
    runs: runs of a sweep (everything is held once per run).

  Returns:
    A :class:`WorkingMemory`.
  """
  from fedjax_sim.engine import round_step
  hooks = algorithm.hooks
  sizes = np.asarray(train.num_examples)
  largest = int(sizes.max())
  batch = algorithm.batch_size or largest
  row = math.prod(train.feature_shape) * train.x.dtype.itemsize + train.y.dtype.itemsize
  x_of = lambda n: jax.ShapeDtypeStruct((n, *train.feature_shape),
                                        jax.dtypes.canonicalize_dtype(train.x.dtype))
  param_bytes = tree_bytes(params)
  update = jax.eval_shape(lambda p: round_step.update_template(SimpleNamespace(algo=algorithm), p),
                          params)
  update_bytes = tree_bytes(update)
  client_opt = tree_bytes(jax.eval_shape(algorithm.client_optimizer.init, params))
  server_opt = tree_bytes(jax.eval_shape(algorithm.server_optimizer.init, params))
  client_state = (0 if hooks.init_client_state is None
                  else tree_bytes(jax.eval_shape(hooks.init_client_state, params)))
  agg_state = (0 if aggregator is None or aggregator.init_client_state is None
               else tree_bytes(jax.eval_shape(aggregator.init_client_state, update)))
  if collect is None:
    collect = aggregator is not None and aggregator.reduction == "collect"
  steps = int(client_lib.num_local_steps(largest, algorithm))
  eval_rows = min(_EVAL_BATCH, max(int(sizes.sum()), 1))
  per_example = activation_bytes(model, params, x_of(batch)) / batch
  if streaming:
    rows = 1 << max(0, math.ceil(math.log2(max(cohort_size * largest, 1))))
    population = 2 * block_len * rows * row
  else:
    population = train.x.nbytes + train.y.nbytes + 3 * 4 * train.num_clients
  fixed = {
      "population": population,
      "evaluation data": eval_bytes,
      "evaluation work": int(eval_rows * (row + 2 * per_example)) + 8 * 4 * train.num_clients,
      "server state": 3 * (param_bytes + server_opt),
      "per-client states": train.num_clients * (client_state + agg_state + local_bytes),
      "collected updates": 2 * cohort_size * update_bytes if collect else 0,
      # each slot's int32 example order; the Fisher–Yates swaps copy it (client.epoch_orders)
      "shuffles": 4 * 4 * cohort_size * steps * batch,
  }
  per_client = {
      "per client: model copies": int(PARAM_COPIES * (update_bytes + client_opt)) + 2 * client_state,
      "per client: batch": 2 * batch * row,
      "per client: activations": int(2 * per_example * batch),
  }
  scale = lambda d: {k: int(v) * runs for k, v in d.items()}
  fixed, per_client = scale(fixed), scale(per_client)
  return WorkingMemory(sum(fixed.values()), sum(per_client.values()), {**fixed, **per_client})


def fit_chunk(memory: WorkingMemory, budget: int, largest: int, devices: int = 1) -> int:
  """The chunk size for at most ``largest`` clients whose :class:`WorkingMemory` fits
  ``HEADROOM · budget`` on each of ``devices`` devices: the fewest chunks that fit, evened out
  (``⌈largest / k⌉`` clients each, so the last chunk is not mostly padding).

  Raises:
    ValueError: not even one client fits; the message names the estimate's parts and the budget.
  """
  usable = int(HEADROOM * budget)
  if memory.bytes(1) > usable:
    parts = ", ".join(f"{k} {v:,}" for k, v in memory.parts.items() if v)
    raise ValueError(
        f"the device's memory budget of {budget:,} bytes (of which {HEADROOM:.0%}, {usable:,}, "
        f"is planned for) cannot hold even one client's training: the estimate is "
        f"{memory.fixed:,} fixed + {memory.per_client:,} per client = {memory.bytes(1):,} bytes "
        f"({parts}); keep the population in host memory (population='host'), use fewer "
        "clients per round, a smaller model, or a device with more memory")
  per_device = (usable - memory.fixed) // max(memory.per_client, 1)
  fits = max(1, min(largest, per_device * devices))
  chunks = -(-largest // fits)
  return -(-largest // chunks)


def run_groups(per_run: WorkingMemory, runs: int, cohort_size: int, budget: int | None,
               devices: int = 1) -> list[range]:
  """A sweep's runs cut into the fewest consecutive, evenly sized groups that each fit
  ``HEADROOM · budget`` per device (one compiled sweep per group; runs are independent, so the
  results do not depend on the grouping).

  A sweep holds every one of its runs at once with the whole cohort in one chunk, so a group of
  ``g`` runs needs ``g · per_run.bytes(cohort_size)``; on several devices a group whose size is a
  multiple of the device count is split by run (``g / devices`` runs per device), any other
  group has each run's chunk split (:mod:`fedjax_sim.engine.mesh`). ``budget=None`` (unknown):
  one group.

  Raises:
    ValueError: one run alone does not fit; the message names its estimate and the budget.
  """
  if budget is None:
    return [range(runs)]
  usable = int(HEADROOM * budget)

  def per_device(g: int) -> int:
    if devices > 1 and g % devices == 0:
      return g // devices * per_run.bytes(cohort_size)
    return g * per_run.bytes(cohort_size, devices)

  if per_device(1) > usable:
    raise ValueError(
        f"one run of this sweep needs about {per_device(1):,} bytes per device (the whole cohort "
        f"of {cohort_size} clients in one chunk: {per_run.fixed:,} fixed + {per_run.per_client:,} "
        f"per client), more than {HEADROOM:.0%} of the device's memory budget of {budget:,} "
        "bytes: run it with simulate(), whose planner splits the cohort into chunks, or use "
        "fewer clients per round")
  for count in range(1, runs + 1):
    size = -(-runs // count)
    if per_device(size) <= usable:
      return [range(i, min(i + size, runs)) for i in range(0, runs, size)]
  raise AssertionError("unreachable: a group of one run fits")
