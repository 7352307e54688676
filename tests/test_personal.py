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


def _fedper_personal_head_beats_the_global_model(conflicting):
  """Half the clients label every example one class further: no global model fits both halves
  (the Ditto fixture's global model is FedAvg's, trained the same way), a personal output layer
  does. The server's copy of the personal layer never moves, and it never travels (fewer bytes)."""
  xs, ys, model, ditto, _ = conflicting
  train, test = _split(xs, ys, 30)
  algo = fs.algorithms.fedavg(client_lr=0.3, local_epochs=3, batch_size=None)
  fedper = fs.simulate(algo, model, train, test=test, rounds=20, seed=0, eval_every=20,
                       local_params=["1/*"])
  fedavg_accuracy = ditto.history["test_accuracy"][-1]
  assert fedavg_accuracy < 0.45
  assert fedper.history["test_accuracy"][-1] > fedavg_accuracy + 0.2
  init = model.init(jax.random.fold_in(jax.random.key(0), 0))
  assert_equal(fedper.params[1], init[1])
  assert fedper.history["bytes_up"][-1] == 12 * (5 * 16 + 16) * 4
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


# Fine-tuned evaluation and Ditto ----------------------------------------------------------------

def test_ditto_personal_models_keep_their_clients_batch_statistics():
  """Batch statistics are not solved for: after one round of full participation each personal
  model holds the statistics its client's local training produced, so their n_k-weighted mean is
  the server's (which averages the clients' statistics), and the solver's full gradient is zero
  on them (a gradient step on a running variance could make it negative)."""
  xs, ys = classification_clients([6, 9, 4, 7], seed=3)
  xs = [3 * x + 5 for x in xs]  # statistics far from the initial mean 0, variance 1
  data = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.from_linen(_DropoutBN.module(), xs[0], "multiclass")
  result = fs.simulate(fs.algorithms.ditto(lam=0.5, client_lr=0.1, batch_size=4), model, data,
                       rounds=1, clients_per_round=4, seed=0, eval_every=5)
  weights = np.array([6, 9, 4, 7]) / 26
  personal_stats = result.state.client_states["batch_stats"]
  for got, server in zip(jax.tree.leaves(personal_stats),
                         jax.tree.leaves(result.params["batch_stats"])):
    np.testing.assert_allclose(np.tensordot(weights, np.asarray(got), 1), server, rtol=1e-5,
                               atol=1e-6)
  from fedjax_sim import client as client_lib
  grads = client_lib.full_gradient(model, jax.numpy.asarray(data.x), jax.numpy.asarray(data.y), 0,
                                   6, 6, result.params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["batch_stats"]))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["params"]))

@pytest.fixture(scope="module")
def conflicting():
  """12 clients, half of which label every example one class further (FedPer's test above); 30
  training and 10 held-out examples each. Two Ditto runs, with fine-tuned evaluation: a small
  ``λ`` and a large one (``η_p λ = 0.5``). Full-batch local steps, so fine-tuning replays
  exactly."""
  xs, ys = classification_clients([40] * 12, seed=1)
  ys = [(y + k % 2) % 3 for k, y in enumerate(ys)]
  train, test = _split(xs, ys, 30)
  model = fs.models.mlp(5, (16,), 3)
  run = lambda lam, lr: fs.simulate(
      fs.algorithms.ditto(lam=lam, personal_lr=lr, client_lr=0.3, local_epochs=3,
                          batch_size=None), model, train, test=test, rounds=20, seed=0,
      eval_every=20, finetune_steps=20)
  return xs, ys, model, run(0.05, 0.3), run(100.0, 0.005)


def _finetuned_and_ditto_personal_models_beat_the_global_model(conflicting):
  """No global model fits both halves of the clients; 20 local steps of fine-tuning, and Ditto's
  personal models, do. The fine-tuned metrics are replayed: each client's 20 full-batch steps from
  the final global model, scored on its held-out examples."""
  xs, ys, model, small, _ = conflicting
  h = small.history
  assert h["test_accuracy"][-1] < 0.45
  assert h["test_finetuned_accuracy"][-1] > h["test_accuracy"][-1] + 0.15
  assert h["test_personal_accuracy"][-1] > h["test_accuracy"][-1] + 0.2
  assert h["train_personal_accuracy"][-1] > h["train_accuracy"][-1] + 0.2
  assert h["test_finetuned_client_accuracy_p90"][-1] >= h["test_finetuned_client_accuracy_p10"][-1]
  grad = jax.jit(jax.grad(model.loss))
  losses, correct = [], []
  for x, y in zip(xs, ys):
    w = small.params
    for _ in range(20):
      w = jax.tree.map(lambda a, g: a - 0.3 * g, w, grad(w, x[:30], y[:30]))
    out = model.apply(w, x[30:])
    losses.append(fs.models.loss_from_outputs("multiclass", out, y[30:]))
    correct.append(np.argmax(out, -1) == y[30:])
  np.testing.assert_allclose(h["test_finetuned_loss"][-1], np.mean(losses), rtol=1e-4)
  np.testing.assert_allclose(h["test_finetuned_accuracy"][-1], np.mean(correct), atol=1e-6)
  # The personal metrics score each client's own v_k.
  personal = [np.argmax(model.apply(jax.tree.map(lambda a: a[k], small.state.client_states),
                                    x[30:]), -1) == y[30:] for k, (x, y) in enumerate(zip(xs, ys))]
  np.testing.assert_allclose(h["test_personal_accuracy"][-1], np.mean(personal), atol=1e-6)


def _distance(states, params):
  """Mean over clients of ``‖v_k − w‖ / ‖w‖``."""
  diff = sum(np.sum((np.asarray(v) - np.asarray(w)[None]) ** 2, axis=tuple(range(1, np.ndim(v))))
             for v, w in zip(jax.tree.leaves(states), jax.tree.leaves(params)))
  norm = sum(np.sum(np.asarray(w) ** 2) for w in jax.tree.leaves(params))
  return float(np.mean(np.sqrt(diff / norm)))


def _ditto_with_a_large_lambda_keeps_personal_models_at_the_global_one(conflicting):
  _, _, _, small, large = conflicting
  assert _distance(large.state.client_states, large.params) < 0.05
  assert _distance(small.state.client_states, small.params) > 0.3
  h = large.history
  assert abs(h["test_personal_accuracy"][-1] - h["test_accuracy"][-1]) < 0.1
  # The global model is FedAvg's whatever λ is.
  assert_equal(large.params, small.params)


def test_personalization_on_conflicting_labels(conflicting):
  """FedPer, fine-tuning and Ditto on the conflicting-labels clients, in one test so that the two
  Ditto runs of the fixture are computed once (tests of one module may run on two workers)."""
  _fedper_personal_head_beats_the_global_model(conflicting)
  _finetuned_and_ditto_personal_models_beat_the_global_model(conflicting)
  _ditto_with_a_large_lambda_keeps_personal_models_at_the_global_one(conflicting)


def test_ditto_personal_update_replayed_and_bad_arguments():
  """Two rounds of Ditto, full batch and full participation, replayed with jax.grad: the global
  model is FedAvg's (one full-batch step per client, weights n_k), and every client's v_k takes
  three steps ``v ← v − η_p (∇F_k(v) + λ (v − w^t))`` from its previous v_k (``w^0`` at first)."""
  xs, ys = classification_clients([5, 7, 6, 8], num_features=4, seed=3)
  data = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.softmax_regression(4, 3)
  lam, lr_p, lr = 0.7, 0.2, 0.1
  algo = fs.algorithms.ditto(lam=lam, personal_lr=lr_p, personal_steps=3, client_lr=lr,
                             batch_size=None)
  result = fs.simulate(algo, model, data, rounds=2, seed=5)
  grad = jax.jit(jax.grad(model.loss))
  w = model.init(jax.random.fold_in(jax.random.key(5), 0))
  vs = [w] * 4
  n = np.array([len(x) for x in xs], np.float32)
  for _ in range(2):
    locals_ = [jax.tree.map(lambda a, g: a - lr * g, w, grad(w, x, y)) for x, y in zip(xs, ys)]
    new_vs = []
    for v, x, y in zip(vs, xs, ys):
      for _ in range(3):
        v = jax.tree.map(lambda a, g, b: a - lr_p * (g + lam * (a - b)), v, grad(v, x, y), w)
      new_vs.append(v)
    w = jax.tree.map(lambda *ls: sum(nk * l for nk, l in zip(n, ls)) / n.sum(), *locals_)
    vs = new_vs
  for got, want in zip(jax.tree.leaves(result.params), jax.tree.leaves(w)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  for k in range(4):
    got = jax.tree.map(lambda a: a[k], result.state.client_states)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(vs[k])):
      np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)
  # What cannot run is named before anything compiles.
  with pytest.raises(ValueError, match="lam must be a finite number >= 0, got -1"):
    fs.algorithms.ditto(lam=-1)
  with pytest.raises(ValueError, match="float personal_lr"):
    fs.algorithms.ditto(client_lr=lambda step: 0.1)
  with pytest.raises(ValueError, match="finetune_steps must be a non-negative integer, got -2"):
    fs.simulate(algo, model, data, rounds=1, finetune_steps=-2)
  other = data.subset([0, 1])
  with pytest.raises(ValueError, match="test must hold a held-out split.*2 clients.*has 4"):
    fs.simulate(algo, model, data, test=other, rounds=1, finetune_steps=3)
  with pytest.raises(ValueError, match="population='host' cannot run it"):
    fs.simulate(algo, model, data, test=data, rounds=1, finetune_steps=3, population="host")
