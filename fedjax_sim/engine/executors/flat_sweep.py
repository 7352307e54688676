"""The flattened sweep executor: a sweep's runs share one cohort per round.

The lockstep sweep (``compiled.build(..., sweep=True)``) vmaps the whole block of rounds over the
runs. Under that vmap ``lax.cond`` evaluates both branches, so every bucket runs every round for
the largest trip count among the runs, and slots that are empty in one run still compute. Here
the runs of a sweep, which share their number of clients and (through
:func:`~fedjax_sim.engine.population.device_data`) one concatenated ``x``/``y``, are flattened
instead. Each round:

1. every run plans its own round (:func:`~fedjax_sim.engine.cohort.plan_round` vmapped over the
   runs' keys: each run's cohort, conditions and keys are exactly those of a separate run);
2. the union of the runs' cohorts, ``R · m`` slots tagged with their run index, is split by size
   bucket; in each bucket the clients that return are sorted by example count (largest first) and
   packed into chunks, so a chunk holds clients of similar step counts and the chunks past the
   round's members are empty;
3. each chunk that holds a member (``lax.cond``, unbatched, so empty chunks really are skipped)
   trains with its own dynamic step bound (the chunk's largest step count): every slot is one
   client of :func:`~fedjax_sim.engine.round_step.train_chunk`, vmapped over the chunk with its
   run's parameters, server extra, aggregator state, hyperparameters and round keys gathered by
   run index, and its per-client states by ``(run, global id)``;
4. the slots' sums go to their runs (``jax.ops.segment_sum`` over the run index: one
   :class:`~fedjax_sim.engine.round_step.RoundSums` per run), and the server step is vmapped over
   the runs.

A round's sequential cost is then the largest client sampled by any run (the chains of different
runs' clients run side by side in one chunk), and the vmapped width is the clients actually
sampled. Randomness is that of separate runs (each run's keys; client keys by global id), so a
flattened run equals ``simulate`` up to float reassociation.

Not flattened (the lockstep executor runs them): collect aggregators and omniscient attacks
(their reduction needs each run's cohort as one ``[slots, ...]`` buffer in cohort order).

Several devices: the runs are split over them (:func:`~fedjax_sim.engine.mesh.over_runs`), each
device flattening its own runs, with no traffic between devices inside a block; the run count
must then be a multiple of the device count (otherwise the lockstep sweep runs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_sim.engine import jobs as jobs_lib
from fedjax_sim.engine import round_step as rs
from fedjax_sim.engine.buckets import Bucket
from fedjax_sim.engine.cohort import RoundPlan, plan_round
from fedjax_sim.engine.executors.aot import AheadOfTime
from fedjax_sim.engine.mesh import over_runs, replicate
from fedjax_sim.engine.population import DeviceData

# Chunks of a flattened bucket hold about a quarter of its expected members per round (rounded
# down to a power of two), between these bounds: sorted chunks keep the step bound tight, so a
# narrower chunk wastes less on the round's last, partly empty chunk, while on XLA:CPU a local
# step costs about 3 µs + 5 µs per client of the chunk (docs/design.md, item 18).
MIN_CHUNK, MAX_CHUNK = 4, 32


def unsupported(aggregator, attack, mesh=None, runs: int = 1) -> str | None:
  """Why a sweep of ``runs`` runs with this (checked) aggregator and attack, on ``mesh``'s
  devices, cannot be flattened (``None``: it can)."""
  if mesh is not None and runs % mesh.devices.size:
    return (f"a flattened sweep splits whole runs over the devices, and {runs} runs do not "
            f"divide over {mesh.devices.size} devices; the lockstep sweep splits each run's "
            "chunks instead")
  if aggregator.reduction == "collect":
    what = f"the collect aggregator {aggregator.name!r}"
  elif attack is not None and attack.omniscient:
    what = f"the omniscient attack {attack.name!r}"
  else:
    return None
  return (f"{what} reduces each run's cohort held as one buffer in cohort order, which the "
          "flattened sweep does not build")


def flat_buckets(buckets: list[Bucket], bucket_of: np.ndarray, cohort_size: int,
                 chunk_size: int | None) -> list[Bucket]:
  """The buckets of a flattened sweep: bucket ``b`` gets ``Σ_runs min(m, members of b in the
  run)`` slots (the most the runs' cohorts can put there in one round) and a chunk of about a
  quarter of its expected members (at most the plan's ``chunk_size``)."""
  runs, num_clients = bucket_of.shape
  out = []
  for b, bucket in enumerate(buckets):
    members = (bucket_of == b).sum(axis=1)
    capacity = int(np.minimum(cohort_size, members).sum())
    expected = float(cohort_size * members.sum() / num_clients)
    chunk = 1 << max(0, math.floor(math.log2(max(expected / 4, 1.0))))
    chunk = min(max(chunk, MIN_CHUNK), MAX_CHUNK)
    if chunk_size is not None:  # the plan's chunk bounds the memory of a chunk's training
      chunk = min(chunk, chunk_size)
    out.append(bucket._replace(capacity=capacity, chunk=max(1, min(chunk, capacity)),
                               dense=False))
  return out


def _flat_slots(d: DeviceData, plans: RoundPlan, runs: int):
  """The union of the runs' cohort slots, flattened run after run, plus one empty slot at the
  end (index ``R · m``) that pads partial chunks: ``(run, ids, returns, straggler, u, attacker,
  num_examples, bucket)``, each ``[R · m + 1]``."""
  m = plans.cohort.shape[1]
  flat = lambda a, fill: jnp.append(a.reshape(-1), fill)
  run = flat(jnp.repeat(jnp.arange(runs, dtype=jnp.int32)[:, None], m, axis=1), 0)
  ids = flat(plans.cohort, 0)
  c = plans.conditions
  returns = flat(c.returns, False)
  attacker = None if plans.attackers is None else flat(plans.attackers, False)
  n = d.counts[run, ids]
  bucket = jnp.where(returns, d.bucket_of[run, ids], -1)
  return run, ids, returns, flat(c.straggler, False), flat(c.u, 0.0), attacker, n, bucket


def _bucket_positions(bucket_col, n, b: int, bucket: Bucket):
  """Positions (into the flat slots) of bucket ``b``'s returning members, largest first, packed
  into ``[num_chunks, chunk]``; unused positions point at the empty last slot."""
  empty = bucket_col.shape[0] - 1
  member = bucket_col == b
  score = jnp.where(member, n, -1)
  order = jnp.argsort(-score, stable=True).astype(jnp.int32)
  slots = bucket.num_chunks * bucket.chunk
  order = jnp.append(order, jnp.full(max(0, slots - order.shape[0]), empty, jnp.int32))[:slots]
  order = jnp.where(member[order], order, empty)
  return order.reshape(bucket.num_chunks, bucket.chunk)


def flat_round(spec, d: DeviceData, keys, state: rs.ServerState, hp, r):
  """One round of every run of a sweep, flattened (see the module docstring)."""
  runs = keys.shape[0]
  plans = jax.vmap(lambda k, extra: plan_round(spec, k, extra, r))(keys, state.extra)
  run, ids, returns, straggler, u, attacker, n, bucket_col = _flat_slots(d, plans, runs)
  # What a slot's client reads of its run's server state (not the population's client states).
  light = (state.params, state.extra, state.aggregator)
  at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
  first = lambda tree: at(tree, 0)
  total = rs.zero_sums(spec, d, first(state), first(hp), first(plans))
  total = jax.tree.map(lambda a: jnp.zeros((runs, *a.shape), a.dtype), total)
  states = rs.client_states_of(state)

  for b, bucket in enumerate(spec.buckets):
    shape = bucket.shape
    if spec.algo.hooks.round_steps is not None:  # runs' Local-SGD H may differ within a chunk
      shape = shape._replace(equal_steps=False)
    positions = _bucket_positions(bucket_col, n, b, bucket)

    def one_chunk(carry, pos, shape=shape):
      total, states = carry
      run_c, gid_c, ret_c = run[pos], ids[pos], returns[pos]
      att_c = None if attacker is None else attacker[pos]

      def slot_view(k_run, gid):
        """The slot's client as a one-client population (its rows, its run's round keys)."""
        d_k = DeviceData(d.x, d.y, d.offsets[k_run, gid][None], d.counts[k_run, gid][None], None,
                         gid[None])
        return d_k, RoundPlan(None, None, at(plans.keys, k_run), plans.local_steps[k_run], r)

      def slot_job(k_run, gid, ret, strag, u_k, att):
        d_k, plan_k = slot_view(k_run, gid)
        one = lambda a: a[None, None]
        s = jobs_lib.Slots(jnp.zeros((1, 1), jnp.int32), one(ret), one(strag), one(u_k),
                           None if att is None else one(att))
        return jax.tree.map(lambda a: a[0], jobs_lib.client_jobs(spec, d_k, s, plan_k, shape))

      def slot_train(job, chunk_state, k_run, gid, ret, att, bound):
        d_k, plan_k = slot_view(k_run, gid)
        params, extra, aggregator = at(light, k_run)
        st = rs.ServerState(params, None, extra, None, aggregator, None, None)
        return rs.train_chunk(spec, d_k, st, at(hp, k_run), plan_k, job, jnp.zeros(1, jnp.int32),
                              ret[None], chunk_state, shape, None if att is None else att[None],
                              bound=bound)

      def update():
        jobs = jax.vmap(slot_job)(run_c, gid_c, ret_c, straggler[pos], u[pos], att_c)
        bound = jnp.max(jobs.num_steps)  # jobs: [chunk, 1, ...]
        chunk_states = jax.tree.map(lambda a: a[run_c, gid_c][:, None], states)
        return jax.vmap(slot_train, in_axes=(0, 0, 0, 0, 0, 0, None))(
            jobs, chunk_states, run_c, gid_c, ret_c, att_c, bound)

      result = lax.cond(jnp.any(ret_c), update, rs.zeros_of(update))
      sums = result.sums
      seg = lambda a: jax.ops.segment_sum(a, run_c, num_segments=runs)
      added = jax.tree.map(seg, sums._replace(norm_max=None))
      added = added._replace(norm_max=jax.ops.segment_max(sums.norm_max, run_c,
                                                          num_segments=runs))
      total = total.combine(added)
      idx = jnp.where(ret_c, gid_c, spec.num_clients)
      states = jax.tree.map(lambda a, v: a.at[run_c, idx].set(v[:, 0].astype(a.dtype),
                                                               mode="drop"),
                            states, result.new_states)
      return (total, states), None

    if bucket.num_chunks == 1:
      (total, states), _ = one_chunk((total, states), positions[0])
    else:
      (total, states), _ = lax.scan(one_chunk, (total, states), positions)
  state = rs.with_client_states(state, states)
  return jax.vmap(lambda st, sums, h, p: rs.server_step(spec, st, sums, None, h, p))(
      state, total, hp, plans)


def build(spec, data: DeviceData, train_key, evaluate, eval_data, population_metrics, hparams,
          runs_mesh=None):
  """``(run_block, init_state)`` of the flattened sweep; ``run_block(state, rounds[R],
  active[R], evaluate[R]) -> (state, metrics dict of [runs, R])`` as the lockstep sweep's
  (``runs_mesh``: the runs split over its devices)."""
  data_axes = DeviceData(None, None, 0, 0, 0, None)

  def block(state, d, eval_data, keys, hp, rounds, active, do_eval):
    # this device's runs (all of them on one device)
    no_stats = {k: jnp.zeros(keys.shape[0], v.dtype) for k, v in rs.no_stats(spec).items()}

    def body(state, xs):
      r, act, ev = xs
      state, stats = lax.cond(act, lambda s: flat_round(spec, d, keys, s, hp, r),
                              lambda s: (s, no_stats), state)
      metrics = jax.vmap(
          lambda st, d_r, e, k: rs.evaluated_metrics(spec, evaluate, population_metrics, st, d_r,
                                                     e, act & ev, None, jax.random.fold_in(k, r)),
          in_axes=(0, data_axes, 0, 0))(state, d, eval_data, keys)
      metrics.update(stats, finite=jax.vmap(rs.finite)(state.params))
      return state, metrics
    state, metrics = lax.scan(body, state, (rounds, active, do_eval))
    return state, jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), metrics)

  data_runs = DeviceData(False, False, True, True, True, False)
  block = over_runs(block, runs_mesh, (True, data_runs, True, True, True, False, False, False))
  block_j = AheadOfTime(jax.jit(block, donate_argnums=0))
  place = lambda tree: replicate(tree, runs_mesh)  # several devices: inputs on every device
  data, eval_data, train_key, hparams = place((data, eval_data, train_key, hparams))

  def run_block(state, rounds, active, do_eval):
    state, rounds, active, do_eval = place((state, rounds, active, do_eval))
    return block_j(state, data, eval_data, train_key, hparams, rounds, active, do_eval)
  run_block.compilations, run_block.memory = block_j.compilations, block_j.memory
  return run_block, jax.vmap(lambda params: rs.init_state(spec, params))
