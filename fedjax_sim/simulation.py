"""``simulate``: the driver that validates inputs, picks a plan, and runs blocks of rounds."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import aggregators as aggregators_lib
from fedjax_sim import checkpoint as checkpoint_lib
from fedjax_sim import attacks as attacks_lib
from fedjax_sim import metrics as metrics_lib
from fedjax_sim import engine as engine_lib
from fedjax_sim import personal, privacy, systems
from fedjax_sim._checks import positive_int
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.data import DataError, FederatedData
from fedjax_sim.models import Model, num_params

# Named randomness streams: key(seed) folded with these constants.
STREAM_INIT, STREAM_TRAIN = 0, 1


class TrainingDiverged(RuntimeError):
  """The global model became non-finite. ``history`` holds the metrics up to that round."""

  def __init__(self, round_num: int, history: dict):
    super().__init__(f"training diverged at round {round_num}: the global model or its loss became "
                     "NaN/inf; lower client_lr (or the server learning rate)")
    self.round = round_num
    self.history = history


class SimulationInterrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) stopped :func:`simulate` at a block boundary.

  Attributes:
    round: the last round that finished.
    history: the metrics up to that round.
    result: a :class:`SimulationResult` of the rounds run (its ``state`` continues the run with
      ``simulate(..., init_state=result.state, start_round=round + 1)``).
    checkpoint: the path of the checkpoint written at the stop, or ``None`` without
      ``checkpoint_dir``.
  """

  def __init__(self, round_num: int, result: "SimulationResult", checkpoint: str | None):
    super().__init__(f"interrupted after round {round_num}")
    self.round, self.result, self.history, self.checkpoint = (round_num, result, result.history,
                                                              checkpoint)


@dataclass
class SimulationResult:
  """What :func:`simulate` returns.

  Attributes:
    params: the final global params.
    history: one entry per evaluated round: ``round`` (1-based), ``train_loss`` and, where they
      apply, ``train_accuracy``, ``test_loss``, ``test_accuracy``, the per-client accuracy spread
      ``{train,test}_client_accuracy_{mean,p10,p90}``, ``grad_dissimilarity`` and ``grad_norm_sq``
      (with ``dissimilarity=True``); with ``finetune_steps``, the fine-tuned metrics
      ``{train,test}_finetuned_{loss,accuracy,client_accuracy_mean,..._p10,..._p90}``; for an
      algorithm with personal models (Ditto), ``{train,test}_personal_*`` likewise; that round's
      client drift ``drift`` (``Σ p_k ‖θ_k − θ̄‖²``),
      ``update_norm_mean``, ``update_norm_max`` and ``participants``; under Poisson sampling
      ``drawn`` (clients drawn that round); with a DP aggregator ``epsilon`` (cumulative, at the
      aggregator's δ); ``bytes_up`` (what the clients that returned sent, in the aggregator's
      encoding: dense float32 unless it compresses) and ``bytes_down`` (the model sent to the
      cohort); and ``elapsed`` (seconds).
    info: plan, buckets, padding waste, compilations, timings.
    state: the final server state (:class:`fedjax_sim.ServerState`: params, server optimizer
      state, the algorithm's server and per-client states, the aggregator's states).
    clients: with ``per_client_metrics=True``, every client's own metrics at the evaluated rounds:
      ``round`` (``[E]``) and ``{train,test}_{loss,accuracy}`` (``[E, num_clients of that set]``,
      clients in the data's order; accuracy for classifiers); else ``None``.
  """
  params: Any
  history: dict
  info: dict = field(default_factory=dict)
  state: Any = None
  clients: dict | None = None


def _check_labels(model: Model, params, data: FederatedData, name: str) -> None:
  """Fails early, with a clear message, when the data does not fit the model."""
  try:
    x_dtype = jax.dtypes.canonicalize_dtype(data.x.dtype)  # integer ids stay integers
    out = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((2, *data.feature_shape), x_dtype))
  except Exception as e:  # the user's model and data disagree: say so without a JAX traceback
    raise DataError(f"{name} data with feature shape {data.feature_shape} does not fit model "
                    f"{model.name!r}: {str(e).splitlines()[0]}") from None
  y = data.y
  if model.task == "multiclass":
    num_classes = out.shape[-1]
    if not np.issubdtype(y.dtype, np.integer):
      raise DataError(f"{name} labels must be integers for a classifier, got {y.dtype}")
    if y.min() < 0 or y.max() >= num_classes:
      raise DataError(f"{name} labels must lie in [0, {num_classes}) for model {model.name!r}; "
                      f"found {int(y.min())}..{int(y.max())}")
  elif model.task == "binary" and not np.all((y == 0) | (y == 1)):
    raise DataError(f"{name} labels must be 0 or 1 for a binary model; found {np.unique(y)[:5]}")


def check_attack(attack, model: Model, params, train: FederatedData):
  """The attack checked against the population and the model (its classes, for label flips)."""
  classes = None
  if model.task == "multiclass":
    x = jax.ShapeDtypeStruct((1, *train.feature_shape),
                             jax.dtypes.canonicalize_dtype(train.x.dtype))
    classes = int(jax.eval_shape(model.apply, params, x).shape[-1])
  return attacks_lib.check(attack, train.num_clients, classes)


def check_local_params(local_params, algorithm: Algorithm, params, train: FederatedData,
                       test: FederatedData | None, dissimilarity: bool):
  """The mask of the local leaves (:func:`fedjax_sim.personal.local_mask`), checked against
  what can run with them."""
  local = personal.local_mask(params, local_params)
  if local is None:
    return None
  if algorithm.hooks.client_result is not None:
    raise ValueError(f"local_params cannot be used with algorithm {algorithm.name!r}: its "
                     "per-client message and state are defined on the whole model")
  if dissimilarity:
    raise ValueError("dissimilarity measures the global model's gradients, which local_params "
                     "leaves undefined; turn one of them off")
  check_per_client_test("with local_params, evaluation is per client", train, test)
  return local


def check_per_client_test(why: str, train: FederatedData, test: FederatedData | None) -> None:
  """Refuses a ``test`` that is not a held-out split of each training client, saying ``why``."""
  if test is not None and test.num_clients != train.num_clients:
    raise ValueError(f"{why}: test must hold a held-out split of each training client, but it "
                     f"has {test.num_clients} clients and train has {train.num_clients}")


def check_finetune(finetune_steps, train: FederatedData, test: FederatedData | None,
                   streaming: bool) -> int | None:
  """``finetune_steps`` (a non-negative int or ``None``), checked against what can run it."""
  if finetune_steps is None:
    return None
  if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, (int, np.integer)) \
      or finetune_steps < 0:
    raise ValueError(f"finetune_steps must be a non-negative integer, got {finetune_steps!r}")
  if streaming:
    raise ValueError("finetune_steps needs the training population on the device (every client "
                     "fine-tunes on its own training examples); population='host' cannot run it")
  check_per_client_test("with finetune_steps, each client is evaluated on its own examples",
                        train, test)
  return int(finetune_steps)


def _check_init_params(params, expected, model_name: str) -> None:
  """``params`` must have the structure and leaf shapes of ``model.init``'s output."""
  got_leaves, got_tree = jax.tree.flatten(params)
  want_leaves, want_tree = jax.tree.flatten(expected)
  if got_tree != want_tree:
    raise ValueError(f"init_params do not have the structure of model {model_name!r}'s params: "
                     f"got {got_tree}, expected {want_tree}")
  for path_leaf, got, want in zip(jax.tree_util.tree_flatten_with_path(expected)[0], got_leaves,
                                  want_leaves):
    if tuple(np.shape(got)) != tuple(want.shape):
      raise ValueError(f"init_params{jax.tree_util.keystr(path_leaf[0])} has shape "
                       f"{tuple(np.shape(got))}; model {model_name!r} expects {tuple(want.shape)}")


def contains_convolution(fn: Callable, *args) -> bool:
  """True when tracing ``fn(*args)`` meets a convolution (which XLA:CPU runs slowly in loops)."""
  return "conv_general_dilated" in str(jax.make_jaxpr(fn)(*args))


def auto_chunk_size(param_count: int, batch: int) -> int:
  """CPU chunk size: about 1e8 multiply-adds (``chunk · params · batch``) per vmapped step.

  Measured in benchmarks/engine.py on a 2-core CPU (docs/design.md): the 2NN (199k params, B=32)
  was fastest at 16 clients per chunk (its chunk's params, ~13 MB, stay in cache), softmax
  regression (610 params, B=16) at 256–1024.
  """
  work = max(1, param_count * batch)
  return int(min(1024, max(1, 2 ** round(math.log2(max(1.0, 1e8 / work))))))


def choose_plan(plan: str, chunk_size: int | None, model: Model, params, feature_shape,
                batch: int, backend: str, x_dtype=jnp.float32,
                compiled_block: bool = False, memory: engine_lib.memory.WorkingMemory | None = None,
                budget: int | None = None, cohort_size: int | None = None,
                devices: int = 1) -> engine_lib.Plan:
  """Resolves ``plan="auto"`` per backend, model size and memory budget; validates explicit
  choices.

  ``compiled_block``: the caller needs every round inside one compiled block (sweeps, streamed
  populations, several devices), so ``auto`` never picks ``host_loop``.

  With ``memory`` (the block's :class:`~fedjax_sim.engine.memory.WorkingMemory`), ``budget``
  (each device's bytes, :func:`memory_budget`), ``cohort_size`` and ``devices`` (the chunk is
  split over them), the chunk the planner picks fits the budget (:func:`~fedjax_sim.engine.memory.fit_chunk`): on an accelerator ``auto`` is
  ``vmap`` when the whole cohort fits and ``chunked`` with the largest chunk that fits
  otherwise; on the CPU the cache-sized chunk (:func:`auto_chunk_size`) is capped to fit. A
  chunk size the caller gives, and explicit ``vmap`` and ``scan`` plans, are kept as given.

  Raises:
    ValueError: the planner picks a chunk and not even one client fits the budget (the message
      names the estimate and the budget).
  """
  x_dtype = jax.dtypes.canonicalize_dtype(x_dtype)
  conv = contains_convolution(model.apply, params, jnp.zeros((1, *feature_shape), x_dtype))
  unroll = conv and backend == "cpu"
  planned = chunk_size is None and memory is not None and bool(budget) and bool(cohort_size)
  if plan == "auto":
    if backend != "cpu":
      fits = (not planned
              or memory.bytes(cohort_size, devices) <= engine_lib.memory.HEADROOM * budget)
      plan = "vmap" if chunk_size is None and fits else "chunked"
    elif conv and not compiled_block:
      plan, chunk_size = "host_loop", chunk_size or 1
    else:
      plan = "chunked"
      chunk_size = chunk_size or auto_chunk_size(num_params(params), batch)
  if plan == "vmap":
    chunk_size = None
  elif plan == "scan":
    chunk_size = 1
  elif plan == "chunked" and chunk_size is None:
    chunk_size = auto_chunk_size(num_params(params), batch)
  elif plan == "host_loop":
    chunk_size = chunk_size or 1
  if planned and plan in ("chunked", "host_loop"):
    if backend != "cpu":  # the largest chunk that fits
      chunk_size = engine_lib.memory.fit_chunk(memory, budget, cohort_size, devices)
    elif (memory.bytes(min(chunk_size, cohort_size), devices)
          > engine_lib.memory.HEADROOM * budget):
      chunk_size = engine_lib.memory.fit_chunk(memory, budget, min(chunk_size, cohort_size),
                                               devices)
  return engine_lib.Plan(plan, chunk_size, unroll)


def plan_memory(model: Model, algorithm: Algorithm, params, train: FederatedData,
                cohort_size: int, eval_sets, aggregator, attack=None, local=None,
                streaming: bool = False, block_len: int = 1,
                runs: int = 1) -> engine_lib.memory.WorkingMemory:
  """:func:`fedjax_sim.engine.memory.working_memory` of :func:`simulate`'s arguments
  (``eval_sets``: the evaluated :class:`FederatedData`; ``local``: the local-parameter mask)."""
  eval_bytes = sum(d.x.nbytes + d.y.nbytes + 4 * d.total_examples for d in eval_sets)
  local_bytes = 0 if local is None else sum(
      a.size * a.dtype.itemsize for a, m in zip(jax.tree.leaves(params), local) if m)
  collect = aggregator.reduction == "collect" or (attack is not None and attack.omniscient)
  return engine_lib.memory.working_memory(
      model, algorithm, params, train, cohort_size, eval_bytes=eval_bytes, aggregator=aggregator,
      collect=collect, streaming=streaming, block_len=block_len, local_bytes=local_bytes,
      runs=runs)


def _cohort_size(num_clients: int, clients_per_round, client_fraction) -> int:
  if clients_per_round is not None and client_fraction is not None:
    raise ValueError("give clients_per_round or client_fraction, not both")
  if clients_per_round is not None:
    if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, int) or clients_per_round <= 0:
      raise ValueError(f"clients_per_round must be a positive integer, got {clients_per_round!r}")
    if clients_per_round > num_clients:
      raise ValueError(f"clients_per_round={clients_per_round} is larger than the population of "
                       f"{num_clients} clients")
    return clients_per_round
  if client_fraction is not None:
    if isinstance(client_fraction, bool) or not isinstance(client_fraction, (int, float)) \
        or not 0 < client_fraction <= 1:
      raise ValueError(f"client_fraction must be in (0, 1], got {client_fraction!r}")
    return max(1, int(client_fraction * num_clients))
  return num_clients


def cohort_sampling(sampling: str, num_clients: int, clients_per_round, client_fraction):
  """``(Sampling, cohort slots)`` of :func:`simulate`'s sampling arguments."""
  if sampling == "fixed":
    return (engine_lib.Sampling(),
            _cohort_size(num_clients, clients_per_round, client_fraction))
  if sampling != "poisson":
    raise ValueError(f"sampling must be 'fixed' or 'poisson', got {sampling!r}")
  if clients_per_round is not None or client_fraction is None:
    raise ValueError("sampling='poisson' draws each client with probability client_fraction: "
                     f"give client_fraction (got client_fraction={client_fraction!r}, "
                     f"clients_per_round={clients_per_round!r})")
  _cohort_size(num_clients, None, client_fraction)  # checks q ∈ (0, 1]
  rate = float(client_fraction)
  return (engine_lib.Sampling("poisson", rate), engine_lib.poisson_capacity(num_clients, rate))


def check_arguments(algorithm, model, train, test=None, rounds=1, clients_per_round=None,
                    client_fraction=None, seed=0, eval_every=1, plan="auto", chunk_size=None,
                    rounds_per_block=None, sampling="fixed"):
  """Validates :func:`simulate`'s arguments; returns ``(cohort_size, rounds_per_block,
  Sampling)`` (for Poisson sampling the cohort size is the slot capacity).

  Raises:
    ValueError: naming the first bad argument and its value.
  """
  if not isinstance(algorithm, Algorithm):
    raise ValueError(f"algorithm must come from fedjax_sim.algorithms, got {type(algorithm).__name__}")
  if not isinstance(model, Model):
    raise ValueError(f"model must be a fedjax_sim.models.Model, got {type(model).__name__}")
  if not isinstance(train, FederatedData):
    raise ValueError(f"train must be a FederatedData, got {type(train).__name__}")
  if test is not None and not isinstance(test, FederatedData):
    raise ValueError(f"test must be a FederatedData or None, got {type(test).__name__}")
  if algorithm.hooks.local_loss is not None and model.stochastic:
    raise ValueError(f"algorithm {algorithm.name!r} defines its own local loss, which does not run "
                     f"model {model.name!r}'s training mode (dropout, batch statistics); use a "
                     "model without them")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  rounds = positive_int("rounds", rounds)
  eval_every = positive_int("eval_every", eval_every)
  if plan not in engine_lib.PLANS:
    raise ValueError(f"plan must be one of {', '.join(engine_lib.PLANS)}, got {plan!r}")
  if chunk_size is not None:
    positive_int("chunk_size", chunk_size)
  block_len = min(rounds, positive_int("rounds_per_block", rounds_per_block or 10))
  how, cohort_size = cohort_sampling(sampling, train.num_clients, clients_per_round,
                                     client_fraction)
  return cohort_size, block_len, how


def privacy_of(aggregator, sampling, cohort_size: int, num_clients: int) -> dict | None:
  """The DP accounting of a DP aggregator (after setup) for these cohorts, else ``None``:
  noise multiplier, δ, accountant, sampling and its rate (recorded in ``info["privacy"]``)."""
  accounting = aggregator.privacy
  if accounting is None:
    return None
  poisson = sampling.kind == "poisson"
  return {"noise_multiplier": float(aggregator.hparams["noise_multiplier"]),
          "delta": accounting.delta or privacy.default_delta(num_clients),
          "accountant": accounting.accountant, "sampling": "poisson" if poisson else "fixed",
          "sampling_rate": sampling.rate if poisson else cohort_size / num_clients,
          "num_clients": num_clients}


def epsilon_of(aggregator, sampling, cohort_size: int, num_clients: int):
  """``fn(rounds) -> ε`` of a DP aggregator (after setup) for these cohorts, else ``None``."""
  p = privacy_of(aggregator, sampling, cohort_size, num_clients)
  if p is None:
    return None
  spent = lambda rounds: privacy.epsilon(p["noise_multiplier"], p["sampling_rate"], rounds,
                                         p["delta"], accountant=p["accountant"],
                                         sampling=p["sampling"], num_clients=num_clients)
  spent(1)  # argument errors now, not after the first block
  return spent


def memory_budget() -> int | None:
  """Bytes each device of the default backend can hold: its allocator's limit where the backend
  reports one (``memory_stats()["bytes_limit"]``: GPU, TPU), else the machine's physical memory
  shared by its local devices (CPU); ``None`` when neither is known."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
  except (ValueError, OSError, AttributeError):
    return None


def collect_bytes(engine, params, runs: int = 1) -> int:
  """Memory of a collect aggregator's buffer: every cohort slot's update (``[slots, update]``
  float32, per run); 0 for stream aggregators, which never hold the cohort's updates."""
  spec = engine.spec
  if not spec.collect:
    return 0
  template = jax.eval_shape(lambda p: engine_lib.round_step.update_template(spec, p), params)
  size = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(template))
  return runs * spec.slot_offsets[-1] * size


def check_collect_memory(engine, params, runs: int = 1, budget: int | None = None) -> int:
  """:func:`collect_bytes`, refused when over half of :func:`memory_budget` (the round also
  needs the population, the chunk's training and the aggregator's own work space)."""
  need = collect_bytes(engine, params, runs)
  budget = memory_budget() if budget is None else budget
  if need and budget and need > budget // 2:
    raise ValueError(
        f"aggregator {engine.spec.aggregator.name!r} holds every cohort update at once: "
        f"{engine.spec.slot_offsets[-1]} slots × {need // (runs * engine.spec.slot_offsets[-1])} "
        f"bytes{f' × {runs} runs' if runs > 1 else ''} = {need:,} bytes, more than half of the "
        f"device's {budget:,}; use fewer clients per round or a streaming aggregator (mean, "
        "clip, dp_mean)")
  return need


def derived_columns(engine, params, epsilon, cohort_size: int):
  """``fn(round, row) -> dict``: the history columns computed on the host from a round's row:
  ``epsilon`` (DP runs) and the round's traffic ``bytes_up`` / ``bytes_down``."""
  from fedjax_sim.aggregators.compress import dense_bytes
  agg = engine.spec.aggregator
  template = jax.eval_shape(lambda p: engine_lib.round_step.update_template(engine.spec, p),
                            params)
  local = engine.spec.local
  if local is not None:  # local parameters never travel
    nothing = lambda tree: [jax.ShapeDtypeStruct((0,), a.dtype)
                            for a in personal.split(tree, local)]
    template = {**template, "delta": personal.merge(template["delta"],
                                                    nothing(template["delta"]), local)}
    params = personal.merge(params, nothing(params), local)
  up = (agg.encoded_bytes or dense_bytes)(template)
  down = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))

  def columns(round_num: int, row: dict) -> dict:
    members = min(row.get("drawn", cohort_size), cohort_size)
    out = {"bytes_up": row["participants"] * up, "bytes_down": members * down}
    if epsilon is not None:
      out["epsilon"] = epsilon(round_num)
    return out
  return columns


def check_overflow(metrics: dict, round_nums, active, capacity: int) -> list[int]:
  """Rounds of a block whose Poisson draw exceeded the slot capacity (warned about: the extra
  clients got no slot)."""
  if "drawn" not in metrics:
    return []
  over = [int(r) for r, a, n in zip(round_nums, active, metrics["drawn"]) if a and n > capacity]
  if over:
    warnings.warn(f"Poisson sampling drew more clients than the {capacity} cohort slots in "
                  f"round(s) {over}; the extra clients were not trained (recorded in "
                  f"info['overflow_rounds'])", RuntimeWarning, stacklevel=3)
  return over


def simulate(algorithm: Algorithm, model: Model, train: FederatedData, rounds: int = 100,
             clients_per_round: int | None = None, client_fraction: float | None = None,
             seed: int = 0, test: FederatedData | None = None, init_params=None,
             eval_every: int = 1, plan: str = "auto", chunk_size: int | None = None,
             rounds_per_block: int | None = None, bucketing: bool | str = "auto",
             system: systems.Heterogeneity | None = None, dissimilarity: bool = False,
             population: str = "device", aggregator=None, sampling: str = "fixed",
             attack=None, local_params=None, finetune_steps: int | None = None,
             callback: Callable[[list[dict]], None] | None = None,
             checkpoint_dir: str | None = None, checkpoint_every: int | None = None,
             checkpoint_keep: int = 2, resume=False, init_state=None,
             start_round: int | None = None, per_client_metrics: bool = False,
             client_callback: Callable[[list[dict]], None] | None = None,
             devices=None) -> SimulationResult:
  """Simulates ``rounds`` rounds of federated training.

  Args:
    algorithm: from :mod:`fedjax_sim.algorithms` (e.g. ``fedavg(...)``).
    model: from :mod:`fedjax_sim.models`.
    train: the clients' training data.
    rounds: number of rounds.
    clients_per_round: cohort size ``m`` (uniform without replacement);
    client_fraction: or ``C`` with ``m = max(1, int(C·K))``; neither means full participation.
      With ``sampling="poisson"`` it is the inclusion probability ``q``.
    seed: the one integer all randomness derives from.
    test: optional held-out data evaluated with the training metrics.
    init_params: starting global params (default ``model.init`` of the ``init`` stream).
    eval_every: evaluate after every ``eval_every``-th round (and always after the last).
    plan: ``"auto"``, ``"vmap"``, ``"chunked"``, ``"scan"`` or ``"host_loop"``.
    chunk_size: clients per vmap for ``chunked`` / ``host_loop`` (auto when ``None``).
    rounds_per_block: rounds per compiled call (default ``min(rounds, 10)``).
    bucketing: group clients by size so small clients do not pay for the largest one's steps:
      ``True`` (up to 6 size groups, each within 2× in size), ``False`` (one group), or
      ``"auto"`` (with mini-batches and more cohort slots than one chunk of 32: the size groups
      share one compiled bucket whose slots are ordered by size, so each chunk runs its own
      clients' step count; otherwise the size groups merged where compiling one more bucket,
      about 2 s on a CPU, would cost more than its smaller clients' padded steps over
      ``rounds`` rounds). Results agree up to float summation order.
    system: stragglers and dropouts (:class:`fedjax_sim.Heterogeneity`); ``None``: all finish.
    dissimilarity: also measure the gradient dissimilarity ``E_k‖∇F_k(w) − ∇f(w)‖²`` over the
      training population at evaluated rounds (one full-gradient pass per evaluation).
    population: ``"device"`` (the training population lives on the device) or ``"host"`` (it stays
      in host memory and each block's cohorts are streamed in, double-buffered; for populations
      larger than device memory). Same results; with ``"host"`` only ``test`` is evaluated (the
      whole training population never reaches the device).
    aggregator: how the cohort's updates are combined (:mod:`fedjax_sim.aggregators`, e.g.
      ``median()``, ``dp_mean(...)``); default the weighted mean (FedAvg's). A DP aggregator's
      cumulative ε is recorded in ``history["epsilon"]``.
    sampling: ``"fixed"`` (``m`` clients without replacement, the default) or ``"poisson"`` (each
      client independently with probability ``client_fraction``; the cohort size varies, on
      ``poisson_capacity`` static slots, and a round that draws more warns: see
      :mod:`fedjax_sim.engine.cohort`).
    attack: Byzantine clients (:mod:`fedjax_sim.attacks`, e.g. ``sign_flip(0.2, scale=4.0)``);
      ``history["attackers"]`` counts those each round sampled.
    local_params: parameters that never leave the clients (:mod:`fedjax_sim.personal`):
      ``"batch_norm"`` (FedBN), ``"batch_stats"``, glob patterns over the parameter paths
      (``["params/Dense_1/*"]``, FedPer's personal layers) or a function of the path. Each
      population client keeps its own copy on the device; evaluation is then personalized (each
      example scored by its client's model), so ``test`` must split the training clients' data.
    finetune_steps: also measure the fine-tuned (personalized) model at evaluated rounds: every
      training client fine-tunes the current global model with ``k = finetune_steps`` local steps
      on its own training examples (the algorithm's client optimizer, batch size and shuffling,
      without its hooks) and is scored on its own examples of ``train`` and of ``test``, which
      must then hold a held-out split of each training client (history keys
      ``{train,test}_finetuned_{loss,accuracy}`` and ``..._finetuned_client_accuracy_{mean,p10,
      p90}``; :mod:`fedjax_sim.engine.personal_eval`). Costs ``k`` local steps of every
      population client per evaluation. ``0`` scores the global model per client.
    callback: called after each block with the new history rows (dicts), e.g. to log them.
    checkpoint_dir: where checkpoints go (:mod:`fedjax_sim.checkpoint`: the whole engine state,
      including per-client states such as SCAFFOLD's control variates and the aggregator's
      states, the round counter and the history). With it a checkpoint is written after the last
      round, when Ctrl-C stops the run, and every ``checkpoint_every`` rounds.
    checkpoint_every: checkpoint period in rounds. Checkpoints are written between compiled
      blocks only, so the period is rounded up to a multiple of the block length
      (``info["checkpoint_every"]`` records the period used).
    checkpoint_keep: how many of the newest checkpoints to keep.
    resume: ``True``: continue from the newest whole checkpoint in ``checkpoint_dir`` (a torn
      newest file falls back to the previous one, with a warning; none present: start afresh);
      or a :class:`fedjax_sim.checkpoint.Checkpoint` already loaded. The continued run gives the
      numbers of an uninterrupted one (rounds are keyed by their number, so no RNG state is
      needed) and its history includes the checkpoint's rows (``callback`` sees only the new
      ones). The block length may differ from the first run's. A checkpoint of a different run
      (algorithm, hyperparameters, data sizes, seed, cohorts, aggregator, plan, ...: see
      :func:`run_fingerprint`) is refused with a ValueError naming what differs; ``rounds`` may
      change (not below the checkpoint's round).
    init_state: continue from a state in memory instead (``result.state`` of an earlier
      :func:`simulate` of the same setup); with ``start_round``.
    start_round: the first round to run (default 1, or the round after the resumed checkpoint).
      ``simulate(..., rounds=200, init_state=r.state, start_round=101)`` continues a 100-round
      result ``r`` as if it had run 200 rounds (the server optimizer's and the per-client states
      carry over, and rounds 101..200 draw the cohorts of an uninterrupted run).
    per_client_metrics: also keep every client's own loss and accuracy at evaluated rounds (the
      values behind ``*_client_accuracy_mean/p10/p90``), in ``result.clients``; for fairness plots.
    client_callback: with ``per_client_metrics``, called after each block with one dict per
      evaluated round: ``round`` and ``{train,test}_{loss,accuracy}`` arrays over that set's
      clients.
    devices: ``None`` (every device of the default backend, of every process after
      :func:`fedjax_sim.distributed.initialize`), a count ``k`` (the first ``k``), or a sequence
      of devices. Each chunk of the cohort is split over them (a ``jax.sharding.Mesh`` axis
      ``clients``); params, server state, population and per-client states are replicated and
      the chunk's sums are added across devices. Client keys derive from global ids, so results
      equal one device's up to float reassociation. ``info["devices"]`` reports the count.

  Returns:
    A :class:`SimulationResult`.

  Raises:
    ValueError / DataError: bad arguments, naming the bad value.
    TrainingDiverged: the model became non-finite; ``.history`` keeps the rows before it.
    SimulationInterrupted: Ctrl-C (SIGINT, in the main thread) stops the run when the current
      block of rounds finishes, after writing a checkpoint; a second Ctrl-C stops it at once
      (a plain ``KeyboardInterrupt``).
  """
  cohort_size, block_len, how = check_arguments(
      algorithm, model, train, test, rounds, clients_per_round, client_fraction, seed, eval_every,
      plan, chunk_size, rounds_per_block, sampling)
  system = systems.check(system)
  aggregator = aggregators_lib.check(aggregator)
  if bucketing not in (True, False, "auto"):
    raise ValueError(f"bucketing must be True, False or 'auto', got {bucketing!r}")
  if population not in ("device", "host"):
    raise ValueError(f"population must be 'device' or 'host', got {population!r}")
  streaming = population == "host"
  if streaming and (dissimilarity or plan == "host_loop"):
    raise ValueError("population='host' streams cohorts into compiled blocks: it cannot run "
                     "plan='host_loop' or measure the population-wide dissimilarity")
  mesh = engine_lib.mesh.make_mesh(devices)
  key = jax.random.key(int(seed))
  params = initial_params(model, seed, init_params)
  _check_labels(model, params, train, "train")
  if test is not None:
    _check_labels(model, params, test, "test")
  attack = check_attack(attack, model, params, train)
  local = check_local_params(local_params, algorithm, params, train, test, dissimilarity)
  finetune_steps = check_finetune(finetune_steps, train, test, streaming)

  backend = jax.default_backend()
  batch = algorithm.batch_size or int(train.num_examples.max())
  eval_sets = {} if streaming else {"train": train}
  if test is not None:
    eval_sets["test"] = test
  budget = memory_budget()
  memory = plan_memory(model, algorithm, params, train, cohort_size, eval_sets.values(),
                       aggregator, attack, local, streaming, block_len)
  chosen = choose_plan(plan, chunk_size, model, params, train.feature_shape, batch, backend,
                       train.x.dtype, compiled_block=streaming or mesh is not None, memory=memory,
                       budget=budget, cohort_size=cohort_size,
                       devices=engine_lib.mesh.size(mesh))
  if not isinstance(per_client_metrics, bool):
    raise ValueError(f"per_client_metrics must be True or False, got {per_client_metrics!r}")
  evaluate = evaluator(model, eval_sets, chosen.unroll, local=local,
                       client_arrays=per_client_metrics)
  eval_data = [metrics_lib.eval_arrays(d) for d in eval_sets.values()]
  client_sets = [engine_lib.personal_eval.ClientSet(name, i, d.num_examples)
                 for i, (name, d) in enumerate(eval_sets.items())
                 if d.num_clients == train.num_clients]
  engine = engine_lib.build_engine(model, algorithm, train, chosen, cohort_size,
                                  jax.random.fold_in(key, STREAM_TRAIN), evaluate, eval_data,
                                  bucketing, system,
                                  metrics_lib.gradient_dissimilarity(model)
                                  if dissimilarity else None, streaming=streaming,
                                  aggregator=aggregator, sampling=how, attack=attack,
                                  local=local, rounds=rounds, client_sets=client_sets,
                                  finetune_steps=finetune_steps, mesh=mesh)
  columns = derived_columns(engine, params, epsilon_of(engine.spec.aggregator, how, cohort_size,
                                                       train.num_clients), cohort_size)
  collect = check_collect_memory(engine, params)
  dp = privacy_of(engine.spec.aggregator, how, cohort_size, train.num_clients)
  info = {
      "plan": chosen.name, "chunk_size": chosen.chunk_size, "unroll": chosen.unroll,
      "population": population, "aggregator": engine.spec.aggregator.name,
      "attack": None if attack is None else attack.name,
      "sampling": how.kind,
      "expected_clients": how.rate * train.num_clients if how.kind == "poisson" else cohort_size,
      "overflow_rounds": [], **({"privacy": dp} if dp else {}),
      "backend": backend, "devices": engine_lib.mesh.size(mesh), "cohort_size": cohort_size,
      "rounds_per_block": block_len, "num_buckets": len(engine.buckets), "collect_bytes": collect,
      "memory_budget": budget,
      "estimated_bytes": memory.bytes(max(b.chunk for b in engine.buckets),
                                      engine_lib.mesh.size(mesh)),
      "bucket_max_examples": [b.shape.max_examples for b in engine.buckets],
      "bucket_chunks": [b.chunk for b in engine.buckets],
      "padding_waste": (engine_lib.shared_padding_waste(train.num_examples, algorithm,
                                                        cohort_size, engine.buckets[0].chunk)
                        if engine.buckets[0].parts else
                        engine_lib.padding_waste(train.num_examples, engine.groups, algorithm)),
      "padding_waste_unbucketed": engine_lib.padding_waste(
          train.num_examples, [np.arange(train.num_clients)], algorithm),
  }

  clients: dict[str, list] | None = {"round": []} if per_client_metrics else None
  state = engine.init_state(params)
  fingerprint = run_fingerprint(
      algorithm=algorithm, model=model, params=params, train=train, test=test,
      clients_per_round=clients_per_round, client_fraction=client_fraction, seed=seed,
      eval_every=eval_every, plan=chosen, bucketing=bucketing,
      system=system, dissimilarity=dissimilarity, population=population,
      aggregator=engine.spec.aggregator, sampling=how, attack=attack, local=local,
      finetune_steps=finetune_steps)
  state, history, first = _starting_point(state, fingerprint, rounds, checkpoint_dir,
                                          checkpoint_every, checkpoint_keep, resume, init_state,
                                          start_round)
  every = None
  if checkpoint_every is not None:
    every = -(-positive_int("checkpoint_every", checkpoint_every) // block_len) * block_len
    info["checkpoint_every"] = every
  elapsed_before = history["elapsed"][-1] if history.get("elapsed") else 0.0
  block_seconds = []
  last_saved = first - 1
  stop = _InterruptFlag()
  start = time.perf_counter()
  with stop:
    for round_nums, active, do_eval in blocks(rounds, block_len, eval_every, first):
      state, metrics = engine.run_block(state, jnp.asarray(round_nums), jnp.asarray(active),
                                        jnp.asarray(do_eval))
      metrics = jax.device_get(metrics)
      client_arrays = metrics_lib.split_client_arrays(metrics)
      elapsed = time.perf_counter() - start
      block_seconds.append(elapsed - sum(block_seconds))
      rows, diverged = history_rows(metrics, round_nums, active, do_eval, elapsed_before + elapsed,
                                    columns)
      info["overflow_rounds"] += check_overflow(metrics, round_nums, active, cohort_size)
      for row in rows:
        for k, v in row.items():
          history.setdefault(k, []).append(v)
      if clients is not None:
        client_rows = per_client_rows(client_arrays, rows, round_nums)
        for row in client_rows:
          for k, v in row.items():
            clients.setdefault(k, []).append(v)
        if client_callback is not None and client_rows:
          client_callback(client_rows)
      if diverged is not None:
        if callback is not None and rows:
          callback(rows)
        raise TrainingDiverged(diverged, history)
      last = int(round_nums[active][-1])
      stopping = stop.requested  # read once: a Ctrl-C from here on stops after the next block
      saved = None
      if checkpoint_dir is not None and (stopping or last == rounds or (
          every is not None and last // every > last_saved // every)):
        saved = checkpoint_lib.save(checkpoint_dir, last, state, history, fingerprint,
                                    checkpoint_keep)
        last_saved = last
      if callback is not None and rows:
        callback(rows)
      if stopping and last < rounds:
        info.update(seconds=time.perf_counter() - start, block_seconds=block_seconds,
                    compilations=compilations(engine), interrupted_after_round=last,
                    **memory_info(engine))
        raise SimulationInterrupted(last, SimulationResult(state.params, history, info, state,
                                                           _client_arrays(clients)), saved)
  info["seconds"] = time.perf_counter() - start
  info["block_seconds"] = block_seconds  # the first includes compilation
  info["compilations"] = compilations(engine)
  info.update(memory_info(engine))
  return SimulationResult(state.params, history, info, state, _client_arrays(clients))


def _client_arrays(clients: dict | None) -> dict | None:
  return None if clients is None else {k: np.asarray(v) for k, v in clients.items()}


class _InterruptFlag:
  """While entered (in the main thread, with Python's default SIGINT handler), the first Ctrl-C
  only sets ``requested`` so the run stops at the end of the current block; a second one raises
  ``KeyboardInterrupt`` at once."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    import sys
    print("\ninterrupt: stopping after the current block of rounds (Ctrl-C again to stop now)",
          file=sys.stderr, flush=True)

  def __enter__(self):
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
    return False


def run_fingerprint(*, algorithm, model, params, train, test, clients_per_round, client_fraction,
                    seed, eval_every, plan, bucketing, system, dissimilarity,
                    population, aggregator, sampling, attack, local=None,
                    finetune_steps=None) -> dict:
  """What a checkpoint must agree on to be resumed (JSON-normal values).

  Compared: the algorithm's name, local work, weighting and numeric ``hparams``; the model's name
  and the initial params (a digest); the data's client sizes and shapes; seed, cohorts, sampling,
  evaluation period, plan (and chunk size), bucketing, systems heterogeneity, population placement,
  aggregator (name and ``hparams``), attack and local parameters. Optimizer objects (learning rates
  inside optax transformations) cannot be compared and are not: the command line compares its
  whole config.
  """
  def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
      a = np.ascontiguousarray(np.asarray(a))
      h.update(str((a.dtype, a.shape)).encode())
      h.update(a.tobytes())
    return h.hexdigest()[:16]

  def data(d):
    return None if d is None else {"clients": d.num_clients, "feature_shape": list(d.feature_shape),
                                   "sizes": digest([d.num_examples])}

  def numbers(hp):
    return {k: np.asarray(v).tolist() for k, v in (hp or {}).items()}

  fp = {
      "algorithm": algorithm.name,
      "algorithm_hparams": numbers(algorithm.hparams),
      "local_work": [algorithm.local_epochs, algorithm.batch_size, algorithm.local_steps,
                     algorithm.shuffle, algorithm.weighting],
      "model": model.name, "init_params": digest(jax.tree.leaves(params)),
      "train": data(train), "test": data(test), "seed": int(seed),
      "clients_per_round": clients_per_round, "client_fraction": client_fraction,
      "sampling": [sampling.kind, sampling.rate], "eval_every": eval_every,
      "plan": [plan.name, plan.chunk_size],
      "bucketing": bucketing, "system": None if system is None else list(system),
      "dissimilarity": bool(dissimilarity), "population": population,
      "aggregator": [aggregator.name, numbers(aggregator.hparams)],
      "attack": None if attack is None else [attack.name, attack.fraction,
                                             None if attack.ids is None else list(attack.ids)],
      "local_params": None if local is None else [bool(m) for m in local],
      **({} if finetune_steps is None else {"finetune_steps": finetune_steps}),
  }
  return json.loads(json.dumps(fp, default=str))


def _starting_point(template, fingerprint, rounds, checkpoint_dir, checkpoint_every,
                    checkpoint_keep, resume, init_state, start_round):
  """``(state, history, first round)``: a fresh start (``template``), a checkpoint or a given
  state."""
  if checkpoint_dir is None and (resume is not False or checkpoint_every is not None):
    raise ValueError("resume and checkpoint_every need a checkpoint_dir")
  if checkpoint_dir is not None:
    positive_int("checkpoint_keep", checkpoint_keep)
  if start_round is not None:
    positive_int("start_round", start_round)
    if start_round > rounds:
      raise ValueError(f"start_round={start_round} is past rounds={rounds}")
  checkpoint = None
  if resume is not False and resume is not True:
    if not isinstance(resume, checkpoint_lib.Checkpoint):
      raise ValueError(f"resume must be True, False or a loaded Checkpoint, got {resume!r}")
    checkpoint = resume
  elif resume:
    checkpoint = checkpoint_lib.load_latest(checkpoint_dir)
  elif checkpoint_dir is not None and checkpoint_lib.list_checkpoints(checkpoint_dir):
    raise ValueError(f"checkpoint_dir {checkpoint_dir!r} already holds checkpoints; pass "
                     "resume=True to continue that run, or give another directory")
  if checkpoint is not None:
    if init_state is not None or start_round is not None:
      raise ValueError("give resume or init_state/start_round, not both")
    differ = checkpoint_lib.differing_keys(checkpoint.fingerprint, fingerprint)
    if differ:
      raise ValueError(f"checkpoint {checkpoint.path} is of a different run: "
                       + ", ".join(f"{k} (checkpoint {checkpoint.fingerprint.get(k)!r}, now "
                                   f"{fingerprint.get(k)!r})" for k in differ))
    if checkpoint.round > rounds:
      raise ValueError(f"checkpoint {checkpoint.path} is of round {checkpoint.round}, past "
                       f"rounds={rounds}")
    try:
      state = checkpoint_lib.restore(checkpoint, template)
    except checkpoint_lib.CheckpointError as e:
      raise ValueError(str(e)) from None
    state = jax.tree.map(jnp.asarray, state)
    return state, checkpoint.history, checkpoint.round + 1
  if init_state is not None:
    want, got = jax.tree.structure(template), jax.tree.structure(init_state)
    if want != got:
      raise ValueError(f"init_state does not have this run's state structure: got {got}, "
                       f"expected {want}")
    for i, (g, w) in enumerate(zip(jax.tree.leaves(init_state), jax.tree.leaves(template))):
      if np.shape(g) != w.shape:
        raise ValueError(f"init_state leaf {i} has shape {np.shape(g)}; this run's is {w.shape}")
    state = jax.tree.map(lambda a, w: jnp.array(a, dtype=w.dtype, copy=True), init_state,
                         template)
    return state, {"round": []}, start_round or 1
  return template, {"round": []}, start_round or 1


def initial_params(model: Model, seed: int, init_params=None):
  """``init_params`` (checked against the model) or ``model.init`` of the seed's init stream,
  copied: the server state is donated to the compiled block, which must not invalidate arrays
  the caller passed in."""
  init_key = jax.random.fold_in(jax.random.key(int(seed)), STREAM_INIT)
  if init_params is not None:
    _check_init_params(init_params, jax.eval_shape(model.init, init_key), model.name)
  params = model.init(init_key) if init_params is None else init_params
  return jax.tree.map(lambda a: jnp.array(a, copy=True), params)


def evaluator(model: Model, eval_sets: dict, unroll: bool, rows: dict | None = None,
              local: tuple | None = None, client_arrays: bool = False):
  """``fn(params, [arrays per set], local_clients) -> metrics`` of every named evaluation set;
  ``rows[name]`` is a set's padded row count (default its own size); with ``local``, scored per
  client; ``client_arrays`` adds every client's metrics
  (:func:`fedjax_sim.metrics.dataset_evaluator`)."""
  rows = rows or {}
  evaluators = [metrics_lib.dataset_evaluator(model, rows.get(name, d.total_examples), name,
                                              unroll, d.num_clients, local, client_arrays)
                for name, d in eval_sets.items()]
  return lambda p, arrays, local_clients=None: {
      k: v for ev, xy in zip(evaluators, arrays) for k, v in ev(p, xy, local_clients).items()}


def blocks(rounds: int, block_len: int, eval_every: int, start: int = 1):
  """``(round_nums, active, do_eval)`` of each block of rounds ``start..rounds`` (the last one
  padded)."""
  for first in range(start, rounds + 1, block_len):
    round_nums = np.arange(first, first + block_len, dtype=np.int32)
    active = round_nums <= rounds
    yield round_nums, active, active & ((round_nums % eval_every == 0) | (round_nums == rounds))


def per_client_rows(client_arrays: dict, rows: list[dict], round_nums) -> list[dict]:
  """One dict per evaluated round of ``rows``: ``round`` and each ``{set}_per_client_{metric}``
  array of that round, renamed ``{set}_{metric}``."""
  index = {int(r): i for i, r in enumerate(round_nums)}
  tag = metrics_lib.CLIENT_ARRAY_TAG
  return [{"round": row["round"], **{k.replace(tag, "_"): np.asarray(v[index[row["round"]]])
                                     for k, v in client_arrays.items()}} for row in rows]


def history_rows(metrics: dict, round_nums, active, do_eval, elapsed: float, columns=None):
  """One block's metrics (``[block]`` arrays) → ``(rows of evaluated rounds, diverged round)``;
  ``columns(round, row)`` adds host-derived columns (:func:`derived_columns`)."""
  rows = []
  for i, r in enumerate(round_nums):
    if not active[i]:
      break
    row = {k: float(v[i]) for k, v in metrics.items() if k != "finite"}
    if not metrics["finite"][i] or (do_eval[i] and not all(map(math.isfinite, row.values()))):
      return rows, int(r)
    if do_eval[i]:
      more = {} if columns is None else columns(int(r), row)
      rows.append({"round": int(r), **row, **more, "elapsed": elapsed})
  return rows, None


def compilations(engine) -> int | None:
  """Programs the compiled executor compiled for its block (``None`` for the host loop)."""
  count = getattr(engine.run_block, "compilations", None)
  return count() if count else None


def memory_info(engine) -> dict:
  """``peak_bytes`` and its parts, from XLA's memory analysis of the compiled block last run
  (:class:`fedjax_sim.engine.executors.aot.MemoryUse`); empty for the host loop."""
  memory = getattr(engine.run_block, "memory", None)
  use = memory() if memory else None
  if use is None:
    return {}
  return {"peak_bytes": use.peak_bytes, "memory": dict(use._asdict())}
