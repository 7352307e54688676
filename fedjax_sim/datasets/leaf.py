"""LEAF benchmark data (FEMNIST, Shakespeare, ...) read from its JSON files.

A LEAF JSON file holds ``users`` (the user ids, in order), ``num_samples`` (one count per user),
``user_data`` (``{user: {"x": [...], "y": [...]}}``) and, for some datasets, ``hierarchies``
(ignored here). LEAF's preprocessing writes one directory of such files per split
(``<dataset>/train/*.json`` and ``<dataset>/test/*.json``); :func:`load_leaf` reads one file, one
directory, or one split of a dataset directory, and :func:`load_leaf_splits` reads both splits.

Shakespeare's examples are text (``x``: an 80-character string, ``y``: the character after it).
With ``text="shakespeare"`` they are mapped to integer ids through :data:`SHAKESPEARE_VOCAB`, the
character set of LEAF's ``models/utils/language_utils.py`` (``ALL_LETTERS``): id ``0`` is padding,
the ``i``-th vocabulary character is id ``i + 1`` and every other character is :data:`OOV_ID`.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from fedjax_sim.data import DataError, FederatedData

SHAKESPEARE_VOCAB = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
                     "abcdefghijklmnopqrstuvwxyz}")
PAD_ID = 0
OOV_ID = len(SHAKESPEARE_VOCAB) + 1
VOCAB_SIZE = len(SHAKESPEARE_VOCAB) + 2  # padding + characters + out-of-vocabulary
TEXT_MODES = (None, "shakespeare")
SPLITS = ("train", "test")

_ASCII = 128  # vocabulary characters are all ASCII; code points >= 128 are out of vocabulary
_TABLE = np.full(_ASCII + 1, OOV_ID, np.int32)
_TABLE[[ord(c) for c in SHAKESPEARE_VOCAB]] = np.arange(1, len(SHAKESPEARE_VOCAB) + 1)


def encode_text(strings: Sequence[str], length: int) -> np.ndarray:
  """Maps strings to ``[len(strings), length]`` int32 character ids, right-padded with ``0``.

  Characters outside :data:`SHAKESPEARE_VOCAB` become :data:`OOV_ID`.

  Raises:
    TypeError: ``strings`` is a single ``str`` or holds something that is not a ``str``.
    ValueError: a string is longer than ``length``.
  """
  if isinstance(strings, str):
    raise TypeError("encode_text takes a sequence of strings, got one str")
  strings = list(strings)
  for i, s in enumerate(strings):
    if not isinstance(s, str):
      raise TypeError(f"encode_text: item {i} is {type(s).__name__}, not str")
  lengths = np.fromiter(map(len, strings), np.int64, len(strings))
  if len(strings) and lengths.max() > length:
    i = int(np.argmax(lengths))
    raise ValueError(f"encode_text: string {i} has {lengths[i]} characters, more than "
                     f"length={length}")
  codes = np.frombuffer("".join(strings).encode("utf-32-le"), dtype="<u4")
  ids = _TABLE[np.minimum(codes, _ASCII)]
  out = np.zeros((len(strings), length), np.int32)
  rows = np.repeat(np.arange(len(strings)), lengths)
  cols = np.arange(len(codes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  out[rows, cols] = ids
  return out


def decode_text(ids) -> str | list[str]:
  """Inverse of :func:`encode_text`: a 1-D id array gives a ``str``, a 2-D one a list of them.

  Padding (``0``) is dropped and :data:`OOV_ID` becomes ``"\\ufffd"``.

  Raises:
    ValueError: ids that are not 1-D or 2-D, or outside ``[0, VOCAB_SIZE)``.
  """
  ids = np.asarray(ids)
  if ids.ndim not in (1, 2):
    raise ValueError(f"decode_text takes a 1-D or 2-D id array, got shape {ids.shape}")
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f"decode_text: ids must lie in [0, {VOCAB_SIZE}), found "
                     f"{int(ids.min())}..{int(ids.max())}")
  chars = np.array(["", *SHAKESPEARE_VOCAB, "\ufffd"])
  if ids.ndim == 1:
    return "".join(chars[ids])
  return ["".join(row) for row in chars[ids]]


def _fail(file: str, problem: str, user=None):
  where = f"{file}: user {user!r}: " if user is not None else f"{file}: "
  raise DataError(where + problem)


def _parse_file(file: str) -> list[tuple[str, list, list]]:
  """Reads and checks one LEAF JSON file; returns ``[(user, x, y)]`` in the order of ``users``."""
  try:
    with open(file, "rb") as f:
      doc = json.loads(f.read().decode("utf-8"))
  except json.JSONDecodeError as e:
    _fail(file, f"invalid or truncated JSON ({e.msg} at line {e.lineno}, column {e.colno})")
  except UnicodeDecodeError as e:
    _fail(file, f"not UTF-8 text ({e.reason} at byte {e.start})")
  except OSError as e:
    _fail(file, f"cannot read the file ({e.strerror or e})")
  if not isinstance(doc, dict):
    _fail(file, "expected a JSON object with users, num_samples, user_data; got "
          f"{type(doc).__name__}")
  missing = [k for k in ("users", "num_samples", "user_data") if k not in doc]
  if missing:
    _fail(file, f"missing key(s) {missing}; found {sorted(doc)[:8]}")
  users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
  if not isinstance(users, list) or not all(isinstance(u, (str, int)) for u in users):
    _fail(file, "'users' must be a list of user ids")
  if not isinstance(counts, list) or len(counts) != len(users):
    _fail(file, f"'num_samples' must be a list with one count per user ({len(users)} users)")
  if not isinstance(data, dict):
    _fail(file, "'user_data' must be an object mapping user ids to {x, y}")
  users = [str(u) for u in users]
  seen = set()
  for u in users:
    if u in seen:
      _fail(file, "listed twice in 'users'", u)
    seen.add(u)
  extra = sorted(set(data) - seen)
  if extra:
    _fail(file, "has user_data but is not listed in 'users'", extra[0])
  parsed = []
  for u, n in zip(users, counts):
    if u not in data:
      _fail(file, "listed in 'users' but has no entry in 'user_data'", u)
    entry = data[u]
    if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
      _fail(file, "user_data entry must be an object with keys 'x' and 'y'", u)
    x, y = entry["x"], entry["y"]
    if not isinstance(x, list) or not isinstance(y, list):
      _fail(file, "'x' and 'y' must be lists", u)
    if isinstance(n, bool) or not isinstance(n, int):
      _fail(file, f"num_samples entry {n!r} is not an integer", u)
    if len(x) != len(y):
      _fail(file, f"x has {len(x)} examples but y has {len(y)}", u)
    if n != len(x):
      _fail(file, f"num_samples says {n} but x and y have {len(x)} examples", u)
    parsed.append((u, x, y))
  return parsed


def _numeric(file: str, user: str, name: str, values: list) -> np.ndarray:
  try:
    arr = np.asarray(values)
  except ValueError:
    arr = None
  if arr is None or arr.dtype == object:
    _fail(file, f"{name} is ragged (examples of different shapes)", user)
  if arr.dtype.kind in "US":
    _fail(file, f"{name} holds strings; for Shakespeare pass text='shakespeare'", user)
  if arr.dtype.kind not in "biuf":
    _fail(file, f"{name} has non-numeric dtype {arr.dtype}", user)
  return arr


def _text_arrays(file: str, user: str, x: list, y: list, length: int):
  if not all(isinstance(s, str) for s in x):
    _fail(file, "x must be a list of strings for text='shakespeare'", user)
  if not all(isinstance(c, str) and len(c) == 1 for c in y):
    _fail(file, "y must be a list of single characters for text='shakespeare'", user)
  return encode_text(x, length), encode_text(y, 1)[:, 0]


def _files(path: str, split: str | None) -> list[str]:
  """The JSON files ``path`` (and ``split``) name, in reading order."""
  if split is not None and split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
  if not os.path.exists(path):
    raise DataError(f"LEAF path {path!r} does not exist")
  if os.path.isfile(path):
    if split is not None:
      raise DataError(f"{path}: split={split!r} needs a dataset directory with train/ and test/, "
                      "not a single file")
    return [path]
  has_splits = all(os.path.isdir(os.path.join(path, s)) for s in SPLITS)
  if has_splits:
    if split is None:
      raise DataError(f"{path} holds train/ and test/: pass split='train' or split='test' "
                      "(or use load_leaf_splits)")
    path = os.path.join(path, split)
  elif split is not None:
    raise DataError(f"{path}: no {split}/ directory (expected train/ and test/ subdirectories)")
  files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))
  if not files:
    raise DataError(f"{path}: no .json files")
  return files


def load_leaf(path: str, split: str | None = None, text: str | None = None) -> FederatedData:
  """Reads a LEAF JSON file, a directory of them, or one split of a LEAF dataset directory.

  Args:
    path: a ``.json`` file; a directory whose ``*.json`` files are read in name order and merged;
      or a dataset directory with ``train/`` and ``test/`` subdirectories (then ``split`` picks one).
    split: ``"train"`` or ``"test"`` for a dataset directory, else ``None``.
    text: ``None`` for numeric data (FEMNIST: ``x`` lists of 784 floats, integer ``y``);
      ``"shakespeare"`` to map ``x`` strings to ``[n, L]`` int32 ids (``L`` the longest string,
      80 for LEAF's Shakespeare, shorter ones right-padded with ``0``) and each ``y`` character to
      one id, through :data:`SHAKESPEARE_VOCAB` (``VOCAB_SIZE`` classes).

  Returns:
    One client per user with examples, named by the LEAF user id, in the order of ``users`` (file
    after file); each client's examples keep their order. Users with ``num_samples == 0`` are
    left out (a client needs at least one example).

  Raises:
    DataError: naming the file (and user): unreadable, invalid or truncated JSON, missing keys, a
      user in ``users`` without ``user_data`` (or the reverse), ``num_samples`` disagreeing with
      ``len(x)`` or ``len(y)``, ``x``/``y`` length mismatch, ragged or string-valued features, or a
      user present in two files. Everything is parsed and checked before anything is built.
    ValueError: unknown ``split`` or ``text``.
  """
  if text not in TEXT_MODES:
    raise ValueError(f"text must be one of {TEXT_MODES}, got {text!r}")
  path = os.fspath(path)
  parsed, owner = [], {}
  for file in _files(path, split):
    for u, x, y in _parse_file(file):
      if u in owner:
        _fail(file, f"also appears in {owner[u]} (a user may appear in only one file)", u)
      owner[u] = file
      if x:
        parsed.append((file, u, x, y))
  if not parsed:
    raise DataError(f"{path}: no user has any examples")
  if text == "shakespeare":
    length = max(len(s) if isinstance(s, str) else 0 for _, _, x, _ in parsed for s in x)
    arrays = [_text_arrays(f, u, x, y, length) for f, u, x, y in parsed]
  else:
    arrays = [(_numeric(f, u, "x", x), _numeric(f, u, "y", y)) for f, u, x, y in parsed]
  try:
    return FederatedData.from_arrays([a[0] for a in arrays], [a[1] for a in arrays],
                                     [u for _, u, _, _ in parsed])
  except DataError as e:
    raise DataError(f"{path}: {e}") from None


def load_leaf_splits(path: str, text: str | None = None) -> tuple[FederatedData, FederatedData]:
  """Reads both splits of a LEAF dataset directory: ``(load_leaf(path, "train"), ... "test")``."""
  return load_leaf(path, "train", text), load_leaf(path, "test", text)
