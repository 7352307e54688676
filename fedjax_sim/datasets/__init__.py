"""Datasets: generators that ship with the package, by name for the CLI.

Each entry of :data:`REGISTRY` maps a name to ``fn(seed, **options) -> (train, test_or_None,
num_classes)``; ``num_classes`` is ``None`` for regression and ``2`` for binary data.
"""

import numpy as np

from fedjax_sim.datasets.files import load_npz, save_npz
from fedjax_sim.datasets.synthetic import (fedprox_synthetic, linear_regression_client,
                                           logistic_demo, power_law_population)


def _power_law(seed, num_clients=5000, heterogeneity=0.5):
  train, test = power_law_population(num_clients=num_clients, heterogeneity=heterogeneity, seed=seed)
  return train, test, 10


def _fedprox(seed, alpha=0.5, beta=0.5):
  train, test = fedprox_synthetic(alpha, beta, seed=seed)
  return train, test, 10


def _fedprox_iid(seed):
  train, test = fedprox_synthetic(iid=True, seed=seed)
  return train, test, 10


def _npz(seed, path=None):
  if path is None:
    raise ValueError("dataset 'npz' needs dataset_options.path (the .npz file to read)")
  train = load_npz(str(path))
  num_classes = int(train.y.max()) + 1 if np.issubdtype(train.y.dtype, np.integer) else None
  return train, None, num_classes


REGISTRY = {
    "power_law": (_power_law, "5,000 clients, lognormal sizes (median ~20, long tail), 60 "
                  "features, 10 classes, non-IID; options: num_clients, heterogeneity"),
    "fedprox_synthetic": (_fedprox, "FedProx Synthetic(alpha, beta): 30 devices, 60 features, 10 "
                          "classes; options: alpha, beta"),
    "fedprox_synthetic_iid": (_fedprox_iid, "FedProx Synthetic-IID: 30 devices"),
    "logistic_demo": (lambda seed: (logistic_demo(seed), None, 2),
                      "five clients, 4 features (bias column included), binary labels"),
    "linear_regression": (lambda seed: (linear_regression_client(seed=seed), None, None),
                          "one client, 3 features, y = x·[2, -1, 0.5] + noise"),
    "npz": (_npz, "your own .npz file (see fedjax_sim.datasets.load_npz); option: path"),
}

__all__ = ["REGISTRY", "fedprox_synthetic", "load_npz", "save_npz", "linear_regression_client", "logistic_demo",
           "power_law_population"]
