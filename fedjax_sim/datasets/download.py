"""Cached, resumable, checksummed downloads (standard library only).

:func:`download` writes ``<cache_dir>/<filename>.partial``, resumes an interrupted transfer with an
HTTP ``Range`` request, checks the size and SHA-256 when given, and renames the finished file into
place atomically, so ``<cache_dir>/<filename>`` only ever exists complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request

from fedjax_sim.data import DataError

# FedJAX's preprocessed SQLite files, at the addresses its dataset modules download from
# (fedjax/datasets/emnist.py, shakespeare.py, stackoverflow.py). FedJAX publishes no checksums for
# them, so none are listed: pass ``sha256=`` yourself to pin a copy.
_FEDJAX = "https://storage.googleapis.com/gresearch/fedjax"
PUBLIC_FILES = {
    "emnist_train": f"{_FEDJAX}/emnist/federated_emnist_train.sqlite",
    "emnist_test": f"{_FEDJAX}/emnist/federated_emnist_test.sqlite",
    "emnist_digitsonly_train": f"{_FEDJAX}/emnist/federated_emnist_digitsonly_train.sqlite",
    "emnist_digitsonly_test": f"{_FEDJAX}/emnist/federated_emnist_digitsonly_test.sqlite",
    "shakespeare_train": f"{_FEDJAX}/shakespeare/shakespeare_train.sqlite",
    "shakespeare_test": f"{_FEDJAX}/shakespeare/shakespeare_test.sqlite",
    "stackoverflow_train": f"{_FEDJAX}/stackoverflow/stackoverflow_train.sqlite",
    "stackoverflow_held_out": f"{_FEDJAX}/stackoverflow/stackoverflow_held_out.sqlite",
    "stackoverflow_test": f"{_FEDJAX}/stackoverflow/stackoverflow_test.sqlite",
}

_CHUNK = 1 << 20


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def _verify(path: str, sha256: str | None, size: int | None) -> str | None:
  """Returns what is wrong with the file at ``path`` (``None`` if it matches)."""
  actual_size = os.path.getsize(path)
  if size is not None and actual_size != size:
    return f"expected {size} bytes, got {actual_size}"
  if sha256 is not None:
    actual = _sha256(path)
    if actual != sha256.lower():
      return f"expected SHA-256 {sha256.lower()}, got {actual}"
  return None


def _filename(url: str, filename: str | None) -> str:
  name = filename or os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
  if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
    raise DataError(f"cannot derive a file name from {url!r}; pass filename=")
  return name


def _open(url: str, offset: int, timeout: float):
  headers = {"Range": f"bytes={offset}-"} if offset else {}
  return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _resume_offset(response, offset: int) -> int | None:
  """Where the body of ``response`` starts in the file, ``None`` if it cannot be used."""
  status = getattr(response, "status", None)
  if offset and status == 206:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return offset if match and int(match.group(1)) == offset else None
  return 0  # 200 or a file:// response: the whole file from the start


def _fetch(url: str, partial: str, timeout: float) -> None:
  """Downloads ``url`` into ``partial``, appending to what is there when the server allows it."""
  offset = os.path.getsize(partial) if os.path.exists(partial) else 0
  try:
    try:
      response = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
      if e.code != 416 or not offset:  # 416: the partial file is unusable; start over
        raise
      offset = 0
      response = _open(url, 0, timeout)
    with response:
      start = _resume_offset(response, offset)
      if start is None:  # a 206 for some other range: start over without Range
        response.close()
        return _fetch_fresh(url, partial, timeout)
      length = response.headers.get("Content-Length")
      expected = int(length) if length and length.isdigit() else None
      written = 0
      with open(partial, "ab" if start else "wb") as f:
        for block in iter(lambda: response.read(_CHUNK), b""):
          f.write(block)
          written += len(block)
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    raise DataError(f"download of {url} failed ({e}); the partial file {partial} is kept and the "
                    "next call resumes it") from None
  if expected is not None and written < expected:
    raise DataError(f"download of {url} stopped after {written} of {expected} bytes; the partial "
                    f"file {partial} is kept and the next call resumes it")


def _fetch_fresh(url: str, partial: str, timeout: float) -> None:
  os.remove(partial)
  _fetch(url, partial, timeout)


def download(url: str, cache_dir: str, sha256: str | None = None, size: int | None = None,
             filename: str | None = None, timeout: float = 60.0) -> str:
  """Downloads ``url`` into ``cache_dir`` once and returns the local path.

  If ``<cache_dir>/<filename>`` already exists and matches ``size`` / ``sha256`` (when given), it
  is returned without touching the network; a cached file that does not match is downloaded
  again. Otherwise the body goes to ``<filename>.partial``: an existing partial file is resumed
  with a ``Range`` request (kept if the server answers 206, restarted cleanly on 200), and the
  finished file is checked and renamed into place atomically. ``http(s)://`` and ``file://`` URLs
  work (``file://`` always copies from the start).

  Args:
    url: where to download from.
    cache_dir: directory for the file (created if missing).
    sha256: expected hex SHA-256 digest, or ``None`` not to check.
    size: expected size in bytes, or ``None`` not to check.
    filename: the local name; defaults to the last component of the URL path.
    timeout: socket timeout in seconds.

  Raises:
    DataError: naming the URL: a network or HTTP error (the partial file is kept for resuming),
      a truncated transfer, or a size / SHA-256 mismatch (the message gives the expected and
      actual values; the partial file is deleted).
  """
  if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
    raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
  path = os.path.join(cache_dir, _filename(url, filename))
  if os.path.exists(path):
    if _verify(path, sha256, size) is None:
      return path
    os.remove(path)
  os.makedirs(cache_dir, exist_ok=True)
  partial = path + ".partial"
  if size is not None and os.path.exists(partial) and os.path.getsize(partial) > size:
    os.remove(partial)
  _fetch(url, partial, timeout)
  problem = _verify(partial, sha256, size)
  if problem is not None:
    os.remove(partial)
    raise DataError(f"download of {url}: {problem}; deleted {partial}")
  os.replace(partial, path)
  return path
