"""Federated datasets: every client's examples in one flat array plus offsets.

Clients are stored back to back (``x[offsets[k] : offsets[k] + num_examples[k]]`` is client ``k``),
so a power-law population costs exactly its number of examples in memory — no padding to the
largest client. The engine gathers mini-batches straight from the flat arrays by global row index.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class DataError(ValueError):
  """Raised for malformed federated data; the message names the bad client or value."""


def integral(y: np.ndarray) -> bool:
  """True for float labels that are all whole numbers within int32's exact float range (±2²⁴)."""
  return (np.issubdtype(y.dtype, np.floating) and y.size > 0 and bool(np.all(np.abs(y) <= 2 ** 24))
          and bool(np.all(np.floor(y) == y)))


class FederatedData:
  """A federated dataset: ``K`` clients, each with its own ``(x, y)`` examples.

  Build one with :meth:`from_arrays`. Examples keep the order in which they were given.

  Attributes:
    x: ``[total_examples, ...]`` array of all clients' features, client after client.
    y: ``[total_examples]`` array of labels (integers for classification, floats for regression).
    offsets: ``[num_clients]`` int64 start row of each client in ``x`` / ``y``.
    num_examples: ``[num_clients]`` int64 count of each client's examples.
    client_ids: list of string ids, one per client.
  """

  def __init__(self, x: np.ndarray, y: np.ndarray, num_examples: np.ndarray,
               client_ids: Sequence[str]):
    self.x = x
    self.y = y
    self.num_examples = np.asarray(num_examples, dtype=np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(self.num_examples)[:-1]]).astype(np.int64)
    self.client_ids = [str(c) for c in client_ids]

  @classmethod
  def from_arrays(cls, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray],
                  client_ids: Sequence[str] | None = None) -> "FederatedData":
    """Builds a dataset from per-client arrays ``xs[k]`` (``[n_k, ...]``) and ``ys[k]`` (``[n_k]``).

    Labels: integers (and booleans) become int32 class ids, and so do float labels whose values
    are all whole numbers (LEAF and other JSON files write class ``3`` as ``3.0``); any other float
    labels stay float32 (regression targets).

    Raises:
      DataError: no clients, a client without examples, ``len(x) != len(y)``, feature shapes that
        differ between clients, non-finite values, or duplicate / wrongly counted ``client_ids``.
    """
    xs, ys = list(xs), list(ys)
    if not xs:
      raise DataError("a federated dataset needs at least one client; got 0")
    if len(xs) != len(ys):
      raise DataError(f"got {len(xs)} feature arrays but {len(ys)} label arrays")
    if client_ids is None:
      client_ids = [str(i) for i in range(len(xs))]
    client_ids = [str(c) for c in client_ids]
    if len(client_ids) != len(xs):
      raise DataError(f"got {len(client_ids)} client_ids for {len(xs)} clients")
    if len(set(client_ids)) != len(client_ids):
      dup = next(c for c in client_ids if client_ids.count(c) > 1)
      raise DataError(f"client id {dup!r} appears more than once")
    xs = [np.asarray(x) for x in xs]
    ys = [np.asarray(y) for y in ys]
    feature_shape = xs[0].shape[1:]
    for cid, x, y in zip(client_ids, xs, ys):
      if x.ndim < 1 or len(x) == 0:
        raise DataError(f"client {cid!r} has no examples (every client needs at least one)")
      if len(x) != len(y):
        raise DataError(f"client {cid!r}: x has {len(x)} examples but y has {len(y)}")
      if x.shape[1:] != feature_shape:
        raise DataError(f"client {cid!r}: feature shape {x.shape[1:]} differs from "
                        f"client {client_ids[0]!r}'s {feature_shape}")
      if y.ndim != 1:
        raise DataError(f"client {cid!r}: y must be 1-D (one label per example), got shape {y.shape}")
      for name, arr in (("x", x), ("y", y)):
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
          raise DataError(f"client {cid!r}: {name} has non-numeric dtype {arr.dtype}")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
          bad = int(np.argwhere(~np.isfinite(arr.reshape(len(arr), -1)))[0, 0])
          raise DataError(f"client {cid!r}: {name} contains NaN or infinity (example {bad})")
    x_all = np.concatenate(xs)
    y_all = np.concatenate(ys)
    if np.issubdtype(x_all.dtype, np.floating) or x_all.dtype == np.bool_:
      x_all = x_all.astype(np.float32, copy=False)
    if np.issubdtype(y_all.dtype, np.integer) or y_all.dtype == np.bool_ or integral(y_all):
      y_all = y_all.astype(np.int32, copy=False)
    else:
      y_all = y_all.astype(np.float32, copy=False)
    return cls(x_all, y_all, np.array([len(x) for x in xs]), client_ids)

  def device_arrays(self):
    """``(x, y)`` as JAX arrays on the default device, copied once and cached."""
    if getattr(self, "_device", None) is None:
      import jax.numpy as jnp
      self._device = (jnp.asarray(self.x), jnp.asarray(self.y))
    return self._device

  @property
  def num_clients(self) -> int:
    return len(self.num_examples)

  @property
  def total_examples(self) -> int:
    return int(self.num_examples.sum())

  @property
  def feature_shape(self) -> tuple[int, ...]:
    return tuple(self.x.shape[1:])

  def client(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(x, y)`` of client ``i`` (by position), in the order they were given."""
    if not 0 <= i < self.num_clients:
      raise IndexError(f"client index {i} out of range for {self.num_clients} clients")
    lo, n = self.offsets[i], self.num_examples[i]
    return self.x[lo:lo + n], self.y[lo:lo + n]

  def subset(self, indices: Sequence[int]) -> "FederatedData":
    """A new dataset made of the clients at ``indices`` (in that order)."""
    pairs = [self.client(int(i)) for i in indices]
    return FederatedData.from_arrays([p[0] for p in pairs], [p[1] for p in pairs],
                                     [self.client_ids[int(i)] for i in indices])

  def __repr__(self) -> str:
    n = self.num_examples
    return (f"FederatedData(num_clients={self.num_clients}, total_examples={self.total_examples}, "
            f"feature_shape={self.feature_shape}, examples per client min/median/max="
            f"{n.min()}/{int(np.median(n))}/{n.max()})")
