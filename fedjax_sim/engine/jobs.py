"""Stage 2 of a round: the cohort's slots in each size bucket, and each slot's client job (its
rows, example count, step count this round and epoch orders)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim import client as client_lib
from fedjax_sim import systems
from fedjax_sim.engine.buckets import Bucket, bucket_slots


class Slots(NamedTuple):
  """Bucket ``b``'s cohort slots, each field ``[num_chunks, chunk]``; empty slots have id 0 and
  ``returns == False``."""
  ids: jax.Array  # global client ids
  returns: jax.Array  # the client's update reaches the server
  straggler: jax.Array
  u: jax.Array  # a partial straggler's work draw
  attacker: jax.Array = None  # the slot holds a Byzantine client (``None``: no attack)


def slots(d, plan_r, b: int, bucket: Bucket) -> Slots:
  """The cohort members of bucket ``b`` and their conditions."""
  ids, pos = bucket_slots(plan_r.cohort, d.bucket_of, b, bucket, d.counts)
  at = lambda a, fill: jnp.append(a, fill)[pos]
  c = plan_r.conditions
  attacker = None if plan_r.attackers is None else at(plan_r.attackers, False)
  return Slots(ids, at(c.returns, False), at(c.straggler, False), at(c.u, 0.0), attacker)


def client_jobs(spec, d, s: Slots, plan_r, shape: client_lib.BucketShape,
                parts: tuple = ()) -> client_lib.ClientJob:
  """The :class:`fedjax_sim.client.ClientJob` of each slot (fields shaped like ``s.ids``); a client
  that does not return gets ``num_examples = 0`` (its slot runs no real step). ``parts``: a shared
  bucket's size groups (:func:`chunk_orders`)."""
  algo = spec.algo
  flat = lambda a: a.reshape(-1)
  ids_f, ret_f = flat(s.ids), flat(s.returns)
  n = jnp.where(ret_f, d.counts[ids_f], 0)
  steps = (client_lib.num_local_steps(n, algo) if algo.hooks.round_steps is None
           else jnp.full_like(n, jnp.minimum(plan_r.local_steps, algo.local_steps)))
  if spec.system.partial:
    spe = client_lib.steps_per_epoch(n, algo.batch_size)
    epochs = None if algo.local_steps is not None else algo.local_epochs
    steps = jnp.where(flat(s.straggler), systems.partial_steps(flat(s.u), steps, spe, epochs),
                      steps)
  client_key = plan_r.keys.clients
  keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(d.global_id(ids_f))
  orders = chunk_orders(keys, n, shape, parts, algo.shuffle, spec.shuffle_method)
  label_map = None
  if spec.attack is not None and spec.attack.label_map is not None:  # data poisoning
    classes = spec.attack.classes
    honest = jnp.arange(classes, dtype=jnp.int32)
    label_map = jnp.where(flat(s.attacker)[:, None], spec.attack.label_map(classes)[None],
                          honest[None])
  step_keys = jax.vmap(client_lib.step_key_of)(keys) if spec.model.stochastic else None
  job = client_lib.ClientJob(d.offsets[ids_f], n, jnp.where(n > 0, steps, 0), orders, label_map,
                             step_keys)
  return jax.tree.map(lambda a: a.reshape(*s.ids.shape, *a.shape[1:]), job)


def chunk_orders(keys, n, shape: client_lib.BucketShape, parts: tuple, shuffle: bool, method: str):
  """:func:`fedjax_sim.client.epoch_orders` of a chunk, shaped by ``shape``. For a shared bucket
  the random numbers are drawn at the bucket's width and turned into permutations (sorted, or
  swapped) at the width of the first part (size group) whose largest client is at least the
  chunk's largest ``n`` (a ``lax.switch``), then padded: a client's permutation does not depend on
  the width (docs/design.md, item 17), and the padding is never read."""
  if not parts or not shuffle or shape.max_examples == 1:
    return client_lib.epoch_orders(keys, n, shape, shuffle, method)
  draws = client_lib.epoch_draws(keys, shape, method)
  widths = jnp.asarray([p.max_examples for p in parts], jnp.int32)
  which = jnp.minimum(jnp.searchsorted(widths, jnp.max(n)), len(parts) - 1)

  def width(length):
    pad = ((0, 0), (0, 0), (0, shape.max_examples - length))
    return lambda: jnp.pad(client_lib.orders_from_draws(draws[..., :length], n, method), pad)
  return lax.switch(which, [width(p.max_examples) for p in parts])
