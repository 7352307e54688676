"""Datasets: generators that ship with the package, by name for the CLI.

Each entry of :data:`REGISTRY` maps a name to ``fn(seed, **options) -> (train, test_or_None,
num_classes)``; ``num_classes`` is ``None`` for regression and ``2`` for binary data.
"""

import os

import numpy as np

from fedjax_sim.datasets.digits import load_digits_federated
from fedjax_sim.datasets.download import PUBLIC_FILES, download
from fedjax_sim.datasets.fedjax_sqlite import (load_fedjax_sqlite, save_fedjax_sqlite,
                                               shakespeare_examples)
from fedjax_sim.datasets.files import load_centralized_npz, load_npz, save_npz
from fedjax_sim.datasets.leaf import (SHAKESPEARE_VOCAB, VOCAB_SIZE, decode_text, encode_text,
                                      load_leaf, load_leaf_splits)
from fedjax_sim.datasets.synthetic import (fedprox_synthetic, linear_regression_client,
                                           logistic_demo, power_law_population)


def _power_law(seed, num_clients=5000, heterogeneity=0.5):
  train, test = power_law_population(num_clients=num_clients, heterogeneity=heterogeneity, seed=seed)
  return train, test, 10


def _fedprox(seed, alpha=0.5, beta=0.5):  # fedprox_synthetic's defaults (a test checks)
  train, test = fedprox_synthetic(alpha, beta, seed=seed)
  return train, test, 10


def _fedprox_iid(seed):
  train, test = fedprox_synthetic(iid=True, seed=seed)
  return train, test, 10


def _held_out(train, test, test_fraction, seed):
  """``(train, test)``, with ``test_fraction`` of every client's examples held out as ``test``."""
  if test_fraction is None:
    return train, test
  if test is not None:
    raise ValueError("dataset_options.test_fraction: this dataset already has a test split")
  from fedjax_sim.partition import holdout
  return holdout(train, test_fraction, seed)


def _npz(seed, path, partition=None, num_clients=None, test_fraction=None,
         **partition_options):
  """A federated .npz, or a centralized one (arrays ``x``, ``y``) split with ``partition``."""
  if partition is None:
    if num_clients is not None or partition_options:
      given = sorted(partition_options) + (["num_clients"] if num_clients is not None else [])
      raise ValueError(f"dataset_options {given} split a centralized file: they need "
                       "dataset_options.partition")
    train = load_npz(str(path))
  else:
    from fedjax_sim import partition as partitions
    x, y = load_centralized_npz(str(path))
    train = partitions.split(x, y, partition, seed, num_clients, **partition_options)
  train, test = _held_out(train, None, test_fraction, seed)
  return train, test, _num_classes(None, train, test)


def _num_classes(text, *datasets):
  """``VOCAB_SIZE`` for text; ``max(y) + 1`` over ``datasets`` for integer labels; else ``None``."""
  if text:
    return VOCAB_SIZE
  ys = [d.y for d in datasets if d is not None]
  if not all(np.issubdtype(y.dtype, np.integer) for y in ys):
    return None
  return max(int(y.max()) for y in ys) + 1


def _leaf(seed, path, split=None, text=None, test_fraction=None):
  path = str(path)
  if split is None and all(os.path.isdir(os.path.join(path, s)) for s in ("train", "test")):
    train, test = load_leaf_splits(path, text)
  else:
    train, test = load_leaf(path, split, text), None
  train, test = _held_out(train, test, test_fraction, seed)
  return train, test, _num_classes(text, train, test)


def _fedjax_sqlite(seed, path, x_key="x", y_key="y", text=None, test_fraction=None):
  train = load_fedjax_sqlite(str(path), x_key, y_key, text=text)
  train, test = _held_out(train, None, test_fraction, seed)
  return train, test, _num_classes(text, train, test)


def _digits(seed, partition="dirichlet", num_clients=20, alpha=0.5):
  train, test = load_digits_federated(partition, num_clients, alpha, seed=seed)
  return train, test, 10


REGISTRY = {
    "power_law": (_power_law, "5,000 clients, lognormal sizes (median ~20, long tail), 60 "
                  "features, 10 classes, non-IID"),
    "fedprox_synthetic": (_fedprox, "FedProx Synthetic(alpha, beta): 30 devices, 60 features, 10 "
                          "classes; beta shifts each device's features, and with the paper's "
                          "generator alpha changes no label (see fedprox_synthetic)"),
    "fedprox_synthetic_iid": (_fedprox_iid, "FedProx Synthetic-IID: 30 devices"),
    "logistic_demo": (lambda seed: (logistic_demo(seed), None, 2),
                      "Five clients, 4 features (bias column included), binary labels"),
    "linear_regression": (lambda seed: (linear_regression_client(seed=seed), None, None),
                          "One client, 3 features, y = x·[2, -1, 0.5] + noise"),
    "npz": (_npz, "Your own .npz file (see fedjax_sim.datasets.load_npz); a centralized file "
            "(arrays x, y) is split with partition = iid | dirichlet | shards | quantity_skew | "
            "by_id and that partition's own options (num_clients, alpha, shards_per_client, "
            "...); test_fraction holds out that share of every client's examples as test data"),
    "leaf": (_leaf, "LEAF JSON file or directory (FEMNIST, Shakespeare...); split picks train/ or "
             "test/, text='shakespeare' maps characters to ids, test_fraction holds out a share "
             "of every client's examples"),
    "fedjax_sqlite": (_fedjax_sqlite, "FedJAX SQLite client file; x_key and y_key name the arrays "
                      "(EMNIST: pixels, label), text='shakespeare' for snippets, test_fraction "
                      "holds out a share of every client's examples"),
    "digits": (_digits, "scikit-learn 8x8 digits (bundled, needs scikit-learn), 64 features, 10 "
               "classes, partitioned"),
}

__all__ = ["PUBLIC_FILES", "REGISTRY", "SHAKESPEARE_VOCAB", "VOCAB_SIZE", "decode_text", "download",
           "encode_text", "fedprox_synthetic", "linear_regression_client", "load_digits_federated",
           "load_centralized_npz", "load_fedjax_sqlite", "load_leaf", "load_leaf_splits", "load_npz", "logistic_demo",
           "power_law_population", "save_fedjax_sqlite", "save_npz", "shakespeare_examples"]
