"""Partitioners (partition.py) and dataset summaries (describe.py)."""

import math

import numpy as np
import pytest

from fedjax_sim import partition
from fedjax_sim.data import DataError, FederatedData
from fedjax_sim.describe import describe, format_description, plot_label_distribution

N, C = 2000, 10


def _data(n=N, num_classes=C, seed=0):
  """Balanced labels in shuffled order; feature 0 is the example's original index."""
  rng = np.random.default_rng(seed)
  y = rng.permutation(np.arange(n) % num_classes)
  x = np.stack([np.arange(n), rng.standard_normal(n)], axis=1).astype(np.float32)
  return x, y


def _index(fd):
  return fd.x[:, 0].astype(np.int64)


def _check_partition(fd, x, y, complete=True):
  """Each example at most (``complete``: exactly) once, with its own row, in original order."""
  idx = _index(fd)
  assert len(np.unique(idx)) == len(idx)
  if complete:
    np.testing.assert_array_equal(np.sort(idx), np.arange(len(y)))
  np.testing.assert_array_equal(fd.x, x[idx])
  np.testing.assert_array_equal(fd.y, y[idx])
  for k in range(fd.num_clients):
    assert np.all(np.diff(_index(fd.subset([k]))) > 0), f"client {k} out of order"
  assert fd.client_ids == [str(k) for k in range(fd.num_clients)]


SCHEMES = {
    "iid": lambda x, y, s: partition.iid(x, y, 7, seed=s),
    "dirichlet": lambda x, y, s: partition.dirichlet(x, y, 20, alpha=0.5, seed=s),
    "shards": lambda x, y, s: partition.shards(x, y, 30, 3, seed=s),
    "lognormal": lambda x, y, s: partition.quantity_skew(x, y, 40, seed=s, sigma=2.0),
    "power_law": lambda x, y, s: partition.quantity_skew(x, y, 40, seed=s,
                                                         distribution="power_law"),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_example_once_reproducible_and_seeded(scheme):
  x, y = _data()
  make = SCHEMES[scheme]
  fd = make(x, y, 3)
  _check_partition(fd, x, y)
  again, other = make(x, y, 3), make(x, y, 4)
  np.testing.assert_array_equal(again.x, fd.x)
  np.testing.assert_array_equal(again.num_examples, fd.num_examples)
  assert not (np.array_equal(other.num_examples, fd.num_examples) and
              np.array_equal(other.x, fd.x))


def test_iid_sizes_differ_by_at_most_one():
  x, y = _data()
  for k in (1, 7, 13, N):
    sizes = partition.iid(x, y, k, seed=0).num_examples
    assert sizes.sum() == N and sizes.max() - sizes.min() <= 1 and len(sizes) == k


def test_quantity_skew_sums_respects_min_size_and_is_skewed():
  x, y = _data()
  for seed in range(3):
    skewed = partition.quantity_skew(x, y, 50, seed=seed, sigma=2.0, min_size=5).num_examples
    assert skewed.sum() == N and skewed.min() >= 5
    assert skewed.max() / np.median(skewed) > 5
    flat = partition.quantity_skew(x, y, 50, seed=seed, sigma=0.05).num_examples
    assert flat.sum() == N and flat.max() / np.median(flat) < 1.3
    power = partition.quantity_skew(x, y, 50, seed=seed, distribution="power_law",
                                    exponent=1.0, min_size=3).num_examples
    assert power.sum() == N and power.min() >= 3 and power.max() / np.median(power) > 3
  exact = partition.quantity_skew(x, y, 400, seed=0, min_size=5).num_examples
  np.testing.assert_array_equal(exact, np.full(400, 5))  # min_size * K == N leaves no slack


def test_dirichlet_concentration_grows_as_alpha_shrinks():
  x, y = _data()
  frac = {a: describe(partition.dirichlet(x, y, 20, alpha=a, seed=1))["max_class_fraction_mean"]
          for a in (0.05, 1.0, 100.0)}
  assert frac[0.05] > frac[1.0] > frac[100.0]
  assert frac[0.05] > frac[100.0] + 0.4
  assert frac[100.0] < 0.25


def test_dirichlet_min_size_met_or_named_error():
  x, y = _data()
  seed = next(s for s in range(20)  # a seed whose first draw is too small, so a redraw is needed
              if partition.dirichlet(x, y, 20, alpha=0.5, seed=s).num_examples.min() < 45)
  fd = partition.dirichlet(x, y, 20, alpha=0.5, seed=seed, min_size=45)
  _check_partition(fd, x, y)
  assert fd.num_examples.min() >= 45
  with pytest.raises(DataError, match=r"alpha=0\.05.*num_clients=20.*min_size=100.*5 tries") as e:
    partition.dirichlet(x, y, 20, alpha=0.05, seed=0, min_size=100, max_tries=5)
  assert "smallest client had at best" in str(e.value)
  with pytest.raises(DataError, match="min_size=101"):
    partition.dirichlet(x, y, 20, alpha=1.0, seed=0, min_size=101)


def test_shards_few_labels_per_client():
  x, y = _data()  # 200 examples per class: 200 shards of 10 never straddle two classes
  fd = partition.shards(x, y, 100, 2, seed=0)
  _check_partition(fd, x, y)
  np.testing.assert_array_equal(fd.num_examples, np.full(100, 20))
  assert (partition.label_distribution(fd) > 0).sum(axis=1).max() <= 2
  x, y = _data(60000)  # McMahan et al.: 200 shards of 300
  mnist_like = partition.shards(x, y, 100, 2, seed=0)
  np.testing.assert_array_equal(mnist_like.num_examples, np.full(100, 600))
  assert (partition.label_distribution(mnist_like) > 0).sum(axis=1).max() <= 2


def test_shards_explicit_size_drops_rest_and_bounds():
  x, y = _data()
  fd = partition.shards(x, y, 100, 2, seed=0, shard_size=7)
  _check_partition(fd, x, y, complete=False)
  np.testing.assert_array_equal(fd.num_examples, np.full(100, 14))
  uneven = partition.shards(x, y, 30, 2, seed=0)  # 2000 / 60 shards: sizes 33 or 34, all used
  _check_partition(uneven, x, y)
  assert set(uneven.num_examples) <= {66, 67, 68}
  with pytest.raises(DataError, match="shard_size=11.*2200.*2000"):
    partition.shards(x, y, 100, 2, seed=0, shard_size=11)
  with pytest.raises(DataError, match="3000 shards"):
    partition.shards(x, y, 100, 30, seed=0)


def test_by_id_round_trip():
  x, y = _data(50)
  rng = np.random.default_rng(0)
  ids = rng.choice([17, 3, 42, 8], size=50)
  fd = partition.by_id(x, y, ids)
  first = [int(i) for i in dict.fromkeys(ids)]
  assert fd.client_ids == [str(i) for i in first]
  for k, i in enumerate(first):
    cx, cy = fd.client(k)
    np.testing.assert_array_equal(cx, x[ids == i])
    np.testing.assert_array_equal(cy, y[ids == i])
  named = partition.by_id(x[:4], y[:4], ["bob", "ann", "bob", "cy"])
  assert named.client_ids == ["bob", "ann", "cy"]
  np.testing.assert_array_equal(_index(named), [0, 2, 1, 3])


@pytest.mark.parametrize("call,error,message", [
    (lambda x, y: partition.iid(x, y[:-1], 5, seed=0), DataError, "2000 examples but y has 1999"),
    (lambda x, y: partition.iid(x, y, 0, seed=0), ValueError, "num_clients .* got 0"),
    (lambda x, y: partition.iid(x, y, 2001, seed=0), ValueError, "num_clients=2001"),
    (lambda x, y: partition.iid(x, y, 5, seed=-1), ValueError, "seed .* got -1"),
    (lambda x, y: partition.iid(x, y, 5, seed=1.5), ValueError, "seed .* got 1.5"),
    (lambda x, y: partition.dirichlet(x, y, 5, alpha=0.0, seed=0), ValueError, "alpha .* got 0.0"),
    (lambda x, y: partition.dirichlet(x, y, 5, alpha=-2, seed=0), ValueError, "alpha .* got -2"),
    (lambda x, y: partition.dirichlet(x, y + 0.5, 5, 1.0, seed=0), DataError,
     "integer class labels.*float64"),
    (lambda x, y: partition.shards(x, y, 5, 0, seed=0), ValueError, "shards_per_client .* got 0"),
    (lambda x, y: partition.quantity_skew(x, y, 5, seed=0, distribution="zipf"), ValueError,
     "'zipf'"),
    (lambda x, y: partition.quantity_skew(x, y, 5, seed=0, sigma=0), ValueError, "sigma .* got 0"),
    (lambda x, y: partition.quantity_skew(x, y, 100, seed=0, min_size=21), DataError,
     "min_size=21 need 2100"),
    (lambda x, y: partition.by_id(x, y, np.zeros(3)), DataError, r"ids must have shape \(2000,\)"),
    (lambda x, y: partition.split(x, y, "dirichlet", 0, num_clients=5), ValueError,
     r"partition 'dirichlet' needs option\(s\) 'alpha' \(in the CLI: dataset_options.alpha=...\)"),
])
def test_bad_inputs_name_the_value(call, error, message):
  x, y = _data()
  with pytest.raises(error, match=message):
    call(x, y)


def _hand_built():
  ys = [[0], [1, 1], [0, 1, 2], [0, 0, 1, 1]]
  return FederatedData.from_arrays([np.zeros((len(c), 1)) for c in ys], [np.array(c) for c in ys])


def test_label_distribution_counts():
  fd = _hand_built()
  expected = [[1, 0, 0], [0, 2, 0], [1, 1, 1], [2, 2, 0]]
  np.testing.assert_array_equal(partition.label_distribution(fd), expected)
  np.testing.assert_array_equal(partition.label_distribution(fd, 4),
                                np.pad(expected, [(0, 0), (0, 1)]))
  with pytest.raises(ValueError, match="num_classes=2 but a label equals 2"):
    partition.label_distribution(fd, 2)


def test_describe_exact_on_hand_built_data():
  stats = describe(_hand_built())
  expected = dict(num_clients=4, total_examples=10, size_min=1, size_p10=1.3, size_median=2.5,
                  size_p90=3.7, size_max=4, size_mean=2.5, num_classes=3,
                  classes_per_client_mean=1.75, classes_per_client_min=1,
                  classes_per_client_max=3, max_class_fraction_mean=(1 + 1 + 1 / 3 + 1 / 2) / 4,
                  label_entropy_mean=(math.log2(3) + 1) / 4)
  assert stats.keys() == expected.keys()
  for key, value in expected.items():
    assert stats[key] == pytest.approx(value, abs=1e-12), key
  assert describe(_hand_built(), num_classes=6)["num_classes"] == 6
  text = format_description(stats)
  assert "classes per client: mean" in text and "1.75" in text and "0.7083" in text
  # whole-number float labels are class ids (FederatedData.from_arrays), so regression targets here
  # are fractional
  regression = FederatedData.from_arrays([np.zeros((2, 1)), np.zeros((5, 1))],
                                         [np.full(2, 0.5, np.float32), np.full(5, 1.5, np.float32)])
  reg_stats = describe(regression)
  assert set(reg_stats) == {"num_clients", "total_examples", "size_min", "size_p10",
                            "size_median", "size_p90", "size_max", "size_mean"}
  assert reg_stats["size_median"] == 3.5 and "label" not in format_description(reg_stats)


def test_plot_writes_png(tmp_path):
  x, y = _data()
  fd = partition.dirichlet(x, y, 30, alpha=0.3, seed=0)
  path = tmp_path / "labels.png"
  plot_label_distribution(fd, str(path), max_clients=12)
  assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
  regression = partition.iid(x, y.astype(np.float32) + 0.5, 9, seed=0)
  reg_path = tmp_path / "sizes.png"
  plot_label_distribution(regression, str(reg_path))
  assert reg_path.stat().st_size > 1000 and reg_path.read_bytes()[:4] == b"\x89PNG"
