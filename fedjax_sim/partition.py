"""Split a centralized dataset ``(x [N, ...], y [N])`` into simulated clients.

Every partitioner returns a :class:`~fedjax_sim.data.FederatedData` whose clients are named
``"0" .. "K-1"`` (:func:`by_id` keeps the original ids). Within a client, examples keep their
increasing original-index order. All randomness comes from ``numpy.random.default_rng(seed)``
built from the explicit integer ``seed``: the same call gives the same partition on every machine.

Schemes:

* :func:`iid` — a uniformly random permutation cut into ``K`` near-equal parts (sizes differ by at
  most one): the homogeneous baseline.
* :func:`dirichlet` — label skew. For each class ``c``, proportions over the ``K`` clients are
  drawn ``p_c ~ Dir(α·1_K)`` and that class's examples are split accordingly: the per-class scheme
  of Yurochkin et al. 2019, "Bayesian Nonparametric Federated Learning of Neural Networks" (ICML).
  Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification" (arXiv:1909.06335), draw each client's class mixture ``q ~ Dir(α·p)`` instead
  (``p``: the class prior); ``α`` means the same in both. Small ``α`` gives clients dominated by
  one or two classes; large ``α`` approaches IID. The whole draw is repeated until every client
  has ``min_size`` examples.
* :func:`shards` — the pathological non-IID split of McMahan et al. 2017, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data" (AISTATS, §3): sort the examples by label,
  cut them into ``K·s`` shards and hand every client ``s`` random shards (MNIST: 200 shards of
  300, two per client), so a client sees at most about ``s`` labels.
* :func:`quantity_skew` — label-independent size skew: client sizes are proportional to lognormal
  or Pareto (power-law) draws, as in the power-law device sizes of the FedProx synthetic data (Li
  et al. 2020, arXiv:1812.06127) and the "quantity skew" setting of Li et al. 2022, "Federated
  Learning on Non-IID Data Silos: An Experimental Study" (ICDE, arXiv:2102.02079); examples are
  assigned by a random permutation.
* :func:`by_id` — the natural partition: one client per distinct user / writer / device id.

:func:`holdout` splits every client's examples into a training and a held-out test part.
:func:`label_distribution` counts each client's labels (``[num_clients, num_classes]``).
"""

from __future__ import annotations

import numpy as np

from fedjax_sim._checks import positive_float, positive_int
from fedjax_sim.data import DataError, FederatedData, integral

_DISTRIBUTIONS = ("lognormal", "power_law")


def _rng(seed) -> np.random.Generator:
  if isinstance(seed, np.integer):
    seed = int(seed)
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  return np.random.default_rng(seed)


def _arrays(x, y) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``x, y`` as arrays; ``y`` must be 1-D, as long as ``x`` and non-empty. Float labels
  that are all whole numbers become int32 class ids (the rule of ``FederatedData.from_arrays``)."""
  x, y = np.asarray(x), np.asarray(y)
  if integral(y):
    y = y.astype(np.int32)
  if x.ndim < 1:
    raise DataError(f"x must have a leading example axis, got shape {x.shape}")
  if y.ndim != 1:
    raise DataError(f"y must be 1-D (one label per example), got shape {y.shape}")
  if len(x) != len(y):
    raise DataError(f"x has {len(x)} examples but y has {len(y)}")
  if len(x) == 0:
    raise DataError("cannot partition an empty dataset (x has 0 examples)")
  return x, y


def _num_clients(num_clients, n: int) -> int:
  num_clients = positive_int("num_clients", num_clients)
  if num_clients > n:
    raise ValueError(f"num_clients={num_clients} exceeds the {n} examples (every client needs one)")
  return num_clients


def _integer_labels(y: np.ndarray, scheme: str) -> None:
  if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
    raise DataError(f"{scheme} needs integer class labels, got y of dtype {y.dtype}")


def _from_owner(x: np.ndarray, y: np.ndarray, owner: np.ndarray, num_clients: int,
                client_ids=None) -> FederatedData:
  """Builds the dataset in which example ``i`` belongs to client ``owner[i]`` (``-1``: dropped)."""
  kept = np.flatnonzero(owner >= 0)
  order = kept[np.argsort(owner[kept], kind="stable")]  # grouped by client, original order inside
  cuts = np.cumsum(np.bincount(owner[kept], minlength=num_clients))[:-1]
  xs, ys = np.split(x[order], cuts), np.split(y[order], cuts)
  return FederatedData.from_arrays(xs, ys, client_ids)


def _assign(perm: np.ndarray, sizes: np.ndarray, n: int) -> np.ndarray:
  """Owner array giving client ``k`` the next ``sizes[k]`` examples of ``perm``."""
  owner = np.full(n, -1, np.int64)
  owner[perm] = np.repeat(np.arange(len(sizes)), sizes)
  return owner


def iid(x, y, num_clients: int, seed: int) -> FederatedData:
  """Uniformly random split into ``num_clients`` parts whose sizes differ by at most one.

  Raises:
    DataError: ``x`` and ``y`` lengths differ or the dataset is empty.
    ValueError: ``num_clients`` is not a positive int or exceeds the number of examples.
  """
  x, y = _arrays(x, y)
  k = _num_clients(num_clients, len(y))
  rng = _rng(seed)
  sizes = np.full(k, len(y) // k) + (np.arange(k) < len(y) % k)
  return _from_owner(x, y, _assign(rng.permutation(len(y)), sizes, len(y)), k)


def dirichlet(x, y, num_clients: int, alpha: float, seed: int, min_size: int = 1,
              max_tries: int = 100) -> FederatedData:
  """Label-skewed split: each class is spread over the clients by ``Dir(alpha·1)`` proportions.

  For every class, ``p ~ Dir(alpha·1_K)`` and the class's (shuffled) examples go to the clients in
  the counts ``diff(floor(cumsum(p)·n_c))``. The whole draw is repeated, up to ``max_tries`` times,
  until every client holds at least ``min_size`` examples.

  Args:
    x: ``[N, ...]`` features.
    y: ``[N]`` integer class labels.
    num_clients: number of clients ``K``.
    alpha: Dirichlet concentration (> 0); smaller is more skewed.
    seed: integer seed.
    min_size: the fewest examples any client may get.
    max_tries: how many full draws to try before giving up.

  Raises:
    ValueError: ``alpha`` not a positive finite number, or a bad count argument.
    DataError: non-integer labels, or no draw in ``max_tries`` gave every client ``min_size``.
  """
  x, y = _arrays(x, y)
  _integer_labels(y, "dirichlet")
  k = _num_clients(num_clients, len(y))
  alpha = positive_float("alpha", alpha)
  min_size, max_tries = positive_int("min_size", min_size), positive_int("max_tries", max_tries)
  rng = _rng(seed)
  if k * min_size > len(y):
    raise DataError(f"dirichlet: num_clients={k} clients of min_size={min_size} need "
                    f"{k * min_size} examples but there are {len(y)}")
  classes = [np.flatnonzero(y == c) for c in np.unique(y)]
  best = -1
  for _ in range(max_tries):
    owner = np.empty(len(y), np.int64)
    for idx in classes:
      ends = np.minimum(np.cumsum(rng.dirichlet(np.full(k, alpha))) * len(idx), len(idx))
      ends = ends.astype(np.int64)
      ends[-1] = len(idx)
      owner[rng.permutation(idx)] = np.repeat(np.arange(k), np.diff(ends, prepend=0))
    smallest = int(np.bincount(owner, minlength=k).min())
    if smallest >= min_size:
      return _from_owner(x, y, owner, k)
    best = max(best, smallest)
  raise DataError(f"dirichlet with alpha={alpha} could not give all num_clients={k} clients "
                  f"min_size={min_size} examples in {max_tries} tries (the smallest client had at "
                  f"best {best}); raise alpha or lower min_size / num_clients")


def shards(x, y, num_clients: int, shards_per_client: int, seed: int,
           shard_size: int | None = None) -> FederatedData:
  """Pathological non-IID split of McMahan et al. 2017: sort by label, deal out shards.

  Examples are sorted by label (stable; ties in a seeded random order) and cut into
  ``num_clients * shards_per_client`` contiguous shards; each client gets ``shards_per_client``
  shards chosen at random. By default every example is used and the shards have ``N // shards``
  or one more examples (60000 examples, 100 clients, 2 shards each: 200 shards of 300). With an
  explicit ``shard_size`` every shard has exactly that many examples, drawn from a seeded random
  subset of the data; the other examples are dropped.

  Raises:
    DataError: ``x`` / ``y`` mismatch, fewer examples than shards, or ``shard_size * shards > N``.
    ValueError: a count argument that is not a positive int.
  """
  x, y = _arrays(x, y)
  n = len(y)
  k = _num_clients(num_clients, n)
  per_client = positive_int("shards_per_client", shards_per_client)
  shard_size = positive_int("shard_size", shard_size, allow_none=True)
  rng = _rng(seed)
  total = k * per_client
  if shard_size is None and n < total:
    raise DataError(f"shards: {n} examples cannot fill num_clients={k} x shards_per_client="
                    f"{per_client} = {total} shards")
  if shard_size is not None and shard_size * total > n:
    raise DataError(f"shards: {total} shards of shard_size={shard_size} need "
                    f"{shard_size * total} examples but there are {n}")
  used = n if shard_size is None else shard_size * total
  perm = rng.permutation(n)[:used]  # a random subset (all of it by default) in random order
  ordered = perm[np.argsort(y[perm], kind="stable")]
  piece_sizes = np.full(total, used // total) + (np.arange(total) < used % total)
  piece_owner = np.empty(total, np.int64)
  piece_owner[rng.permutation(total)] = np.arange(total) // per_client  # s random shards each
  owner = np.full(n, -1, np.int64)
  owner[ordered] = np.repeat(piece_owner, piece_sizes)
  return _from_owner(x, y, owner, k)


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
  """Non-negative integers proportional to ``weights`` that sum exactly to ``total``."""
  share = weights / weights.sum() * total
  sizes = np.floor(share).astype(np.int64)
  short = total - int(sizes.sum())
  sizes[np.argsort(-(share - sizes), kind="stable")[:short]] += 1
  return sizes


def quantity_skew(x, y, num_clients: int, seed: int, distribution: str = "lognormal",
                  sigma: float = 1.0, exponent: float = 1.5, min_size: int = 1) -> FederatedData:
  """Size-skewed split: client sizes follow a lognormal or power law; labels are not skewed.

  Weights are ``w_k ~ lognormal(0, sigma)`` or, for ``"power_law"``, Pareto with tail index
  ``exponent`` (``w_k = 1 + pareto(exponent)``). Each client gets ``min_size`` examples plus its
  share ``w_k / sum(w)`` of the remaining ``N - K·min_size``, rounded by largest remainder so the
  sizes sum exactly to ``N``. Examples are then assigned by a random permutation.

  Raises:
    ValueError: unknown ``distribution``, or a non-positive ``sigma`` / ``exponent`` / count.
    DataError: ``num_clients * min_size > N`` or ``x`` / ``y`` mismatch.
  """
  x, y = _arrays(x, y)
  n = len(y)
  k = _num_clients(num_clients, n)
  min_size = positive_int("min_size", min_size)
  if distribution not in _DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
  sigma, exponent = positive_float("sigma", sigma), positive_float("exponent", exponent)
  rng = _rng(seed)
  if k * min_size > n:
    raise DataError(f"quantity_skew: num_clients={k} clients of min_size={min_size} need "
                    f"{k * min_size} examples but there are {n}")
  if distribution == "lognormal":
    weights = rng.lognormal(0.0, sigma, k)
  else:
    weights = 1.0 + rng.pareto(exponent, k)
  sizes = min_size + _largest_remainder(weights, n - k * min_size)
  return _from_owner(x, y, _assign(rng.permutation(n), sizes, n), k)


def by_id(x, y, ids) -> FederatedData:
  """Natural partition: one client per distinct value of ``ids`` (e.g. writer or user id).

  Clients come in order of first appearance and are named ``str(id)``; each client's examples keep
  their original order.

  Raises:
    DataError: ``ids`` is not 1-D with one id per example, or ``x`` / ``y`` mismatch.
  """
  x, y = _arrays(x, y)
  ids = np.asarray(ids)
  if ids.shape != (len(y),):
    raise DataError(f"ids must have shape ({len(y)},) (one id per example), got {ids.shape}")
  uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
  rank = np.argsort(first)  # distinct ids in order of first appearance
  position = np.empty(len(uniq), np.int64)
  position[rank] = np.arange(len(uniq))
  return _from_owner(x, y, position[inverse.reshape(-1)], len(uniq),
                     [str(u) for u in uniq[rank]])


def holdout(fd: FederatedData, test_fraction: float, seed: int
            ) -> tuple[FederatedData, FederatedData]:
  """Per-client held-out split: ``(train, test)`` with the same client ids.

  Client ``k`` sends ``round(test_fraction · n_k)`` of its examples, drawn uniformly without
  replacement, to ``test`` and keeps the rest, at least one, in ``train`` (each part in the
  original order). A client whose share rounds to zero has no test examples and is left out of
  ``test``; ``train`` keeps every client.

  Raises:
    ValueError: ``test_fraction`` outside ``(0, 1)`` or a bad seed.
    DataError: no client has a test example at this fraction.
  """
  if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
      or not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
  rng = _rng(seed)
  parts = {"train": ([], [], []), "test": ([], [], [])}
  for k, cid in enumerate(fd.client_ids):
    x, y = fd.client(k)
    n = len(y)
    n_test = min(int(np.floor(test_fraction * n + 0.5)), n - 1)
    is_test = np.zeros(n, bool)
    is_test[rng.permutation(n)[:n_test]] = True
    for name, rows in (("train", ~is_test), ("test", is_test)):
      if rows.any():
        for out, value in zip(parts[name], (x[rows], y[rows], cid)):
          out.append(value)
  if not parts["test"][0]:
    raise DataError(f"test_fraction={test_fraction} leaves no client a test example (the largest "
                    f"client has {int(fd.num_examples.max())})")
  return tuple(FederatedData.from_arrays(*parts[name]) for name in ("train", "test"))


def label_distribution(fd: FederatedData, num_classes: int | None = None) -> np.ndarray:
  """Label counts ``[num_clients, num_classes]`` (int64): ``[k, c]`` is client ``k``'s class ``c``.

  Args:
    fd: a dataset with integer labels in ``[0, num_classes)``.
    num_classes: defaults to the largest label plus one.

  Raises:
    DataError: labels are not integers or are negative.
    ValueError: a label is ``>= num_classes``.
  """
  y = np.asarray(fd.y)
  _integer_labels(y, "label_distribution")
  y = y.astype(np.int64)
  if len(y) and y.min() < 0:
    raise DataError(f"labels must be non-negative class indices, found {int(y.min())}")
  top = int(y.max()) + 1 if len(y) else 0
  if num_classes is None:
    num_classes = top
  else:
    num_classes = positive_int("num_classes", num_classes)
    if top > num_classes:
      raise ValueError(f"num_classes={num_classes} but a label equals {top - 1}")
  client = np.repeat(np.arange(fd.num_clients), fd.num_examples)
  counts = np.bincount(client * num_classes + y, minlength=fd.num_clients * num_classes)
  return counts.reshape(fd.num_clients, num_classes).astype(np.int64)


SCHEMES = ("iid", "dirichlet", "shards", "quantity_skew", "by_id")


def split(x, y, scheme: str, seed: int, num_clients: int | None = None, **options) -> FederatedData:
  """Partitions by scheme name (for configs): ``split(x, y, "dirichlet", seed, num_clients=100,
  alpha=0.3)``. ``options`` are the chosen partitioner's keywords (``by_id`` takes ``ids``).

  Raises:
    ValueError: unknown scheme or options, naming them.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"partition must be one of {', '.join(SCHEMES)}, got {scheme!r}")
  fn = {"iid": iid, "dirichlet": dirichlet, "shards": shards, "quantity_skew": quantity_skew,
        "by_id": by_id}[scheme]
  import inspect
  given = {"x", "y", "num_clients", "seed", *options}
  missing = [p.name for p in inspect.signature(fn).parameters.values()
             if p.default is p.empty and p.name not in given]
  if missing:
    raise ValueError(f"partition {scheme!r} needs option(s) {', '.join(map(repr, missing))} "
                     f"(in the CLI: dataset_options.{missing[0]}=...)")
  takes = [p for p in inspect.signature(fn).parameters if p not in ("x", "y", "seed")]
  unknown = sorted(set(options) - set(takes))
  if unknown:
    raise ValueError(f"partition {scheme!r} has no option {unknown[0]!r}; its options: "
                     f"{', '.join(takes)}")
  try:
    if scheme == "by_id":
      return fn(x, y, **options)
    return fn(x, y, num_clients=num_clients, seed=seed, **options)
  except TypeError as e:
    raise ValueError(f"bad options {sorted(options)} for partition {scheme!r}: {e}") from None
