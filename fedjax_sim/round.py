"""The federated round and the block of rounds, compiled once.

A round: sample the cohort on device → for each size bucket, vmap :func:`client.local_train` over
chunks of the bucket's cohort members → stream a weighted sum of client deltas → server optax update.
A block is a ``lax.scan`` of rounds with evaluation folded in, so the host wakes once per block.

Randomness (reproducible whatever the plan, chunk or block size):
``round_key = fold_in(train_key, r)``; ``sample, clients, system = split(round_key, 3)``;
client ``k``'s key is ``fold_in(clients, k)`` with ``k`` its global id; ``system`` draws the
stragglers and dropouts (:mod:`fedjax_sim.systems`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fedjax_sim import client as client_lib
from fedjax_sim import systems
from fedjax_sim.algorithms import Algorithm, ClientContext, ClientOutput, RoundSummary

PLANS = ("auto", "vmap", "chunked", "scan", "host_loop")


class Bucket(NamedTuple):
  """Clients of similar size that share one compiled shape.

  Attributes:
    shape: static client shapes (see :class:`client.BucketShape`).
    capacity: most of its members one round can sample (``min(cohort, members)``).
    chunk: clients vmapped together.
    members: number of population clients in the bucket.
    dense: a round is expected to fill at least half the capacity (full participation, or one
      bucket): the shuffles are then drawn for the whole bucket at once rather than per chunk.
  """
  shape: client_lib.BucketShape
  capacity: int
  chunk: int
  members: int
  dense: bool = True

  @property
  def num_chunks(self) -> int:
    return -(-self.capacity // self.chunk)


class ServerState(NamedTuple):
  """The server's state between rounds (donated to the compiled block).

  Attributes:
    params: the global model.
    opt_state: the server optimizer's state.
    extra: the algorithm's server state (``Hooks.init_server_extra``), e.g. SCAFFOLD's ``c``.
    client_states: the algorithm's per-client state for the whole population, leaves
      ``[num_clients, ...]`` (``Hooks.init_client_state``), e.g. SCAFFOLD's ``c_i``.
  """
  params: Any
  opt_state: Any
  extra: Any = None
  client_states: Any = None


class RoundSums(NamedTuple):
  """Running reductions over the clients that returned an update (``w_k`` = server weight)."""
  delta: Any  # Σ w_k Δ_k
  message: Any  # Σ w_k message_k
  weight: jax.Array  # Σ w_k
  sq_norm: jax.Array  # Σ w_k ‖Δ_k‖²
  norm_sum: jax.Array  # Σ ‖Δ_k‖
  norm_max: jax.Array  # max ‖Δ_k‖
  count: jax.Array  # number of clients

  def combine(self, other: "RoundSums") -> "RoundSums":
    added = jax.tree.map(jnp.add, self._replace(norm_max=0.0), other._replace(norm_max=0.0))
    return added._replace(norm_max=jnp.maximum(self.norm_max, other.norm_max))


class Plan(NamedTuple):
  """How the cohort is executed (results are the same up to float reassociation).

  * ``vmap``: each bucket's sampled clients in one vmap (with partial participation, in chunks of
    the bucket's expected share of the cohort, rounded up to a power of two).
  * ``chunked``: vmap over chunks of ``chunk_size`` clients, ``lax.scan`` over the chunks with a
    running weighted sum (bounded memory).
  * ``scan``: ``chunk_size = 1``, one client at a time inside the compiled program.
  * ``host_loop``: Python drives rounds, chunks and local steps, one compiled call per step (the
    schedule, masks and randomness are the same functions). XLA:CPU runs convolutions about 10×
    slower inside any loop (jax-ml/jax#12868), so convolutional models on CPU use this plan.
  ``unroll`` fully unrolls scanned local steps and evaluation batches (convolutions on CPU).
  """
  name: str
  chunk_size: int | None
  unroll: bool


def size_buckets(num_examples: np.ndarray, growth: float = 2.0, max_buckets: int = 6) -> list[np.ndarray]:
  """Groups clients so that within a group the largest is at most ``growth`` × the smallest.

  Returns a list of index arrays (each sorted by client id). With equal sizes there is one group.
  When more than ``max_buckets`` groups would be needed, ``growth`` is raised until they fit.
  """
  order = np.argsort(num_examples, kind="stable")
  sizes = num_examples[order]
  while True:
    groups, start = [], 0
    while start < len(sizes):
      stop = np.searchsorted(sizes, sizes[start] * growth, side="right")
      groups.append(order[start:stop])
      start = stop
    if len(groups) <= max_buckets:
      return [np.sort(g) for g in groups]
    growth *= 1.5


def padding_waste(num_examples: np.ndarray, groups: list[np.ndarray], algo: Algorithm) -> float:
  """Masked steps per real step when every client runs its bucket's step count (population mean)."""
  real = client_lib.num_local_steps(num_examples, algo).astype(np.float64)
  padded = np.zeros_like(real)
  for g in groups:
    padded[g] = real[g].max()
  return float(padded.sum() / real.sum() - 1.0)


def make_buckets(num_examples: np.ndarray, algo: Algorithm, cohort_size: int,
                 chunk_size: int | None, bucketing: bool = True,
                 variable_steps: bool = False) -> tuple[list[Bucket], np.ndarray, list]:
  """Builds the buckets; returns ``(buckets, bucket_of_client, groups)``.

  For a sweep (2-D sizes) a bucket is one chunk: runs in lockstep execute every chunk anyway
  (under vmap over runs, ``lax.cond`` runs both branches), so splitting a bucket into chunks
  would only run them one after another.

  ``num_examples`` is ``[num_clients]``, or ``[runs, num_clients]`` for a sweep: then the buckets
  are shared by every run (shapes fit the union of the runs' clients) and ``bucket_of_client`` is
  ``[runs, num_clients]``; ``groups`` index the flattened sizes.
  """
  sizes = np.atleast_2d(num_examples)
  num_clients = sizes.shape[1]
  flat = sizes.reshape(-1)
  groups = size_buckets(flat) if bucketing else [np.arange(flat.size)]
  bucket_of = np.zeros(flat.size, np.int32)
  for b, g in enumerate(groups):
    bucket_of[g] = b
  bucket_of = bucket_of.reshape(sizes.shape)
  buckets = []
  for b, g in enumerate(groups):
    members = int((bucket_of == b).sum(axis=1).max())  # the most any one run has
    capacity = min(cohort_size, members)
    # A round samples about `expected` members of this bucket, rarely all `capacity` of them:
    # chunks no larger than the expected count (next power of two) let lax.cond skip the rest.
    expected = cohort_size * members / num_clients
    chunk = min(capacity, 1 << max(0, math.ceil(math.log2(max(expected, 1.0)))))
    if sizes.shape[0] > 1:
      chunk = capacity
    elif chunk_size is not None:
      chunk = max(1, min(chunk_size, chunk))
    buckets.append(Bucket(client_lib.bucket_shape(flat[g], algo, variable_steps), capacity,
                          chunk, members, dense=capacity <= 2 * expected))
  if np.ndim(num_examples) == 1:
    bucket_of = bucket_of[0]
  return buckets, bucket_of, groups


def _over_chunk(fn):
  """``vmap(fn)`` over a chunk of clients; a chunk of one runs ``fn`` unbatched (a vmapped
  convolution becomes a grouped one, which XLA:CPU runs about 4× slower)."""
  def run(*args):
    if jax.tree.leaves(args)[0].shape[0] == 1:
      out = fn(*jax.tree.map(lambda a: a[0], args))
      return jax.tree.map(lambda a: a[None], out)
    return jax.vmap(fn)(*args)
  return run


def sample_cohort(key: jax.Array, num_clients: int, cohort_size: int) -> jax.Array:
  """``cohort_size`` distinct global client ids, uniformly without replacement (all when equal).

  Uses the top-``m`` of i.i.d. 32-bit random integers per client (no full sort of the population).
  """
  if cohort_size >= num_clients:
    return jnp.arange(num_clients, dtype=jnp.int32)
  _, ids = lax.top_k(jax.random.bits(key, (num_clients,)), cohort_size)
  return ids.astype(jnp.int32)


def bucket_slots(cohort: jax.Array, bucket_of: jax.Array, b: int, bucket: Bucket):
  """The cohort members in bucket ``b`` packed into ``num_chunks × chunk`` slots.

  Returns ``(ids, pos)`` each ``[num_chunks, chunk]``: global client ids and cohort positions;
  empty slots have ``pos == len(cohort)`` and id 0.
  """
  slots = bucket.num_chunks * bucket.chunk
  pos = jnp.nonzero(bucket_of[cohort] == b, size=slots, fill_value=cohort.shape[0])[0]
  ids = jnp.where(pos < cohort.shape[0], jnp.append(cohort, 0)[pos], 0)
  return ids.reshape(bucket.num_chunks, bucket.chunk), pos.reshape(bucket.num_chunks, bucket.chunk)



class DeviceData(NamedTuple):
  """The training population on device. Passed to the compiled block as an argument, never
  closed over: a closed-over array is embedded in the executable as a constant, which copies
  the whole dataset several times during compilation and slows compilation down with its size."""
  x: jax.Array
  y: jax.Array
  offsets: jax.Array
  counts: jax.Array
  bucket_of: jax.Array
  global_ids: Any = None  # streamed cohorts: the population id of each client (else its index)

  def global_id(self, index):
    return index if self.global_ids is None else self.global_ids[index]


class CohortStream:
  """A population kept in host memory, sent to the device one block of cohorts at a time.

  For each round of a block the cohort is sampled exactly as on device (same key, same
  :func:`sample_cohort`), its clients' rows are gathered on the host into one compact array in
  cohort order, and the block's rounds go to the device stacked ``[rounds, rows, ...]``, with the
  row count rounded up to a power of two (few compiled shapes). Clients keep their population
  bucket and their global id (client keys and per-client states use it), so results equal the
  on-device path. Host memory: the population's flat arrays plus two blocks of cohort rows (the
  block in flight and the next one, gathered while the device runs — double buffering).
  """

  def __init__(self, train, bucket_of: np.ndarray, cohort_size: int):
    self.x, self.y = train.x, train.y
    self.offsets, self.sizes = train.offsets, train.num_examples
    self.bucket_of, self.cohort_size = bucket_of, cohort_size
    num_clients = train.num_clients
    self._cohorts = jax.jit(jax.vmap(lambda key, r: sample_cohort(
        jax.random.split(jax.random.fold_in(key, r), 3)[0], num_clients, cohort_size),
        in_axes=(None, 0)))
    self._next = None

  def _gather(self, key, rounds: np.ndarray) -> DeviceData:
    ids = np.asarray(self._cohorts(key, jnp.asarray(rounds, jnp.int32)))  # [R, m]
    counts = self.sizes[ids]
    totals = counts.sum(axis=1)
    cap = 1 << int(math.ceil(math.log2(max(int(totals.max()), 1))))
    x = np.zeros((len(rounds), cap, *self.x.shape[1:]), self.x.dtype)
    y = np.zeros((len(rounds), cap), self.y.dtype)
    local = np.cumsum(counts, axis=1) - counts
    for i in range(len(rounds)):
      rows = np.repeat(self.offsets[ids[i]] - local[i], counts[i]) + np.arange(totals[i])
      x[i, :totals[i]], y[i, :totals[i]] = self.x[rows], self.y[rows]
    as_int = lambda a: jnp.asarray(a, jnp.int32)
    return DeviceData(jnp.asarray(x), jnp.asarray(y), as_int(local), as_int(counts),
                      as_int(self.bucket_of[ids]), as_int(ids))

  def take(self, key, rounds: np.ndarray) -> DeviceData:
    """The block's cohort data (prefetched when :meth:`prefetch` guessed these rounds)."""
    if self._next is not None and np.array_equal(self._next[0], rounds):
      data = self._next[1]
    else:
      data = self._gather(key, rounds)
    self._next = None
    return data

  def prefetch(self, key, rounds: np.ndarray) -> None:
    self._next = (rounds, self._gather(key, rounds))


class Engine(NamedTuple):
  """The compiled pieces of a simulation (built by :func:`build_engine`)."""
  run_block: Callable  # (state, rounds[R], active[R], evaluate[R]) -> (state, metrics dict of [R])
  init_state: Callable  # params -> ServerState
  buckets: list
  groups: list  # client indices of each bucket
  plan: Plan


ROUND_STATS = ("drift", "update_norm_mean", "update_norm_max", "participants")


def device_data(trains, bucket_of: np.ndarray) -> DeviceData:
  """The population on device. For a sweep (a list of datasets) the runs' examples are
  concatenated into one shared ``x``/``y`` (each run's ``offsets`` point into its own rows) and the
  per-client arrays are stacked ``[runs, num_clients]``: vmapping over runs then batches only the
  row indices, and no run is padded to the largest run's row count. (On the FedProx sweep this
  measured the same speed as stacking padded per-run arrays; it saves their memory.)"""
  if not isinstance(trains, (list, tuple)):
    return DeviceData(*trains.device_arrays(), jnp.asarray(trains.offsets, jnp.int32),
                      jnp.asarray(trains.num_examples, jnp.int32), jnp.asarray(bucket_of))
  base = np.cumsum([0] + [t.total_examples for t in trains[:-1]])
  return DeviceData(jnp.asarray(np.concatenate([t.x for t in trains])),
                    jnp.asarray(np.concatenate([t.y for t in trains])),
                    jnp.asarray(np.stack([t.offsets + b for t, b in zip(trains, base)]), jnp.int32),
                    jnp.asarray(np.stack([t.num_examples for t in trains]), jnp.int32),
                    jnp.asarray(bucket_of))


def build_engine(model, algo: Algorithm, train, plan: Plan, cohort_size: int, train_key: jax.Array,
                 evaluate: Callable[[Any, Any], dict], eval_data: Any, bucketing: bool = True,
                 system: systems.Heterogeneity | None = None,
                 population_metrics: Callable | None = None, hparams: dict | None = None,
                 streaming: bool = False) -> Engine:
  """Compiles the round for one (model, algorithm, dataset, plan), or for a sweep of runs.

  A sweep (``train`` a list of datasets with the same number of clients; ``train_key``,
  ``eval_data``, ``hparams`` and the state stacked on a leading run axis) runs every run in the
  same compiled program, vmapped over runs: the runs advance in lockstep, and a round costs about
  as much as the slowest run's round rather than the sum of all of them.

  Args:
    model: the model.
    algo: the algorithm.
    train: the training :class:`~fedjax_sim.data.FederatedData` (a list for a sweep).
    plan: the execution :class:`Plan`.
    cohort_size: clients per round.
    train_key: the training randomness stream (``[runs]`` keys for a sweep).
    evaluate: ``fn(params, eval_data) -> {name: scalar}``, the metrics of evaluated rounds.
    eval_data: the arrays ``evaluate`` reads (passed to the compiled block as an argument).
    bucketing: group clients by size (``False``: one bucket padded to the largest client).
    system: stragglers and dropouts (:class:`~fedjax_sim.systems.Heterogeneity`).
    population_metrics: ``fn(params, device_data, buckets) -> {name: scalar}``, more metrics of
      evaluated rounds that read the training population (e.g. gradient dissimilarity).
    hparams: the algorithm's hyperparameters (default ``algo.hparams``; ``[runs]`` arrays for a
      sweep).
    streaming: keep the population on the host; each block, gather the rounds' cohorts there and
      send only their rows (see :class:`CohortStream`). Same results as the on-device path.
  """
  sweep = isinstance(train, (list, tuple))
  num_clients = train[0].num_clients if sweep else train.num_clients
  if sweep and plan.name == "host_loop":
    raise ValueError("a sweep runs inside one compiled program; plan 'host_loop' cannot run it")
  hooks = algo.hooks
  system = systems.check(system)
  sizes = np.stack([t.num_examples for t in train]) if sweep else train.num_examples
  buckets, bucket_of, groups = make_buckets(sizes, algo, cohort_size, plan.chunk_size,
                                            bucketing, variable_steps=system.partial)
  if streaming and (sweep or plan.name == "host_loop" or population_metrics is not None):
    raise ValueError("a streamed population runs with plan vmap/chunked/scan, without sweeps or "
                     "population metrics (dissimilarity)")
  stream = CohortStream(train, bucket_of, cohort_size) if streaming else None
  data = None if streaming else device_data(train, bucket_of)
  shuffle_method = client_lib.shuffle_method(int(np.max(sizes)))
  hparams = {k: jnp.asarray(v, jnp.float32)
             for k, v in (algo.hparams if hparams is None else hparams).items()}
  uniform = algo.weighting == "uniform"
  f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
  zeros_of = lambda fn, *args: (lambda: jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args)))

  def round_plan(key, state: ServerState, r):
    """This round's cohort, per-position conditions, client key and Local-SGD ``H``."""
    sample_key, client_key, system_key = jax.random.split(jax.random.fold_in(key, r), 3)
    # A streamed round's data holds exactly its cohort, in cohort order.
    cohort = (jnp.arange(cohort_size, dtype=jnp.int32) if streaming
              else sample_cohort(sample_key, num_clients, cohort_size))
    conditions = systems.cohort_conditions(system_key, cohort_size, system)
    h = (jnp.int32(0) if hooks.round_steps is None
         else jnp.asarray(hooks.round_steps(state.extra, r), jnp.int32))
    return cohort, conditions, client_key, h

  def slots(d: DeviceData, plan_r, b: int, bucket: Bucket):
    """Bucket ``b``'s slots: ``(ids, returns, straggler, u)``, each ``[num_chunks, chunk]``."""
    cohort, conditions, _, _ = plan_r
    ids, pos = bucket_slots(cohort, d.bucket_of, b, bucket)
    at = lambda a, fill: jnp.append(a, fill)[pos]
    return ids, at(conditions.returns, False), at(conditions.straggler, False), at(conditions.u, 0.0)

  def client_jobs(d: DeviceData, ids, returns, straggler, u, client_key, h, shape):
    """The :class:`client.ClientJob` of each slot (``ids`` of any shape); returns nothing for
    clients that do not return (their slots run no real step)."""
    flat = lambda a: a.reshape(-1)
    ids_f, ret_f = flat(ids), flat(returns)
    n = jnp.where(ret_f, d.counts[ids_f], 0)
    steps = (client_lib.num_local_steps(n, algo) if hooks.round_steps is None
             else jnp.full_like(n, jnp.minimum(h, algo.local_steps)))
    if system.partial:
      spe = client_lib.steps_per_epoch(n, algo.batch_size)
      epochs = None if algo.local_steps is not None else algo.local_epochs
      steps = jnp.where(flat(straggler), systems.partial_steps(flat(u), steps, spe, epochs), steps)
    keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(d.global_id(ids_f))
    orders = client_lib.epoch_orders(keys, n, shape, algo.shuffle, shuffle_method)
    job = client_lib.ClientJob(d.offsets[ids_f], n, jnp.where(n > 0, steps, 0), orders)
    return jax.tree.map(lambda a: a.reshape(*ids.shape, *a.shape[1:]), job)

  def client_context(state: ServerState, r, hp, client_state):
    extra = None if hooks.client_extra is None else hooks.client_extra(state.extra, client_state)
    return ClientContext(state.params, r, hp, extra)

  def client_end(d: DeviceData, params, context, new_params, job, client_state, shape):
    """``(Δ_k, message_k, new client state)`` of one client."""
    delta = jax.tree.map(lambda a, p: (a - p).astype(jnp.float32), new_params, params)
    if hooks.client_result is None:
      return delta, None, None
    full_grad = lambda p: client_lib.full_gradient(model, d.x, d.y, job.offset, job.num_examples,
                                                   shape.max_examples, p)
    out = ClientOutput(context, new_params, job.num_steps, job.num_examples, client_state,
                       full_grad)
    message, new_state = hooks.client_result(out)
    return delta, f32(message), new_state

  def reduce_chunk(deltas, messages, n, returns) -> RoundSums:
    """Weighted sums over a chunk's clients that returned."""
    weights = jnp.where(returns, 1.0 if uniform else n.astype(jnp.float32), 0.0)
    # where(): a slot that returns nothing never reaches the sums, even if its unmasked steps
    # made it non-finite (buckets with equal step counts do not mask steps).
    mask = lambda a: jnp.where(returns.reshape(-1, *([1] * (a.ndim - 1))), a, 0.0)
    wsum = lambda tree: jax.tree.map(lambda a: jnp.tensordot(weights, mask(a), axes=1), tree)
    sq = sum(jnp.sum(mask(a).reshape(a.shape[0], -1) ** 2, axis=1) for a in jax.tree.leaves(deltas))
    norms = jnp.sqrt(sq)
    return RoundSums(wsum(deltas), wsum(messages), jnp.sum(weights), jnp.sum(weights * sq),
                     jnp.sum(norms), jnp.max(norms), jnp.sum(returns.astype(jnp.float32)))

  def gather_states(client_states, ids):
    return jax.tree.map(lambda a: a[ids], client_states)

  def scatter_states(client_states, ids, returns, new_states):
    """Writes the returning clients' new states back by global id (others are dropped)."""
    if client_states is None:
      return None
    idx = jnp.where(returns, ids, num_clients)
    return jax.tree.map(lambda a, v: a.at[idx].set(v.astype(a.dtype), mode="drop"),
                        client_states, new_states)

  def train_chunk(d: DeviceData, state: ServerState, hp, r, job, client_states, returns, shape):
    """One chunk of clients trained in one program: ``(RoundSums, new client states)``."""
    bound = jnp.max(job.num_steps)

    def one(job_k, state_k):
      context = client_context(state, r, hp, state_k)
      new_params = client_lib.local_train(model, algo, shape, state.params, d.x, d.y, job_k,
                                          context, bound, plan.unroll)
      return client_end(d, state.params, context, new_params, job_k, state_k, shape)

    deltas, messages, new_states = _over_chunk(one)(job, client_states)
    return reduce_chunk(deltas, messages, job.num_examples, returns), new_states

  def server_update(state: ServerState, sums: RoundSums, hp, r):
    """Means over the returning clients → the algorithm's server rule → the server optimizer."""
    total = jnp.maximum(sums.weight, 1e-30)
    mean = lambda tree: jax.tree.map(lambda a: a / total, tree)
    mean_delta = mean(sums.delta)
    drift = jnp.maximum(
        sums.sq_norm / total - sum(jnp.sum(a * a) for a in jax.tree.leaves(mean_delta)), 0.0)
    summary = RoundSummary(mean_delta, mean(sums.message), sums.count, num_clients, drift, r)
    if hooks.server_update is None:
      delta, extra = mean_delta, state.extra
    else:
      delta, extra = hooks.server_update(summary, hp, state.extra)
    pseudo_grad = jax.tree.map(lambda g, p: (-g).astype(p.dtype), delta, state.params)
    updates, opt_state = algo.server_optimizer.update(pseudo_grad, state.opt_state, state.params)
    new = (optax.apply_updates(state.params, updates), opt_state, extra)
    # A round in which no client returned leaves the server where it was.
    params, opt_state, extra = jax.tree.map(lambda a, b: jnp.where(sums.count > 0, a, b), new,
                                            (state.params, state.opt_state, state.extra))
    stats = {"drift": drift, "update_norm_mean": sums.norm_sum / jnp.maximum(sums.count, 1.0),
             "update_norm_max": sums.norm_max, "participants": sums.count}
    return ServerState(params, opt_state, extra, state.client_states), stats

  def zero_sums(d: DeviceData, state: ServerState, hp, r) -> RoundSums:
    """Empty sums; the message sums take the shape of the algorithm's client messages."""
    z = jnp.float32(0.0)
    message = None
    if hooks.client_result is not None:
      shape = buckets[0].shape
      def one_message():
        job = client_lib.ClientJob(jnp.int32(0), jnp.int32(1), jnp.int32(1),
                                   jnp.zeros((shape.num_epochs, shape.max_examples), jnp.int32))
        state_k = (None if state.client_states is None
                   else gather_states(state.client_states, jnp.int32(0)))
        context = client_context(state, r, hp, state_k)
        return client_end(d, state.params, context, state.params, job, state_k, shape)[1]
      message = zeros_of(one_message)()
    return RoundSums(jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), state.params),
                     message, z, z, z, z, z)

  def device_round(d: DeviceData, key, state: ServerState, hp, r):
    plan_r = round_plan(key, state, r)
    _, _, client_key, h = plan_r
    total, states = zero_sums(d, state, hp, r), state.client_states
    for b, bucket in enumerate(buckets):
      ids, returns, straggler, u = slots(d, plan_r, b, bucket)
      # Dense buckets draw every slot's shuffle at once (a shuffle loop per small chunk is
      # dominated by loop overhead); sparse ones per chunk, so that skipped chunks draw nothing.
      jobs = (client_jobs(d, ids, returns, straggler, u, client_key, h, bucket.shape)
              if bucket.dense else None)

      def one_chunk(carry, chunk, bucket=bucket):
        total, states = carry
        ids_c, returns_c, straggler_c, u_c, job_c = chunk
        def update():
          job = job_c if bucket.dense else client_jobs(d, ids_c, returns_c, straggler_c, u_c,
                                                      client_key, h, bucket.shape)
          chunk_states = None if states is None else gather_states(states, d.global_id(ids_c))
          return train_chunk(d, state, hp, r, job, chunk_states, returns_c, bucket.shape)
        sums, new_states = lax.cond(jnp.any(returns_c), update, zeros_of(update))
        total = total.combine(sums)
        return (total, scatter_states(states, d.global_id(ids_c), returns_c, new_states)), None

      chunks = (ids, returns, straggler, u, jobs)
      if bucket.num_chunks == 1:
        (total, states), _ = one_chunk((total, states), jax.tree.map(lambda a: a[0], chunks))
      else:
        (total, states), _ = lax.scan(one_chunk, (total, states), chunks)
    state, stats = server_update(state._replace(client_states=states), total, hp, r)
    return state, dict(stats, **round_steps_stat(h))

  def round_steps_stat(h):
    return {} if hooks.round_steps is None else {"local_steps": h.astype(jnp.float32)}

  def evaluated_metrics(params, d, eval_data, do_eval):
    def compute():
      metrics = dict(evaluate(params, eval_data))
      if population_metrics is not None:
        metrics.update(population_metrics(params, d, buckets))
      return metrics
    shapes = jax.eval_shape(compute)
    nan = lambda: jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
    return lax.cond(do_eval, compute, nan)

  def finite(params):
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))

  def init_state(params):
    extra = None if hooks.init_server_extra is None else hooks.init_server_extra(params)
    states = None
    if hooks.init_client_state is not None:
      states = jax.tree.map(lambda a: jnp.repeat(a[None], num_clients, axis=0),
                            hooks.init_client_state(params))
    return ServerState(params, algo.server_optimizer.init(params), extra, states)

  no_stats = {k: jnp.float32(0.0) for k in ROUND_STATS + ("local_steps",) * (
      hooks.round_steps is not None)}

  if plan.name != "host_loop":
    def block(state, d, eval_data, key, hp, rounds, active, do_eval, round_data=None):
      def body(state, xs):
        r, act, ev, d_r = xs
        d_r = d if d_r is None else d_r  # streamed: this round's cohort data
        state, stats = lax.cond(act, lambda s: device_round(d_r, key, s, hp, r),
                                lambda s: (s, no_stats), state)
        metrics = evaluated_metrics(state.params, d_r, eval_data, act & ev)
        metrics.update(stats, finite=finite(state.params))
        return state, metrics
      return lax.scan(body, state, (rounds, active, do_eval, round_data))

    if sweep:
      data_axes = DeviceData(None, None, 0, 0, 0, None)
      block = jax.vmap(block, in_axes=(0, data_axes, 0, 0, 0, None, None, None))
      init_state = jax.vmap(init_state)
    block_j = jax.jit(block, donate_argnums=0)
    def run_block(state, rounds, active, do_eval):
      if not streaming:
        return block_j(state, data, eval_data, train_key, hparams, rounds, active, do_eval)
      rounds = np.asarray(rounds)
      out = block_j(state, None, eval_data, train_key, hparams, rounds, active, do_eval,
                    stream.take(train_key, rounds))
      stream.prefetch(train_key, rounds + len(rounds))  # overlaps the block just dispatched
      return out
    run_block.compiled = block_j  # for inspection (compile counts, memory analysis)
    return Engine(run_block, init_state, buckets, groups, plan)

  # host_loop: the same pieces, with Python driving rounds, chunks and local steps. One compiled
  # call per local step is what XLA:CPU runs convolutions fastest with (see Plan).
  plan_j = jax.jit(lambda state, r: round_plan(train_key, state, r))

  def bucket_inputs(d, plan_r, b, bucket):
    ids, returns, straggler, u = slots(d, plan_r, b, bucket)
    return ids, returns, client_jobs(d, ids, returns, straggler, u, plan_r[2], plan_r[3],
                                     bucket.shape)
  bucket_j = jax.jit(bucket_inputs, static_argnums=(2, 3))

  def start(state, hp, r, ids):
    chunk_states = None if state.client_states is None else gather_states(state.client_states, ids)
    contexts = _over_chunk(lambda _, s: client_context(state, r, hp, s))(ids, chunk_states)
    carry = _over_chunk(lambda _: (state.params, algo.client_optimizer.init(state.params)))(ids)
    return carry, contexts, chunk_states
  start_j = jax.jit(start)

  def step(shape, d, carry, t, job, contexts):
    return _over_chunk(lambda c, job_k, ctx: client_lib.local_step(
        model, algo, shape, d.x, d.y, c, t, job_k, ctx))(carry, job, contexts)
  step_j = jax.jit(step, static_argnums=(0,))

  def finish(total, states, shape, d, params, carry, job, contexts, chunk_states, ids, returns):
    deltas, messages, new_states = _over_chunk(lambda w, job_k, ctx, s: client_end(
        d, params, ctx, w, job_k, s, shape))(carry[0], job, contexts, chunk_states)
    sums = reduce_chunk(deltas, messages, job.num_examples, returns)
    return total.combine(sums), scatter_states(states, ids, returns, new_states)
  finish_j = jax.jit(finish, static_argnums=(2,), donate_argnums=(0, 1))
  zero_sums_j = jax.jit(zero_sums)
  server_j = jax.jit(server_update)
  eval_j = jax.jit(lambda p, d, e, ev: dict(evaluated_metrics(p, d, e, ev), finite=finite(p)))

  def run_block_host(state, rounds, active, do_eval):
    rows = []
    for r, act, ev in zip(np.asarray(rounds), np.asarray(active), np.asarray(do_eval)):
      stats = no_stats
      if act:
        plan_r = plan_j(state, r)
        total, states = zero_sums_j(data, state, hparams, r), state.client_states
        for b, bucket in enumerate(buckets):
          ids, returns, jobs = bucket_j(data, plan_r, b, bucket)
          returns_np, steps_np = np.asarray(returns), np.asarray(jobs.num_steps)
          for c in range(bucket.num_chunks):
            if not returns_np[c].any():
              continue
            job = jax.tree.map(lambda a: a[c], jobs)
            carry, contexts, chunk_states = start_j(state._replace(client_states=states),
                                                    hparams, r, ids[c])
            for t in range(int(steps_np[c].max())):
              carry = step_j(bucket.shape, data, carry, t, job, contexts)
            total, states = finish_j(total, states, bucket.shape, data, state.params, carry, job,
                                     contexts, chunk_states, ids[c], returns[c])
        state, stats = server_j(state._replace(client_states=states), total, hparams, r)
        stats = dict(stats, **round_steps_stat(plan_r[3]))
      rows.append(dict(eval_j(state.params, data, eval_data, bool(act and ev)), **stats))
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *rows)

  return Engine(run_block_host, init_state, buckets, groups, plan)
