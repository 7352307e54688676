"""Size buckets: clients of similar size share one compiled shape.

Clients are grouped so that within a group the largest is at most 2× the smallest; each round the
cohort members of a bucket are packed into ``num_chunks × chunk`` slots (empty slots are masked and
chunks without any member are skipped). See docs/design.md, item 2.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import client as client_lib
from fedjax_sim.algorithms import Algorithm


class Bucket(NamedTuple):
  """Clients of similar size that share one compiled shape.

  Attributes:
    shape: static client shapes (see :class:`client.BucketShape`).
    capacity: most of its members one round can sample (``min(cohort, members)``).
    chunk: clients vmapped together.
    members: number of population clients in the bucket.
    dense: a round is expected to fill at least half the capacity (full participation, or one
      bucket): the shuffles are then drawn for the whole bucket at once rather than per chunk.
    parts: for a *shared* bucket (``bucketing="auto"``), the shapes of the size groups it holds,
      smallest first: its slots are ordered by client size, so that each chunk runs only its own
      clients' step count, and a chunk draws its shuffles at the width of the smallest part that
      fits it. Empty for an ordinary bucket.
  """
  shape: client_lib.BucketShape
  capacity: int
  chunk: int
  members: int
  dense: bool = True
  parts: tuple = ()

  @property
  def num_chunks(self) -> int:
    return -(-self.capacity // self.chunk)


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


# The cost model of ``bucketing="auto"``, measured on the 2-core CPU in process seconds
# (docs/design.md, "Compile time"): each size bucket compiles its own copy of the local training
# loop, about 2 s; a client's local step costs about 4 µs plus its FLOPs at about 40 GFLOP/s.
BUCKET_COMPILE_SECONDS = 2.0
STEP_SECONDS = 4e-6
FLOPS_PER_SECOND = 4e10
# ``bucketing="auto"``'s shared bucket runs chunks of this many clients (the default CLI job, 500
# clients per round: 0.20 s per 10 rounds with 16 or 32, 0.21 with 64, 0.26 with 128).
SHARED_CHUNK = 32


def merge_groups(groups: list[np.ndarray], num_examples: np.ndarray, algo: Algorithm,
                 cohort_size: int, rounds: int, step_flops: float) -> list[np.ndarray]:
  """Merges adjacent size groups while a merge costs less running time than the compilation it
  saves (``bucketing="auto"``).

  A group ``g`` of ``|g|`` of the ``N`` clients gets about ``m_g = cohort · |g| / N`` cohort members
  per round, each running as many steps as the group's largest client. Merging groups ``i < j``
  makes group ``i``'s members run ``j``'s step count: ``rounds · m_i · (s_j − s_i)`` more client
  steps at ``STEP_SECONDS + step_flops / FLOPS_PER_SECOND`` each, against one bucket's
  compilation. The cheapest merge is made first, until none pays.
  """
  step_seconds = STEP_SECONDS + step_flops / FLOPS_PER_SECOND
  groups = list(groups)
  total = len(num_examples)
  def steps(g):
    return float(client_lib.num_local_steps(int(num_examples[g].max()), algo))
  while len(groups) > 1:
    costs = [rounds * cohort_size * len(a) / total * (steps(b) - steps(a)) * step_seconds
             for a, b in zip(groups, groups[1:])]
    i = int(np.argmin(costs))
    if costs[i] >= BUCKET_COMPILE_SECONDS:
      break
    groups[i:i + 2] = [np.sort(np.concatenate(groups[i:i + 2]))]
  return groups


def padding_waste(num_examples: np.ndarray, groups: list[np.ndarray], algo: Algorithm) -> float:
  """Masked steps per real step when every client runs its bucket's step count (population mean)."""
  real = client_lib.num_local_steps(num_examples, algo).astype(np.float64)
  padded = np.zeros_like(real)
  for g in groups:
    padded[g] = real[g].max()
  return float(padded.sum() / real.sum() - 1.0)


def shared_padding_waste(num_examples: np.ndarray, algo: Algorithm, cohort_size: int,
                         chunk: int, cohorts: int = 64, seed: int = 0) -> float:
  """:func:`padding_waste` of a shared bucket (:func:`shared_bucket`): each round's cohort sorted
  by size and cut into chunks of ``chunk``, every client running its chunk's largest step count.
  It depends on the cohort, so it is the mean over ``cohorts`` uniform cohorts of
  ``min(cohort_size, clients)`` drawn from a NumPy generator seeded with ``seed`` (an estimate:
  the engine's cohorts are drawn on the device)."""
  steps = client_lib.num_local_steps(num_examples, algo).astype(np.float64)
  m = min(cohort_size, steps.size)
  starts = np.arange(0, m, chunk)
  lengths = np.diff(np.append(starts, m))
  rng = np.random.default_rng(seed)
  real = padded = 0.0
  for _ in range(cohorts):
    s = np.sort(steps[rng.choice(steps.size, m, replace=False)])
    real += s.sum()
    padded += (lengths * s[starts + lengths - 1]).sum()  # sorted: a chunk's last is its largest
  return float(padded / real - 1.0)


def make_buckets(num_examples: np.ndarray, algo: Algorithm, cohort_size: int,
                 chunk_size: int | None, bucketing: bool | str = True,
                 variable_steps: bool = False, rounds: int | None = None,
                 step_flops: float = 0.0, devices: int = 1) -> tuple[list[Bucket], np.ndarray, list]:
  """Builds the buckets; returns ``(buckets, bucket_of_client, groups)``.

  ``bucketing``: ``True`` (every size group of :func:`size_buckets`), ``False`` (one bucket), or
  ``"auto"`` (size groups merged while that is cheaper than compiling them, for ``rounds``
  rounds whose local steps cost ``step_flops`` each: :func:`merge_groups`; a sweep keeps them all).

  For a sweep (2-D sizes) a bucket is one chunk: runs in lockstep execute every chunk anyway
  (under vmap over runs, ``lax.cond`` runs both branches), so splitting a bucket into chunks
  would only run them one after another.

  ``num_examples`` is ``[num_clients]``, or ``[runs, num_clients]`` for a sweep: then the buckets
  are shared by every run (shapes fit the union of the runs' clients) and ``bucket_of_client`` is
  ``[runs, num_clients]``; ``groups`` index the flattened sizes.

  With ``devices > 1`` every chunk is a multiple of ``devices`` (each device trains an equal share
  of it, :mod:`fedjax_sim.engine.mesh`); the extra slots are empty.
  """
  sizes = np.atleast_2d(num_examples)
  num_clients = sizes.shape[1]
  flat = sizes.reshape(-1)
  groups = size_buckets(flat) if bucketing else [np.arange(flat.size)]
  shared_chunk = min(SHARED_CHUNK, chunk_size or SHARED_CHUNK)
  if (bucketing == "auto" and rounds is not None and sizes.shape[0] == 1 and len(groups) > 1
      and algo.batch_size is not None and min(cohort_size, flat.size) > shared_chunk):
    return shared_bucket(flat, groups, algo, cohort_size, -(-shared_chunk // devices) * devices,
                         variable_steps)
  if bucketing == "auto" and rounds is not None:  # a sweep's runs all execute every bucket
    groups = merge_groups(groups, flat, algo, cohort_size * sizes.shape[0], rounds, step_flops)
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
    chunk = -(-chunk // devices) * devices
    buckets.append(Bucket(client_lib.bucket_shape(flat[g], algo, variable_steps), capacity,
                          chunk, members, dense=capacity <= 2 * expected))
  if np.ndim(num_examples) == 1:
    bucket_of = bucket_of[0]
  return buckets, bucket_of, groups


def shared_bucket(num_examples: np.ndarray, groups: list[np.ndarray], algo: Algorithm,
                  cohort_size: int, chunk: int,
                  variable_steps: bool = False) -> tuple[list[Bucket], np.ndarray, list]:
  """One bucket for the whole population that compiles one copy of the local training loop for
  every size group (``groups``, smallest first): ``make_buckets``'s result for it.

  Its slots are ordered by size and cut into chunks of ``chunk`` clients; a chunk's loop runs its
  largest client's step count (``client.local_train``'s dynamic trip count), so small clients do
  not pay for large ones, as with separate buckets, and the only padding left is the per-chunk
  rounding. Shapes are those of the largest client; the shuffles of a chunk are drawn at the
  width of the smallest group that fits its largest client (``jobs.client_jobs``).
  """
  num_clients = num_examples.size
  capacity = min(cohort_size, num_clients)
  parts = tuple(client_lib.bucket_shape(num_examples[g], algo, variable_steps) for g in groups)
  bucket = Bucket(client_lib.bucket_shape(num_examples, algo, variable_steps), capacity, chunk,
                  num_clients, dense=False, parts=parts)
  return [bucket], np.zeros(num_clients, np.int32), [np.arange(num_clients)]


def bucket_slots(cohort: jax.Array, bucket_of: jax.Array, b: int, bucket: Bucket,
                 counts: jax.Array | None = None):
  """The cohort members in bucket ``b`` packed into ``num_chunks × chunk`` slots: in cohort order,
  or, for a shared bucket (``bucket.parts``), by size (``counts``, the clients' example counts;
  ties in cohort order), so that a chunk holds clients of similar step counts.

  Returns ``(ids, pos)`` each ``[num_chunks, chunk]``: global client ids and cohort positions;
  empty slots have ``pos == len(cohort)`` and id 0.
  """
  slots = bucket.num_chunks * bucket.chunk
  member = bucket_of[cohort] == b
  if bucket.parts:
    m = cohort.shape[0]
    order = jnp.argsort(jnp.where(member, counts[cohort], jnp.iinfo(jnp.int32).max), stable=True)
    order = jnp.where(member[order], order, m)
    pos = jnp.pad(order, (0, max(0, slots - m)), constant_values=m)[:slots]
  else:
    pos = jnp.nonzero(member, size=slots, fill_value=cohort.shape[0])[0]
  ids = jnp.where(pos < cohort.shape[0], jnp.append(cohort, 0)[pos], 0)
  return ids.reshape(bucket.num_chunks, bucket.chunk), pos.reshape(bucket.num_chunks, bucket.chunk)
