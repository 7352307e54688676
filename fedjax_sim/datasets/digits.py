"""scikit-learn's bundled 8x8 handwritten digits, split into simulated clients (no download).

``sklearn.datasets.load_digits`` ships 1,797 images of the digits 0-9 (8x8 pixels, values 0..16)
inside scikit-learn, so this dataset works offline. Install the optional dependency with
``pip install 'fedjax-sim[digits]'``.
"""

from __future__ import annotations

import numpy as np

from fedjax_sim import partition as partitions
from fedjax_sim.data import FederatedData

# every scheme except by_id, which needs ids the digits do not have
PARTITIONS = tuple(s for s in partitions.SCHEMES if s != "by_id")
NUM_CLASSES = 10


def _load_digits():
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    raise ImportError("the digits dataset needs scikit-learn: pip install 'fedjax-sim[digits]'"
                      ) from None
  digits = load_digits()
  return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)


def _split_clients(fd: FederatedData, test_fraction: float,
                   rng: np.random.Generator) -> tuple[FederatedData, FederatedData | None]:
  """Holds out ``round(test_fraction * n)`` random examples of each client with ``n >= 2``."""
  train_x, train_y, test_x, test_y, test_ids = [], [], [], [], []
  for i, cid in enumerate(fd.client_ids):
    x, y = fd.client(i)
    n = len(y)
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1) if n >= 2 and test_fraction else 0
    held = np.zeros(n, bool)
    held[rng.choice(n, n_test, replace=False)] = True
    train_x.append(x[~held]); train_y.append(y[~held])
    if n_test:
      test_x.append(x[held]); test_y.append(y[held]); test_ids.append(cid)
  train = FederatedData.from_arrays(train_x, train_y, fd.client_ids)
  test = FederatedData.from_arrays(test_x, test_y, test_ids) if test_ids else None
  return train, test


def load_digits_federated(partition: str = "dirichlet", num_clients: int = 20, alpha: float = 0.5,
                          seed: int = 0, test_fraction: float = 0.2,
                          shards_per_client: int = 2) -> tuple[FederatedData, FederatedData | None]:
  """The 1,797 scikit-learn digits as ``num_clients`` clients: 64 features in ``[0, 1]``, 10 classes.

  The whole dataset is partitioned with :mod:`fedjax_sim.partition` (``"iid"``, ``"dirichlet"``
  with concentration ``alpha``, ``"shards"`` with ``shards_per_client`` label-sorted shards each,
  or ``"quantity_skew"``), then each client's examples are split at random into train and test:
  ``round(test_fraction * n)`` examples (at least one, and never all) of every client with
  ``n >= 2`` examples are held out, so test clients keep their train clients' ids and label mix.
  All randomness derives from ``seed``.

  Returns:
    ``(train, test)``; ``test`` holds only the clients with held-out examples (``None`` when
    ``test_fraction == 0``).

  Raises:
    ImportError: scikit-learn is not installed.
    ValueError: unknown ``partition`` or ``test_fraction`` outside ``[0, 1)``, or a bad argument
      for the partitioner.
  """

  if partition not in PARTITIONS:
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
  if not 0 <= test_fraction < 1:
    raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction!r}")
  x, y = _load_digits()
  options = {"dirichlet": dict(alpha=alpha), "shards": dict(shards_per_client=shards_per_client)}
  fd = partitions.split(x, y, partition, seed, num_clients, **options.get(partition, {}))
  rng = np.random.default_rng([seed, 1])  # independent of the partitioner's stream
  return _split_clients(fd, test_fraction, rng)
