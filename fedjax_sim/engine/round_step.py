"""Stages 3–8 of a round, as small pure functions of the static :class:`~.spec.RoundSpec`:

local training of a chunk of clients (:func:`train_chunk`: vmapped :func:`fedjax_sim.client.
local_train`, then the algorithm's per-client result and the aggregator's per-client transform),
the chunk's reduction (:func:`reduce_chunk`, and :func:`collect_chunk` for collect aggregators),
and the server step (:func:`server_step`: the aggregator's reduction and server-side transform,
the algorithm's server rule, the server optimizer). The executors (``executors/compiled.py``,
``executors/host_loop.py``) call these same functions; there is one copy of the round.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_sim import attacks
from fedjax_sim import client as client_lib
from fedjax_sim import personal
from fedjax_sim.aggregators import StreamSums, weighted_sums
from fedjax_sim.algorithms import (ClientContext, ClientOutput, RoundSummary, optimizer_update,
                                   run_hparams)
from fedjax_sim.engine import mesh as mesh_lib

ROUND_STATS = ("drift", "update_norm_mean", "update_norm_max", "participants")
ATTACK_STATS = ("attackers",)


class ServerState(NamedTuple):
  """The server's state between rounds (donated to the compiled block).

  Attributes:
    params: the global model.
    opt_state: the server optimizer's state.
    extra: the algorithm's server state (``Hooks.init_server_extra``), e.g. SCAFFOLD's ``c``.
    client_states: the algorithm's per-client state for the whole population, leaves
      ``[num_clients, ...]`` (``Hooks.init_client_state``), e.g. SCAFFOLD's ``c_i``.
    aggregator: the aggregator's server-side state (``Aggregator.init``).
    aggregator_clients: the aggregator's per-client state for the whole population, leaves
      ``[num_clients, ...]`` (``Aggregator.init_client_state``), e.g. error-feedback residuals.
    local_clients: each population client's local parameters (a list of ``[num_clients, ...]``
      leaves, :mod:`fedjax_sim.personal`), or ``None``.
  """
  params: Any
  opt_state: Any
  extra: Any = None
  client_states: Any = None
  aggregator: Any = None
  aggregator_clients: Any = None
  local_clients: Any = None


class RoundSums(NamedTuple):
  """Running reductions over the clients that returned an update (``w_k`` = server weight)."""
  update: Any  # Σ w_k u_k of the aggregator-transformed updates (stream aggregators, else None)
  delta: Any  # Σ w_k Δ_k of the raw deltas (for the drift)
  weight: jax.Array  # Σ w_k
  sq_norm: jax.Array  # Σ w_k ‖Δ_k‖²
  norm_sum: jax.Array  # Σ ‖Δ_k‖
  norm_max: jax.Array  # max ‖Δ_k‖
  count: jax.Array  # number of clients

  def combine(self, other: "RoundSums") -> "RoundSums":
    added = jax.tree.map(jnp.add, self._replace(norm_max=0.0), other._replace(norm_max=0.0))
    return added._replace(norm_max=jnp.maximum(self.norm_max, other.norm_max))


class Collected(NamedTuple):
  """The cohort's updates for a collect aggregator: leaves ``[slots, ...]``, ``weights`` and
  ``mask`` ``[slots]`` (``False`` for empty slots and clients that did not return), and which
  slots hold Byzantine clients (``None``: no attack)."""
  updates: Any
  weights: jax.Array
  mask: jax.Array
  attackers: Any = None


class ChunkResult(NamedTuple):
  """One chunk's contribution: its sums, per-client updates and weights (collect aggregators
  only), and the new per-client states ``(algorithm's, aggregator's, local parameters)`` of its
  clients."""
  sums: RoundSums
  updates: Any
  weights: Any
  new_states: tuple


def over_chunk(fn):
  """``vmap(fn)`` over a chunk of clients; a chunk of one runs ``fn`` unbatched (a vmapped
  convolution becomes a grouped one, which XLA:CPU runs about 4× slower)."""
  def run(*args):
    if jax.tree.leaves(args)[0].shape[0] == 1:
      out = fn(*jax.tree.map(lambda a: a[0], args))
      return jax.tree.map(lambda a: a[None], out)
    return jax.vmap(fn)(*args)
  return run


def _f32(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def zeros_of(fn, *args):
  """A function returning zeros shaped like ``fn(*args)``'s output."""
  return lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))


# --- per-client states ----------------------------------------------------------------------

def client_states_of(state: ServerState) -> tuple:
  """The population's per-client states: ``(algorithm's, aggregator's, local parameters)``."""
  return state.client_states, state.aggregator_clients, state.local_clients


def with_client_states(state: ServerState, states: tuple) -> ServerState:
  """``state`` holding the per-client states ``states`` (as :func:`client_states_of` orders
  them)."""
  return state._replace(client_states=states[0], aggregator_clients=states[1],
                        local_clients=states[2])


def start_params(spec, base, local_k):
  """A client's starting model: ``base`` (:func:`start_of`), with its own local parameters if
  any."""
  return base if spec.local is None else personal.merge(base, local_k, spec.local)


def start_of(spec, state: ServerState, context: ClientContext):
  """The server model a client starts from and its delta is taken against: the current one, or
  its context's under ``Hooks.client_start`` (e.g. FedBuff's stale model)."""
  return state.params if spec.algo.hooks.client_start is None else context.global_params


def gather_states(states: tuple, ids):
  return jax.tree.map(lambda a: a[ids], states)


def scatter_states(spec, states: tuple, ids, returns, new_states: tuple) -> tuple:
  """Writes the returning clients' new states back by global id (others are dropped)."""
  idx = jnp.where(returns, ids, spec.num_clients)
  return jax.tree.map(lambda a, v: a.at[idx].set(v.astype(a.dtype), mode="drop"), states,
                      new_states)


# --- stage 3: local training and the per-client result --------------------------------------

def client_context(spec, state: ServerState, r, hp, client_state, keys=None,
                   global_id=None) -> ClientContext:
  hooks = spec.algo.hooks
  extra = None if hooks.client_extra is None else hooks.client_extra(state.extra, client_state)
  if hooks.client_start is None:
    return ClientContext(state.params, r, hp, extra)
  key = jax.random.fold_in(keys.client_start, global_id)
  start, scale = hooks.client_start(state.extra, state.params, key, hp)
  return ClientContext(start, r, hp, extra, jnp.asarray(scale, jnp.float32))


def client_end(spec, d, params, context, new_params, job, client_state, shape):
  """``(Δ_k, message_k, new algorithm client state)`` of one client."""
  delta = jax.tree.map(lambda a, p: (a - p).astype(jnp.float32), new_params, params)
  if context.delta_scale is not None:  # Hooks.client_start's factor (FedBuff's s(τ))
    delta = jax.tree.map(lambda a: a * context.delta_scale, delta)
  hooks = spec.algo.hooks
  if hooks.client_result is None:
    return delta, None, None
  full_grad = lambda p: client_lib.full_gradient(spec.model, d.x, d.y, job.offset,
                                                 job.num_examples, shape.max_examples, p)
  out = ClientOutput(context, new_params, job.num_steps, job.num_examples, client_state, full_grad,
                     spec.model.state_collections)
  message, new_state = hooks.client_result(out)
  return delta, _f32(message), new_state


# --- stage 4: Byzantine clients, then the aggregator's per-client transform -------------------

def attacked(spec, keys, global_id, delta, message, is_attacker):
  """A Byzantine client's ``(delta, message)`` under a (non-omniscient) model-update attack,
  keyed by ``fold_in(keys.attack, global id)``; honest clients' pass unchanged."""
  attack = spec.attack
  if attack is None or attack.update is None or attack.omniscient:
    return delta, message
  update = {"delta": delta, "message": message}
  bad = attack.update(update, None, key=jax.random.fold_in(keys.attack, global_id))
  pick = lambda b, a: jnp.where(is_attacker, b.astype(a.dtype), a)
  out = jax.tree.map(pick, bad, update)
  return out["delta"], out["message"]


def client_transform(spec, state: ServerState, keys, global_id, delta, message, agg_client_state):
  """``(update, new aggregator client state)``: the aggregator's transform of one client's
  ``{"delta", "message"}``, keyed by ``fold_in(keys.client_transform, global id)``."""
  update = {"delta": delta, "message": message}
  agg = spec.aggregator
  if agg.client is None:
    return update, agg_client_state
  key = jax.random.fold_in(keys.client_transform, global_id)
  return agg.client(update, agg_client_state, state.aggregator, key=key)


def chunk_weights(spec, n, returns):
  """The server weights of a chunk's slots: ``n_k`` or 1 (the algorithm's weighting, or the
  aggregator's ``"uniform"``), and 0 for clients that did not return."""
  uniform = spec.algo.weighting == "uniform" or spec.aggregator.weighting == "uniform"
  return jnp.where(returns, 1.0 if uniform else n.astype(jnp.float32), 0.0)


# --- stage 5: the reduction ------------------------------------------------------------------

def reduce_chunk(spec, deltas, updates, weights, returns) -> RoundSums:
  """Weighted sums over a chunk's clients that returned (and their update-norm statistics)."""
  # where(): a slot that returns nothing never reaches the sums, even if its unmasked steps
  # made it non-finite (buckets with equal step counts do not mask steps).
  mask = lambda a: jnp.where(returns.reshape(-1, *([1] * (a.ndim - 1))), a, 0.0)
  wsum = lambda tree: jax.tree.map(lambda a: jnp.tensordot(weights, mask(a), axes=1), tree)
  sq = sum(jnp.sum(mask(a).reshape(a.shape[0], -1) ** 2, axis=1) for a in jax.tree.leaves(deltas))
  norms = jnp.sqrt(sq)
  update = None if spec.collect else wsum(updates)
  return RoundSums(update, wsum(deltas), jnp.sum(weights), jnp.sum(weights * sq), jnp.sum(norms),
                   jnp.max(norms), jnp.sum(returns.astype(jnp.float32)))


def collect_chunk(collected: Collected, start, result: ChunkResult, returns,
                  attackers=None) -> Collected:
  """Writes a chunk's updates, weights and mask (and attacker flags) into the cohort's slots
  from ``start``."""
  put = lambda buf, v: lax.dynamic_update_slice_in_dim(buf, v.astype(buf.dtype), start, 0)
  return Collected(jax.tree.map(put, collected.updates, result.updates),
                   put(collected.weights, result.weights), put(collected.mask, returns),
                   None if attackers is None else put(collected.attackers, attackers))


def chunk_contexts(spec, state: ServerState, hp, plan_r, job, algo_states, gids):
  """Each client's :class:`~fedjax_sim.algorithms.ClientContext` (leading chunk axis); ``gids``
  are the clients' global ids."""
  return over_chunk(lambda _, s, g: client_context(spec, state, plan_r.round, hp, s, plan_r.keys,
                                                   g))(job.offset, algo_states, gids)


def finish_chunk(spec, d, state: ServerState, plan_r, shape, new_params, job, contexts,
                 chunk_states, ids, returns, attackers=None) -> ChunkResult:
  """Stages 3 (the algorithm's per-client result), 4 and 5 for a chunk of trained clients."""
  def one(w, job_k, ctx, state_k, agg_state_k, local_k, gid, bad):
    delta, message, new_state = client_end(spec, d, start_of(spec, state, ctx), ctx, w, job_k,
                                           state_k, shape)
    if spec.local is not None:  # local parameters stay on the client
      delta, local_k = personal.zero_local(delta, spec.local), personal.split(w, spec.local)
    delta, message = attacked(spec, plan_r.keys, gid, delta, message, bad)
    update, new_agg_state = client_transform(spec, state, plan_r.keys, gid, delta, message,
                                             agg_state_k)
    return delta, update, new_state, new_agg_state, local_k

  bad = jnp.zeros_like(returns) if attackers is None else attackers
  deltas, updates, *new_states = over_chunk(one)(new_params, job, contexts, *chunk_states,
                                                 d.global_id(ids), bad)
  weights = chunk_weights(spec, job.num_examples, returns)
  sums = reduce_chunk(spec, deltas, updates, weights, returns)
  keep = spec.collect
  return ChunkResult(sums, updates if keep else None, weights if keep else None,
                     tuple(new_states))


def train_chunk(spec, d, state: ServerState, hp, plan_r, job, ids, returns, chunk_states,
                shape, attackers=None, bound=None) -> ChunkResult:
  """One chunk of clients trained in one program (stages 3–5 for the chunk); with a mesh, the
  chunk's clients are split over its devices (:func:`fedjax_sim.engine.mesh.sharded_chunk`).
  ``bound``: the local-step loop's trip count (default: the chunk's largest ``job.num_steps``; a
  flattened sweep vmaps this function over single clients and passes its chunk's bound)."""
  def run(d, state, hp, plan_r, job, ids, returns, chunk_states, attackers):
    steps = jnp.max(job.num_steps) if bound is None else bound
    contexts = chunk_contexts(spec, state, hp, plan_r, job, chunk_states[0], d.global_id(ids))
    new_params = over_chunk(lambda job_k, ctx, local_k: client_lib.local_train(
        spec.model, spec.algo, shape, start_params(spec, start_of(spec, state, ctx), local_k),
        d.x, d.y, job_k, ctx, steps, spec.plan.unroll))(job, contexts, chunk_states[2])
    return finish_chunk(spec, d, state, plan_r, shape, new_params, job, contexts, chunk_states,
                        ids, returns, attackers)
  return mesh_lib.sharded_chunk(run, spec.mesh, 4)(d, state, hp, plan_r, job, ids, returns,
                                                   chunk_states, attackers)


# --- the empty round's sums and buffers -------------------------------------------------------

def zero_sums(spec, d, state: ServerState, hp, plan_r) -> RoundSums:
  """Empty sums; the update sums take the shape of one client's update."""
  z = jnp.float32(0.0)
  delta = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), state.params)
  update = None if spec.collect else zero_update(spec, d, state, hp, plan_r)()
  return RoundSums(update, delta, z, z, z, z, z)


def zero_update(spec, d, state: ServerState, hp, plan_r):
  """A function returning one client's zero update ``{"delta", "message"}``."""
  shape = spec.buckets[0].shape

  def one_update():
    job = client_lib.ClientJob(jnp.int32(0), jnp.int32(1), jnp.int32(1),
                               jnp.zeros((shape.num_epochs, shape.max_examples), jnp.int32))
    algo_state, agg_state, _ = gather_states(client_states_of(state), jnp.int32(0))
    context = client_context(spec, state, plan_r.round, hp, algo_state, plan_r.keys, jnp.int32(0))
    delta, message, _ = client_end(spec, d, state.params, context, state.params, job, algo_state,
                                   shape)
    return client_transform(spec, state, plan_r.keys, jnp.int32(0), delta, message, agg_state)[0]
  return zeros_of(one_update)


def zero_collected(spec, d, state: ServerState, hp, plan_r) -> Collected | None:
  """Empty slots for every cohort slot of every bucket (collect aggregators)."""
  if not spec.collect:
    return None
  slots = spec.slot_offsets[-1]
  one = zero_update(spec, d, state, hp, plan_r)()
  return Collected(jax.tree.map(lambda a: jnp.zeros((slots, *a.shape), a.dtype), one),
                   jnp.zeros(slots, jnp.float32), jnp.zeros(slots, bool),
                   None if spec.attack is None else jnp.zeros(slots, bool))


# --- stages 6–8: reduction result, server transform, algorithm rule, optax ---------------------

def server_step(spec, state: ServerState, sums: RoundSums, collected: Collected | None, hp,
                plan_r):
  """The aggregate → the algorithm's server rule → the server optimizer; returns the new state
  and the round statistics. A round in which no client returned leaves the server where it was."""
  algo, agg = spec.algo, spec.aggregator
  total = jnp.maximum(sums.weight, 1e-30)
  mean_delta = jax.tree.map(lambda a: a / total, sums.delta)
  drift = jnp.maximum(
      sums.sq_norm / total - sum(jnp.sum(a * a) for a in jax.tree.leaves(mean_delta)), 0.0)
  if spec.attack is not None and spec.attack.omniscient:  # attackers read the honest slots
    collected = collected._replace(updates=attacks.apply(
        spec.attack, collected.updates, collected.attackers, key=plan_r.keys.attack,
        mask=collected.mask))
  if agg.reduction == "stream" and not spec.collect:
    aggregate = agg.finalize(StreamSums(sums.update, sums.weight, sums.count), state.aggregator)
  elif agg.reduction == "stream":  # a stream rule run on collected updates (omniscient attack)
    aggregate = agg.finalize(weighted_sums(collected.updates, collected.weights, collected.mask),
                             state.aggregator)
  else:
    aggregate = agg.reduce(collected.updates, collected.weights, collected.mask, state.aggregator,
                           key=plan_r.keys.aggregator)
  agg_state = state.aggregator
  if agg.server is not None:
    aggregate, agg_state = agg.server(aggregate, agg_state, key=plan_r.keys.server)
  summary = RoundSummary(aggregate["delta"], aggregate["message"], sums.count, spec.num_clients,
                         drift, plan_r.round, state.params)
  if algo.hooks.server_update is None:
    delta, extra = aggregate["delta"], state.extra
  else:
    delta, extra = algo.hooks.server_update(summary, hp, state.extra)
  pseudo_grad = jax.tree.map(lambda g, p: (-g).astype(p.dtype), delta, state.params)
  updates, opt_state = optimizer_update(algo.server_optimizer, pseudo_grad, state.opt_state,
                                        state.params, hp)
  new_params = optax.apply_updates(state.params, updates)
  if spec.model.state_collections:  # batch statistics: the aggregate, not an optimizer step
    new_params = {**new_params, **{c: jax.tree.map(jnp.add, state.params[c], aggregate["delta"][c])
                                   for c in spec.model.state_collections}}
  new = (new_params, opt_state, extra, agg_state)
  params, opt_state, extra, agg_state = jax.tree.map(
      lambda a, b: jnp.where(sums.count > 0, a, b), new,
      (state.params, state.opt_state, state.extra, state.aggregator))
  stats = {"drift": drift, "update_norm_mean": sums.norm_sum / jnp.maximum(sums.count, 1.0),
           "update_norm_max": sums.norm_max, "participants": sums.count}
  if algo.hooks.round_steps is not None:
    stats["local_steps"] = plan_r.local_steps.astype(jnp.float32)
  if spec.poisson:
    stats["drawn"] = plan_r.drawn.astype(jnp.float32)
  if spec.attack is not None:
    stats["attackers"] = jnp.sum(plan_r.attackers.astype(jnp.float32))
  stats.update({k: jnp.asarray(agg_state[k], jnp.float32) for k in agg.report})
  new_state = state._replace(params=params, opt_state=opt_state, extra=extra, aggregator=agg_state)
  return new_state, stats


def no_stats(spec) -> dict:
  """The statistics of a round that did not run (inactive rounds of a padded block)."""
  keys = (ROUND_STATS + ("local_steps",) * (spec.algo.hooks.round_steps is not None)
          + ("drawn",) * spec.poisson + ATTACK_STATS * (spec.attack is not None)
          + tuple(spec.aggregator.report))
  return {k: jnp.float32(0.0) for k in keys}


def update_template(spec, params):
  """Zeros shaped like one client's update ``{"delta", "message"}`` (the algorithm's message
  traced abstractly from its ``client_result``): what the aggregator's states are shaped by."""
  hooks = spec.algo.hooks
  delta = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), params)
  if hooks.client_result is None:
    return {"delta": delta, "message": None}

  def message():
    extra = None if hooks.init_server_extra is None else hooks.init_server_extra(params)
    client_state = None if hooks.init_client_state is None else hooks.init_client_state(params)
    hp = {k: jnp.float32(v) for k, v in run_hparams(spec.algo).items()}
    context = ClientContext(params, jnp.int32(1), hp, None if hooks.client_extra is None
                            else hooks.client_extra(extra, client_state))
    out = ClientOutput(context, params, jnp.int32(1), jnp.int32(1), client_state, lambda p: p)
    return _f32(hooks.client_result(out)[0])
  return {"delta": delta, "message": zeros_of(message)()}


def init_state(spec, params) -> ServerState:
  """The server state before round 1."""
  algo, agg = spec.algo, spec.aggregator
  hooks = algo.hooks
  extra = None if hooks.init_server_extra is None else hooks.init_server_extra(params)
  population = lambda tree: jax.tree.map(lambda a: jnp.repeat(a[None], spec.num_clients, axis=0),
                                         tree)
  states = None if hooks.init_client_state is None else population(hooks.init_client_state(params))
  update = update_template(spec, params)
  agg_clients = (None if agg.init_client_state is None
                 else population(agg.init_client_state(update)))
  local = None if spec.local is None else population(personal.split(params, spec.local))
  return ServerState(params, algo.server_optimizer.init(params), extra, states, agg.init(update),
                     agg_clients, local)


def evaluated_metrics(spec, evaluate, population_metrics, state: ServerState, d, eval_data,
                      do_eval, client_metrics=None, round_key=None):
  """The evaluation metrics of an evaluated round (NaN on other rounds); with local parameters,
  each example is scored by its own client's model. ``client_metrics(state, d, eval_data,
  round_key)``: the per-client (fine-tuned, personal) metrics (:mod:`.personal_eval`)."""
  params = state.params
  def compute():
    metrics = dict(evaluate(params, eval_data, state.local_clients))
    if population_metrics is not None:
      metrics.update(population_metrics(params, d, spec.buckets))
    if client_metrics is not None:
      metrics.update(client_metrics(state, d, eval_data, round_key))
    return metrics
  shapes = jax.eval_shape(compute)
  nan = lambda: jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
  return lax.cond(do_eval, compute, nan)


def finite(params):
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
