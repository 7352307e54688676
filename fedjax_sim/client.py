"""One client's local training: the mini-batch schedule, the epoch shuffles, the ``lax.scan``.

Everything here is written for a single client and vmapped over a chunk of the cohort by
:mod:`fedjax_sim.engine`. Shapes are static per *size bucket* (see :class:`BucketShape`); a client
smaller than its bucket's largest runs masked steps, and a masked step leaves its state unchanged.

Schedule (McMahan et al. 2017, Algorithm 1): a client with ``n`` examples and batch size ``B`` takes
``spe = ⌈n / B⌉`` steps per epoch and ``E · spe`` steps per round (or ``H`` with ``local_steps``);
step ``t`` uses epoch ``e = t // spe`` and batch ``j = t mod spe``, i.e. positions
``j·B … j·B + B − 1`` of that epoch's permutation, of which only those ``< n`` are real (the last
batch is smaller). The gradient is the mean over the batch's real examples.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fedjax_sim.algorithms import Algorithm, ClientContext, optimizer_update


class BucketShape(NamedTuple):
  """Static shapes shared by every client of one size bucket.

  Attributes:
    max_examples: ``L``, the largest client in the bucket (length of each epoch permutation).
    batch: static batch width (``B``, or ``L`` for full-batch training).
    num_steps: ``S``, the largest per-round step count in the bucket (scan length).
    num_epochs: permutations drawn per client and round (``E``, or enough epochs to cover ``H``).
    equal_steps: every client of the bucket takes exactly ``num_steps`` steps, so no step needs
      masking (empty cohort slots still run, and the round discards them).
  """
  max_examples: int
  batch: int
  num_steps: int
  num_epochs: int
  equal_steps: bool = False


def steps_per_epoch(num_examples, batch_size: int | None):
  """``⌈n / B⌉`` (1 for full batch); works on ints and NumPy/JAX integer arrays."""
  if batch_size is None:
    return num_examples * 0 + 1
  return (num_examples + batch_size - 1) // batch_size


def num_local_steps(num_examples, algo: Algorithm):
  """Local steps a client with ``num_examples`` examples takes in one round."""
  if algo.local_steps is not None:
    return num_examples * 0 + algo.local_steps
  return algo.local_epochs * steps_per_epoch(num_examples, algo.batch_size)


def bucket_shape(num_examples: np.ndarray, algo: Algorithm,
                 variable_steps: bool = False) -> BucketShape:
  """The static shapes that fit every client size in ``num_examples``.

  ``variable_steps``: clients may stop early (partial stragglers), so steps must be masked.
  """
  largest, smallest = int(num_examples.max()), int(num_examples.min())
  batch = largest if algo.batch_size is None else algo.batch_size
  steps = int(num_local_steps(largest, algo))
  if algo.local_steps is None:
    epochs = algo.local_epochs
  else:  # the smallest client cycles through the most epochs
    epochs = -(-algo.local_steps // int(steps_per_epoch(smallest, algo.batch_size)))
  equal = steps == int(num_local_steps(smallest, algo)) and not variable_steps
  return BucketShape(largest, batch, steps, epochs, equal)


# Populations whose largest client has more examples than this shuffle by sorting random keys.
SORT_SHUFFLE_ABOVE = 256


def shuffle_method(largest_client: int) -> str:
  """``"fisher_yates"`` or ``"sort"``, chosen once per population (never per bucket, so that
  bucketing cannot change a client's permutation).

  XLA:CPU cannot update the Fisher–Yates array in place (each of the ``L − 1`` swaps gathers and
  scatters the same buffer, and XLA copies it), so its cost grows like ``L² · columns``: for
  ``L = 64`` it is 3× faster than sorting (W1: 37 vs 110 ms for 10,000 clients), for ``L = 3049``
  7× slower (2.8 s vs 0.38 s for 480 client-epochs; measured in docs/design.md).
  """
  return "sort" if largest_client > SORT_SHUFFLE_ABOVE else "fisher_yates"


def epoch_orders(keys: jax.Array, num_examples: jax.Array, shape: BucketShape,
                 shuffle: bool, method: str = "fisher_yates") -> jax.Array:
  """Per-client, per-epoch example orders, ``[clients, num_epochs, max_examples]`` int32.

  Row ``[c, e, :n_c]`` is a random permutation of ``0 … n_c − 1`` drawn from ``keys[c]`` alone (so
  it does not depend on which other clients share the chunk); entries past ``n_c`` are never read.
  ``method`` (see :func:`shuffle_method`): ``"fisher_yates"``, a pass vectorised over all clients
  and epochs, exactly uniform; or ``"sort"``, a stable argsort of 32-bit random keys (uniform up
  to ties, which have probability about ``n² / 2³³`` per epoch and are broken by position).
  """
  length = shape.max_examples
  if not shuffle or length == 1:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                            (keys.shape[0], shape.num_epochs, length))
  return orders_from_draws(epoch_draws(keys, shape, method), num_examples, method)


def epoch_draws(keys: jax.Array, shape: BucketShape, method: str = "fisher_yates") -> jax.Array:
  """The random numbers :func:`orders_from_draws` turns into epoch orders, ``[clients,
  num_epochs, max_examples]``: 32 random bits per position (``"sort"``) or uniforms in ``[0, 1)``
  (``"fisher_yates"``), epoch ``e`` of client ``c`` from ``fold_in(keys[c], e)``. With JAX's
  partitionable threefry (the default) they are prefix-stable: the first ``L'`` positions drawn
  at width ``L > L'`` equal those drawn at width ``L'``."""
  length, epochs = shape.max_examples, shape.num_epochs
  if method == "sort":
    one = lambda k, e: jax.random.bits(jax.random.fold_in(k, e), (length,))
  else:
    one = lambda k, e: jax.random.uniform(jax.random.fold_in(k, e), (length,))
  return jax.vmap(lambda k: jax.vmap(lambda e: one(k, e))(jnp.arange(epochs)))(keys)


def stable_argsort_bits(bits: jax.Array, packed: bool | None = None) -> jax.Array:
  """``jnp.argsort(bits, axis=-1, stable=True)`` of ``uint32`` keys, as int32.

  ``packed`` (default: on the CPU backend) computes it as one sort of the unique 64-bit keys
  ``bits · 2³² + position`` (ties in ``bits`` fall back on the position, as a stable argsort's do,
  so the result is the same permutation). XLA:CPU sorts a single operand with a plain
  ``std::sort``, whereas an argsort sorts a (key, index) pair through a compiled comparator called
  per comparison: 3049-wide rows sort about 5× faster. The 64-bit keys exist only inside this
  function (``jax.enable_x64`` for its trace). Other backends keep the argsort (TPUs emulate
  64-bit integers, and neither GPU nor TPU speed was measured); both give the same permutation.
  """
  if packed is None:
    packed = jax.default_backend() == "cpu"
  if not packed:
    return jnp.argsort(bits, axis=-1, stable=True).astype(jnp.int32)
  axis = bits.ndim - 1
  with jax.enable_x64(True):
    keys = ((bits.astype(jnp.uint64) << jnp.uint64(32))
            | lax.broadcasted_iota(jnp.uint64, bits.shape, axis))
    keys = lax.sort(keys, dimension=axis, is_stable=False)  # unique keys: stability is moot
    return (keys & jnp.uint64(0xFFFFFFFF)).astype(jnp.int32)


def orders_from_draws(draws: jax.Array, num_examples: jax.Array,
                      method: str = "fisher_yates") -> jax.Array:
  """Epoch orders ``[clients, num_epochs, L]`` from :func:`epoch_draws` ``[clients, num_epochs,
  L]`` (see :func:`epoch_orders`)."""
  num_clients, epochs, length = draws.shape
  if method == "sort":
    def one(bits, n):
      bits = jnp.where(jnp.arange(length) < n, bits, jnp.uint32(0xFFFFFFFF))
      return stable_argsort_bits(bits)
    return jax.vmap(one)(draws, num_examples.astype(jnp.int32))
  # u[i, c*E + e] drives the swap at position i; layout [L, columns] keeps rows contiguous.
  # Epoch e of a client draws from fold_in(key, e); with JAX's partitionable threefry (the default)
  # draws are prefix-stable, so a client's permutation depends on u[:n] only, not on L or on how
  # many epochs its bucket draws: bucketing does not change results.
  u = jnp.transpose(draws, (2, 0, 1)).reshape(length, num_clients * epochs)
  n = jnp.repeat(num_examples.astype(jnp.int32), epochs)
  cols = jnp.arange(num_clients * epochs)
  identity = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (num_clients, epochs, length))
  orders = identity.reshape(num_clients * epochs, length).T  # [L, cols]

  def swap(t, orders):
    i = length - 1 - t
    j = jnp.minimum((u[i] * (i + 1)).astype(jnp.int32), i)
    j = jnp.where(i < n, j, i)  # positions past n stay put
    at_i, at_j = orders[i], orders[j, cols]
    return orders.at[j, cols].set(at_i).at[i].set(at_j)

  # Unrolling 8× halves the time for wide problems (10,000 clients × 64: 40 → 20 ms) but adds
  # about a second of compilation per bucket, which narrow buckets never win back.
  unroll = 8 if num_clients * epochs >= 1024 else 1
  orders = lax.fori_loop(0, length - 1, swap, orders, unroll=unroll)
  return orders.T.reshape(num_clients, epochs, length)


class ClientJob(NamedTuple):
  """One client's inputs to a round (each field gains a leading axis when vmapped over a chunk).

  Attributes:
    offset: first row of the client in the population's flat arrays.
    num_examples: ``n``; ``0`` marks an empty slot (every step masked).
    num_steps: local steps this client takes this round (``E·⌈n/B⌉``, ``H``, fewer for a straggler).
    orders: ``[num_epochs, max_examples]`` example order per epoch (see :func:`epoch_orders`).
    label_map: ``[num_classes]``, the label each class is trained as (data poisoning), or ``None``.
    key: the key of a model's training-mode randomness (dropout; step ``t`` uses
      ``fold_in(key, t)``), or ``None`` for models without any (see :func:`step_key_of`).
  """
  offset: jax.Array
  num_examples: jax.Array
  num_steps: jax.Array
  orders: jax.Array
  label_map: jax.Array | None = None
  key: jax.Array | None = None


# ``fold_in(client key, DROPOUT_STREAM)`` is a client's dropout key; its epoch orders fold in the
# epoch numbers 0, 1, ..., which never reach this value.
DROPOUT_STREAM = 1 << 30


def step_key_of(client_key: jax.Array) -> jax.Array:
  """The key whose ``fold_in(., t)`` drives local step ``t``'s dropout."""
  return jax.random.fold_in(client_key, DROPOUT_STREAM)


def local_step(model, algo: Algorithm, shape: BucketShape, x_all: jax.Array, y_all: jax.Array,
               carry, t: jax.Array, job: ClientJob, context: ClientContext):
  """Local step ``t`` of one client: ``carry = (params, opt_state)`` → the next carry.

  The step's batch holds positions ``j·B … j·B + B − 1`` of epoch ``t // spe``'s order; its mean-loss
  gradient (or the gradient of ``algo.hooks.local_loss``) goes through ``algo.hooks.gradient``
  (e.g. FedProx's proximal term), then the client optimizer, then ``algo.hooks.update_scale``. Steps ``t ≥ job.num_steps`` change nothing.

  Args:
    model: the :class:`~fedjax_sim.models.Model`.
    algo: the algorithm (batch size, client optimizer, hooks).
    shape: the bucket's static shapes.
    x_all, y_all: the population's flat example arrays.
    carry: ``(params, client_opt_state)``.
    t: the step index (0-based).
    job: the client's :class:`ClientJob`.
    context: the client's :class:`~fedjax_sim.algorithms.ClientContext`.
  """
  w, opt_state = carry
  n = job.num_examples
  spe = jnp.maximum(steps_per_epoch(n, algo.batch_size), 1)
  epoch, j = t // spe, t % spe
  pos = j * shape.batch + jnp.arange(shape.batch, dtype=jnp.int32)
  active = t < job.num_steps
  real = (pos < n) & active
  local = job.orders[jnp.minimum(epoch, shape.num_epochs - 1),
                     jnp.minimum(pos, shape.max_examples - 1)]
  rows = job.offset + jnp.where(real, local, 0)
  hooks = algo.hooks
  x, y = x_all[rows], y_all[rows]
  if job.label_map is not None:
    y = job.label_map[y]
  updated = {}
  if hooks.local_loss is not None:
    grads = jax.grad(lambda p: hooks.local_loss(model, p, (x, y, real), context))(w)
  elif model.train_apply is not None:
    grads, updated = jax.grad(lambda p: model.train_loss(p, x, y, real,
                                                         key=jax.random.fold_in(job.key, t)),
                              has_aux=True)(w)
  else:
    grads = jax.grad(model.loss)(w, x, y, real)
  if hooks.gradient is not None:
    grads = hooks.gradient(grads, w, context)
  updates, new_opt_state = optimizer_update(algo.client_optimizer, grads, opt_state, w,
                                            context.hparams)
  if hooks.update_scale is not None:
    scale = hooks.update_scale(context.round)
    updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
  new_w = optax.apply_updates(w, updates)
  if updated:  # batch statistics: the forward pass's, whatever the optimizer did to them
    new_w = {**new_w, **{c: jax.tree.map(lambda a, b: a.astype(b.dtype), v, w[c])
                         for c, v in updated.items()}}
  if shape.equal_steps:
    return new_w, new_opt_state
  keep = lambda new, old: jnp.where(active, new, old)
  return jax.tree.map(keep, new_w, w), jax.tree.map(keep, new_opt_state, opt_state)


def local_train(model, algo: Algorithm, shape: BucketShape, params, x_all: jax.Array,
                y_all: jax.Array, job: ClientJob, context: ClientContext,
                num_steps: jax.Array | None = None, unroll: bool | int = 1):
  """Runs one client's local training from ``params``; returns its final params.

  Args:
    num_steps: the loop's trip count, shared by the vmapped chunk (the largest ``job.num_steps``
      of its clients). A chunk whose clients are all small, or a short Local-SGD round, then runs
      only the steps it needs instead of the bucket's static ``shape.num_steps``. ``None`` (or
      ``unroll``) runs the static count with ``lax.scan``.
    unroll: scan unrolling (convolutions on CPU).
  """
  def step(t, carry):
    return local_step(model, algo, shape, x_all, y_all, carry, t, job, context)
  carry = (params, algo.client_optimizer.init(params))
  if num_steps is None or unroll is True:
    carry, _ = lax.scan(lambda c, t: (step(t, c), None), carry, jnp.arange(shape.num_steps),
                        unroll=unroll)
  else:
    carry = lax.fori_loop(0, jnp.minimum(num_steps, shape.num_steps), step, carry)
  return carry[0]


def full_gradient(model, x_all: jax.Array, y_all: jax.Array, offset: jax.Array,
                  num_examples: jax.Array, max_examples: int, params, width: int = 256):
  """``∇F_k(params)``: the gradient of the client's mean loss over all its ``n`` examples.

  Scans the client's rows in slices of ``width`` (the sum of per-slice loss sums, divided by ``n``),
  so memory does not grow with the client's size. The model's state collections (batch
  statistics, :attr:`~fedjax_sim.models.Model.state_collections`) are not trained by gradients:
  their entries are zero.
  """
  width = min(width, max_examples)
  num_slices = -(-max_examples // width)
  frozen = lambda p: ({**p, **{c: lax.stop_gradient(p[c]) for c in model.state_collections}}
                      if model.state_collections else p)

  def body(acc, i):
    pos = i * width + jnp.arange(width, dtype=jnp.int32)
    real = pos < num_examples
    rows = offset + jnp.where(real, pos, 0)
    total = lambda p: jnp.sum(model.per_example_loss(frozen(p), x_all[rows], y_all[rows])
                              * real.astype(jnp.float32))
    return jax.tree.map(jnp.add, acc, jax.grad(total)(params)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  sums, _ = lax.scan(body, zeros, jnp.arange(num_slices))
  return jax.tree.map(lambda g: g / jnp.maximum(num_examples, 1).astype(g.dtype), sums)
