"""Several devices: the cohort's chunks sharded over a one-axis mesh named ``clients``.

Each chunk of cohort slots (:func:`~fedjax_sim.engine.round_step.train_chunk`) is split over the
mesh's devices with :func:`jax.shard_map`: every device trains ``chunk / devices`` of the chunk's
clients against replicated params, server state and population, and the chunk's weighted sums are
combined with one cross-device sum (``psum``; the largest update norm with ``pmax``). The
per-client results that leave the chunk (collected updates, the clients' new per-client states)
come back sharded over ``clients`` and are written into the replicated population states and
collect buffers by XLA. Everything else (sampling, planning, the server step, evaluation) runs
replicated, so randomness is unchanged: a client's keys derive from its global id, never from its
device. One device means no mesh and the unchanged single-device program.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "clients"


def resolve_devices(devices=None) -> list:
  """The devices a run uses: ``None`` → every device of the default backend (of every process in a
  multi-process run); ``k`` → the first ``k`` of them; or an explicit sequence of devices."""
  available = jax.devices()
  if devices is None:
    return list(available)
  if (isinstance(devices, (bool, np.bool_, str))
      or not isinstance(devices, (int, np.integer, Sequence))):
    raise ValueError(f"devices must be None, a positive int or a sequence of devices, got "
                     f"{devices!r}")
  if isinstance(devices, (int, np.integer)):
    if devices < 1:
      raise ValueError(f"devices must be at least 1, got {devices}")
    if devices > len(available):
      raise ValueError(f"devices={devices} but only {len(available)} "
                       f"{available[0].platform} device(s) exist: {available}")
    return list(available[:devices])
  chosen = list(devices)
  if not chosen:
    raise ValueError("devices is an empty sequence")
  for d in chosen:
    if not isinstance(d, jax.Device):
      raise ValueError(f"devices holds {d!r}, which is not a jax.Device")
  if len(set(chosen)) != len(chosen):
    raise ValueError(f"devices lists a device twice: {chosen}")
  return chosen


def make_mesh(devices=None) -> Mesh | None:
  """A one-axis ``clients`` mesh over :func:`resolve_devices`, or ``None`` for one device."""
  chosen = resolve_devices(devices)
  return None if len(chosen) == 1 else Mesh(np.array(chosen), (AXIS,))


def size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.devices.size


def replicate(tree, mesh: Mesh | None):
  """``tree``'s arrays replicated on every device of ``mesh`` (unchanged without a mesh)."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, P())
  def put(a):
    if (isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding)
        and a.sharding.mesh == mesh):  # already placed (replicated, or a sweep's state by run)
      return a
    if mesh.is_multi_process:  # each process passes the same host value
      if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        # a typed key has no host value: place its key data, then wrap it again
        return jax.random.wrap_key_data(put(jax.random.key_data(a)),
                                        impl=jax.random.key_impl(a))
      host = np.asarray(a)
      return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.device_put(a, sharding)
  return jax.tree.map(put, tree)


def sharded_chunk(fn, mesh: Mesh | None, num_replicated: int):
  """``fn(*replicated, *per_client)`` with its per-client arguments (leading chunk axis) split over
  the mesh. ``fn`` returns a :class:`~fedjax_sim.engine.round_step.ChunkResult`; its sums are
  combined across devices, its per-client fields stay split along ``clients``."""
  if mesh is None:
    return fn

  def local(*args):
    result = fn(*args)
    sums = result.sums
    total = jax.lax.psum(sums._replace(norm_max=0.0), AXIS)
    sums = total._replace(norm_max=jax.lax.pmax(sums.norm_max, AXIS))
    return result._replace(sums=sums)

  def run(*args):
    in_specs = tuple([P()] * num_replicated + [P(AXIS)] * (len(args) - num_replicated))
    result = jax.eval_shape(fn, *args)
    out_specs = result._replace(sums=jax.tree.map(lambda _: P(), result.sums),
                                updates=jax.tree.map(lambda _: P(AXIS), result.updates),
                                weights=jax.tree.map(lambda _: P(AXIS), result.weights),
                                new_states=jax.tree.map(lambda _: P(AXIS), result.new_states))
    # check_vma=False: the local-training loops carry replicated params into per-device values,
    # which the varying-axes checker would refuse; the sums are made replicated by psum.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)
  return run


def over_runs(block, mesh: Mesh | None, run_args: tuple):
  """A sweep's vmapped ``block`` with its runs split over ``mesh`` (each device runs
  ``runs / devices`` whole simulations; no cross-device traffic inside a round). ``run_args``:
  per positional argument, ``True`` where its leading axis is the run axis, ``False`` where it is
  shared, or a pytree prefix of those (e.g. the population's shared rows and per-run offsets).
  The outputs (state, metrics) stay split by run."""
  if mesh is None:
    return block
  spec = lambda per_run: jax.tree.map(lambda r: P(AXIS) if r else P(), per_run)
  def run(*args):
    in_specs = tuple(spec(r) for r in run_args[:len(args)])
    return jax.shard_map(block, mesh=mesh, in_specs=in_specs, out_specs=P(AXIS),
                         check_vma=False)(*args)
  return run


def to_host(tree, mesh: Mesh | None):
  """``tree``'s arrays as NumPy arrays on this host. Across processes, where a sweep's state and
  metrics stay split by run over devices this process cannot read, every process gathers the
  whole (a collective: all processes call it)."""
  if mesh is None or not mesh.is_multi_process:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
