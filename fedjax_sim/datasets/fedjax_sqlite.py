"""FedJAX's SQLite client-data files (federated EMNIST, Shakespeare, Stack Overflow, ...).

The format, as read by FedJAX's ``fedjax/core/sqlite_federated_data.py`` (``SQLiteFederatedData``)
and written by its ``SQLiteFederatedDataBuilder``, is one table::

  CREATE TABLE federated_data (
    client_id BLOB NOT NULL PRIMARY KEY,  -- the client id, bytes
    data BLOB NOT NULL,                   -- zlib-compressed msgpack of {feature name: array}
    num_examples INTEGER NOT NULL         -- the client's number of examples
  );

Clients are read in ``rowid`` (insertion) order, as FedJAX does. ``data`` is
``zlib.compress(msgpack.packb({name: array}, default=..., strict_types=True))`` where every array
is a msgpack extension (``fedjax/core/serialization.py``):

* code 1, numeric ndarray: the msgpack of ``(shape, dtype name, C-order bytes)``;
* code 3, NumPy scalar: the same encoding of a 0-d array;
* code 4, ndarray of ``bytes`` objects: the msgpack of ``(shape, [bytes, ...])``.

Nothing is unpickled; only these extensions are accepted.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import tempfile
import zlib
from typing import Iterable

import msgpack
import numpy as np

from fedjax_sim.data import DataError, FederatedData
from fedjax_sim.datasets.leaf import encode_text

_NDARRAY, _COMPLEX, _NPSCALAR, _BYTES_NDARRAY = 1, 2, 3, 4
_COLUMNS = ("client_id", "data", "num_examples")
_TEXT_MODES = (None, "shakespeare")


class _Malformed(Exception):
  """A blob that does not decode to the expected arrays (turned into a DataError by the caller)."""


def _shape(value) -> tuple[int, ...]:
  if not isinstance(value, (list, tuple)) or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
    raise _Malformed(f"array shape {value!r} is not a list of non-negative integers")
  return tuple(value)


def _ext_parts(data: bytes, count: int, what: str, layout: str) -> list:
  """The ``count`` msgpack fields of an extension's payload, or _Malformed naming ``what``."""
  try:
    parts = msgpack.unpackb(data, raw=True)
  except (ValueError, msgpack.UnpackException) as e:
    raise _Malformed(f"{what} header does not decode ({e})") from None
  if not isinstance(parts, (list, tuple)) or len(parts) != count:
    raise _Malformed(f"{what} is not {layout}")
  return list(parts)


def _ndarray_from_ext(data: bytes) -> np.ndarray:
  shape, name, buffer = _ext_parts(data, 3, "array", "(shape, dtype, bytes)")
  shape = _shape(shape)
  if not isinstance(name, bytes) or not isinstance(buffer, bytes):
    raise _Malformed("array dtype name or data is not a byte string")
  try:
    dtype = np.dtype(name.decode("ascii"))
  except (TypeError, UnicodeDecodeError):
    raise _Malformed(f"unknown array dtype {name!r}") from None
  if dtype.kind not in "biuf":
    raise _Malformed(f"unsupported array dtype {dtype.name!r} (only bool, integers and floats)")
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(buffer) != expected:
    raise _Malformed(f"array of shape {shape} and dtype {dtype.name} needs {expected} bytes, "
                     f"the blob holds {len(buffer)}")
  return np.frombuffer(buffer, dtype=dtype.newbyteorder("<")).reshape(shape)


def _bytes_ndarray_from_ext(data: bytes) -> np.ndarray:
  shape, flat = _ext_parts(data, 2, "bytes-array", "(shape, [bytes...])")
  shape = _shape(shape)
  if not isinstance(flat, list) or not all(isinstance(b, bytes) for b in flat):
    raise _Malformed("bytes array items are not byte strings")
  if len(flat) != int(np.prod(shape)):
    raise _Malformed(f"bytes array of shape {shape} holds {len(flat)} items")
  out = np.empty(len(flat), dtype=object)
  out[:] = flat
  return out.reshape(shape)


def _ext_hook(code: int, data: bytes):
  if code == _NDARRAY:
    return _ndarray_from_ext(data)
  if code == _NPSCALAR:
    return _ndarray_from_ext(data)[()]
  if code == _BYTES_NDARRAY:
    return _bytes_ndarray_from_ext(data)
  raise _Malformed(f"msgpack extension type {code} is not an array")


def decode_examples(blob: bytes) -> dict[str, np.ndarray]:
  """Decodes one ``data`` blob into ``{feature name: array}``.

  Raises:
    DataError: not zlib data, not msgpack, or not a map of names to arrays.
  """
  try:
    raw = zlib.decompress(blob)
  except (zlib.error, TypeError) as e:
    raise DataError(f"data blob is not valid zlib data ({e})") from None
  try:
    examples = msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False)
  except _Malformed as e:
    raise DataError(str(e)) from None
  except (ValueError, TypeError, msgpack.UnpackException) as e:  # ExtraData, FormatError, ...
    raise DataError(f"data blob is not valid msgpack ({type(e).__name__}: {e or 'bad format'})"
                    ) from None
  if not isinstance(examples, dict) or not examples:
    raise DataError(f"data blob decodes to {type(examples).__name__}, not a map of feature arrays")
  for name, value in examples.items():
    if not isinstance(value, np.ndarray) or value.ndim < 1:
      raise DataError(f"feature {name!r} decodes to {type(value).__name__}, not an array")
  return examples


def _ndarray_ext(arr: np.ndarray) -> msgpack.ExtType:
  if arr.dtype == object:
    flat = list(arr.reshape(-1))
    if not all(isinstance(b, bytes) for b in flat):
      raise TypeError("object arrays may only hold bytes")
    return msgpack.ExtType(_BYTES_NDARRAY, msgpack.packb((arr.shape, flat), use_bin_type=True))
  if arr.dtype.kind not in "biuf":
    raise TypeError(f"cannot store arrays of dtype {arr.dtype} (only bool, integers, floats, bytes)")
  arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)  # tobytes("C") copies if needed
  return msgpack.ExtType(_NDARRAY, msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")),
                                                 use_bin_type=True))


def _pack_default(value):
  if isinstance(value, np.ndarray):
    return _ndarray_ext(value)
  if isinstance(value, np.generic):
    ext = _ndarray_ext(np.asarray(value))
    return msgpack.ExtType(_NPSCALAR, ext.data)
  raise TypeError(f"cannot serialize {type(value).__name__}")


def encode_examples(examples: dict[str, np.ndarray]) -> bytes:
  """Encodes ``{feature name: array}`` as a FedJAX ``data`` blob (zlib-compressed msgpack)."""
  return zlib.compress(msgpack.packb(dict(examples), default=_pack_default, strict_types=True,
                                     use_bin_type=True))


def shakespeare_examples(snippets: Iterable[str | bytes],
                         seq_len: int = 80) -> tuple[np.ndarray, np.ndarray]:
  """Turns text snippets into next-character examples (LEAF's Shakespeare convention).

  Every character of every snippet becomes one target ``y`` (its id in
  :data:`~fedjax_sim.datasets.leaf.SHAKESPEARE_VOCAB`); its input ``x`` is the ``seq_len``
  characters before it in the same snippet, left-padded with id ``0`` when the snippet has fewer
  (so a snippet's first character is predicted from padding alone). Bytes are decoded as UTF-8
  (undecodable bytes and characters outside the vocabulary become the out-of-vocabulary id).

  Note FedJAX's own ``shakespeare.preprocess_client`` differs: it joins a client's snippets with
  BOS/EOS markers and predicts a whole sequence of next characters per example; here ``y`` is one
  label per example so the data fits :class:`~fedjax_sim.data.FederatedData`.

  Returns:
    ``(x, y)``: ``x`` ``[n, seq_len]`` int32, ``y`` ``[n]`` int32, ``n`` the total characters.
  """
  xs, ys = [], []
  for s in snippets:
    if isinstance(s, (bytes, np.bytes_)):
      s = bytes(s).decode("utf-8", errors="replace")
    if not s:
      continue
    ids = encode_text([s], len(s))[0]
    padded = np.concatenate([np.zeros(seq_len, np.int32), ids])
    xs.append(np.lib.stride_tricks.sliding_window_view(padded, seq_len)[:len(s)])
    ys.append(ids)
  if not xs:
    return np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32)
  return np.concatenate(xs).astype(np.int32), np.concatenate(ys).astype(np.int32)


def _connect(path: str) -> sqlite3.Connection:
  if not os.path.isfile(path):
    raise DataError(f"SQLite file {path!r} does not exist (or is not a file)")
  uri = pathlib.Path(path).absolute().as_uri() + "?mode=ro"
  try:
    return sqlite3.connect(uri, uri=True)
  except sqlite3.Error as e:
    raise DataError(f"cannot open {path!r} as SQLite: {e}") from None


def _read_rows(path: str) -> list[tuple]:
  conn = _connect(path)
  try:
    try:
      tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
      raise DataError(f"{path} is not a SQLite database ({e})") from None
    if "federated_data" not in tables:
      raise DataError(f"{path}: no table 'federated_data' (FedJAX format); tables: {sorted(tables)}")
    columns = [r[1] for r in conn.execute("PRAGMA table_info(federated_data)")]
    missing = [c for c in _COLUMNS if c not in columns]
    if missing:
      raise DataError(f"{path}: table federated_data lacks column(s) {missing}; has {columns}")
    query = "SELECT client_id, data, num_examples FROM federated_data ORDER BY {}"
    try:
      return conn.execute(query.format("rowid")).fetchall()
    except sqlite3.OperationalError:  # a WITHOUT ROWID table: fall back to the key order
      return conn.execute(query.format("client_id")).fetchall()
  except sqlite3.DatabaseError as e:
    raise DataError(f"{path}: cannot read table federated_data ({e})") from None
  finally:
    conn.close()


def _client_id(path: str, raw) -> str:
  if isinstance(raw, str):
    return raw
  if isinstance(raw, bytes):
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      raise DataError(f"{path}: client id {raw!r} is not UTF-8") from None
  raise DataError(f"{path}: client id {raw!r} is {type(raw).__name__}, not bytes")


def load_fedjax_sqlite(path: str, x_key: str = "x", y_key: str | None = "y",
                       text: str | None = None, seq_len: int = 80) -> FederatedData:
  """Reads a FedJAX SQLite federated dataset (see the module docstring for the format).

  Args:
    path: the ``.sqlite`` file (e.g. FedJAX's ``federated_emnist_train.sqlite``).
    x_key: the feature array to use as ``x`` (EMNIST: ``"pixels"``; Shakespeare: ``"snippets"``).
    y_key: the label array (EMNIST: ``"label"``); unused with ``text``.
    text: ``None``, or ``"shakespeare"`` to turn the bytes snippets in ``x_key`` into next-character
      examples with :func:`shakespeare_examples` (``VOCAB_SIZE`` classes); clients whose snippets
      are all empty are left out.
    seq_len: input window length for ``text="shakespeare"``.

  Returns:
    One client per row, in FedJAX's (rowid) order, with client ids decoded from UTF-8.

  Raises:
    DataError: naming the file (and client): not a SQLite file, missing table or columns,
      corrupted zlib, msgpack that does not decode to arrays, a missing ``x_key`` / ``y_key`` (the
      message lists the available ones), ``num_examples`` disagreeing with the array lengths, or
      any problem :meth:`FederatedData.from_arrays` finds.
  """
  if text not in _TEXT_MODES:
    raise ValueError(f"text must be one of {_TEXT_MODES}, got {text!r}")
  path = os.fspath(path)
  rows = _read_rows(path)
  if not rows:
    raise DataError(f"{path}: table federated_data has no clients")
  xs, ys, ids = [], [], []
  for raw_id, blob, count in rows:
    cid = _client_id(path, raw_id)
    where = f"{path}: client {cid!r}"
    if not isinstance(blob, bytes):
      raise DataError(f"{where}: data is {type(blob).__name__}, not a blob")
    try:
      examples = decode_examples(blob)
    except DataError as e:
      raise DataError(f"{where}: {e}") from None
    keys = [x_key] if text else [x_key, y_key]
    for key in keys:
      if key not in examples:
        raise DataError(f"{where}: no feature {key!r}; available: {sorted(examples)}")
    for key in keys:
      if len(examples[key]) != count:
        raise DataError(f"{where}: num_examples is {count} but {key!r} has "
                        f"{len(examples[key])} entries")
    x = examples[x_key]
    if text:
      if x.dtype != object:
        raise DataError(f"{where}: {x_key!r} must hold byte-string snippets for text={text!r}, "
                        f"got dtype {x.dtype}")
      x, y = shakespeare_examples(x.reshape(-1), seq_len)
      if not len(x):
        continue
    else:
      y = examples[y_key]
      for key, arr in ((x_key, x), (y_key, y)):
        if arr.dtype == object:
          raise DataError(f"{where}: {key!r} holds byte strings; for Shakespeare snippets pass "
                          "text='shakespeare'")
    xs.append(x); ys.append(y); ids.append(cid)
  if not xs:
    raise DataError(f"{path}: no client has any examples")
  try:
    return FederatedData.from_arrays(xs, ys, ids)
  except DataError as e:
    raise DataError(f"{path}: {e}") from None


def save_fedjax_sqlite(path: str, fd: FederatedData, x_key: str = "x", y_key: str = "y",
                       overwrite: bool = False) -> None:
  """Writes ``fd`` as a FedJAX SQLite file that :func:`load_fedjax_sqlite` and FedJAX read.

  Client ids are stored as UTF-8 bytes, one row per client in ``fd``'s order; each row's data is
  ``{x_key: x, y_key: y}``. The file is written to a temporary name and renamed into place.

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is false.
  """
  path = os.fspath(path)
  if x_key == y_key:
    raise ValueError(f"x_key and y_key must differ, both are {x_key!r}")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  rows = []
  for i, cid in enumerate(fd.client_ids):
    x, y = fd.client(i)
    rows.append((cid.encode("utf-8"), encode_examples({x_key: x, y_key: y}), len(x)))
  handle, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".partial")
  os.close(handle)
  try:
    conn = sqlite3.connect(tmp)
    try:
      conn.execute("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
                   "data BLOB NOT NULL, num_examples INTEGER NOT NULL)")
      conn.executemany("INSERT INTO federated_data VALUES (?, ?, ?)", rows)
      conn.commit()
    finally:
      conn.close()
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise

