"""Update compression as per-client transforms, composable with any aggregator:
``quantize(bits)``, ``top_k(fraction)``, ``random_k(fraction)`` and ``sign()``, each with an
``inner`` aggregator (default the mean) that receives the decompressed updates, and (except
``quantize``) optional **error feedback** (Stich et al. 2018; Karimireddy et al. 2019): each client
keeps a residual ``e`` on the device for the whole population, sends ``C(u + e)`` and keeps
``e ← u + e − C(u + e)``.

Each compressor acts on every leaf of the client's update (delta and algorithm message) with its
own key, and declares its encoding, from which the simulation reports ``bytes_up`` (bytes one client
sends, times the clients that returned) next to ``bytes_down`` (the float32 model, times the cohort):

* ``quantize(bits)``: per leaf, a float32 scale ``r = max|v|`` and ``bits`` bits per coordinate.
  Stochastic uniform quantization on ``2^bits`` levels spanning ``[−r, r]``, rounded up or down at
  random so that ``E[Q(v)] = v`` (QSGD-style, Alistarh et al. 2017, with the max-norm instead of the
  L2 norm as scale and no separate sign bit).
* ``top_k(fraction)``: per leaf the ``k = ⌈fraction·size⌉`` largest-magnitude coordinates, each a
  float32 value and an int32 index (8 bytes).
* ``random_k(fraction)``: ``k`` coordinates chosen at random (float32 values; indices follow from a
  4-byte seed). Without error feedback the kept values are scaled by ``size/k``, which makes it
  unbiased; with error feedback they are not (the residual carries the rest).
* ``sign()``: per leaf ``sign(v)·mean|v|`` (scaled sign, as in EF-signSGD): one bit per coordinate
  and a float32 scale.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim.aggregators._base import Aggregator, check
from fedjax_sim.aggregators.mean import mean

FLOAT_BYTES = 4


def dense_bytes(update) -> int:
  """Bytes of an uncompressed float32 update."""
  return FLOAT_BYTES * sum(a.size for a in jax.tree.leaves(update))


def _fraction(value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {value!r}")
  return float(value)


def _kept(size: int, fraction: float) -> int:
  return max(1, math.ceil(fraction * size))


def _per_leaf(fn, update, key):
  leaves, treedef = jax.tree.flatten(update)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [fn(a, k) for a, k in zip(leaves, keys)])


def _compressor(name: str, leaf_fn, leaf_bytes, error_feedback: bool, inner) -> Aggregator:
  """An aggregator that compresses each client's update with ``leaf_fn(leaf, key)`` (optionally
  with error feedback), then hands it to ``inner``."""
  inner = check(inner if inner is not None else mean())

  def client(update, client_state, state, *, key):
    own_key, inner_key = jax.random.split(key)
    residual, inner_state = client_state if error_feedback else (None, client_state)
    target = update if residual is None else jax.tree.map(jnp.add, update, residual)
    sent = _per_leaf(leaf_fn, target, own_key)
    if error_feedback:
      residual = jax.tree.map(jnp.subtract, target, sent)
    if inner.client is not None:
      sent, inner_state = inner.client(sent, inner_state, state, key=inner_key)
    return sent, ((residual, inner_state) if error_feedback else inner_state)

  def init_client_state(update):
    inner_state = (None if inner.init_client_state is None
                   else inner.init_client_state(update))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), update)
    return (zeros, inner_state) if error_feedback else inner_state

  needs_state = error_feedback or inner.init_client_state is not None
  setup = (None if inner.setup is None else lambda info, hparams: _compressor(
      name, leaf_fn, leaf_bytes, error_feedback, check(inner.setup(info, hparams))))
  return inner._replace(
      name=f"{name}({inner.name})", client=client,
      init_client_state=init_client_state if needs_state else None, setup=setup,
      encoded_bytes=lambda update: sum(leaf_bytes(a.size) for a in jax.tree.leaves(update)))


def stochastic_quantize(v, key, bits: int):
  """``v`` rounded at random to one of ``2^bits`` levels on ``[−max|v|, max|v|]``, unbiased."""
  r = jnp.max(jnp.abs(v))
  top = float(2 ** bits - 1)
  t = (v / jnp.maximum(r, 1e-30) + 1.0) * (top / 2)  # in [0, top]
  low = jnp.floor(t)
  level = low + (jax.random.uniform(key, v.shape) < t - low)
  return jnp.where(r > 0, (level * (2 / top) - 1.0) * r, 0.0).astype(v.dtype)


def quantize(bits: int, inner: Aggregator | None = None) -> Aggregator:
  """Stochastic uniform quantization of every update to ``bits`` bits per coordinate (unbiased).

  Args:
    bits: bits per coordinate, 1 … 32.
    inner: the aggregator of the dequantized updates (default the mean).
  """
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
    raise ValueError(f"bits must be an integer in 1..32, got {bits!r}")
  return _compressor(f"quantize{bits}", lambda a, k: stochastic_quantize(a, k, bits),
                     lambda size: FLOAT_BYTES + math.ceil(size * bits / 8), False, inner)


def top_k(fraction: float, error_feedback: bool = False,
          inner: Aggregator | None = None) -> Aggregator:
  """Top-k sparsification: the ``⌈fraction·size⌉`` largest-magnitude coordinates of every leaf.

  Args:
    fraction: the kept share of each leaf, in (0, 1].
    error_feedback: keep the unsent remainder per client and add it to the next update.
    inner: the aggregator of the sparse updates (default the mean).
  """
  fraction = _fraction(fraction)

  def leaf(a, key):
    del key
    flat = a.reshape(-1)
    _, idx = lax.top_k(jnp.abs(flat), _kept(flat.size, fraction))
    return jnp.zeros_like(flat).at[idx].set(flat[idx]).reshape(a.shape)
  return _compressor("top_k", leaf, lambda size: 2 * FLOAT_BYTES * _kept(size, fraction),
                     error_feedback, inner)


def random_k(fraction: float, error_feedback: bool = False,
             inner: Aggregator | None = None) -> Aggregator:
  """Random-k sparsification: ``⌈fraction·size⌉`` coordinates of every leaf chosen at random
  (scaled by ``size/k`` without error feedback, so that it is unbiased).

  Args:
    fraction: the kept share of each leaf, in (0, 1].
    error_feedback: keep the unsent remainder per client (no scaling then).
    inner: the aggregator of the sparse updates (default the mean).
  """
  fraction = _fraction(fraction)

  def leaf(a, key):
    flat = a.reshape(-1)
    k = _kept(flat.size, fraction)
    _, idx = lax.top_k(jax.random.bits(key, flat.shape), k)
    scale = 1.0 if error_feedback else flat.size / k
    return jnp.zeros_like(flat).at[idx].set(flat[idx] * scale).reshape(a.shape)
  return _compressor("random_k", leaf, lambda size: FLOAT_BYTES * (_kept(size, fraction) + 1),
                     error_feedback, inner)


def sign(error_feedback: bool = False, inner: Aggregator | None = None) -> Aggregator:
  """Scaled sign compression: every leaf becomes ``sign(v)·mean|v|``.

  Args:
    error_feedback: keep the unsent remainder per client (EF-signSGD).
    inner: the aggregator of the compressed updates (default the mean).
  """
  return _compressor("sign", lambda a, key: jnp.sign(a) * jnp.mean(jnp.abs(a)),
                     lambda size: FLOAT_BYTES + math.ceil(size / 8), error_feedback, inner)
