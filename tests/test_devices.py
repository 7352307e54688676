"""Several devices (``simulate(..., devices=...)``): the cohort's chunks split over a ``clients``
mesh give the histories of one device, up to float reassociation.

The comparison runs in a subprocess with four forced CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``): this process's JAX already has one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest

import fedjax_sim as fs
from fedjax_sim.engine import mesh as mesh_lib
from tests.helpers import forced_devices_flags

HERE = os.path.dirname(os.path.abspath(__file__))

# Each configuration runs with devices=1 and devices=4 in the child; their histories must agree.
CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    import fedjax_sim as fs
    from helpers import classification_clients

    assert len(jax.devices()) == 4, jax.devices()
    sizes = np.random.default_rng(0).integers(3, 40, 40)  # several size groups
    xs, ys = classification_clients(sizes, seed=0)
    train = fs.FederatedData.from_arrays(xs, ys)
    model = fs.models.softmax_regression(5, 3)
    sgd = dict(client_lr=0.1, local_epochs=2, batch_size=4)
    common = dict(rounds=2, clients_per_round=6, bucketing=False)
    shared = dict(rounds=2, clients_per_round=36, bucketing="auto")  # one bucket ordered by size

    def same(a, b, what, devices=4):
      assert (a.info["devices"], b.info["devices"]) == (1, devices), (what, b.info["devices"])
      for k in a.history:
        if k != "elapsed":
          np.testing.assert_allclose(a.history[k], b.history[k], rtol=1e-4, atol=1e-6,
                                     err_msg=f"{{what}}: {{k}}")
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                   a.params, b.params)

    # Several devices split each chunk of clients: SCAFFOLD (per-client control variates
    # scattered back by id) with the coordinate-wise median (collect path) on a host-streamed
    # population, its cohort of 36 in one shared bucket ordered by size (chunks of 32).
    runs = [fs.simulate(fs.algorithms.scaffold(**sgd), model, train, seed=3, test=train,
                        population="host", aggregator=fs.aggregators.median(), devices=d,
                        **shared) for d in (1, 4)]
    [bucket], _, _ = fs.engine.make_buckets(train.num_examples, fs.algorithms.scaffold(**sgd), 36,
                                            None, "auto", rounds=2, devices=4)
    assert bucket.parts and bucket.chunk == 32 and runs[1].info["num_buckets"] == 1
    same(*runs, "scaffold median host")
    # The streamed block's rows are split over the devices (each receives a quarter of them)
    # and equal the one-device block's.
    from fedjax_sim.engine import mesh as mesh_lib
    streams = [fs.engine.CohortStream(train, np.zeros(40, np.int32), 36, mesh=m)
               for m in (None, mesh_lib.make_mesh(4))]
    one, four = [s.take(jax.random.key(5), np.arange(2)) for s in streams]
    assert four.x.sharding.spec == jax.sharding.PartitionSpec(None, "clients")
    assert sorted(s.data.shape[1] for s in four.x.addressable_shards) == [one.x.shape[1] // 4] * 4
    for a, b in zip(one, four):
      if a is not None:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                 runs[0].state.client_states, runs[1].state.client_states)
    # A sweep of 2 runs on 2 devices splits its runs: FedAvg under DP (clipping and Gaussian
    # noise) over two learning rates, population on device, lockstep on both sides.
    lrs = [{{"client_lr": v}} for v in (0.1, 0.05)]
    sweeps = [fs.simulate_sweep(fs.algorithms.fedavg(**sgd), model, [train] * 2, seeds=[1, 2],
                                hparams=lrs, aggregator=fs.aggregators.dp_mean(0.5, 0.3),
                                devices=d, flatten=False, **common) for d in (1, 2)]
    for a, b in zip(*sweeps):
      same(a, b, "fedavg dp sweep", devices=2)
    # The same sweep flattened, its runs split over 2 devices (each device flattens its own run).
    flat = fs.simulate_sweep(fs.algorithms.fedavg(**sgd), model, [train] * 2, seeds=[1, 2],
                             hparams=lrs, aggregator=fs.aggregators.dp_mean(0.5, 0.3),
                             devices=2, flatten=True, **common)
    for a, b in zip(sweeps[0], flat):
      assert b.info["flattened"], b.info["flatten_fallback"]
      same(a, b, "fedavg dp sweep flattened", devices=2)
    print("DEVICES-OK")
""")


def test_four_devices_equal_one():
  env = dict(os.environ, XLA_FLAGS=forced_devices_flags(4),
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", CHILD.format(tests=HERE)], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "DEVICES-OK" in out.stdout, out.stderr[-4000:]


def test_bad_devices_are_named():
  count = len(jax.devices())
  with pytest.raises(ValueError, match=f"devices={count + 1} but only {count} cpu device"):
    mesh_lib.resolve_devices(count + 1)
  for bad, msg in [(0, "at least 1, got 0"), ("two", "got 'two'"), (True, "got True"),
                   ([], "empty sequence"), (["cpu:0"], "not a jax.Device"),
                   ([jax.devices()[0]] * 2, "lists a device twice")]:
    with pytest.raises(ValueError, match=msg):
      mesh_lib.resolve_devices(bad)
  assert mesh_lib.make_mesh(None if count == 1 else 1) is None  # one device: no mesh
  train = fs.FederatedData.from_arrays([jax.numpy.ones((2, 3))], [jax.numpy.zeros(2, "int32")])
  with pytest.raises(ValueError, match="devices"):
    fs.simulate(fs.algorithms.fedavg(), fs.models.softmax_regression(3, 2), train, rounds=1,
                devices=count + 1)
