"""Checkpoints of a simulation: the engine's whole state, the round counter and the history.

A checkpoint is one file ``ckpt-<round>.msgpack`` in the checkpoint directory:

```
b"FJSCKPT1" | sha256(payload) (32 bytes) | payload = msgpack {format, round, fingerprint,
                                                                 history, leaves: [arrays]}
```

The state's leaves are stored in ``jax.tree.flatten`` order and put back into the structure of
the engine's own ``init_state`` (so no class is ever deserialized: msgpack, never pickle). A file
is written under a temporary name, flushed to disk (``fsync``) and renamed, so a reader sees a
whole checkpoint or none; the checksum catches a file torn anyway (a filesystem that reorders
writes, a truncated copy), and :func:`load_latest` then falls back to the previous checkpoint
with a warning. The last ``keep`` checkpoints are kept.

Rounds are keyed by their number (round ``r`` uses ``fold_in(train_key, r)``), so a checkpoint
needs no RNG state: the resumed rounds draw the same cohorts and keys as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import serialization

MAGIC = b"FJSCKPT1"
FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d+)\.msgpack$")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used for this run; the message says why."""


class TornCheckpoint(CheckpointError):
  """A checkpoint file that is not whole (torn by a kill, truncated, corrupted)."""


class Checkpoint(NamedTuple):
  """A loaded checkpoint: the last finished ``round``, the engine ``state`` (a flat list of
  arrays, see :func:`restore`), the ``history`` up to that round and the run's ``fingerprint``."""
  round: int
  state: Any
  history: dict
  fingerprint: dict
  path: str


def checkpoint_path(directory: str, round_num: int) -> str:
  return os.path.join(directory, f"ckpt-{round_num:09d}.msgpack")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
  """``(round, path)`` of the checkpoint files in ``directory``, oldest first."""
  if not os.path.isdir(directory):
    return []
  found = [(int(m.group(1)), os.path.join(directory, name))
           for name in os.listdir(directory) if (m := _NAME.match(name))]
  return sorted(found)


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # e.g. a platform without directory handles
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def save(directory: str, round_num: int, state, history: dict, fingerprint: dict,
         keep: int = 2) -> str:
  """Writes the checkpoint of ``round_num`` atomically and deletes all but the newest ``keep``.

  Returns:
    The checkpoint's path.
  """
  os.makedirs(directory, exist_ok=True)
  leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(state))]
  payload = serialization.msgpack_serialize({
      "format": FORMAT, "round": int(round_num), "fingerprint": fingerprint,
      "history": {k: list(v) for k, v in history.items()},
      "leaves": {str(i): leaf for i, leaf in enumerate(leaves)}})
  path = checkpoint_path(directory, round_num)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(directory)
  for _, old in list_checkpoints(directory)[:-keep]:
    os.remove(old)
  return path


def _read(path: str) -> Checkpoint:
  """The checkpoint at ``path`` with its state as the flat list of leaves."""
  with open(path, "rb") as f:
    blob = f.read()
  head = len(MAGIC) + 32
  if len(blob) < head or blob[:len(MAGIC)] != MAGIC:
    raise TornCheckpoint(f"{path} is not a whole fedjax_sim checkpoint (torn or truncated)")
  payload = blob[head:]
  if hashlib.sha256(payload).digest() != blob[len(MAGIC):head]:
    raise TornCheckpoint(f"{path} is torn or corrupt (checksum mismatch)")
  data = serialization.msgpack_restore(payload)
  if data.get("format") != FORMAT:
    raise CheckpointError(f"{path} has checkpoint format {data.get('format')!r}; this version "
                          f"reads format {FORMAT}")
  leaves = [data["leaves"][str(i)] for i in range(len(data["leaves"]))]
  return Checkpoint(int(data["round"]), leaves,
                    {k: list(v) for k, v in data["history"].items()}, data["fingerprint"], path)


def restore(checkpoint: Checkpoint, template):
  """The checkpoint's state in the structure of ``template`` (a state of the run to continue,
  e.g. the engine's ``init_state(params)``), its leaves' shapes and dtypes checked."""
  want, treedef = jax.tree.flatten(template)
  got = checkpoint.state
  if len(got) != len(want):
    raise CheckpointError(f"{checkpoint.path} holds {len(got)} state arrays; this run's state "
                          f"has {len(want)} (a different algorithm, aggregator or model)")
  for i, (g, w) in enumerate(zip(got, want)):
    if tuple(g.shape) != tuple(w.shape) or np.dtype(g.dtype) != np.dtype(w.dtype):
      raise CheckpointError(f"{checkpoint.path}: state array {i} is {g.dtype}{list(g.shape)}; "
                            f"this run's is {np.dtype(w.dtype)}{list(w.shape)}")
  return jax.tree.unflatten(treedef, got)


def load_latest(directory: str) -> Checkpoint | None:
  """The newest whole checkpoint in ``directory`` (``None`` when there is none), its state a flat
  list of arrays (:func:`restore` puts them in a run's structure).

  A torn or corrupt newer file is skipped with a warning and the previous one is loaded.

  Raises:
    CheckpointError: every checkpoint present is torn, or one is of an unknown format.
  """
  found = list_checkpoints(directory)
  errors = []
  for _, path in reversed(found):
    try:
      return _read(path)
    except TornCheckpoint as e:
      errors.append(str(e))
    except (ValueError, KeyError, TypeError) as e:  # undecodable: torn past the checksum's view
      if isinstance(e, CheckpointError):
        raise
      errors.append(f"{path} is unreadable ({e})")
    warnings.warn(f"skipping checkpoint: {errors[-1]}; falling back to the previous one",
                  RuntimeWarning, stacklevel=2)
  if found:
    raise CheckpointError(f"no whole checkpoint in {directory}: {'; '.join(errors)}")
  return None


def differing_keys(saved: dict, current: dict, ignore=("rounds",)) -> list[str]:
  """Keys whose values differ between two fingerprints (or configs), except ``ignore``."""
  keys = sorted(set(saved) | set(current))
  return [k for k in keys if k not in ignore and saved.get(k, "<absent>") != current.get(k, "<absent>")]
