"""Local (personal) parameters: FedPer's personal layers and FedBN's local batch normalization."""

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import personal
from tests.helpers import assert_equal, classification_clients
from tests.test_data_models import _DropoutBN


def _bn_model(x):
  return fs.models.from_linen(_DropoutBN.module(), x, "multiclass")


def test_local_mask_presets_patterns_and_errors():
  x = np.zeros((2, 5), np.float32)
  params = _bn_model(x).init(jax.random.key(0))
  paths = personal.leaf_paths(params)
  chosen = lambda which: [p for p, m in zip(paths, personal.local_mask(params, which)) if m]
  assert chosen("batch_norm") == ["batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var",
                                  "params/BatchNorm_0/bias", "params/BatchNorm_0/scale"]
  assert chosen("batch_stats") == ["batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"]
  assert chosen(["params/Dense_1/*"]) == ["params/Dense_1/bias", "params/Dense_1/kernel"]
  assert chosen(lambda p: p.endswith("kernel")) == ["params/Dense_0/kernel",
                                                    "params/Dense_1/kernel"]
  assert personal.local_mask(params, None) is None
  mask = personal.local_mask(params, "batch_norm")
  local = personal.split(params, mask)
  assert_equal(personal.merge(params, local, mask), params)
  with pytest.raises(ValueError, match="selects no parameter.*params/Dense_0/kernel"):
    personal.local_mask(params, ["head/*"])
  with pytest.raises(ValueError, match="selects every parameter"):
    personal.local_mask(params, ["*"])
  with pytest.raises(ValueError, match="must be one of batch_norm, batch_stats.*'fedbn'"):
    personal.local_mask(params, "fedbn")
  with pytest.raises(ValueError, match="no batch statistics"):
    personal.local_mask(fs.models.mlp(5, (4,), 3).init(jax.random.key(0)), "batch_norm")
  # What cannot run with local parameters is named before anything compiles.
  data = fs.FederatedData.from_arrays([x, x], [np.zeros(2, np.int32)] * 2)
  model = fs.models.mlp(5, (4,), 3)
  with pytest.raises(ValueError, match="algorithm 'scaffold'"):
    fs.simulate(fs.algorithms.scaffold(), model, data, rounds=1, local_params=["1/*"])
  with pytest.raises(ValueError, match="dissimilarity"):
    fs.simulate(fs.algorithms.fedavg(), model, data, rounds=1, local_params=["1/*"],
                dissimilarity=True)
  other = fs.FederatedData.from_arrays([x], [np.zeros(2, np.int32)])
  with pytest.raises(ValueError, match="test must hold a held-out split.*1 clients.*has 2"):
    fs.simulate(fs.algorithms.fedavg(), model, data, test=other, rounds=1, local_params=["1/*"])


def _split(xs, ys, cut):
  return (fs.FederatedData.from_arrays([x[:cut] for x in xs], [y[:cut] for y in ys]),
          fs.FederatedData.from_arrays([x[cut:] for x in xs], [y[cut:] for y in ys]))


def test_fedper_personal_head_beats_the_global_model_on_conflicting_labels():
  """Half the clients label every example one class further: no global model fits both halves,
  a personal output layer does. The server's copy of the personal layer never moves, and it
  never travels (fewer bytes)."""
  xs, ys = classification_clients([40] * 12, seed=1)
  ys = [(y + k % 2) % 3 for k, y in enumerate(ys)]
  train, test = _split(xs, ys, 30)
  model = fs.models.mlp(5, (16,), 3)
  algo = fs.algorithms.fedavg(client_lr=0.1, local_epochs=2, batch_size=10)
  run = lambda local: fs.simulate(algo, model, train, test=test, rounds=30, clients_per_round=6,
                                  seed=0, local_params=local)
  fedavg, fedper = run(None), run(["1/*"])
  assert fedavg.history["test_accuracy"][-1] < 0.45
  assert fedper.history["test_accuracy"][-1] > fedavg.history["test_accuracy"][-1] + 0.2
  init = model.init(jax.random.fold_in(jax.random.key(0), 0))
  assert_equal(fedper.params[1], init[1])
  assert fedper.history["bytes_up"][-1] == 6 * (5 * 16 + 16) * 4
  heads = np.asarray(fedper.state.local_clients[1])  # [clients, 16, 3] kernels
  assert np.std(heads, axis=0).mean() > 1e-2  # each client trained its own


def test_fedbn_keeps_batch_norm_local_and_evaluates_each_client_with_its_own():
  """Feature-shifted clients (FedBN's setting). After two rounds: every client that trained holds
  its own batch-norm layer, the others still hold the initial one, the server's copy never moved,
  and the test accuracy is each client's own model on its own held-out examples."""
  rng = np.random.default_rng(0)
  xs, ys = classification_clients([24] * 8, seed=2)
  xs = [x * rng.uniform(0.2, 5) + rng.normal(0, 3, size=5).astype(np.float32) for x in xs]
  train, test = _split(xs, ys, 16)
  model = _bn_model(xs[0])
  result = fs.simulate(fs.algorithms.fedavg(client_lr=0.1, batch_size=8), model, train,
                       test=test, rounds=2, clients_per_round=3, seed=4, local_params="batch_norm")
  mask = personal.local_mask(result.params, "batch_norm")
  init = model.init(jax.random.fold_in(jax.random.key(4), 0))
  assert_equal(personal.split(result.params, mask), personal.split(init, mask))
  from tests.helpers import cohort
  trained = set(cohort(4, 1, 8, 3)) | set(cohort(4, 2, 8, 3))
  correct = []
  for k in range(8):
    local_k = [np.asarray(a[k]) for a in result.state.local_clients]
    moved = any(np.any(a != b) for a, b in zip(local_k, personal.split(init, mask)))
    assert moved == (k in trained), k
    own = personal.merge(result.params, local_k, mask)
    correct.append(np.argmax(model.apply(own, xs[k][16:]), -1) == ys[k][16:])
  np.testing.assert_allclose(result.history["test_accuracy"][-1], np.mean(correct), atol=1e-6)
