"""Update compression (``fedjax_sim.aggregators.compress``): each compressor against its
definition, unbiasedness, error feedback's bookkeeping and its effect on convergence, and the
reported bytes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators as agg
from helpers import classification_clients


def _one(rule, v, key=0, state=None):
  """One client's compressed update through the rule's client transform."""
  update = {"delta": {"w": jnp.asarray(v, jnp.float32)}, "message": None}
  if state is None and rule.init_client_state is not None:
    state = rule.init_client_state(update)
  out, state = rule.client(update, state, None, key=jax.random.key(key))
  return np.asarray(out["delta"]["w"]), state


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantization_is_unbiased_and_on_the_grid(bits):
  """4,000 draws of a 50-coordinate vector: every coordinate's mean within 6 standard errors
  (each draw's error is at most one grid step, so its sd is at most step/2; false-failure rate
  below 1e-7 over the 150 coordinates tested)."""
  v = np.random.default_rng(0).normal(size=50).astype(np.float32)
  rule = agg.quantize(bits)
  draw = jax.jit(jax.vmap(lambda k: rule.client({"delta": {"w": jnp.asarray(v)}, "message": None},
                                                None, None, key=k)[0]["delta"]["w"]))
  q = np.asarray(draw(jax.random.split(jax.random.key(1), 4000)))
  r = np.abs(v).max()
  step = 2 * r / (2 ** bits - 1)
  levels = -r + step * np.arange(2 ** bits)
  assert np.all(np.min(np.abs(q[..., None] - levels), axis=-1) < 1e-5 * r)
  assert np.all(np.abs(q.mean(0) - v) < 6 * (step / 2) / math.sqrt(len(q)))


def test_sparsifiers_and_sign_are_their_definitions():
  v = np.random.default_rng(2).normal(size=40).astype(np.float32)
  top, _ = _one(agg.top_k(0.1), v)
  keep = np.argsort(-np.abs(v))[:4]
  np.testing.assert_array_equal(np.flatnonzero(top), np.sort(keep))
  np.testing.assert_array_equal(top[keep], v[keep])
  rand, _ = _one(agg.random_k(0.25), v, key=3)
  kept = np.flatnonzero(rand)
  assert len(kept) == 10
  np.testing.assert_allclose(rand[kept], 4.0 * v[kept], rtol=1e-6)  # size/k: unbiased
  signed, _ = _one(agg.sign(), v)
  np.testing.assert_allclose(signed, np.sign(v) * np.abs(v).mean(), rtol=1e-6)


def test_error_feedback_sends_everything_eventually():
  """With error feedback the sent updates add up to the inputs minus the final residual."""
  rng = np.random.default_rng(4)
  rule = agg.top_k(0.1, error_feedback=True)
  state, sent, given = None, 0.0, 0.0
  for t in range(6):
    v = rng.normal(size=30).astype(np.float32)
    out, state = _one(rule, v, key=t, state=state)
    sent, given = sent + out, given + v
  residual = np.asarray(state[0]["delta"]["w"])
  np.testing.assert_allclose(sent + residual, given, rtol=1e-5, atol=1e-5)
  assert np.abs(residual).max() > 0


@pytest.fixture(scope="module")
def regression():
  xs, ys = classification_clients([30] * 8, num_features=20, seed=5)
  rng = np.random.default_rng(5)
  w = rng.normal(size=20)
  ys = [(x @ w).astype(np.float32) for x in xs]
  return fs.FederatedData.from_arrays(xs, ys), fs.models.linear_regression(20)


def test_error_feedback_makes_top_k_converge_and_bytes_follow_the_encoding(regression):
  """Linear regression with 5 % top-k: with error feedback the loss falls well below what top-k
  alone reaches in the same rounds; the traffic columns follow the encodings."""
  fd, model = regression
  algo = fs.algorithms.fedavg(client_lr=0.02, batch_size=10)
  run = lambda rule: fs.simulate(algo, model, fd, rounds=30, clients_per_round=4, seed=0,
                                 eval_every=30, aggregator=rule)
  plain, feedback = run(agg.top_k(0.05)), run(agg.top_k(0.05, error_feedback=True))
  assert feedback.history["train_loss"][-1] < 0.5 * plain.history["train_loss"][-1]
  # 20 weights + 1 bias: k = 1 of each leaf, 8 bytes each; the model is 21 float32
  assert feedback.history["bytes_up"] == [4 * (8 + 8)]
  assert feedback.history["bytes_down"] == [4 * 21 * 4]


def test_bad_compression_options_are_named():
  for call, message in [(lambda: agg.quantize(0), "bits must be an integer in 1..32, got 0"),
                        (lambda: agg.quantize(33), "bits must be an integer in 1..32, got 33"),
                        (lambda: agg.top_k(0.0), r"fraction must be in \(0, 1\], got 0.0"),
                        (lambda: agg.random_k(1.5), r"fraction must be in \(0, 1\], got 1.5")]:
    with pytest.raises(ValueError, match=message):
      call()
