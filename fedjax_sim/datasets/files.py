"""Federated data read from local files."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from fedjax_sim.data import DataError, FederatedData


def load_npz(path: str) -> FederatedData:
  """Reads a NumPy ``.npz`` federated dataset, in either of two layouts:

  * columns: arrays ``x`` (``[N, ...]``), ``y`` (``[N]``) and ``client_id`` (``[N]``); clients appear
    in order of their first example and keep their examples' order;
  * per client: arrays ``x/<id>`` and ``y/<id>`` for each client id, in the order of an optional
    ``client_ids`` array (as :func:`save_npz` writes), else sorted by id.

  Nothing is unpickled (``allow_pickle=False``).

  Raises:
    DataError: missing file, unreadable or truncated archive, missing arrays, or any problem
      :meth:`FederatedData.from_arrays` finds (empty clients, x/y length mismatch, NaN, ...).
  """
  if not os.path.exists(path):
    raise DataError(f"data file {path!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {k: archive[k] for k in archive.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise DataError(f"cannot read {path!r} as .npz: {e}") from None
  if {"x", "y", "client_id"} <= arrays.keys():
    x, y, cid = arrays["x"], arrays["y"], arrays["client_id"]
    if not len(x) == len(y) == len(cid):
      raise DataError(f"{path}: x has {len(x)} rows, y {len(y)}, client_id {len(cid)}; they must match")
    ids, first = np.unique(cid, return_index=True)
    ids = ids[np.argsort(first)]
    groups = [np.flatnonzero(cid == i) for i in ids]
    return FederatedData.from_arrays([x[g] for g in groups], [y[g] for g in groups],
                                     [str(i) for i in ids])
  xs = sorted(k[2:] for k in arrays if k.startswith("x/"))
  ys = sorted(k[2:] for k in arrays if k.startswith("y/"))
  if "client_ids" in arrays:  # written by save_npz: keep the original client order
    order = [str(c) for c in arrays["client_ids"]]
    if sorted(order) == xs:
      xs = ys = order
  if not xs:
    raise DataError(f"{path}: expected arrays x, y, client_id or x/<id>, y/<id>; found "
                    f"{sorted(arrays)[:6]}")
  if xs != ys:
    missing = sorted(set(xs) ^ set(ys))[0]
    raise DataError(f"{path}: client {missing!r} has x without y or y without x")
  return FederatedData.from_arrays([arrays["x/" + c] for c in xs], [arrays["y/" + c] for c in xs], xs)


def load_centralized_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads arrays ``x`` (``[N, ...]``) and ``y`` (``[N]``) of a centralized ``.npz`` (to partition
  with :mod:`fedjax_sim.partition`). Raises DataError naming the file and the problem."""
  if not os.path.exists(path):
    raise DataError(f"data file {path!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as archive:
      if not {"x", "y"} <= set(archive.files):
        raise DataError(f"{path}: a centralized .npz needs arrays x and y; found {sorted(archive.files)[:6]}")
      x, y = archive["x"], archive["y"]
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"cannot read {path!r} as .npz: {e}") from None
  if len(x) != len(y):
    raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}")
  return x, y


def save_npz(path: str, data: FederatedData) -> None:
  """Writes ``data`` in the per-client layout :func:`load_npz` reads."""
  arrays = {"client_ids": np.array(data.client_ids)}
  for i, cid in enumerate(data.client_ids):
    arrays["x/" + cid], arrays["y/" + cid] = data.client(i)
  np.savez(path, **arrays)
