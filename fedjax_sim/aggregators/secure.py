"""``secure_mean``: secure aggregation (Bonawitz et al. 2017), simulated inside the compiled round.

Each round the cohort's slots are the parties ``0 … S − 1``. A party

1. encodes its update in fixed point, ``round(u · 2^f)``, saturated to ``±B`` with
   ``B = ⌊(2^(b−1) − 1) / S⌋`` so that no sum of ``S`` parties can leave the field of ``b``-bit
   two's-complement integers (a saturated coordinate is counted: ``history["saturated"]``);
2. adds pairwise masks mod ``2^b``: for every partner ``v`` in its neighbour set, ``+PRG(s_uv)``
   if ``v > u`` and ``−PRG(s_uv)`` if ``v < u``, with the pair's seed ``s_uv`` drawn from the
   round's aggregator key; the masks of every pair cancel in the sum. By default every other party
   is a partner (Bonawitz et al.'s complete graph, ``S − 1`` masks per party); ``neighbors=k``
   uses a ring of ``k`` partners (the sparse graphs of Bell et al. 2020, O(k) per party).

The server code (:func:`unmask_sum`) receives only the masked vectors of the parties that
returned. Parties that dropped after masking (and empty slots) leave their partners' masks
uncancelled; the server removes them with the dropped parties' pair seeds, which the protocol
recovers by secret sharing (here: recomputed from the round key, as the survivors' shares would
give them). The decoded sum divided by the number of parties that returned is the uniform mean,
exact to the fixed-point step ``2^−f`` per client. Weighting is uniform (as in DP-FedAvg).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim._checks import positive_int
from fedjax_sim.aggregators._base import Aggregator, flat_updates, unflat_update

_U32 = jnp.uint32


def _field_mask(bits: int):
  return _U32(0xFFFFFFFF if bits == 32 else (1 << bits) - 1)


def saturation_bound(bits: int, parties: int) -> int:
  """``B``: the largest fixed-point magnitude a party may send so that ``parties`` of them sum
  inside the signed ``bits``-bit range."""
  return ((1 << (bits - 1)) - 1) // parties


def encode(flat, bits: int, frac_bits: int, parties: int):
  """``(field elements uint32, saturated count)`` of float32 vectors ``[S, D]``."""
  bound = saturation_bound(bits, parties)
  scaled = jnp.round(flat * (2.0 ** frac_bits))
  saturated = jnp.sum(jnp.abs(scaled) > bound)
  ints = jnp.clip(scaled, -bound, bound).astype(jnp.int32)
  return lax.bitcast_convert_type(ints, _U32) & _field_mask(bits), saturated


def decode(field_sum, bits: int, frac_bits: int):
  """A field element (two's complement on ``bits`` bits) back to a float."""
  shift = _U32(32 - bits)
  signed = lax.bitcast_convert_type(field_sum << shift, jnp.int32) >> (32 - bits)
  return signed.astype(jnp.float32) / (2.0 ** frac_bits)


def _offsets(parties: int, neighbors: int | None):
  """Partner offsets ``j`` (party ``p`` pairs with ``(p + j) mod S``), symmetric so that each
  party is its partners' partner."""
  if neighbors is None or neighbors >= parties - 1:
    return list(range(1, parties))
  half = max(1, neighbors // 2)
  return sorted(set(range(1, half + 1)) | {parties - j for j in range(1, half + 1)})


def pair_masks(key, parties: int, dim: int, bits: int, neighbors, include):
  """``[S, D]``: each party's sum of signed pairwise masks over the partners where
  ``include[partner]`` (all partners: the masks a party adds; dropped partners only: what the
  server must remove)."""
  field = _field_mask(bits)
  p = jnp.arange(parties)

  def one_offset(total, j):
    q = (p + j) % parties
    lo, hi = jnp.minimum(p, q), jnp.maximum(p, q)
    prg = jax.vmap(lambda a, b: jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, a), b),
                                                (dim,), _U32))(lo, hi)
    signed = jnp.where((q > p)[:, None], prg, -prg)  # −x mod 2^32 for uint32
    return total + jnp.where(include[q][:, None], signed, _U32(0)), None

  total, _ = lax.scan(one_offset, jnp.zeros((parties, dim), _U32),
                      jnp.asarray(_offsets(parties, neighbors)))
  return total & field


def masked_updates(flat, key, bits: int, frac_bits: int, neighbors=None):
  """What the parties send: their fixed-point updates plus pairwise masks, mod ``2^bits``
  (``[S, D]`` uint32), and the saturated count."""
  parties, dim = flat.shape
  ints, saturated = encode(flat, bits, frac_bits, parties)
  masks = pair_masks(key, parties, dim, bits, neighbors, jnp.ones(parties, bool))
  return (ints + masks) & _field_mask(bits), saturated


def unmask_sum(masked, returned, key, bits: int, neighbors=None):
  """The server: the field sum of the returned parties' masked vectors, minus the uncancelled
  masks of their dropped partners (seeds recovered for the dropped parties only)."""
  parties, dim = masked.shape
  field = _field_mask(bits)
  total = jnp.sum(jnp.where(returned[:, None], masked, _U32(0)), axis=0, dtype=_U32)
  leftover = pair_masks(key, parties, dim, bits, neighbors, ~returned)
  leftover = jnp.sum(jnp.where(returned[:, None], leftover, _U32(0)), axis=0, dtype=_U32)
  return (total - leftover) & field


def secure_mean(bits: int = 32, frac_bits: int = 16, neighbors: int | None = None) -> Aggregator:
  """The uniform mean of the returned updates through simulated secure aggregation.

  Args:
    bits: the field is the integers mod ``2^bits`` (2 … 32).
    frac_bits: fixed-point fraction bits ``f`` (resolution ``2^−f``).
    neighbors: partners per party (``None``: all other parties).
  """
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
    raise ValueError(f"bits must be an integer in 2..32, got {bits!r}")
  if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits < bits:
    raise ValueError(f"frac_bits must be an integer in [0, bits), got {frac_bits!r}")
  if neighbors is not None:
    neighbors = positive_int("neighbors", neighbors)

  def init(update):
    del update
    return {"saturated": jnp.float32(0.0)}

  def reduce(updates, weights, mask, state, *, key):
    del weights, state
    flat = flat_updates(updates)
    masked, saturated = masked_updates(flat, key, bits, frac_bits, neighbors)
    field_sum = unmask_sum(masked, mask, key, bits, neighbors)  # the server sees `masked` only
    mean = decode(field_sum, bits, frac_bits) / jnp.maximum(jnp.sum(mask), 1)
    result = unflat_update(updates, mean)
    result[_SATURATED] = saturated.astype(jnp.float32)
    return result

  def server(aggregate, state, *, key):
    del key
    aggregate = dict(aggregate)
    return aggregate, {"saturated": aggregate.pop(_SATURATED)}

  return Aggregator(name="secure_mean", reduction="collect", init=init, reduce=reduce,
                    server=server, weighting="uniform", report=("saturated",))


_SATURATED = "secure_saturated"
