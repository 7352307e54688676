"""Golden runs: histories and final states recorded from the engine before the round was split
into stages (issue 8), replayed on every test run so that a refactor of the round, a new default
aggregator or a faster layout cannot silently change a number the project produces.

Each case is small (a few clients, a few rounds) but covers one path of the round: FedAvg with a
sampled cohort and reshuffled epochs, SCAFFOLD's per-client state, FedNova's normalized messages,
FedAdam's server state, partial stragglers and dropouts, a host-streamed population, a sweep, and
``host_loop`` on a convolutional model.

Comparison is bit for bit when the recording's fingerprint (JAX, jaxlib and NumPy versions, CPU
model, the test session's XLA flags) matches this machine's; XLA:CPU may pick other kernels on another processor or release, so
elsewhere the same values are compared to 1e-5 (and the test says which it did).

Re-record (only when a change is *meant* to change numbers, and say so in the commit):
``python tests/test_goldens.py --record``.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import jax
import numpy as np
import pytest

import fedjax_sim as fs

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens")


def _population(sizes, seed=0, shape=(4,), num_classes=3):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(int(np.prod(shape)), num_classes))
  xs = [rng.normal(size=(n, *shape)).astype(np.float32) for n in sizes]
  ys = [np.argmax(x.reshape(n, -1) @ w + rng.normal(size=(n, num_classes)), 1).astype(np.int32)
        for x, n in zip(xs, sizes)]
  return fs.FederatedData.from_arrays(xs, ys)


SIZES = [3, 5, 8, 13, 21, 6, 9, 4]  # three size buckets
MLP = lambda: fs.models.mlp(4, (6,), 3)
# Recorded with every size group compiled (bucketing=True, the default before "auto").
COMMON = dict(rounds=4, clients_per_round=5, seed=3, eval_every=2, rounds_per_block=3,
              bucketing=True)
KW = dict(client_lr=0.1, local_epochs=2, batch_size=4)


def _cases():
  alg = fs.algorithms
  fd = _population(SIZES)
  return {
      "fedavg": lambda: fs.simulate(alg.fedavg(**KW), MLP(), fd, test=fd, **COMMON),
      "scaffold": lambda: fs.simulate(alg.scaffold(**KW), MLP(), fd, **COMMON),
      "fednova": lambda: fs.simulate(alg.fednova(**KW), MLP(), fd, **COMMON),
      "fedadam": lambda: fs.simulate(alg.fedadam(server_lr=0.05, **KW), MLP(), fd, **COMMON),
      "stragglers": lambda: fs.simulate(alg.fedprox(mu=0.3, **KW), MLP(), fd, **COMMON,
                                        system=fs.Heterogeneity(0.4, "partial", 0.2)),
      "streamed": lambda: fs.simulate(alg.fedavg(**KW), MLP(), fd, test=fd, population="host",
                                      **COMMON),
      "sweep": lambda: fs.simulate_sweep(alg.fedprox(mu=0.0, **KW), MLP(), fd, seeds=[0, 1],
                                         hparams=[{"mu": 0.0}, {"mu": 1.0}], flatten=False,
                                         **{k: v for k, v in COMMON.items() if k != "seed"}),
      "host_loop_cnn": lambda: fs.simulate(
          alg.fedavg(client_lr=0.1, batch_size=3), fs.models.cnn((4, 4, 1), 3, (2,), 4),
          _population([4, 6, 5], shape=(4, 4, 1)), rounds=2, clients_per_round=2, seed=1,
          plan="host_loop", bucketing=True),
  }


def _record_of(result) -> dict:
  """Every leaf of the final state and every history column (``elapsed`` excluded, and the
  traffic columns, which the host derives from ``participants`` and the shapes, added after
  the goldens were recorded)."""
  results = result if isinstance(result, list) else [result]
  out = {}
  for i, res in enumerate(results):
    for path, leaf in jax.tree_util.tree_flatten_with_path(res.state)[0]:
      out[f"{i}/state{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    for k, v in res.history.items():
      if k not in ("elapsed", "bytes_up", "bytes_down"):
        out[f"{i}/history/{k}"] = np.asarray(v, np.float64)
  return out


def fingerprint() -> dict:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  import jaxlib
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
          "machine": platform.machine(), "cpu": cpu,
          "xla_flags": sorted(os.environ.get("XLA_FLAGS", "").split())}


@pytest.mark.parametrize("name", sorted(_cases()))
def test_golden_run(name):
  with open(os.path.join(HERE, "fingerprint.json")) as f:
    recorded = json.load(f)
  got = _record_of(_cases()[name]())
  with np.load(os.path.join(HERE, f"{name}.npz")) as golden:
    assert sorted(golden.files) == sorted(got), "the state or history layout changed"
    exact = recorded == fingerprint()
    for k in golden.files:
      if exact:
        np.testing.assert_array_equal(got[k], golden[k], err_msg=k)
      else:
        np.testing.assert_allclose(got[k], golden[k], rtol=1e-5, atol=1e-6, err_msg=k)


def record():
  os.makedirs(HERE, exist_ok=True)
  for name, run in _cases().items():
    np.savez(os.path.join(HERE, f"{name}.npz"), **_record_of(run()))
    print("recorded", name)
  with open(os.path.join(HERE, "fingerprint.json"), "w") as f:
    json.dump(fingerprint(), f, indent=1)


if __name__ == "__main__":
  if sys.argv[1:] != ["--record"]:
    sys.exit("usage: python tests/test_goldens.py --record")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests.helpers import use_test_xla_flags
  use_test_xla_flags()  # record under the flags the test session compiles with (conftest.py)
  record()
