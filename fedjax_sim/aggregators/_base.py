"""The aggregator record, and :func:`aggregate`, which applies one outside any simulation.

An :class:`Aggregator` says what happens between a client's local training and the algorithm's
server rule, in three optional stages (optax style: a record of pure functions, pytree states):

1. ``client``: a per-client transform, run inside the vmapped client computation (clipping,
   compression, attacks), with an optional persistent per-client state kept on device for the
   whole population (``init_client_state``) and its own key.
2. the reduction, either **stream** (a weighted sum accumulated chunk by chunk, so the cohort's
   updates are never held at once; ``finalize`` turns the sums into the aggregate) or **collect**
   (every cohort slot's update is kept, ``[slots, ...]`` per leaf, with its weight and a validity
   mask for empty slots and clients that did not return; ``reduce`` computes the aggregate: order
   statistics such as the median).
3. ``server``: a server-side transform with the aggregator's state and its own key (noise,
   adaptive clipping).

An aggregator may also specialize itself once the cohort is known (``setup``, given a
:class:`CohortInfo`: e.g. DP's fixed denominator, the expected cohort size), force uniform weights
(``weighting="uniform"``), name numeric ``hparams`` that live in its state (so a sweep can vary
them per run, as data), and declare its ``privacy`` accounting.

What an aggregator applies to: each client's whole message to the server, the pytree
``{"delta": θ_k − θ, "message": m_k}`` where ``m_k`` is the algorithm's own message
(:attr:`fedjax_sim.algorithms.Hooks.client_result`: SCAFFOLD's ``Δc_i``, FedNova's normalized
delta and ``a_k``; ``None`` for FedAvg). The algorithm's server rule then reads the aggregate's
``delta`` as ``mean_delta`` and its ``message`` as ``mean_message``; with :func:`mean` these are
exactly the weighted means, with :func:`median` their coordinate-wise medians, and a norm clip
bounds the norm of the whole message. The weights are the algorithm's (``n_k`` or uniform).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

REDUCTIONS = ("stream", "collect")


class CohortInfo(NamedTuple):
  """What :attr:`Aggregator.setup` learns about the cohorts before the round is built."""
  expected_clients: float  # E|cohort|: m for fixed-size cohorts, q·N for Poisson sampling
  num_clients: int  # the population N
  slots: int  # the static number of cohort slots (m, or the Poisson capacity)


class StreamSums(NamedTuple):
  """What a stream reduction accumulates over the clients that returned."""
  weighted_sum: Any  # Σ_k w_k u_k (a pytree like the updates)
  weight: jax.Array  # Σ_k w_k
  count: jax.Array  # number of clients


def _no_state(params):
  del params
  return None


class Aggregator(NamedTuple):
  """How the cohort's updates become the server's aggregate.

  Attributes:
    name: registry name, e.g. ``"median"``.
    reduction: ``"stream"`` or ``"collect"`` (see the module docstring).
    init: ``fn(update) -> state``, the aggregator's server-side state; ``update`` is zeros shaped
      like one client's update (in a simulation ``{"delta": params as float32, "message": the
      algorithm's message}``).
    client: ``fn(update, client_state, state, *, key) -> (update, client_state)`` applied to each
      client's update before the reduction (``None``: the identity).
    init_client_state: ``fn(update) -> state`` of one client (``update`` as for ``init``), kept
      on device for every population client and written back by global client id (``None``: no
      per-client state).
    finalize: stream reductions: ``fn(StreamSums, state) -> aggregate``.
    reduce: collect reductions: ``fn(updates, weights, mask, state, *, key) -> aggregate`` with
      leaves ``[slots, ...]``, ``weights [slots]`` and a boolean ``mask [slots]``.
    server: ``fn(aggregate, state, *, key) -> (aggregate, state)`` after the reduction
      (``None``: the identity).
    weighting: ``"uniform"`` gives every returning client weight 1 whatever the algorithm's
      weighting (DP); ``None`` keeps the algorithm's.
    hparams: numeric options (name → value) that the functions read from the state, a dict
      holding them under these names; :func:`simulate_sweep`'s ``aggregator_hparams`` varies them
      per run.
    setup: ``fn(CohortInfo, hparams) -> Aggregator``, run once before the round is built (by the
      engine and by :func:`aggregate`): checks the options, naming bad values, and returns the
      aggregator specialized to the cohort (``None``: used as is).
    privacy: the DP accounting of the aggregator's noise
      (:class:`fedjax_sim.privacy.Accounting`), read by the simulation to record ``epsilon``.
    encoded_bytes: ``fn(update) -> int``, the bytes one client sends (a compressor's encoding;
      ``None``: the dense float32 update), for ``history["bytes_up"]``.
    report: names of scalar entries of the (dict) state added to every round's statistics and
      history (e.g. DP's adapted ``clip_norm``).
  """
  name: str
  reduction: str
  init: Callable = _no_state
  client: Callable | None = None
  init_client_state: Callable | None = None
  finalize: Callable | None = None
  reduce: Callable | None = None
  server: Callable | None = None
  weighting: str | None = None
  hparams: dict | None = None
  setup: Callable | None = None
  privacy: Any = None
  encoded_bytes: Callable | None = None
  report: tuple = ()


def check(aggregator) -> "Aggregator":
  """Validates an aggregator (``None`` is :func:`fedjax_sim.aggregators.mean`)."""
  if aggregator is None:
    from fedjax_sim.aggregators.mean import mean
    return mean()
  if not isinstance(aggregator, Aggregator):
    raise ValueError(f"aggregator must be a fedjax_sim.aggregators.Aggregator (e.g. "
                     f"fedjax_sim.aggregators.median()), got {type(aggregator).__name__}")
  if aggregator.reduction not in REDUCTIONS:
    raise ValueError(f"aggregator {aggregator.name!r}: reduction must be 'stream' or 'collect', "
                     f"got {aggregator.reduction!r}")
  needed = "finalize" if aggregator.reduction == "stream" else "reduce"
  if getattr(aggregator, needed) is None and aggregator.setup is None:
    raise ValueError(f"aggregator {aggregator.name!r} has a {aggregator.reduction} reduction but "
                     f"no {needed} function")
  if aggregator.weighting not in (None, "uniform"):
    raise ValueError(f"aggregator {aggregator.name!r}: weighting must be None or 'uniform', got "
                     f"{aggregator.weighting!r}")
  return aggregator


def prepare(aggregator, info: CohortInfo, hparams: dict | None = None) -> "Aggregator":
  """Checks ``aggregator`` and specializes it to the cohorts ``info`` describes, with its
  ``hparams`` overridden by ``hparams`` (names it does not have are an error)."""
  aggregator = check(aggregator)
  known = dict(aggregator.hparams or {})
  unknown = sorted(set(hparams or {}) - set(known))
  if unknown:
    raise ValueError(f"aggregator {aggregator.name!r} has no hparam(s) {unknown} (its hparams: "
                     f"{sorted(known) or 'none'})")
  known.update(hparams or {})
  if aggregator.setup is None:
    return aggregator
  return check(aggregator.setup(info, known))


def tree_norm(tree) -> jax.Array:
  """The L2 norm of all leaves of ``tree`` taken as one flat vector."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(tree)))


def flat_updates(updates) -> jax.Array:
  """``[slots, D]``: each slot's whole update (leading axis) as one float32 vector."""
  return jnp.concatenate([a.reshape(a.shape[0], -1).astype(jnp.float32)
                          for a in jax.tree.leaves(updates)], axis=1)


def unflat_update(updates, flat_one):
  """A flat ``[D]`` vector back into one update shaped like a slot of ``updates``."""
  leaves, treedef = jax.tree.flatten(updates)
  out, start = [], 0
  for a in leaves:
    size = a[0].size
    out.append(flat_one[start:start + size].reshape(a.shape[1:]).astype(a.dtype))
    start += size
  return jax.tree.unflatten(treedef, out)


def weighted_sums(updates, weights, mask) -> StreamSums:
  """The stream reduction of stacked updates (leading axis = clients)."""
  w = jnp.where(mask, weights.astype(jnp.float32), 0.0)
  keep = lambda a: jnp.where(mask.reshape(-1, *([1] * (a.ndim - 1))), a, 0.0)
  return StreamSums(jax.tree.map(lambda a: jnp.tensordot(w, keep(a), axes=1), updates),
                    jnp.sum(w), jnp.sum(mask.astype(jnp.float32)))


def aggregate(aggregator: Aggregator, client_updates, weights, *, key=None, mask=None,
              state=None, client_states=None, expected_clients=None, return_state=False):
  """Applies ``aggregator`` to a stacked batch of client updates, outside any simulation.

  This is how a rule of one's own is unit-tested: the same three stages the engine runs
  (per-client transform, reduction, server transform), on plain arrays.

  Args:
    aggregator: an :class:`Aggregator`.
    client_updates: a pytree whose leaves have a leading client axis ``[clients, ...]``.
    weights: ``[clients]`` weights of the reduction (``n_k``, or ones).
    key: the PRNG key (needed by randomized rules; default ``jax.random.key(0)``).
    mask: ``[clients]`` booleans, ``False`` for slots to ignore (default all ``True``).
    state: the aggregator state (default ``aggregator.init`` of one client's update).
    client_states: stacked per-client states (default ``init_client_state`` for each client).
    expected_clients: the expected cohort size an aggregator with ``setup`` is specialized to
      (DP's fixed denominator; default the number of clients given).
    return_state: also return the aggregator's new state (e.g. an adapted clip norm).

  Returns:
    The aggregate, a pytree like one client's update (and the new state with ``return_state``).
  """
  leaves = jax.tree.leaves(client_updates)
  if not leaves or any(jnp.ndim(a) < 1 for a in leaves):
    raise ValueError("client_updates must be a pytree of arrays with a leading client axis")
  num = leaves[0].shape[0]
  if any(a.shape[0] != num for a in leaves):
    raise ValueError(f"client_updates leaves disagree on the number of clients: "
                     f"{sorted({a.shape[0] for a in leaves})}")
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (num,):
    raise ValueError(f"weights must have shape ({num},), got {weights.shape}")
  mask = jnp.ones(num, bool) if mask is None else jnp.asarray(mask, bool)
  expected = num if expected_clients is None else expected_clients
  aggregator = prepare(aggregator, CohortInfo(expected, num, num))
  if aggregator.weighting == "uniform":
    weights = jnp.ones(num, jnp.float32)
  key = jax.random.key(0) if key is None else key
  one = jax.tree.map(lambda a: a[0], client_updates)
  state = aggregator.init(one) if state is None else state
  client_key, reduce_key, server_key = jax.random.split(key, 3)
  if aggregator.client is not None:
    if client_states is None and aggregator.init_client_state is not None:
      client_states = jax.vmap(lambda _: aggregator.init_client_state(one))(jnp.arange(num))
    keys = jax.random.split(client_key, num)
    client_updates, _ = jax.vmap(lambda u, s, k: aggregator.client(u, s, state, key=k))(
        client_updates, client_states, keys)
  if aggregator.reduction == "stream":
    result = aggregator.finalize(weighted_sums(client_updates, weights, mask), state)
  else:
    result = aggregator.reduce(client_updates, weights, mask, state, key=reduce_key)
  if aggregator.server is not None:
    result, state = aggregator.server(result, state, key=server_key)
  return (result, state) if return_state else result
