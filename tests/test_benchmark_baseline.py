"""The vectorized NumPy FedAvg round (the ``numpy_vec`` benchmark baseline) against the loop
reference: same params after a round, with in-order batches and with the same permutations."""

import numpy as np
import pytest

from fedjax_sim import reference


def _problem(kind, num_clients=6, n=10, d=7, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((num_clients, n, d)).astype(np.float32)
  y = rng.integers(0, classes, (num_clients, n)).astype(np.int32)
  dims = [d, classes] if kind == "softmax" else [d, 5, 3, classes]
  layers = [{"kernel": (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
             "bias": (0.1 * rng.standard_normal(b)).astype(np.float32)}
            for a, b in zip(dims[:-1], dims[1:])]
  return x, y, (layers[0] if kind == "softmax" else layers)


def _leaves(params):
  layers = [params] if isinstance(params, dict) else params
  return [np.asarray(layer[k]) for layer in layers for k in sorted(layer)]


def _loop(kind, params, x, y, lr, batch, rng):
  return reference.fedavg(kind, params, list(zip(x, y)), 1, lr, 1, batch, rng=rng)


@pytest.mark.parametrize("kind", ["softmax", "mlp"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_vectorized_round_matches_loop_reference(kind, shuffle):
  x, y, params = _problem(kind)
  lr, batch = 0.5, 4  # n = 10: batches of 4, 4 and 2
  # the loop reference draws one permutation per client, in client order, from its rng
  order = np.stack(_perms(len(y), 10, seed=3)) if shuffle else None
  want = _loop(kind, params, x, y, lr, batch, np.random.default_rng(3) if shuffle else None)
  got = reference.vectorized_fedavg_round(kind, params, x, y, lr, batch, order=order)
  for g, w, p in zip(_leaves(got), _leaves(want), _leaves(params)):
    assert g.dtype == np.float32
    assert np.abs(w - p).max() > 1e-2  # the round moved the params
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
  chunked = reference.vectorized_fedavg_round(kind, params, x, y, lr, batch, order=order,
                                              chunk_size=4)
  for g, c in zip(_leaves(got), _leaves(chunked)):
    np.testing.assert_allclose(c, g, rtol=0, atol=1e-6)


def _perms(num_clients, n, seed):
  rng = np.random.default_rng(seed)
  return [rng.permutation(n) for _ in range(num_clients)]


def test_vectorized_round_shuffles_each_client_separately():
  x, y, params = _problem("softmax", num_clients=50, n=12)
  in_order = reference.vectorized_fedavg_round("softmax", params, x, y, 0.5, 4)
  shuffled = reference.vectorized_fedavg_round("softmax", params, x, y, 0.5, 4,
                                               rng=np.random.default_rng(0))
  assert np.abs(shuffled["kernel"] - in_order["kernel"]).max() > 1e-4
  order = np.random.default_rng(0).permuted(np.broadcast_to(np.arange(12), (50, 12)), axis=1)
  assert (np.sort(order, axis=1) == np.arange(12)).all()  # rows are permutations ...
  assert len({tuple(row) for row in order}) == 50  # ... and each client has its own
  again = reference.vectorized_fedavg_round("softmax", params, x, y, 0.5, 4, order=order)
  np.testing.assert_array_equal(again["kernel"], shuffled["kernel"])  # rng path = that order
