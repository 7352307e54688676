"""The compiled executor: a block of rounds as one ``lax.scan`` inside one ``jit``.

Each round runs its stages on the device: plan (cohort, conditions, keys) → for each size bucket,
a scan over chunks of its cohort slots (chunks without a member are skipped with ``lax.cond``),
each chunk trained, transformed and reduced → the server step. Evaluation is folded in (a
``lax.cond`` on rounds the host marked), so the host wakes once per block. A sweep vmaps the whole
block over its runs; a host-streamed population passes each round's cohort data in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_sim.engine import jobs as jobs_lib
from fedjax_sim.engine import round_step as rs
from fedjax_sim.engine.cohort import plan_round
from fedjax_sim.engine.executors.aot import AheadOfTime
from fedjax_sim.engine.mesh import over_runs, replicate
from fedjax_sim.engine.population import DeviceData


def device_round(spec, d: DeviceData, train_key, state: rs.ServerState, hp, r):
  """One round on the device: every stage, every bucket, every chunk."""
  plan_r = plan_round(spec, train_key, state.extra, r)
  total = rs.zero_sums(spec, d, state, hp, plan_r)
  states = rs.client_states_of(state)
  collected = rs.zero_collected(spec, d, state, hp, plan_r)
  offsets = spec.slot_offsets
  for b, bucket in enumerate(spec.buckets):
    s = jobs_lib.slots(d, plan_r, b, bucket)
    # Dense buckets draw every slot's shuffle at once (a shuffle loop per small chunk is
    # dominated by loop overhead); sparse ones per chunk, so that skipped chunks draw nothing.
    jobs = jobs_lib.client_jobs(spec, d, s, plan_r, bucket.shape) if bucket.dense else None

    def one_chunk(carry, chunk, b=b, bucket=bucket):
      total, states, collected = carry
      c, s_c, job_c = chunk
      gids = d.global_id(s_c.ids)
      def update():
        job = job_c if bucket.dense else jobs_lib.client_jobs(spec, d, s_c, plan_r, bucket.shape,
                                                                bucket.parts)
        return rs.train_chunk(spec, d, state, hp, plan_r, job, s_c.ids, s_c.returns,
                              rs.gather_states(states, gids), bucket.shape, s_c.attacker)
      result = lax.cond(jnp.any(s_c.returns), update, rs.zeros_of(update))
      total = total.combine(result.sums)
      states = rs.scatter_states(spec, states, gids, s_c.returns, result.new_states)
      if collected is not None:
        collected = rs.collect_chunk(collected, offsets[b] + c * bucket.chunk, result, s_c.returns,
                                     s_c.attacker)
      return (total, states, collected), None

    chunks = (jnp.arange(bucket.num_chunks), s, jobs)
    if bucket.num_chunks == 1:
      (total, states, collected), _ = one_chunk((total, states, collected),
                                                jax.tree.map(lambda a: a[0], chunks))
    else:
      (total, states, collected), _ = lax.scan(one_chunk, (total, states, collected), chunks)
  state = rs.with_client_states(state, states)
  return rs.server_step(spec, state, total, collected, hp, plan_r)


def build(spec, data, train_key, evaluate, eval_data, population_metrics, hparams, sweep: bool,
          stream, client_metrics=None, runs_mesh=None):
  """``(run_block, init_state)`` of the compiled executor (``runs_mesh``: a sweep's runs split
  over its devices, :func:`fedjax_sim.engine.mesh.over_runs`).

  ``run_block(state, rounds[R], active[R], evaluate[R]) -> (state, metrics dict of [R])``.
  The block is compiled ahead of time, once per argument signature (:class:`AheadOfTime`):
  ``run_block.compilations()`` counts the programs and ``run_block.memory()`` is XLA's memory
  analysis of the one last run.
  """
  no_stats = rs.no_stats(spec)

  def block(state, d, eval_data, key, hp, rounds, active, do_eval, round_data=None):
    def body(state, xs):
      r, act, ev, d_r = xs
      d_r = d if d_r is None else d_r  # streamed: this round's cohort data
      state, stats = lax.cond(act, lambda s: device_round(spec, d_r, key, s, hp, r),
                              lambda s: (s, no_stats), state)
      metrics = rs.evaluated_metrics(spec, evaluate, population_metrics, state, d_r, eval_data,
                                     act & ev, client_metrics, jax.random.fold_in(key, r))
      metrics.update(stats, finite=rs.finite(state.params))
      return state, metrics
    return lax.scan(body, state, (rounds, active, do_eval, round_data))

  init_state = lambda params: rs.init_state(spec, params)
  if sweep:
    data_axes = DeviceData(None, None, 0, 0, 0, None)
    block = jax.vmap(block, in_axes=(0, data_axes, 0, 0, 0, None, None, None))
    data_runs = DeviceData(False, False, True, True, True, False)
    block = over_runs(block, runs_mesh, (True, data_runs, True, True, True, False, False, False))
    init_state = jax.vmap(init_state)
  block_j = AheadOfTime(jax.jit(block, donate_argnums=0))
  mesh = spec.mesh or runs_mesh
  place = lambda tree: replicate(tree, mesh)  # several devices: inputs on every device
  data, eval_data, train_key, hparams = place((data, eval_data, train_key, hparams))

  def run_block(state, rounds, active, do_eval):
    state, rounds, active, do_eval = place((state, rounds, active, do_eval))
    if stream is None:
      return block_j(state, data, eval_data, train_key, hparams, rounds, active, do_eval)
    out = block_j(state, None, eval_data, train_key, hparams, rounds, active, do_eval,
                  place(stream.take(train_key, np.asarray(rounds))))
    rounds = np.asarray(rounds)
    stream.prefetch(train_key, rounds + len(rounds))  # overlaps the block just dispatched
    return out
  run_block.compilations, run_block.memory = block_j.compilations, block_j.memory
  return run_block, init_state
