"""Where the training population lives: on the device (:class:`DeviceData`), or in host memory
with each block's cohorts streamed in (:class:`CohortStream`)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fedjax_sim.engine.cohort import draw_cohort, round_keys
from fedjax_sim.engine.mesh import AXIS, replicate


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
  :func:`~fedjax_sim.engine.cohort.draw_cohort`), its clients' rows are gathered on the host into
  one compact array in cohort order, and the block's rounds go to the device stacked
  ``[rounds, rows, ...]``, with the row count rounded up to a power of two (few compiled shapes).
  Clients keep their population bucket and their global id (client keys and per-client states use
  it), so results equal the on-device path. Host memory: the population's flat arrays plus two
  blocks of cohort rows (the block in flight and the next one, gathered while the device runs —
  double buffering).

  With a ``mesh`` (several devices, possibly of several processes) the block's rows are split
  along the row axis over its devices (``P(None, "clients")``): each device receives, and each
  process gathers and sends, only its devices' share of the rows; the compiled round all-gathers
  them on the devices. Everything else (offsets, counts, ids) is replicated.
  """

  def __init__(self, train, bucket_of: np.ndarray, cohort_size: int, sampling=None, mesh=None):
    self.x, self.y = train.x, train.y
    self.offsets, self.sizes = train.offsets, train.num_examples
    self.bucket_of, self.cohort_size, self.mesh = bucket_of, cohort_size, mesh
    num_clients = train.num_clients
    self._cohorts = jax.jit(jax.vmap(lambda key, r: draw_cohort(
        round_keys(key, r).sample, num_clients, cohort_size, sampling)[0], in_axes=(None, 0)))
    self._next = None

  def _gather(self, key, rounds: np.ndarray) -> DeviceData:
    ids = np.asarray(self._cohorts(key, jnp.asarray(rounds, jnp.int32)))  # [R, m]
    counts = self.sizes[ids]
    totals = counts.sum(axis=1)
    cap = 1 << int(math.ceil(math.log2(max(int(totals.max()), 1))))
    devices = 1 if self.mesh is None else self.mesh.devices.size
    cap = -(-cap // devices) * devices  # an equal share of rows per device
    local = np.cumsum(counts, axis=1) - counts
    # rows[i, j]: the population row at position j of round i's block (-1: padding)
    rows = np.full((len(rounds), cap), -1, np.int64)
    for i in range(len(rounds)):
      rows[i, :totals[i]] = (np.repeat(self.offsets[ids[i]] - local[i], counts[i])
                             + np.arange(totals[i]))
    x, y = self._rows(self.x, rows), self._rows(self.y, rows)
    as_int = lambda a: replicate(jnp.asarray(a, jnp.int32), self.mesh)
    return DeviceData(x, y, as_int(local), as_int(counts), as_int(self.bucket_of[ids]),
                      as_int(ids))

  def _rows(self, source: np.ndarray, rows: np.ndarray) -> jax.Array:
    """``source``'s rows ``rows`` (``[R, cap]``, -1 = zeros) on the device(s): gathered whole
    without a mesh; else split along ``cap``, each process gathering its devices' slices only."""
    def gather(index=(slice(None), slice(None))):
      part = rows[index[:2]]
      out = source[np.maximum(part, 0)]
      out[part < 0] = 0
      return out
    if self.mesh is None:
      return jnp.asarray(gather())
    sharding = NamedSharding(self.mesh, PartitionSpec(None, AXIS))
    return jax.make_array_from_callback((*rows.shape, *source.shape[1:]), sharding, gather)

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
