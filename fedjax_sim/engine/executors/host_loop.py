"""The host-loop executor: Python drives rounds, buckets, chunks and local steps, one compiled call
per local step, which is how XLA:CPU runs convolutions fastest (see ``Plan``). It calls the same
stage functions as the compiled executor: the plan, the jobs, :func:`fedjax_sim.client.local_step`,
the per-client result and transform, the reduction and the server step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import client as client_lib
from fedjax_sim.engine import jobs as jobs_lib
from fedjax_sim.engine import round_step as rs
from fedjax_sim.engine.cohort import plan_round


def build(spec, data, train_key, evaluate, eval_data, population_metrics, hparams,
          client_metrics=None):
  """``(run_block, init_state)`` of the host loop (same contract as the compiled executor)."""
  algo = spec.algo
  plan_j = jax.jit(lambda extra, r: plan_round(spec, train_key, extra, r))

  def bucket_inputs(d, plan_r, b, bucket):
    s = jobs_lib.slots(d, plan_r, b, bucket)
    return s, jobs_lib.client_jobs(spec, d, s, plan_r, bucket.shape)
  bucket_j = jax.jit(bucket_inputs, static_argnums=(2, 3))

  def start(state, hp, plan_r, job, ids):
    chunk_states = rs.gather_states(rs.client_states_of(state), ids)
    contexts = rs.chunk_contexts(spec, state, hp, plan_r, job, chunk_states[0], ids)
    def begin(ctx, local_k):
      params = rs.start_params(spec, rs.start_of(spec, state, ctx), local_k)
      return params, algo.client_optimizer.init(params)
    carry = rs.over_chunk(begin)(contexts, chunk_states[2])
    return carry, contexts, chunk_states
  start_j = jax.jit(start)

  def step(shape, d, carry, t, job, contexts):
    return rs.over_chunk(lambda c, job_k, ctx: client_lib.local_step(
        spec.model, algo, shape, d.x, d.y, c, t, job_k, ctx))(carry, job, contexts)
  step_j = jax.jit(step, static_argnums=(0,))

  def finish(total, states, collected, shape, slot, d, state, plan_r, carry, job, contexts,
             chunk_states, ids, returns, attackers):
    result = rs.finish_chunk(spec, d, state, plan_r, shape, carry[0], job, contexts, chunk_states,
                             ids, returns, attackers)
    if collected is not None:
      collected = rs.collect_chunk(collected, slot, result, returns, attackers)
    return (total.combine(result.sums),
            rs.scatter_states(spec, states, ids, returns, result.new_states), collected)
  finish_j = jax.jit(finish, static_argnums=(3, 4), donate_argnums=(0, 1, 2))
  zero_j = jax.jit(lambda d, state, hp, plan_r: (rs.zero_sums(spec, d, state, hp, plan_r),
                                                 rs.zero_collected(spec, d, state, hp, plan_r)))
  server_j = jax.jit(lambda state, total, collected, hp, plan_r: rs.server_step(
      spec, state, total, collected, hp, plan_r))
  eval_j = jax.jit(lambda st, d, e, ev, r: dict(rs.evaluated_metrics(
      spec, evaluate, population_metrics, st, d, e, ev, client_metrics,
      jax.random.fold_in(train_key, r)), finite=rs.finite(st.params)))
  no_stats = rs.no_stats(spec)
  offsets = spec.slot_offsets

  def run_block(state, rounds, active, do_eval):
    rows = []
    for r, act, ev in zip(np.asarray(rounds), np.asarray(active), np.asarray(do_eval)):
      stats = no_stats
      if act:
        plan_r = plan_j(state.extra, r)
        total, collected = zero_j(data, state, hparams, plan_r)
        states = rs.client_states_of(state)
        for b, bucket in enumerate(spec.buckets):
          s, jobs = bucket_j(data, plan_r, b, bucket)
          returns_np, steps_np = np.asarray(s.returns), np.asarray(jobs.num_steps)
          for c in range(bucket.num_chunks):
            if not returns_np[c].any():
              continue
            job = jax.tree.map(lambda a: a[c], jobs)
            current = rs.with_client_states(state, states)
            carry, contexts, chunk_states = start_j(current, hparams, plan_r, job, s.ids[c])
            for t in range(int(steps_np[c].max())):
              carry = step_j(bucket.shape, data, carry, t, job, contexts)
            total, states, collected = finish_j(
                total, states, collected, bucket.shape, offsets[b] + c * bucket.chunk, data,
                state, plan_r, carry, job, contexts, chunk_states, s.ids[c], s.returns[c],
                None if s.attacker is None else s.attacker[c])
        state = rs.with_client_states(state, states)
        state, stats = server_j(state, total, collected, hparams, plan_r)
      rows.append(dict(eval_j(state, data, eval_data, bool(act and ev), r), **stats))
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *rows)

  return run_block, lambda params: rs.init_state(spec, params)
