"""FederatedData validation, the .npz format, the models and the Flax adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.data import DataError
from fedjax_sim.datasets import fedprox_synthetic, load_npz, power_law_population, save_npz


def test_from_arrays_round_trip_and_ids():
  xs = [np.arange(6, dtype=np.float32).reshape(3, 2), np.ones((1, 2), np.float32)]
  ys = [np.array([0, 1, 2]), np.array([1])]
  fd = fs.FederatedData.from_arrays(xs, ys)
  assert fd.num_clients == 2 and fd.client_ids == ["0", "1"]
  np.testing.assert_array_equal(fd.num_examples, [3, 1])
  for k in range(2):
    xk, yk = fd.client(k)
    np.testing.assert_array_equal(xk, xs[k]); np.testing.assert_array_equal(yk, ys[k])
  named = fs.FederatedData.from_arrays(xs, ys, client_ids=["alice", "bob"])
  assert named.client_ids == ["alice", "bob"]


@pytest.mark.parametrize("xs,ys,message", [
    ([], [], "at least one client"),
    ([np.zeros((0, 2))], [np.zeros(0)], "client '0' has no examples"),
    ([np.zeros((3, 2))], [np.zeros(2)], "x has 3 examples but y has 2"),
    ([np.array([[1.0, np.nan]])], [np.zeros(1)], "NaN"),
    ([np.zeros((2, 2)), np.zeros((2, 3))], [np.zeros(2), np.zeros(2)], "feature shape"),
])
def test_bad_data_is_named(xs, ys, message):
  with pytest.raises(DataError, match=message):
    fs.FederatedData.from_arrays(xs, ys)


def test_npz_round_trip_and_errors(tmp_path):
  fd, _ = fedprox_synthetic(0.5, 0.5, num_devices=12, seed=1)  # ids "10" < "2" as strings
  path = str(tmp_path / "d.npz")
  save_npz(path, fd)
  back = load_npz(path)
  assert back.client_ids == fd.client_ids
  for i in range(fd.num_clients):
    for a, b in zip(back.client(i), fd.client(i)):
      np.testing.assert_array_equal(a, b)
  # column layout keeps first-appearance order of clients
  np.savez(tmp_path / "c.npz", x=np.arange(8.0).reshape(4, 2), y=np.array([0, 1, 1, 0]),
           client_id=np.array(["b", "a", "b", "a"]))
  col = load_npz(str(tmp_path / "c.npz"))
  assert col.client_ids == ["b", "a"]
  np.testing.assert_array_equal(col.client(0)[0], [[0, 1], [4, 5]])
  (tmp_path / "bad.npz").write_bytes(open(path, "rb").read()[:100])
  with pytest.raises(DataError, match="cannot read"):
    load_npz(str(tmp_path / "bad.npz"))
  with pytest.raises(DataError, match="does not exist"):
    load_npz(str(tmp_path / "missing.npz"))


def test_fedprox_synthetic_recipe():
  train, test = fedprox_synthetic(1.0, 1.0, seed=0)
  assert train.num_clients == test.num_clients == 30
  total = train.num_examples + test.num_examples
  assert total.min() >= 50
  np.testing.assert_array_equal(train.num_examples, (0.9 * total).astype(int))
  assert train.feature_shape == (60,) and train.y.max() <= 9
  again, _ = fedprox_synthetic(1.0, 1.0, seed=0)
  np.testing.assert_array_equal(again.x, train.x)
  iid, _ = fedprox_synthetic(iid=True, seed=0)
  # IID devices share one labelling function: their label histograms look alike
  assert iid.num_clients == 30


def test_power_law_population_is_heavy_tailed():
  train, test = power_law_population(num_clients=3000, seed=0)
  n = train.num_examples
  assert train.num_clients == 3000 and n.max() > 10 * np.median(n)


def test_paper_model_sizes():
  p2nn = fs.models.mlp(784).init(jax.random.key(0))
  assert fs.models.num_params(p2nn) == 199_210
  pcnn = fs.models.cnn().init(jax.random.key(0))
  assert fs.models.num_params(pcnn) == 1_663_370
  out = fs.models.cnn().apply(pcnn, jnp.zeros((2, 784)))
  assert out.shape == (2, 10)


def test_use_bias_and_losses():
  m = fs.models.logistic_regression(3, use_bias=False)
  p = m.init(jax.random.key(0))
  assert set(p) == {"kernel"}
  x, y = jnp.ones((2, 3)), jnp.array([0, 1])
  np.testing.assert_allclose(m.loss(p, x, y), np.log(2.0), rtol=1e-6)
  masked = m.loss(p, x, y, jnp.array([True, False]))
  np.testing.assert_allclose(masked, np.log(2.0), rtol=1e-6)


def test_flax_adapters_train():
  import flax.linen as nn
  from flax import nnx

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))

  class Nnx(nnx.Module):
    def __init__(self, rngs):
      self.a, self.b = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)
    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3))
  xs = [rng.normal(size=(20, 4)).astype(np.float32) for _ in range(4)]
  fd = fs.FederatedData.from_arrays(xs, [np.argmax(x @ w, 1) for x in xs])
  algo = fs.algorithms.fedavg(client_lr=0.2, batch_size=5)
  for model in (fs.models.from_linen(Linen(), jnp.zeros((1, 4)), "multiclass"),
                fs.models.from_nnx(Nnx, "multiclass")):
    res = fs.simulate(algo, model, fd, rounds=8, eval_every=7)
    assert res.history["train_loss"][-1] < res.history["train_loss"][0]


def test_init_params_of_the_wrong_shape_are_named():
  fd = fs.FederatedData.from_arrays([np.ones((3, 4), np.float32)], [np.array([0, 1, 2])])
  model = fs.models.softmax_regression(4, 3)
  algo = fs.algorithms.fedavg(batch_size=2)
  with pytest.raises(ValueError, match=r"init_params\['kernel'\] has shape \(4, 2\); .* expects \(4, 3\)"):
    fs.simulate(algo, model, fd, rounds=1,
                init_params={"kernel": np.zeros((4, 2)), "bias": np.zeros(3)})
  with pytest.raises(ValueError, match="structure"):
    fs.simulate(algo, model, fd, rounds=1, init_params={"kernel": np.zeros((4, 3))})


class _DropoutBN:
  """A linen MLP with batch normalization and dropout, switched by ``train``."""

  @staticmethod
  def module():
    import flax.linen as nn

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(8)(x))
        return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(nn.relu(x)))
    return Net()


def test_dropout_and_batch_norm_replay_one_round():
  """Each client's step uses dropout key fold_in(step_key_of(client key), t) and keeps the
  statistics of its forward pass; the server averages the statistics (weights n_k) without the
  server optimizer, which scales the trained parameters' mean delta by 0.5."""
  import optax
  from fedjax_sim import client as client_lib
  from tests.helpers import assert_close, classification_clients, round_keys
  sizes = [6, 9, 4, 7]
  xs, ys = classification_clients(sizes, seed=3)
  data = fs.FederatedData.from_arrays(xs, ys)
  module = _DropoutBN.module()
  model = fs.models.from_linen(module, xs[0], "multiclass")
  assert model.state_collections == ("batch_stats",) and model.stochastic
  lr = 0.3
  algo = fs.algorithms.fedavg(client_lr=lr, batch_size=None, local_epochs=1, shuffle=False,
                              server_optimizer=optax.sgd(0.5))
  result = fs.simulate(algo, model, data, rounds=1, seed=5, clients_per_round=4)
  w0 = model.init(jax.random.fold_in(jax.random.key(5), 0))

  @jax.jit
  def client_step(x, y, mask, key):
    return jax.grad(lambda p: model.train_loss(p, x, y, mask, key=key), has_aux=True)(w0)

  def client(k, stream):  # the engine pads each full batch to 9 rows with copies of row 0
    key = jax.random.fold_in(client_lib.step_key_of(
        jax.random.fold_in(round_keys(5, 1).clients, k)), stream)
    pad = lambda a: np.concatenate([a, np.repeat(a[:1], 9 - len(a), axis=0)])
    grads, stats = client_step(pad(xs[k]), pad(ys[k]), np.arange(9) < sizes[k], key)
    return {"params": jax.tree.map(lambda w, g: w - lr * g, w0["params"], grads["params"]),
            **stats}

  def server(stream):
    clients = [client(k, stream) for k in range(4)]
    p = np.asarray(sizes, np.float32) / sum(sizes)
    mean = jax.tree.map(lambda *c: sum(pk * ck for pk, ck in zip(p, c)), *clients)
    return {"params": jax.tree.map(lambda w, m: w + 0.5 * (m - w), w0["params"], mean["params"]),
            "batch_stats": mean["batch_stats"]}

  assert_close(result.params, server(0), rtol=1e-5, atol=1e-6)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       server(0)["params"], server(1)["params"])
  assert max(jax.tree.leaves(moved)) > 1e-3  # another dropout key gives other params
  # Padding never enters the batch statistics: a padded, masked batch has the statistics of the
  # client's own examples.
  key = jax.random.key(0)
  padded = np.concatenate([xs[2], np.repeat(xs[2][:1], 5, axis=0)])
  assert_close(model.train_apply(w0, padded, key=key, mask=np.arange(9) < 4)[1],
               model.train_apply(w0, xs[2], key=key)[1], rtol=1e-5, atol=1e-7)
  # Evaluation is deterministic and uses the running statistics.
  out = model.apply(result.params, xs[0])
  np.testing.assert_allclose(out, module.apply(result.params, xs[0], train=False), rtol=1e-6)


def test_flax_models_that_cannot_train_are_named():
  import flax.linen as nn
  from flax import nnx

  class NoTrainDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dropout(0.5)(nn.Dense(3)(x))

  class NoTrainBN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=True)(nn.Dense(3)(x))

  class Counts(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      self.variable("counter", "calls", lambda: jnp.zeros((), jnp.int32))
      return nn.Dense(3)(x)

  class NnxDropout(nnx.Module):
    def __init__(self, rngs):
      self.dense, self.drop = nnx.Linear(5, 3, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)
    def __call__(self, x):
      return self.drop(self.dense(x))

  x = np.zeros((2, 5), np.float32)
  with pytest.raises(ValueError, match="NoTrainDropout.*deterministic.*`train` argument"):
    fs.models.from_linen(NoTrainDropout(), x, "multiclass")
  with pytest.raises(ValueError, match="NoTrainBN.*batch statistics.*no `train` argument"):
    fs.models.from_linen(NoTrainBN(), x, "multiclass")
  with pytest.raises(ValueError, match=r"Counts.*\['counter'\]"):
    fs.models.from_linen(Counts(), x, "multiclass")
  with pytest.raises(ValueError, match="from_nnx.*RngKey.*from_linen"):
    fs.models.from_nnx(NnxDropout, "multiclass")
  model = fs.models.from_linen(_DropoutBN.module(), x, "multiclass")
  data = fs.FederatedData.from_arrays([x, x], [np.zeros(2, np.int32)] * 2)
  with pytest.raises(ValueError, match="'moon' defines its own local loss"):
    fs.simulate(fs.algorithms.moon(), model, data, rounds=1)


def _plain_forward(params, x):
  """The built-in dense models' forward pass written with plain products (the reference for the
  dense layer's own derivative rule)."""
  layers = params if isinstance(params, list) else [params]
  h = x
  for i, layer in enumerate(layers):
    h = h @ layer["kernel"] + layer["bias"]
    if i < len(layers) - 1:
      h = jax.nn.relu(h)
  return h


def test_dense_layer_derivatives_equal_the_plain_product():
  """The dense layer's own derivative rule (a materialized ``xᵀ`` for the kernel's gradient on
  CPU) gives the plain product's gradients (to the last bits: the same sums in another kernel's
  order), for a vmapped chunk of clients as in local training, and its forward-mode derivative."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=(8, *shape)).astype(np.float32))
  dense = lambda a, b: {"kernel": normal(a, b), "bias": normal(b)}
  for model, params in ((fs.models.softmax_regression(16, 8), dense(16, 8)),
                        (fs.models.mlp(12, (16,), 5), [dense(12, 16), dense(16, 5)])):
    x = normal(10, jax.tree.leaves(params)[1].shape[1])
    y = jnp.asarray(rng.integers(0, 5, (8, 10)).astype(np.int32))
    mask = jnp.asarray(rng.random((8, 10)) < 0.8)
    ref_loss = lambda p, x, y, m: jnp.sum(fs.models.loss_from_outputs(
        "multiclass", _plain_forward(p, x), y) * m) / jnp.maximum(jnp.sum(m), 1.0)
    grads = jax.jit(jax.vmap(jax.grad(model.loss)))(params, x, y, mask)
    ref = jax.jit(jax.vmap(jax.grad(ref_loss)))(params, x, y, mask)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)
  jvp = jax.jit(lambda f, p, t: jax.jvp(lambda q: f(q, x[0], y[0], mask[0]), (p,), (t,))[1],
                static_argnums=0)
  first = jax.tree.map(lambda p: p[0], params)
  tangent = jax.tree.map(lambda p: p[1], params)
  np.testing.assert_allclose(jvp(model.loss, first, tangent), jvp(ref_loss, first, tangent),
                             rtol=1e-5)
