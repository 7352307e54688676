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
