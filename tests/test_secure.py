"""Simulated secure aggregation (``fedjax_sim.aggregators.secure``): the masked vectors say nothing
about the updates, the masks cancel (with dropouts too), saturation is reported."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import aggregators as agg
from fedjax_sim.aggregators import secure


def _updates(num, dim=40, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(scale * rng.normal(size=(num, dim)), jnp.float32)}


@pytest.mark.parametrize("bits,frac_bits,neighbors", [(32, 16, None), (16, 8, None), (32, 12, 2)])
def test_secure_mean_is_the_plain_mean_to_fixed_point_precision_with_dropouts(bits, frac_bits,
                                                                              neighbors):
  updates = _updates(7)
  returned = jnp.array([1, 0, 1, 1, 0, 1, 1], bool)  # two parties dropped after masking
  got, state = agg.aggregate(agg.secure_mean(bits, frac_bits, neighbors), updates, jnp.ones(7),
                             mask=returned, key=jax.random.key(3), return_state=True)
  want = np.asarray(updates["w"])[np.asarray(returned)].mean(0)
  # each party rounds to the nearest 2^−f: the mean is off by at most half a step
  assert np.abs(np.asarray(got["w"]) - want).max() <= 0.5 * 2.0 ** -frac_bits + 1e-6
  assert float(state["saturated"]) == 0


def test_masked_vectors_are_uncorrelated_with_the_updates():
  """Each party's masked vector against its fixed-point update over 20,000 coordinates: the
  correlation is within 6/√n of zero (false-failure rate ~2e-9 per party) and the masked values
  spread over the whole field (mean within 1 % of 2^31)."""
  flat = jnp.asarray(np.random.default_rng(1).normal(size=(5, 20_000)), jnp.float32)
  masked, _ = secure.masked_updates(flat, jax.random.key(0), 32, 16)
  masked = np.asarray(masked, np.float64)
  for party in range(5):
    r = np.corrcoef(masked[party], np.asarray(flat[party]))[0, 1]
    assert abs(r) < 6 / math.sqrt(flat.shape[1])
  assert masked.mean() == pytest.approx(2.0 ** 31, rel=0.01)


def test_the_server_recovers_the_field_sum_of_the_returned_parties():
  flat = jnp.asarray(np.random.default_rng(2).normal(size=(6, 30)), jnp.float32)
  returned = jnp.array([1, 1, 0, 1, 0, 1], bool)
  key = jax.random.key(5)
  for neighbors in (None, 2):
    masked, _ = secure.masked_updates(flat, key, 32, 16, neighbors)
    ints, _ = secure.encode(flat, 32, 16, 6)
    want = np.asarray(ints)[np.asarray(returned)].sum(0, dtype=np.uint64) % 2 ** 32
    got = np.asarray(secure.unmask_sum(masked, returned, key, 32, neighbors))
    np.testing.assert_array_equal(got, want.astype(np.uint32))


def test_saturated_coordinates_are_counted_not_wrapped():
  updates = _updates(4)
  huge = {"w": updates["w"].at[0, :3].set(1e6)}
  got, state = agg.aggregate(agg.secure_mean(16, 8), huge, jnp.ones(4), return_state=True)
  bound = secure.saturation_bound(16, 4) / 2 ** 8
  assert float(state["saturated"]) == 3
  want = np.clip(np.asarray(huge["w"]), -bound, bound).mean(0)
  assert np.abs(np.asarray(got["w"]) - want).max() <= 0.5 * 2.0 ** -8 + 1e-6


def test_bad_secure_options_are_named():
  for call, message in [(lambda: agg.secure_mean(bits=1), "bits must be an integer in 2..32"),
                        (lambda: agg.secure_mean(bits=40), "bits must be an integer in 2..32"),
                        (lambda: agg.secure_mean(bits=16, frac_bits=16), "frac_bits must be"),
                        (lambda: agg.secure_mean(neighbors=0), "neighbors must be a positive")]:
    with pytest.raises(ValueError, match=message):
      call()
