"""File-format loaders (LEAF JSON, FedJAX SQLite), the download helper and the digits dataset."""

import hashlib
import http.server
import json
import sqlite3
import threading
import zlib

import msgpack
import numpy as np
import pytest

from fedjax_sim.data import DataError, FederatedData
from fedjax_sim.datasets import (PUBLIC_FILES, REGISTRY, SHAKESPEARE_VOCAB, VOCAB_SIZE, decode_text,
                                 download, encode_text, load_fedjax_sqlite, load_leaf,
                                 load_leaf_splits, save_fedjax_sqlite, shakespeare_examples)
from fedjax_sim.datasets import fedjax_sqlite
from fedjax_sim.datasets.leaf import OOV_ID

# ----------------------------------------------------------------------------------------- LEAF


def _leaf_doc(users):
  """A LEAF document from ``{user: (x, y)}`` (insertion order is the ``users`` order)."""
  return {"users": list(users), "num_samples": [len(x) for x, _ in users.values()],
          "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()}}


def _write_json(path, doc):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(doc))
  return path


def _femnist_users(rng, names, dim=784):
  return {u: (rng.random((n, dim)).round(4).tolist(), rng.integers(0, 62, n).tolist())
          for u, n in names}


def test_leaf_file_round_trip_keeps_ids_order_and_values(tmp_path):
  users = _femnist_users(np.random.default_rng(0), [("f_z", 3), ("f_a", 1), ("f_10", 2)])
  doc = _leaf_doc(users)
  doc["hierarchies"] = ["w1", "w2", "w3"]
  fd = load_leaf(str(_write_json(tmp_path / "all_data_0.json", doc)))
  assert fd.client_ids == ["f_z", "f_a", "f_10"]
  assert fd.feature_shape == (784,)
  for i, (x, y) in enumerate(users.values()):
    cx, cy = fd.client(i)
    np.testing.assert_array_equal(cx, np.asarray(x, np.float32))
    np.testing.assert_array_equal(cy, y)
  assert fd.y.dtype == np.int32


def test_leaf_directory_merges_files_in_name_order_and_skips_empty_users(tmp_path):
  rng = np.random.default_rng(1)
  first = _femnist_users(rng, [("u3", 2), ("u1", 1)], dim=4)
  second = _femnist_users(rng, [("u2", 2), ("empty", 0)], dim=4)
  _write_json(tmp_path / "b.json", _leaf_doc(second))
  _write_json(tmp_path / "a.json", _leaf_doc(first))
  (tmp_path / "notes.txt").write_text("ignored")
  fd = load_leaf(tmp_path)
  assert fd.client_ids == ["u3", "u1", "u2"]
  np.testing.assert_array_equal(fd.client(2)[0], np.asarray(second["u2"][0], np.float32))


def test_leaf_split_layout(tmp_path):
  rng = np.random.default_rng(2)
  _write_json(tmp_path / "train" / "x.json", _leaf_doc(_femnist_users(rng, [("a", 3), ("b", 2)], 5)))
  _write_json(tmp_path / "test" / "x.json", _leaf_doc({"a": ([[0.0] * 5], [61]),
                                                       "b": ([[1.0] * 5], [0])}))
  train, test = load_leaf_splits(str(tmp_path))
  assert train.client_ids == test.client_ids == ["a", "b"]
  assert train.num_examples.tolist() == [3, 2] and test.num_examples.tolist() == [1, 1]
  assert load_leaf(tmp_path, split="test").y.tolist() == [61, 0]
  with pytest.raises(DataError, match="split='train' or split='test'"):
    load_leaf(tmp_path)
  with pytest.raises(DataError, match="no test/ directory"):
    load_leaf(tmp_path / "train", split="test")
  with pytest.raises(ValueError, match="split"):
    load_leaf(tmp_path, split="val")
  r_train, r_test, num_classes = REGISTRY["leaf"][0](0, path=str(tmp_path))
  assert r_test.y.tolist() == [61, 0] and num_classes == 62
  assert REGISTRY["leaf"][0](0, path=str(tmp_path), split="train")[1] is None


def test_shakespeare_vocabulary_matches_leaf():
  # LEAF's models/utils/language_utils.py ALL_LETTERS: 80 characters, id 0 is padding.
  assert len(SHAKESPEARE_VOCAB) == len(set(SHAKESPEARE_VOCAB)) == 80
  assert SHAKESPEARE_VOCAB.startswith("\n !\"&'(),-.0123456789:;>?ABC")
  assert SHAKESPEARE_VOCAB.endswith("xyz}")
  assert VOCAB_SIZE == 82 and OOV_ID == 81
  ids = encode_text(["\n", "}", "A", "~é", ""], 2)
  assert ids.tolist() == [[1, 0], [80, 0], [26, 0], [OOV_ID, OOV_ID], [0, 0]]
  assert ids.dtype == np.int32
  assert decode_text(encode_text(["to be, or not"], 20))[0] == "to be, or not"
  assert decode_text(np.array([26, OOV_ID, 0])) == "A\ufffd"
  with pytest.raises(ValueError, match="more than length=3"):
    encode_text(["abcd"], 3)
  with pytest.raises(TypeError):
    encode_text("abc", 3)
  with pytest.raises(ValueError, match=r"\[0, 82\)"):
    decode_text([82])


def test_leaf_shakespeare_text(tmp_path):
  text = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer~"
  windows = [text[i:i + 80] for i in range(3)]
  doc = _leaf_doc({"THE_TRAGEDY_HAMLET": (windows, [text[80], text[81], text[82]]),
                   "KING_LEAR": (windows[:1], ["~"])})
  path = _write_json(tmp_path / "shakespeare.json", doc)
  fd = load_leaf(path, text="shakespeare")
  assert fd.client_ids == ["THE_TRAGEDY_HAMLET", "KING_LEAR"]
  assert fd.feature_shape == (80,) and fd.x.dtype == np.int32
  assert decode_text(fd.client(0)[0]) == windows
  assert decode_text(fd.y[:3]) == text[80:83]
  assert fd.y[3] == OOV_ID
  _, _, num_classes = REGISTRY["leaf"][0](0, path=str(path), text="shakespeare")
  assert num_classes == VOCAB_SIZE
  with pytest.raises(DataError, match="text='shakespeare'"):
    load_leaf(path)
  bad = _leaf_doc({"u": (windows[:1], ["ab"])})
  with pytest.raises(DataError, match="single characters"):
    load_leaf(_write_json(tmp_path / "bad.json", bad), text="shakespeare")


def _corrupt(kind):
  """(file name, file bytes, expected message fragment) for one malformed LEAF file."""
  good = _leaf_doc({"u1": ([[1.0, 2.0]], [0]), "u2": ([[3.0, 4.0], [5.0, 6.0]], [1, 2])})
  doc = json.loads(json.dumps(good))
  if kind == "invalid_json":
    return b"{'users': [1]}", "invalid or truncated JSON"
  if kind == "truncated":
    raw = json.dumps(good).encode()
    return raw[:len(raw) // 2], "invalid or truncated JSON"
  if kind == "not_utf8":
    return b'{"users": ["\xff"]}', "not UTF-8"
  if kind == "num_samples":
    doc["num_samples"][1] = 3
    return json.dumps(doc).encode(), "user 'u2': num_samples says 3 but x and y have 2"
  if kind == "xy_mismatch":
    doc["user_data"]["u2"]["y"] = [1]
    return json.dumps(doc).encode(), "user 'u2': x has 2 examples but y has 1"
  if kind == "missing_key":
    del doc["num_samples"]
    return json.dumps(doc).encode(), r"missing key\(s\) \['num_samples'\]"
  if kind == "missing_y":
    del doc["user_data"]["u1"]["y"]
    return json.dumps(doc).encode(), "user 'u1': user_data entry must be an object with keys"
  if kind == "no_user_data":
    del doc["user_data"]["u2"]
    return json.dumps(doc).encode(), "user 'u2': listed in 'users' but has no entry in 'user_data'"
  if kind == "unlisted":
    doc["user_data"]["ghost"] = {"x": [], "y": []}
    return json.dumps(doc).encode(), "user 'ghost': has user_data but is not listed"
  if kind == "ragged":
    doc["user_data"]["u2"]["x"][1] = [5.0]
    return json.dumps(doc).encode(), "user 'u2': x is ragged"
  if kind == "counts_length":
    doc["num_samples"] = [1]
    return json.dumps(doc).encode(), "one count per user"
  if kind == "top_level_list":
    return b"[]", "expected a JSON object"
  raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["invalid_json", "truncated", "not_utf8", "num_samples",
                                  "xy_mismatch", "missing_key", "missing_y", "no_user_data",
                                  "unlisted", "ragged", "counts_length", "top_level_list"])
def test_leaf_malformed_files_name_file_and_user(tmp_path, kind):
  raw, message = _corrupt(kind)
  (tmp_path / "bad_file.json").write_bytes(raw)
  with pytest.raises(DataError, match=message) as info:
    load_leaf(tmp_path / "bad_file.json")
  assert "bad_file.json" in str(info.value)


def test_leaf_user_in_two_files_and_missing_paths(tmp_path):
  _write_json(tmp_path / "a.json", _leaf_doc({"u": ([[1.0]], [0])}))
  _write_json(tmp_path / "b.json", _leaf_doc({"u": ([[2.0]], [1])}))
  with pytest.raises(DataError, match=r"b\.json: user 'u': also appears in .*a\.json"):
    load_leaf(tmp_path)
  with pytest.raises(DataError, match="does not exist"):
    load_leaf(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="no .json files"):
    load_leaf(tmp_path / "empty")
  with pytest.raises(ValueError, match="text"):
    load_leaf(tmp_path / "a.json", text="sent140")


# --------------------------------------------------------------------------------- FedJAX SQLite


def _ext_array(arr):
  """FedJAX's ndarray extension, built by hand from the documented layout (not our writer)."""
  return msgpack.ExtType(1, msgpack.packb([list(arr.shape), arr.dtype.name, arr.tobytes()]))


def _raw_db(path, rows, schema="client_id BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL, "
                              "num_examples INTEGER NOT NULL"):
  conn = sqlite3.connect(path)
  conn.execute(f"CREATE TABLE federated_data ({schema})")
  conn.executemany(f"INSERT INTO federated_data VALUES ({', '.join('?' * len(rows[0]))})", rows)
  conn.commit()
  conn.close()
  return str(path)


def _blob(examples):
  return zlib.compress(msgpack.packb(examples))


def test_fedjax_sqlite_reads_hand_built_emnist_file_in_rowid_order(tmp_path):
  rng = np.random.default_rng(3)
  clients = [(b"f3_zz", 3), (b"f0_aa", 2), (b"f1_\xc3\xa9", 1)]  # rowid order, not sorted
  rows, expected = [], []
  for cid, n in clients:
    pixels = rng.random((n, 28, 28)).astype(np.float32)
    label = rng.integers(0, 62, n).astype(np.int32)
    rows.append((cid, _blob({"pixels": _ext_array(pixels), "label": _ext_array(label)}), n))
    expected.append((pixels, label))
  path = _raw_db(tmp_path / "emnist.sqlite", rows)
  fd = load_fedjax_sqlite(path, x_key="pixels", y_key="label")
  assert fd.client_ids == ["f3_zz", "f0_aa", "f1_é"]
  for i, (pixels, label) in enumerate(expected):
    np.testing.assert_array_equal(fd.client(i)[0], pixels)
    np.testing.assert_array_equal(fd.client(i)[1], label)
  _, test, num_classes = REGISTRY["fedjax_sqlite"][0](0, path=path, x_key="pixels", y_key="label")
  assert test is None and num_classes == int(fd.y.max()) + 1
  with pytest.raises(DataError, match=r"client 'f3_zz': no feature 'x'; available: \['label', "
                     r"'pixels'\]"):
    load_fedjax_sqlite(path)


def test_fedjax_sqlite_save_load_round_trip_is_fedjax_bytes(tmp_path):
  rng = np.random.default_rng(4)
  fd = FederatedData.from_arrays([rng.random((n, 2, 3)) for n in (2, 5, 1)],
                                 [rng.integers(0, 9, n) for n in (2, 5, 1)], ["10", "2", "b"])
  path = tmp_path / "out.sqlite"
  save_fedjax_sqlite(str(path), fd, x_key="pixels", y_key="label")
  back = load_fedjax_sqlite(str(path), "pixels", "label")
  assert back.client_ids == fd.client_ids
  np.testing.assert_array_equal(back.x, fd.x)
  np.testing.assert_array_equal(back.y, fd.y)
  np.testing.assert_array_equal(back.num_examples, fd.num_examples)
  conn = sqlite3.connect(path)
  columns = [(r[1], r[2], r[3], r[5]) for r in conn.execute("PRAGMA table_info(federated_data)")]
  rows = conn.execute("SELECT client_id, data, num_examples FROM federated_data ORDER BY rowid")
  rows = rows.fetchall()
  conn.close()
  assert columns == [("client_id", "BLOB", 1, 1), ("data", "BLOB", 1, 0),
                     ("num_examples", "INTEGER", 1, 0)]
  assert rows[0][0] == b"10" and rows[1][2] == 5
  x, y = fd.client(1)
  hand = zlib.compress(msgpack.packb({"pixels": _ext_array(x), "label": _ext_array(y)}))
  assert rows[1][1] == hand  # byte-identical to the documented FedJAX encoding
  with pytest.raises(FileExistsError):
    save_fedjax_sqlite(str(path), fd)
  save_fedjax_sqlite(str(path), fd, overwrite=True)
  assert load_fedjax_sqlite(str(path)).client_ids == fd.client_ids


def test_shakespeare_snippets(tmp_path):
  x, y = shakespeare_examples([b"Hello", b"", "ab"], seq_len=3)
  assert decode_text(x) == ["", "H", "He", "Hel", "ell", "", "a"]
  assert decode_text(y) == "Helloab"
  assert x.shape == (7, 3) and x.dtype == y.dtype == np.int32
  snippets = {b"HAMLET": [b"To be, or not to be", b"."], b"LEAR": [b"Nothing will come of nothing"],
              b"SILENT": [b""]}
  rows = []
  for cid, texts in snippets.items():
    ext = msgpack.ExtType(4, msgpack.packb([[len(texts)], texts]))
    rows.append((cid, _blob({"snippets": ext}), len(texts)))
  path = _raw_db(tmp_path / "shakespeare.sqlite", rows)
  fd = load_fedjax_sqlite(path, x_key="snippets", text="shakespeare")
  assert fd.client_ids == ["HAMLET", "LEAR"]  # SILENT has no characters, so no examples
  hx, hy = shakespeare_examples(snippets[b"HAMLET"])
  np.testing.assert_array_equal(fd.client(0)[0], hx)
  np.testing.assert_array_equal(fd.client(0)[1], hy)
  assert fd.feature_shape == (80,)
  assert REGISTRY["fedjax_sqlite"][0](0, path=path, x_key="snippets", text="shakespeare")[2] == 82
  with pytest.raises(DataError, match="byte strings; for Shakespeare snippets pass text"):
    load_fedjax_sqlite(path, x_key="snippets", y_key="snippets")


def _bad_db(tmp_path, kind):
  """(path, expected message) for one malformed FedJAX SQLite file."""
  path = tmp_path / "bad.sqlite"
  arrays = {"x": _ext_array(np.ones((2, 3), np.float32)), "y": _ext_array(np.array([0, 1]))}
  if kind == "not_sqlite":
    path.write_bytes(b"this is not a database, just text" * 100)
    return str(path), "not a SQLite database"
  if kind == "missing":
    return str(tmp_path / "absent.sqlite"), "does not exist"
  if kind == "no_table":
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE examples (a)")
    conn.close()
    return str(path), r"no table 'federated_data' .*\['examples'\]"
  if kind == "no_column":
    return _raw_db(path, [(b"c", _blob(arrays))], "client_id BLOB, data BLOB"), \
        r"lacks column\(s\) \['num_examples'\]"
  if kind == "empty":
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE federated_data (client_id BLOB, data BLOB, num_examples INTEGER)")
    conn.close()
    return str(path), "no clients"
  blobs = {
      "bad_zlib": (zlib.compress(msgpack.packb(arrays))[:-6], "not valid zlib"),
      "not_msgpack": (zlib.compress(b"\xc1\xc1"), "not valid msgpack"),
      "not_a_map": (_blob([1, 2]), "decodes to list, not a map"),
      "scalar_feature": (_blob({"x": 3, "y": _ext_array(np.array([0]))}), "'x' decodes to int"),
      "complex_ext": (_blob({"x": msgpack.ExtType(2, msgpack.packb([1.0, 2.0]))}),
                      "extension type 2 is not an array"),
      "object_dtype": (_blob({"x": msgpack.ExtType(1, msgpack.packb([[2], "object", b"12345678"]))}),
                       "unsupported array dtype 'object'"),
      "short_buffer": (_blob({"x": msgpack.ExtType(1, msgpack.packb([[2, 3], "float32",
                                                                      b"\0" * 20]))}),
                       r"needs 24 bytes, the blob holds 20"),
      "count": (_blob(arrays), "num_examples is 5 but 'x' has 2 entries"),
  }
  blob, message = blobs[kind]
  rows = [(b"good", _blob(arrays), 2), (b"client_7", blob, 5 if kind == "count" else 2)]
  return _raw_db(path, rows), message


@pytest.mark.parametrize("kind", ["not_sqlite", "missing", "no_table", "no_column", "empty",
                                  "bad_zlib", "not_msgpack", "not_a_map", "scalar_feature",
                                  "complex_ext", "object_dtype", "short_buffer", "count"])
def test_fedjax_sqlite_malformed(tmp_path, kind):
  path, message = _bad_db(tmp_path, kind)
  with pytest.raises(DataError, match=message) as info:
    load_fedjax_sqlite(path)
  assert "sqlite" in str(info.value)
  if kind in ("bad_zlib", "not_msgpack", "not_a_map", "complex_ext", "count"):
    assert "client 'client_7'" in str(info.value)
  assert not (tmp_path / "absent.sqlite").exists()  # reading never creates a file


def test_fedjax_decoder_keeps_bytes_arrays_and_scalars():
  snippets = np.empty(2, object)
  snippets[:] = [b"ab", b""]
  blob = fedjax_sqlite.encode_examples({"s": snippets, "v": np.arange(3, dtype=np.int16)})
  back = fedjax_sqlite.decode_examples(blob)
  assert back["s"].tolist() == [b"ab", b""] and back["v"].dtype == np.int16
  assert fedjax_sqlite._ext_hook(3, _ext_array(np.array(2.5, np.float32)).data) == 2.5


# -------------------------------------------------------------------------------------- download


class _Server:
  """A local HTTP server for ``files`` (path -> bytes) that honours ``Range: bytes=N-``."""

  def __init__(self, files):
    self.files, self.requests = files, []
    self.ignore_range, self.cut_after = False, None
    owner = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):
        owner.requests.append((self.path, self.headers.get("Range")))
        body = owner.files.get(self.path)
        if body is None:
          self.send_error(404)
          return
        start, status = 0, 200
        range_ = self.headers.get("Range")
        if range_ and not owner.ignore_range:
          start, status = int(range_.split("=")[1].rstrip("-")), 206
        self.send_response(status)
        if status == 206:
          self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        part = body[start:]
        if owner.cut_after is not None:
          part, self.close_connection = part[:owner.cut_after], True
        self.wfile.write(part)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                   daemon=True)
    self.thread.start()
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()


PAYLOAD = bytes(np.random.default_rng(5).integers(0, 256, 300_000, dtype=np.uint8))
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def server():
  s = _Server({"/data/file.sqlite": PAYLOAD})
  yield s
  s.stop()


def test_download_fresh_then_cached_without_network(tmp_path, server):
  url = server.url + "/data/file.sqlite"
  path = download(url, str(tmp_path / "cache"), sha256=DIGEST, size=len(PAYLOAD))
  assert path == str(tmp_path / "cache" / "file.sqlite")
  assert open(path, "rb").read() == PAYLOAD
  assert not (tmp_path / "cache" / "file.sqlite.partial").exists()
  assert server.requests == [("/data/file.sqlite", None)]
  server.stop()
  assert download(url, str(tmp_path / "cache"), sha256=DIGEST) == path
  assert download(url, str(tmp_path / "cache")) == path


def test_download_resumes_partial_with_range(tmp_path, server):
  (tmp_path / "x.bin.partial").write_bytes(PAYLOAD[:100_000])
  path = download(server.url + "/data/file.sqlite", str(tmp_path), sha256=DIGEST,
                  filename="x.bin")
  assert server.requests == [("/data/file.sqlite", "bytes=100000-")]
  assert open(path, "rb").read() == PAYLOAD


def test_download_interrupted_then_resumed(tmp_path, server):
  url = server.url + "/data/file.sqlite"
  server.cut_after = 123_456
  with pytest.raises(DataError, match="partial file .* is kept"):
    download(url, str(tmp_path), sha256=DIGEST)
  assert (tmp_path / "file.sqlite.partial").stat().st_size == 123_456
  assert not (tmp_path / "file.sqlite").exists()
  server.cut_after = None
  assert open(download(url, str(tmp_path), sha256=DIGEST), "rb").read() == PAYLOAD
  assert server.requests[-1] == ("/data/file.sqlite", "bytes=123456-")


def test_download_restarts_when_server_ignores_range(tmp_path, server):
  server.ignore_range = True
  (tmp_path / "file.sqlite.partial").write_bytes(b"garbage that must not survive")
  path = download(server.url + "/data/file.sqlite", str(tmp_path), sha256=DIGEST)
  assert server.requests == [("/data/file.sqlite", "bytes=29-")]
  assert open(path, "rb").read() == PAYLOAD


def test_download_checksum_mismatch_deletes_partial(tmp_path, server):
  url = server.url + "/data/file.sqlite"
  wrong = "0" * 64
  with pytest.raises(DataError) as info:
    download(url, str(tmp_path), sha256=wrong)
  message = str(info.value)
  assert url in message and wrong in message and DIGEST in message
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(DataError, match=f"expected 10 bytes, got {len(PAYLOAD)}"):
    download(url, str(tmp_path), size=10)
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(DataError, match=f"{url[:-6]}x.*404"):
    download(url[:-6] + "x", str(tmp_path))
  with pytest.raises(ValueError, match="64 hex digits"):
    download(url, str(tmp_path), sha256="abc")


def test_download_replaces_stale_cached_file(tmp_path, server):
  (tmp_path / "file.sqlite").write_bytes(b"stale")
  path = download(server.url + "/data/file.sqlite", str(tmp_path), sha256=DIGEST)
  assert open(path, "rb").read() == PAYLOAD and len(server.requests) == 1


def test_download_file_url(tmp_path):
  source = tmp_path / "src dir" / "payload.bin"
  source.parent.mkdir()
  source.write_bytes(PAYLOAD)
  (tmp_path / "cache").mkdir()
  (tmp_path / "cache" / "payload.bin.partial").write_bytes(b"old")
  path = download(source.as_uri(), str(tmp_path / "cache"), sha256=DIGEST, size=len(PAYLOAD))
  assert open(path, "rb").read() == PAYLOAD
  with pytest.raises(DataError, match="failed"):
    download((tmp_path / "missing.bin").as_uri(), str(tmp_path / "cache"))


def test_public_files_are_fedjax_sqlite_urls():
  assert all(u.startswith("https://storage.googleapis.com/gresearch/fedjax/") and
             u.endswith(".sqlite") for u in PUBLIC_FILES.values())


# ---------------------------------------------------------------------------------------- digits


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards", "quantity_skew"])
def test_digits_partitions(partition):
  # scikit-learn is a test dependency (pyproject [test]): a missing one must fail, not skip
  from fedjax_sim.datasets.digits import load_digits_federated
  train, test = load_digits_federated(partition, num_clients=10, alpha=0.3, seed=7)
  assert train.num_clients == 10 and train.feature_shape == (64,)
  assert train.total_examples + test.total_examples == 1797
  assert set(test.client_ids) <= set(train.client_ids)
  assert 0.0 <= train.x.min() and train.x.max() <= 1.0 and set(np.unique(train.y)) <= set(range(10))
  again, _ = load_digits_federated(partition, num_clients=10, alpha=0.3, seed=7)
  np.testing.assert_array_equal(again.x, train.x)
  np.testing.assert_array_equal(again.num_examples, train.num_examples)
  for i in range(test.num_clients):  # held-out share of each client ~ test_fraction
    k = train.client_ids.index(test.client_ids[i])
    n = train.num_examples[k] + test.num_examples[i]
    assert test.num_examples[i] == max(1, round(0.2 * n))


def test_digits_dirichlet_is_label_skewed_and_registry():
  # scikit-learn is a test dependency (pyproject [test]): a missing one must fail, not skip
  from fedjax_sim.datasets.digits import load_digits_federated
  from fedjax_sim.partition import label_distribution
  iid, _ = load_digits_federated("iid", num_clients=10, seed=0)
  skewed, _ = load_digits_federated("dirichlet", num_clients=10, alpha=0.1, seed=0)
  top_share = lambda fd: np.mean((lambda c: c.max(1) / c.sum(1))(label_distribution(fd, 10)))
  assert top_share(skewed) > 2 * top_share(iid)
  train, test, num_classes = REGISTRY["digits"][0](3, partition="iid", num_clients=5)
  assert num_classes == 10 and train.num_clients == test.num_clients == 5
  with pytest.raises(ValueError, match="partition"):
    load_digits_federated("pathological")


def test_leaf_labels_written_as_floats_load_as_classes_and_train(tmp_path, capsys):
  """LEAF files of real datasets write class 3 as 3.0: they load as int32 classes and train a
  softmax model through simulate and the CLI; non-integral float labels stay float."""
  import fedjax_sim as fs
  from fedjax_sim.cli import main
  rng = np.random.default_rng(2)
  users = {f"u{i}": (rng.normal(size=(n, 4)).round(3).tolist(),
                     [float(c) for c in rng.integers(0, 3, n)]) for i, n in enumerate([5, 7, 6])}
  path = _write_json(tmp_path / "leaf" / "data.json", _leaf_doc(users))
  assert '.0' in path.read_text()
  fd = load_leaf(str(path))
  assert fd.y.dtype == np.int32 and sorted(set(fd.y.tolist())) <= [0, 1, 2]
  out = tmp_path / "run"  # the CLI trains through simulate (one compilation, not two)
  assert main(["run", "--out", str(out), "--set", "dataset=leaf", "--set",
               f"dataset_options.path={json.dumps(str(path))}", "--set", "clients_per_round=2",
               "--set", "rounds=2", "--set", "batch_size=4", "--quiet"]) == 0, capsys.readouterr().err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["final"]["round"] == 2
  assert np.isfinite(summary["final"]["train_loss"])
  regression = fs.FederatedData.from_arrays([np.ones((2, 1))], [np.array([0.5, 2.0])])
  assert regression.y.dtype == np.float32
  whole = fs.FederatedData.from_arrays([np.ones((2, 1))], [np.array([1.0, 2.0])])
  assert whole.y.dtype == np.int32 and whole.y.tolist() == [1, 2]


def test_fedjax_sqlite_float_labels_load_as_classes_when_whole(tmp_path):
  """The SQLite loader follows from_arrays' rule: float labels that are all whole numbers are
  class ids (int32), fractional ones stay float32 regression targets."""
  x = np.zeros((3, 2), np.float32)
  whole = [(b"a", _blob({"x": _ext_array(x), "y": _ext_array(np.array([0.0, 2.0, 1.0]))}), 3)]
  fd = load_fedjax_sqlite(_raw_db(tmp_path / "whole.sqlite", whole))
  assert fd.y.dtype == np.int32 and fd.y.tolist() == [0, 2, 1]
  assert REGISTRY["fedjax_sqlite"][0](0, path=str(tmp_path / "whole.sqlite"))[2] == 3
  frac = [(b"a", _blob({"x": _ext_array(x), "y": _ext_array(np.array([0.5, 2.0, 1.0]))}), 3)]
  fd = load_fedjax_sqlite(_raw_db(tmp_path / "frac.sqlite", frac))
  assert fd.y.dtype == np.float32 and fd.y.tolist() == [0.5, 2.0, 1.0]


def test_centralized_float_labels_partition_by_class():
  """A centralized file whose class labels are floats (3.0) partitions by label like integers."""
  from fedjax_sim import partition
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(60, 2)), rng.integers(0, 3, 60)
  as_float = partition.dirichlet(x, y.astype(np.float64), num_clients=4, alpha=0.5, seed=1)
  as_int = partition.dirichlet(x, y, num_clients=4, alpha=0.5, seed=1)
  assert as_float.y.dtype == np.int32
  np.testing.assert_array_equal(as_float.y, as_int.y)
  with pytest.raises(DataError, match="integer class labels"):
    partition.dirichlet(x, y + 0.5, num_clients=4, alpha=0.5, seed=1)


def test_holdout_splits_every_client_and_loses_no_example():
  from fedjax_sim import partition
  rng = np.random.default_rng(6)
  sizes = [1, 2, 8, 21]
  fd = FederatedData.from_arrays([np.arange(n, dtype=np.float32)[:, None] + 100 * k
                                  for k, n in enumerate(sizes)],
                                 [rng.integers(0, 3, n) for n in sizes], ["a", "b", "c", "d"])
  train, test = partition.holdout(fd, 0.25, seed=3)
  assert train.client_ids == ["a", "b", "c", "d"] and test.client_ids == ["b", "c", "d"]
  assert train.num_examples.tolist() == [1, 1, 6, 16] and test.num_examples.tolist() == [1, 2, 5]
  for cid in fd.client_ids:
    parts = [d.client(d.client_ids.index(cid))[0][:, 0] for d in (train, test)
             if cid in d.client_ids]
    whole = fd.client(fd.client_ids.index(cid))[0][:, 0]
    assert sorted(np.concatenate(parts).tolist()) == whole.tolist()
  again = partition.holdout(fd, 0.25, seed=3)[1]
  np.testing.assert_array_equal(again.x, test.x)
  with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.0"):
    partition.holdout(fd, 1.0, seed=0)
  with pytest.raises(DataError, match="leaves no client a test example"):
    partition.holdout(fd.subset([0]), 0.5, seed=0)


def test_fedprox_synthetic_alpha_changes_nothing_and_defaults_agree():
  """The paper's generator adds one shift u_k to every class's W_k and b_k: argmax unchanged, so
  alpha gives identical arrays (documented); beta does change the data. The CLI's defaults are
  the Python function's."""
  import inspect
  from fedjax_sim.datasets import fedprox_synthetic
  small = dict(num_devices=4, seed=2)
  ref = fedprox_synthetic(0.0, 0.5, **small)
  for alpha in (1.0, 5.0, 100.0):
    for a, b in zip(ref, fedprox_synthetic(alpha, 0.5, **small)):
      np.testing.assert_array_equal(a.x, b.x)
      np.testing.assert_array_equal(a.y, b.y)
  assert not np.array_equal(ref[0].y, fedprox_synthetic(0.0, 2.0, **small)[0].y)
  python = inspect.signature(fedprox_synthetic).parameters
  cli = inspect.signature(REGISTRY["fedprox_synthetic"][0]).parameters
  assert [cli[k].default for k in ("alpha", "beta")] == [python[k].default for k in ("alpha", "beta")]
