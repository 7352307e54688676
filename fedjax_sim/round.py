"""The federated round and the block of rounds, compiled once.

A round: sample the cohort on device → for each size bucket, vmap :func:`client.local_train` over
chunks of the bucket's cohort members → stream a weighted sum of client deltas → server optax update.
A block is a ``lax.scan`` of rounds with evaluation folded in, so the host wakes once per block.

Randomness (reproducible whatever the plan, chunk or block size):
``round_key = fold_in(train_key, r)``; ``sample, clients, server = split(round_key, 3)``;
client ``k``'s key is ``fold_in(clients, k)`` with ``k`` its global id.
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
from fedjax_sim.algorithms import Algorithm

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
  params: Any
  opt_state: Any


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
                 chunk_size: int | None, bucketing: bool = True) -> tuple[list[Bucket], np.ndarray, list]:
  """Builds the buckets; returns ``(buckets, bucket_of_client, groups)``."""
  groups = size_buckets(num_examples) if bucketing else [np.arange(len(num_examples))]
  bucket_of = np.zeros(len(num_examples), np.int32)
  buckets = []
  for b, g in enumerate(groups):
    bucket_of[g] = b
    capacity = min(cohort_size, len(g))
    # A round samples about `expected` members of this bucket, rarely all `capacity` of them:
    # chunks no larger than the expected count (next power of two) let lax.cond skip the rest.
    expected = cohort_size * len(g) / len(num_examples)
    chunk = min(capacity, 1 << max(0, math.ceil(math.log2(max(expected, 1.0)))))
    if chunk_size is not None:
      chunk = max(1, min(chunk_size, chunk))
    buckets.append(Bucket(client_lib.bucket_shape(num_examples[g], algo), capacity, chunk, len(g),
                          dense=capacity <= 2 * expected))
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

  Returns ``(ids, present)`` each ``[num_chunks, chunk]``; empty slots have ``present=False``.
  """
  slots = bucket.num_chunks * bucket.chunk
  pos = jnp.nonzero(bucket_of[cohort] == b, size=slots, fill_value=cohort.shape[0])[0]
  present = pos < cohort.shape[0]
  ids = jnp.where(present, jnp.append(cohort, 0)[pos], 0)
  return ids.reshape(bucket.num_chunks, bucket.chunk), present.reshape(bucket.num_chunks, bucket.chunk)


class DeviceData(NamedTuple):
  """The training population on device. Passed to the compiled block as an argument, never
  closed over: a closed-over array is embedded in the executable as a constant, which copies
  the whole dataset several times during compilation and slows compilation down with its size."""
  x: jax.Array
  y: jax.Array
  offsets: jax.Array
  counts: jax.Array
  bucket_of: jax.Array


class Engine(NamedTuple):
  """The compiled pieces of a simulation (built by :func:`build_engine`)."""
  run_block: Callable  # (state, rounds[R], active[R], evaluate[R]) -> (state, metrics dict of [R])
  init_state: Callable  # params -> ServerState
  buckets: list
  groups: list  # client indices of each bucket
  plan: Plan


def build_engine(model, algo: Algorithm, train, plan: Plan, cohort_size: int, train_key: jax.Array,
                 evaluate: Callable[[Any, Any], dict], eval_data: Any,
                 bucketing: bool = True) -> Engine:
  """Compiles the round for one (model, algorithm, dataset, plan).

  Args:
    model: the model.
    algo: the algorithm.
    train: the training :class:`~fedjax_sim.data.FederatedData`.
    plan: the execution :class:`Plan`.
    cohort_size: clients per round.
    train_key: the training randomness stream.
    evaluate: ``fn(params, eval_data) -> {name: scalar}``, the metrics of evaluated rounds.
    eval_data: the arrays ``evaluate`` reads (passed to the compiled block as an argument).
    bucketing: group clients by size (``False``: one bucket padded to the largest client).
  """
  num_clients = train.num_clients
  buckets, bucket_of, groups = make_buckets(train.num_examples, algo, cohort_size, plan.chunk_size,
                                       bucketing)
  data = DeviceData(*train.device_arrays(), jnp.asarray(train.offsets, jnp.int32),
                    jnp.asarray(train.num_examples, jnp.int32), jnp.asarray(bucket_of))
  uniform = algo.weighting == "uniform"
  zeros_like_f32 = lambda p: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), p)

  def bucket_inputs(d: DeviceData, ids, present, client_key, shape: client_lib.BucketShape):
    """Row offsets, sizes (0 for empty slots) and epoch orders of slots ``ids`` (any shape)."""
    flat_ids, flat_present = ids.reshape(-1), present.reshape(-1)
    n = jnp.where(flat_present, d.counts[flat_ids], 0)
    keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(flat_ids)
    orders = client_lib.epoch_orders(keys, n, shape, algo.shuffle)
    unflat = lambda a: a.reshape(*ids.shape, *a.shape[1:])
    return unflat(d.offsets[flat_ids]), unflat(n), unflat(orders)

  def chunk_reduce(params, client_params, n, present):
    """Weighted sum of the chunk's deltas ``θ_k − θ`` and of its weights."""
    weights = jnp.where(present, 1.0 if uniform else n.astype(jnp.float32), 0.0)
    # where(): an empty slot's params never reach the sum, even if its unmasked steps made them
    # non-finite (buckets with equal step counts do not mask steps).
    delta_sum = jax.tree.map(
        lambda cp, p: jnp.tensordot(weights, jnp.where(
            present.reshape(-1, *([1] * p.ndim)), cp - p[None], 0).astype(jnp.float32), axes=1),
        client_params, params)
    return delta_sum, jnp.sum(weights)

  def chunk_update(d: DeviceData, params, offs, n, orders, present, shape):
    """Weighted delta sum and weight sum of one chunk of clients, trained in one program."""
    train_one = lambda off, n_k, order: client_lib.local_train(
        model, algo, shape, params, d.x, d.y, off, n_k, order, unroll=plan.unroll)
    client_params = _over_chunk(train_one)(offs, n, orders)
    return chunk_reduce(params, client_params, n, present)

  def server_update(state: ServerState, delta_sum, weight_sum):
    mean_delta = jax.tree.map(lambda d: d / jnp.maximum(weight_sum, 1e-30), delta_sum)
    pseudo_grad = jax.tree.map(lambda d, p: (-d).astype(p.dtype), mean_delta, state.params)
    updates, opt_state = algo.server_optimizer.update(pseudo_grad, state.opt_state, state.params)
    return ServerState(optax.apply_updates(state.params, updates), opt_state)

  def round_keys(r):
    return jax.random.split(jax.random.fold_in(train_key, r), 3)

  def device_round(d: DeviceData, state: ServerState, r):
    sample_key, client_key, _ = round_keys(r)
    cohort = sample_cohort(sample_key, num_clients, cohort_size)
    total = (zeros_like_f32(state.params), jnp.float32(0.0))
    for b, bucket in enumerate(buckets):
      ids, present = bucket_slots(cohort, d.bucket_of, b, bucket)
      # Dense buckets draw every slot's shuffle at once (a shuffle loop per small chunk is
      # dominated by loop overhead); sparse ones per chunk, so that skipped chunks draw nothing.
      chunks = ((*bucket_inputs(d, ids, present, client_key, bucket.shape), present)
                if bucket.dense else (ids, present))

      def one_chunk(acc, chunk, bucket=bucket):
        def update():
          inputs = chunk if bucket.dense else (
              *bucket_inputs(d, *chunk, client_key, bucket.shape), chunk[1])
          return chunk_update(d, state.params, *inputs, bucket.shape)
        out = lax.cond(jnp.any(chunk[-1]), update,
                       lambda: (zeros_like_f32(state.params), jnp.float32(0.0)))
        return jax.tree.map(jnp.add, acc, out), None

      if bucket.num_chunks == 1:
        total, _ = one_chunk(total, jax.tree.map(lambda a: a[0], chunks))
      else:
        total, _ = lax.scan(one_chunk, total, chunks)
    return server_update(state, *total)

  def metrics_or_nan(params, eval_data, do_eval):
    shapes = jax.eval_shape(evaluate, params, eval_data)
    nan = lambda: jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
    return lax.cond(do_eval, lambda: evaluate(params, eval_data), nan)

  def finite(params):
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))

  def init_state(params):
    return ServerState(params, algo.server_optimizer.init(params))

  if plan.name != "host_loop":
    def block(state, d, eval_data, rounds, active, do_eval):
      def body(state, xs):
        r, act, ev = xs
        state = lax.cond(act, lambda s: device_round(d, s, r), lambda s: s, state)
        metrics = metrics_or_nan(state.params, eval_data, act & ev)
        metrics["finite"] = finite(state.params)
        return state, metrics
      return lax.scan(body, state, (rounds, active, do_eval))

    block_j = jax.jit(block, donate_argnums=0)
    def run_block(state, rounds, active, do_eval):
      return block_j(state, data, eval_data, rounds, active, do_eval)
    run_block.compiled = block_j  # for inspection (compile counts, memory analysis)
    return Engine(run_block, init_state, buckets, groups, plan)

  # host_loop: the same pieces, with Python driving rounds, chunks and local steps. One compiled
  # call per local step is what XLA:CPU runs convolutions fastest with (see Plan).
  sample_j = jax.jit(lambda r: (sample_cohort(round_keys(r)[0], num_clients, cohort_size),
                                round_keys(r)[1]))
  def slots_and_inputs(d, cohort, client_key, b, bucket):
    ids, present = bucket_slots(cohort, d.bucket_of, b, bucket)
    return present, bucket_inputs(d, ids, present, client_key, bucket.shape)
  bucket_j = jax.jit(slots_and_inputs, static_argnums=(3, 4))
  start_j = jax.jit(lambda params, n: _over_chunk(
      lambda _: (params, algo.client_optimizer.init(params)))(n))
  step_j = jax.jit(lambda shape, d, carry, t, offs, n, orders: _over_chunk(
      lambda c, o, n_k, order: client_lib.local_step(model, algo, shape, d.x, d.y, c, t, o,
                                                     n_k, order))(carry, offs, n, orders),
                   static_argnums=(0,))
  accumulate_j = jax.jit(lambda total, params, client_params, n, present: jax.tree.map(
      jnp.add, total, chunk_reduce(params, client_params, n, present)), donate_argnums=0)
  server_j = jax.jit(server_update)
  eval_j = jax.jit(lambda p, e, ev: dict(metrics_or_nan(p, e, ev), finite=finite(p)))

  def run_block_host(state, rounds, active, do_eval):
    rows = []
    for r, act, ev in zip(np.asarray(rounds), np.asarray(active), np.asarray(do_eval)):
      if act:
        cohort, client_key = sample_j(r)
        total = (zeros_like_f32(state.params), jnp.float32(0.0))
        for b, bucket in enumerate(buckets):
          present, inputs = bucket_j(data, cohort, client_key, b, bucket)
          present = np.asarray(present)
          for c in range(bucket.num_chunks):
            if present[c].any():
              offs, n, orders = (a[c] for a in inputs)
              carry = start_j(state.params, n)
              for t in range(bucket.shape.num_steps):
                carry = step_j(bucket.shape, data, carry, t, offs, n, orders)
              total = accumulate_j(total, state.params, carry[0], n, present[c])
        state = server_j(state, *total)
      rows.append(eval_j(state.params, eval_data, bool(act and ev)))
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *rows)

  return Engine(run_block_host, init_state, buckets, groups, plan)
