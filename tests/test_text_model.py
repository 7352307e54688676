"""The Shakespeare next-character LSTM: size, shapes, padding, vmap, id checks, end-to-end run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.data import DataError
from fedjax_sim.models import num_params, shakespeare_lstm


def _count(**kwargs) -> int:
  model = shakespeare_lstm(**kwargs)
  return num_params(jax.eval_shape(model.init, jax.random.key(0)))


@pytest.mark.parametrize("kwargs,expected", [
    ({}, 818_402),                                      # pad + LEAF's 80 characters + OOV
    ({"vocab_size": 80}, 817_872),                      # LEAF's own model
    ({"vocab_size": 90}, 820_522),                      # FedJAX's create_lstm_model (86 + 4)
    ({"vocab_size": 258, "peepholes": True}, 866_578),  # the paper's stated count
])
def test_parameter_counts(kwargs, expected):
  assert _count(**kwargs) == expected
  v, e, h = kwargs.get("vocab_size", 82), 8, 256
  formula = v * e + 4 * (e + h + 1) * h + 4 * (h + h + 1) * h + (h + 1) * v
  assert expected == formula + (2 * 3 * h if kwargs.get("peepholes") else 0)


def _ids(rng, n, vocab, length=80):
  return rng.integers(1, vocab, size=(n, length)).astype(np.int32)


# One small model and one compiled apply shared by the tests below (compiling dominates their time).
SMALL = shakespeare_lstm(vocab_size=12, hidden=16)
SMALL_PARAMS = SMALL.init(jax.random.key(0))
small_apply = jax.jit(SMALL.apply)


def test_output_shape_and_padding_is_skipped():
  x = _ids(np.random.default_rng(0), 5, 12)
  assert small_apply(SMALL_PARAMS, x).shape == (5, 12)
  # Right or left padding gives the prediction of the unpadded window.
  any_length = shakespeare_lstm(vocab_size=12, hidden=16, seq_len=None)
  short = jax.jit(any_length.apply)(SMALL_PARAMS, x[:, :50])
  right = x.copy(); right[:, 50:] = 0
  left = np.concatenate([np.zeros((5, 30), np.int32), x[:, :50]], axis=1)
  np.testing.assert_allclose(small_apply(SMALL_PARAMS, right), short, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(small_apply(SMALL_PARAMS, left), short, rtol=1e-5, atol=1e-6)


def test_vmap_over_clients_matches_a_loop():
  model = shakespeare_lstm(vocab_size=20, hidden=16)
  params = model.init(jax.random.key(1))
  rng = np.random.default_rng(1)
  x = _ids(rng, 3 * 4, 20).reshape(3, 4, 80)
  x[0, 1, :20] = 0  # some padding
  y = rng.integers(0, 20, size=(3, 4)).astype(np.int32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
  grad = jax.grad(model.loss)
  batched = jax.jit(jax.vmap(grad, in_axes=(None, 0, 0, 0)))(params, x, y, mask)
  for c in range(3):
    single = jax.jit(grad)(params, x[c], y[c], mask[c])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[c], b, rtol=1e-4, atol=1e-6),
                 batched, single)


def test_bad_inputs_are_named():
  x = _ids(np.random.default_rng(2), 5, 12)
  x[1, 7] = 12
  with pytest.raises(ValueError, match=r"character id 12 is outside \[0, 12\)"):
    SMALL.apply(SMALL_PARAMS, x)
  negative = x.copy(); negative[1, 7] = 1; negative[3, 0] = -1
  with pytest.raises(ValueError, match=r"character id -1 is outside"):
    SMALL.apply(SMALL_PARAMS, negative)
  x[3, 0] = -1
  # Inside jit the values cannot be checked: rows with a bad id become NaN, the others do not.
  out = small_apply(SMALL_PARAMS, x)
  bad = np.isin(np.arange(5), [1, 3])
  assert np.all(np.isnan(out[bad])) and np.all(np.isfinite(out[~bad]))
  with pytest.raises(TypeError, match="integer character ids"):
    SMALL.apply(SMALL_PARAMS, x.astype(np.float32))
  with pytest.raises(ValueError, match=r"shape \[batch, 80\]"):
    SMALL.apply(SMALL_PARAMS, x[:, :40])


def _text_data(rng, vocab, num_clients=4, per_client=12):
  """Next id = (last id + 1) mod vocab, skipping padding; some windows right-padded."""
  xs, ys = [], []
  for _ in range(num_clients):
    x = _ids(rng, per_client, vocab)
    lengths = rng.integers(60, 81, size=per_client)
    for i, n in enumerate(lengths):
      x[i, n:] = 0
    last = x[np.arange(per_client), lengths - 1]
    xs.append(x)
    ys.append(last % (vocab - 1) + 1)
  return fs.FederatedData.from_arrays(xs, ys)


def test_simulate_end_to_end_on_character_ids():
  vocab = 10
  train = _text_data(np.random.default_rng(3), vocab)
  assert train.x.dtype.kind == "i"
  model = shakespeare_lstm(vocab_size=vocab, hidden=16)
  algo = fs.algorithms.fedavg(client_lr=1.0, local_epochs=3, batch_size=4)
  res = fs.simulate(algo, model, train, rounds=2, seed=0)
  losses = res.history["train_loss"]
  assert len(losses) == 2 and all(np.isfinite(losses))
  initial = float(jax.jit(model.loss)(model.init(jax.random.fold_in(jax.random.key(0), 0)),
                                      jnp.asarray(train.x), jnp.asarray(train.y)))
  assert losses[1] < losses[0] < initial
  assert 0.0 <= res.history["train_accuracy"][-1] <= 1.0


def test_simulate_rejects_data_that_does_not_fit():
  model = shakespeare_lstm(vocab_size=10, hidden=8)
  algo = fs.algorithms.fedavg(batch_size=4)
  short = fs.FederatedData.from_arrays([np.ones((3, 40), np.int32)], [np.array([1, 2, 3])])
  with pytest.raises(DataError, match="does not fit model"):
    fs.simulate(algo, model, short, rounds=1)
  floats = fs.FederatedData.from_arrays([np.ones((3, 80), np.float32)], [np.array([1, 2, 3])])
  with pytest.raises(DataError, match="integer character ids"):
    fs.simulate(algo, model, floats, rounds=1)
  labels = fs.FederatedData.from_arrays([np.ones((3, 80), np.int32)], [np.array([1, 2, 10])])
  with pytest.raises(DataError, match=r"labels must lie in \[0, 10\)"):
    fs.simulate(algo, model, labels, rounds=1)
