"""Engine benchmark: the vectorized round against a NumPy client loop and a per-client jitted loop.

Workloads (same data and hyper-parameters for every implementation, full participation):
  W1  softmax regression 60→10, 64 examples/client, E=1, B=16, K ∈ {100, 1000, 10000}
  W2  2NN 784-200-200-10,      128 examples/client, E=1, B=32, K ∈ {10, 100, 1000}
  W3  McMahan CNN 28×28×1,      64 examples/client, E=1, B=32, K ∈ {10}

Implementations:
  numpy       the seeds' style: Python loop over clients and batches, NumPy maths (float32)
  numpy_vec   vectorized NumPy (W1, W2): every client at once, batched matmuls over a leading
              client axis, per-client permutations by fancy indexing, in chunks of clients
              (fedjax_sim.reference.vectorized_fedavg_round; float32)
  per_client  FedJAX's execution model: Python loop over clients and batches, one jitted step
  engine      fedjax_sim.simulate (plan "auto" unless --plan), steady-state blocks only

Workload P times the engine on a power-law population three ways: with size buckets (engine),
without (engine_unbucketed: every client padded to the largest), and on an equal-size population
with the same total number of examples (engine_equal_sizes) — the cost of heterogeneity.

W1 also runs the engine with other aggregators than the streamed weighted mean: the coordinate-wise
median (engine_median), the collect path, every cohort update held at once; and DP-FedAvg
(engine_dp, ``dp_mean(clip_norm=1.0, noise_multiplier=1.0)``): each client's update clipped to norm
1, a uniform sum over the cohort, Gaussian noise added on the server; the β = 0.1 trimmed mean
(engine_trimmed_mean) and Krum with f = 10 (engine_krum: O(m²·d) pairwise distances, computed in
chunks of 1,024 columns), both on the collect path.

Workload S is a 300,000-client power-law population (8.8 M examples, 2.1 GB of features) at 500
clients per round: the population on the device (engine) against the population kept in host
memory with each block's cohorts streamed in (engine_streamed, ``population="host"``); the two
runs' final params are compared (max abs difference, recorded in the engine_streamed row).

Each results file records the git commit (and whether tracked files were modified), the JAX,
jaxlib and NumPy versions, the CPU model, core count and platform, and each row the 1-minute load
average when its case started (the machine is shared).

Each (workload, implementation) runs in its own subprocess so its peak RSS is its own. FLOPs come
from XLA's cost analysis of one training step; the peak is a 2048² float32 matmul timed in the same
run. Usage: ``python benchmarks/engine.py [--quick] [--workloads W1,W2] [--out results.json]``;
``--from-json FILE [--readme]`` re-renders a saved run.

``--accelerator`` measures what the engine is for instead (:func:`accelerator_main`): W1 at 100,000
clients per round and the 2NN (W2's model) at 10,000, full participation, ``plan="auto"`` (the
memory planner picks vmap or chunks), on every device; their achieved FLOP/s against the device's
measured float32 matmul peak and bytes/s (XLA's bytes accessed of a step × steps) against its
measured copy bandwidth; XLA's peak memory against the planner's estimate and the budget; and a
device-count scaling table (W1 with ``devices=1, 2, 4, 8``, those that exist). ``--scale`` shrinks
the client counts (a CPU run with forced devices:
``XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/engine.py --accelerator
--scale 0.01``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

WORKLOADS = {  # vec_chunk: clients per numpy_vec chunk (the fastest of those tried on 2 cores)
    "W1": dict(model="softmax", examples=64, batch=16, lr=0.1, sizes=[100, 1000, 10000],
               vec_chunk=256),
    "W2": dict(model="2nn", examples=128, batch=32, lr=0.05, sizes=[10, 100, 1000], vec_chunk=8),
    "W3": dict(model="cnn", examples=64, batch=32, lr=0.05, sizes=[10]),
    # client-size heterogeneity: the default 5,000-client power-law population, 500 per round
    "P": dict(model="softmax", examples=None, batch=16, lr=0.1, sizes=[500]),
    # a population larger than a device would hold in the real case (StackOverflow: 342k clients)
    "S": dict(model="softmax", examples=None, batch=16, lr=0.1, sizes=[500], population=300_000),
}

AGGREGATORS = {  # W1 engine cases with another aggregator: impl -> (its factory, what it is)
    "engine_median": (lambda agg: agg.median(), "median (collect path)"),
    "engine_dp": (lambda agg: agg.dp_mean(clip_norm=1.0, noise_multiplier=1.0),
                  "DP-FedAvg (dp_mean, clip + noise)"),
    "engine_trimmed_mean": (lambda agg: agg.trimmed_mean(0.1), "trimmed mean β=0.1 (collect path)"),
    # Krum's pairwise distances are O(m²·d): measured, no target
    "engine_krum": (lambda agg: agg.krum(num_byzantine=10), "Krum f=10 (collect path, m² distances)"),
}


def _model(name):
  import fedjax_sim as fs
  if name == "softmax":
    return fs.models.softmax_regression(60, 10), (60,), "softmax"
  if name == "2nn":
    return fs.models.mlp(784, (200, 200), 10), (784,), "mlp"
  return fs.models.cnn((28, 28, 1), 10), (28, 28, 1), None


def _data(workload, num_clients, seed=0):
  import numpy as np
  spec = WORKLOADS[workload]
  _, shape, _ = _model(spec["model"])
  if workload == "P":
    from fedjax_sim.datasets import power_law_population
    train, _ = power_law_population(num_clients=5000, seed=seed)
    pairs = [train.client(i) for i in range(train.num_clients)]
    return [p[0] for p in pairs], [p[1] for p in pairs]
  rng = np.random.default_rng(seed)
  xs = [rng.standard_normal((spec["examples"], *shape), dtype=np.float32) for _ in range(num_clients)]
  ys = [rng.integers(0, 10, spec["examples"]).astype(np.int32) for _ in range(num_clients)]
  return xs, ys


def _step_cost(model, params, shape, batch):
  """XLA's cost analysis of one training step's gradient: ``(flops, bytes accessed)``."""
  import jax
  import jax.numpy as jnp
  x = jnp.zeros((batch, *shape), jnp.float32)
  y = jnp.zeros((batch,), jnp.int32)
  cost = jax.jit(jax.grad(model.loss)).lower(params, x, y).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _step_flops(model, params, shape, batch):
  return _step_cost(model, params, shape, batch)[0]


def run_case(workload, impl, num_clients, reps, plan, chunk_size, params_out=None, devices=1):
  """Times one implementation; returns seconds per steady-state round and more.

  ``params_out``: an engine case writes its final params there (``.npz``, leaves in tree order).
  ``devices``: the engine's ``devices`` (default one device, whatever XLA's flags expose).
  """
  import jax
  import numpy as np
  import fedjax_sim as fs
  from fedjax_sim import reference
  spec = WORKLOADS[workload]
  model, shape, ref_kind = _model(spec["model"])
  if workload == "S":
    from fedjax_sim.datasets import power_law_population
    fd, _ = power_law_population(num_clients=spec["population"], seed=0)
    xs = ys = None
  else:
    xs, ys = _data(workload, num_clients)
  params = model.init(jax.random.key(0))
  info = {"loadavg_1m": os.getloadavg()[0]}
  if impl == "numpy":
    clients = list(zip(xs, ys))
    p = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(0)
    reference.fedavg(ref_kind, p, clients[:2], 1, spec["lr"], 1, spec["batch"], rng=rng,
                     dtype=np.float32)  # warm up
    per_round = _best_of(reps, lambda: reference.fedavg(
        ref_kind, p, clients, 1, spec["lr"], 1, spec["batch"], rng=rng, dtype=np.float32))
  elif impl == "numpy_vec":
    x, y = np.stack(xs), np.stack(ys)  # [K, n, ...], [K, n]: the layout this baseline needs
    p = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(0)
    run = lambda x, y: reference.vectorized_fedavg_round(
        ref_kind, p, x, y, spec["lr"], spec["batch"], rng=rng, chunk_size=spec["vec_chunk"])
    run(x[:2], y[:2])  # warm up
    per_round = _best_of(reps, lambda: run(x, y))
    info["chunk_size"] = spec["vec_chunk"]
  elif impl == "per_client":
    import jax.numpy as jnp
    import optax
    @jax.jit
    def step(w, x, y):
      g = jax.grad(model.loss)(w, x, y)
      return optax.apply_updates(w, jax.tree.map(lambda q: -spec["lr"] * q, g))
    @jax.jit
    def accumulate(acc, w, weight):
      return jax.tree.map(lambda a, b: a + weight * b, acc, w)
    rng = np.random.default_rng(0)
    def one_round(w):  # batches are cut on the host with NumPy, as FedJAX does
      acc = jax.tree.map(jnp.zeros_like, w)
      total = 0.0
      for x, y in zip(xs, ys):
        wk = w
        order = rng.permutation(len(x))
        for s in range(0, len(x), spec["batch"]):
          idx = order[s:s + spec["batch"]]
          wk = step(wk, x[idx], y[idx])
        acc = accumulate(acc, wk, float(len(x)))
        total += len(x)
      return jax.tree.map(lambda a: a / total, acc)
    jax.block_until_ready(one_round(params))  # compile
    per_round = _best_of(reps, lambda: jax.block_until_ready(one_round(params)))
  else:
    if impl == "engine_equal_sizes":  # same total examples, every client the mean size
      flat_x, flat_y = np.concatenate(xs), np.concatenate(ys)
      size = len(flat_x) // len(xs)
      xs = [flat_x[i * size:(i + 1) * size] for i in range(len(xs))]
      ys = [flat_y[i * size:(i + 1) * size] for i in range(len(ys))]
    if workload != "S":
      fd = fs.FederatedData.from_arrays(xs, ys)
    algo = fs.algorithms.fedavg(client_lr=spec["lr"], local_epochs=1, batch_size=spec["batch"])
    block = 3 if num_clients <= 100 else 1
    res = fs.simulate(algo, model, fd, rounds=(reps + 2) * block, rounds_per_block=block,
                      eval_every=10 ** 6, init_params=params, plan=plan, chunk_size=chunk_size,
                      clients_per_round=min(num_clients, fd.num_clients),
                      bucketing=impl != "engine_unbucketed",
                      population="host" if impl == "engine_streamed" else "device",
                      aggregator=(AGGREGATORS[impl][0](fs.aggregators) if impl in AGGREGATORS
                                  else None), devices=devices)
    # the first block compiles and the last one evaluates: the best of the others
    per_round = min(res.info["block_seconds"][1:-1]) / block
    info.update({k: res.info.get(k) for k in (
        "plan", "chunk_size", "unroll", "padding_waste", "devices", "peak_bytes",
        "estimated_bytes", "memory_budget")})
    info["compile_and_first_block_s"] = res.info["block_seconds"][0]
    info["rounds"] = (reps + 2) * block
    if params_out:
      np.savez(params_out, *[np.asarray(a) for a in jax.tree.leaves(res.params)])
  if workload in ("P", "S"):  # expected steps of a uniformly sampled cohort
    sizes = fd.num_examples if workload == "S" else np.array([len(x) for x in xs])
    steps = num_clients * float(np.mean(-(-sizes // spec["batch"])))
  else:
    steps = num_clients * (spec["examples"] // spec["batch"])
  step_flops, step_bytes = _step_cost(model, params, shape, spec["batch"])
  flops = steps * step_flops
  return dict(workload=workload, impl=impl, clients=num_clients, ms_per_round=per_round * 1e3,
              client_updates_per_s=num_clients / per_round, gflops=flops / per_round / 1e9,
              gbytes_per_s=steps * step_bytes / per_round / 1e9,
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **info)


def _best_of(reps, fn):
  """Seconds of the fastest of ``reps`` calls (the machine's noise only ever adds time)."""
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def _best_seconds(f, a, reps: int) -> float:
  """The fastest of ``reps`` timed calls ``f(a)``, after one warm-up (compilation) call."""
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return best


def matmul_peak_gflops(n=2048, reps=10):
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  best = _best_seconds(f, a, reps)
  return 2 * n ** 3 / best / 1e9


def _subprocess_case(args_list, params_out=None, blas_threads=None, devices=None):
  extra = ["--params-out", params_out] if params_out else []
  extra += ["--devices", str(devices)] if devices else []
  env = dict(os.environ, PYTHONPATH=_ROOT)
  if blas_threads:
    env["OPENBLAS_NUM_THREADS"] = str(blas_threads)
  out = subprocess.run([sys.executable, __file__, "--case", *args_list, *extra],
                       capture_output=True, text=True, env=env)
  if out.returncode != 0:
    raise RuntimeError(f"case {args_list} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def max_abs_diff(path_a, path_b):
  """Largest absolute difference between two ``.npz`` files of the same params' leaves."""
  import numpy as np
  with np.load(path_a) as a, np.load(path_b) as b:
    if sorted(a.files) != sorted(b.files):
      raise ValueError(f"{path_a} and {path_b} hold different leaves")
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)


def provenance():
  """What was measured and where: git commit, library versions, machine."""
  import jax
  import jaxlib
  import numpy as np
  git = lambda *a: subprocess.run(["git", "-C", _ROOT, *a], capture_output=True, text=True)
  head = git("rev-parse", "HEAD")
  cpu = "unknown cpu"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    cpu = platform.processor() or cpu
  return {"commit": head.stdout.strip() if head.returncode == 0 else None,
          # tracked files only: modified sources make the commit not reproduce the numbers
          "dirty": bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
                   if head.returncode == 0 else None,
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
          "python": platform.python_version(), "cpu_model": cpu, "cores": os.cpu_count(),
          "machine": platform.machine(), "platform": platform.platform()}


def describe_run(result):
  """The table's header line: machine, versions, commit, matmul peak."""
  cpu = result.get("cpu_model", "CPU model not recorded")
  desc = f"{result['backend']} ({cpu}, {result['cores']} cores, {result['machine']}"
  desc += f", {result['platform']})" if "platform" in result else ")"
  versions = f"JAX {result['jax']}"
  if "jaxlib" in result:
    versions += f", jaxlib {result['jaxlib']}, NumPy {result['numpy']}"
  if result.get("blas_threads"):
    versions += f" (OpenBLAS threads: {result['blas_threads']})"
  commit = result.get("commit")
  commit = (f"commit {commit[:12]}{' (with uncommitted changes)' if result.get('dirty') else ''}"
            if commit else "commit not recorded")
  return (f"Measured on: {desc}; {versions}; {commit}; float32 2048² matmul peak "
          f"{result['matmul_peak_gflops']:.0f} GFLOP/s.")


BASELINES = [("numpy", "vs numpy"), ("numpy_vec", "vs numpy_vec"), ("per_client", "vs per-client")]


def table(rows, peak):
  head = (f"{'workload':<8} {'K':>6} {'impl':<22} {'ms/round':>10} {'updates/s':>10} "
          f"{'GFLOP/s':>8} {'%peak':>6} {'RSS MB':>7} "
          + " ".join(f"{title:>13}" for _, title in BASELINES))
  lines = [head, "-" * len(head)]
  note = ("(speed-ups are baseline time / row time, '-' where the baseline was not run; rows P "
          "and S give time relative to the engine row (bucketed, population on device) in the "
          "'vs numpy' column)")
  for r in rows:
    base = {b["impl"]: b["ms_per_round"] for b in rows
            if b["workload"] == r["workload"] and b["clients"] == r["clients"]}
    ratio = lambda k: f"{base[k] / r['ms_per_round']:.2f}x" if k in base else "-"
    name = r["impl"]
    if r["impl"] == "engine":
      name = f"engine[{r['plan']},{r['chunk_size']}]"
    elif r["impl"] == "numpy_vec" and r.get("chunk_size"):
      name = f"numpy_vec[{r['chunk_size']}]"
    if r["workload"] in ("P", "S") and "engine" in base:  # cost relative to the engine
      name = r["impl"]
      ratio = lambda k, r=r: (f"{r['ms_per_round'] / base['engine']:.2f}x cost" if k == "numpy"
                              else "-")
    lines.append(f"{r['workload']:<8} {r['clients']:>6} {name:<22} {r['ms_per_round']:>10.1f} "
                 f"{r['client_updates_per_s']:>10.0f} {r['gflops']:>8.2f} "
                 f"{100 * r['gflops'] / peak:>5.1f}% {r['peak_rss_mb']:>7.0f} "
                 + " ".join(f"{ratio(k):>13}" for k, _ in BASELINES))
  return "\n".join(lines + [note])


TARGETS = [  # (workload, K, impl ratio or %peak, threshold), from the engine issue
    ("W1", 10000, "numpy_vec", 3.0), ("W1", 10000, "per_client", 3.0),
    ("W2", 1000, "numpy_vec", 1.3), ("W2", 1000, "%peak", 60.0),
    ("W3", 10, "per_client", 1.0),
    ("P", 500, "engine_equal_sizes", 2.0),  # data issue: heterogeneity costs well under 2×
    ("W1", 10000, "engine_median", 1.5),  # stages issue: the collect path (median) vs the mean
    ("W1", 10000, "engine_trimmed_mean", 1.5),  # robustness issue: ≤ 1.5× the streaming mean
    ("W1", 10000, "engine_dp", 1.2),  # DP issue: a DP-FedAvg round vs the FedAvg round
]


def target_lines(rows, peak):
  """One line per target: the measured value and whether it is met (or that it was not run)."""
  lines = []
  workloads = {r["workload"] for r in rows}
  for workload, k, against, threshold in TARGETS:
    if workload not in workloads:
      continue
    at = {r["impl"]: r for r in rows if r["workload"] == workload and r["clients"] == k}
    if against == "engine_equal_sizes":
      what, shown = f"{workload} K={k}: power-law population cost vs equal sizes", None
      if "engine" in at and against in at:
        value = at["engine"]["ms_per_round"] / at[against]["ms_per_round"]
        shown = f"{value:.2f}x (target < {threshold}x) — {'met' if value < threshold else 'NOT met'}"
    elif against in AGGREGATORS:
      what, shown = f"{workload} K={k}: {AGGREGATORS[against][1]} cost vs mean", None
      if "engine" in at and against in at:
        value = at[against]["ms_per_round"] / at["engine"]["ms_per_round"]
        shown = f"{value:.2f}x (target ≤ {threshold}x) — {'met' if value <= threshold else 'NOT met'}"
    elif against == "%peak":
      what, shown = f"{workload} K={k}: % of matmul peak", None
      if "engine" in at:
        value = 100 * at["engine"]["gflops"] / peak
        shown = (f"{value:.0f}% (target ≥ {threshold:.0f}%) — "
                 f"{'met' if value >= threshold else 'NOT met'}")
    else:
      what, shown = f"{workload} K={k}: engine vs {against}", None
      if "engine" in at and against in at:
        value = at[against]["ms_per_round"] / at["engine"]["ms_per_round"]
        shown = (f"{value:.2f}x (target ≥ {threshold}x) — "
                 f"{'met' if value >= threshold else 'NOT met'}")
    if shown is None:
      bound = (f"< {threshold}x" if against == "engine_equal_sizes" else
               f"≤ {threshold}x" if against in AGGREGATORS else
               f"≥ {threshold:.0f}%" if against == "%peak" else f"≥ {threshold}x")
      shown = f"not measured in this run (target {bound})"
    lines.append(f"- {what}: {shown}")
  return lines


def note_lines(rows):
  """Run-dependent facts the README states about workload S (so its text carries no numbers)."""
  at = {r["impl"]: r for r in rows if r["workload"] == "S"}
  if "engine" not in at or "engine_streamed" not in at:
    return []
  dev, host = at["engine"], at["engine_streamed"]
  line = (f"- S K={host['clients']}: streamed from host memory {host['ms_per_round']:.1f} ms/round "
          f"and {host['peak_rss_mb'] / 1024:.1f} GiB peak RSS, on the device "
          f"{dev['ms_per_round']:.1f} ms/round and {dev['peak_rss_mb'] / 1024:.1f} GiB")
  if "params_max_abs_diff_vs_engine" in host:
    line += (f"; final params after {host.get('rounds', '?')} rounds differ by at most "
             f"{host['params_max_abs_diff_vs_engine']:.3g} (max abs)")
  return [line]


def render(result):
  """Fills in the table, targets and notes of ``result`` from its rows."""
  result["table"] = table(result["rows"], result["matmul_peak_gflops"])
  result["targets"] = target_lines(result["rows"], result["matmul_peak_gflops"])
  result["notes"] = note_lines(result["rows"])
  result["machine_desc"] = describe_run(result)
  return result


def update_readme(result, path):
  """Replaces the table between the README's benchmark markers with ``result``."""
  start, end = "<!-- bench:start -->", "<!-- bench:end -->"
  text = open(path).read()
  if start not in text or end not in text:
    return
  body = (f"{start}\n{result['machine_desc']}\n\n```\n{result['table']}\n```\n\n"
          + "\n".join(result["targets"] + result["notes"]) + f"\n{end}")
  before, rest = text.split(start, 1)
  open(path, "w").write(before + body + rest.split(end, 1)[1])


def copy_bandwidth_gbps(megabytes=256, reps=10):
  """Measured device memory bandwidth: the best of ``reps`` copies of a ``megabytes`` float32 array
  (``2 × size`` bytes moved each: read and write), in GB/s."""
  import jax
  import jax.numpy as jnp
  n = megabytes * 2 ** 20 // 4
  a = jnp.arange(n, dtype=jnp.float32)
  f = jax.jit(lambda a: a * 1.0000001)  # one read and one write of every element, not elided
  best = _best_seconds(f, a, reps)
  return 2 * n * 4 / best / 1e9


ACCELERATOR = [("W1", 100_000), ("W2", 10_000)]  # (workload, clients per round) at --scale 1
SCALING_DEVICES = (1, 2, 4, 8)


def accelerator_table(result):
  """The accelerator run's two tables (workloads; device scaling) as text."""
  peak, bandwidth = result["matmul_peak_gflops"], result["copy_bandwidth_gbps"]
  gib = lambda b: f"{b / 2 ** 30:.2f}" if b else "-"
  head = (f"{'workload':<8} {'K':>7} {'plan':<14} {'dev':>3} {'ms/round':>9} {'updates/s':>10} "
          f"{'GFLOP/s':>8} {'%peak':>6} {'GB/s':>7} {'%copy':>6} {'peak GiB':>8} "
          f"{'est GiB':>8} {'budget GiB':>10}")
  lines = [head, "-" * len(head)]
  for r in result["rows"]:
    plan = f"{r['plan']},{r['chunk_size']}"
    lines.append(
        f"{r['workload']:<8} {r['clients']:>7} {plan:<14} {r['devices']:>3} "
        f"{r['ms_per_round']:>9.1f} {r['client_updates_per_s']:>10.0f} {r['gflops']:>8.2f} "
        f"{100 * r['gflops'] / peak:>5.1f}% {r['gbytes_per_s']:>7.2f} "
        f"{100 * r['gbytes_per_s'] / bandwidth:>5.1f}% {gib(r.get('peak_bytes')):>8} "
        f"{gib(r.get('estimated_bytes')):>8} {gib(r.get('memory_budget')):>10}")
  scaling = result.get("scaling", [])
  if scaling:
    base = scaling[0]["ms_per_round"]
    lines += ["", f"device scaling, {scaling[0]['workload']} K={scaling[0]['clients']}:",
              f"{'devices':>7} {'ms/round':>9} {'speed-up':>8} {'plan':<14}"]
    for r in scaling:
      lines.append(f"{r['devices']:>7} {r['ms_per_round']:>9.1f} {base / r['ms_per_round']:>7.2f}x "
                   f"{r['plan']},{r['chunk_size']}")
  return "\n".join(lines)


def accelerator_main(args):
  """``--accelerator``: the accelerator workloads, roofline and device scaling (see the module
  docstring); writes ``args.out``."""
  import jax
  backend = jax.default_backend()
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"engine_{backend}_accelerator.json")
  devices = jax.device_count()
  result = {"device": jax.devices()[0].device_kind, "backend": backend, "device_count": devices,
            "xla_flags": os.environ.get("XLA_FLAGS"), "scale": args.scale, **provenance()}
  on_cpu = backend == "cpu"
  result["matmul_peak_gflops"] = matmul_peak_gflops(2048 if on_cpu else 8192)
  result["copy_bandwidth_gbps"] = copy_bandwidth_gbps(64 if on_cpu else 1024)
  print(f"{result['device']} ({backend}) x{devices}: f32 matmul peak "
        f"{result['matmul_peak_gflops']:.1f} GFLOP/s, copy {result['copy_bandwidth_gbps']:.1f} GB/s; "
        f"commit {result['commit']}{' (dirty)' if result['dirty'] else ''}", flush=True)
  clients = lambda k: max(1, int(round(k * args.scale)))
  rows = []
  for workload, k in ACCELERATOR:
    row = _subprocess_case([workload, "engine", str(clients(k)), "auto", "none"],
                           blas_threads=args.blas_threads, devices=devices)
    rows.append(row)
    print(json.dumps(row), flush=True)
  scaling = []
  for d in [d for d in SCALING_DEVICES if d <= devices]:
    row = _subprocess_case(["W1", "engine", str(clients(ACCELERATOR[0][1])), "auto", "none"],
                           blas_threads=args.blas_threads, devices=d)
    scaling.append(row)
    print(json.dumps(row), flush=True)
  result.update(rows=rows, scaling=scaling)
  result["table"] = accelerator_table(result)
  print(result["table"])
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
  parser.add_argument("--params-out", help=argparse.SUPPRESS)
  parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--accelerator", action="store_true",
                      help="the accelerator workloads (W1 at 100,000 clients, the 2NN at 10,000), "
                           "roofline against measured matmul peak and copy bandwidth, device "
                           "scaling; results in --out (default results/engine_<backend>_"
                           "accelerator.json)")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="--accelerator: multiply the client counts (e.g. 0.01 on a CPU)")
  parser.add_argument("--quick", action="store_true", help="smallest K of each workload only")
  parser.add_argument("--blas-threads", type=int,
                      help="OPENBLAS_NUM_THREADS for every case (default: OpenBLAS's own choice). "
                           "On a loaded machine threaded OpenBLAS GEMMs can be very much slower.")
  parser.add_argument("--workloads", default="W1,W2,W3,P,S")
  parser.add_argument("--plans", default="auto", help="comma list, e.g. auto,vmap,chunked:64")
  parser.add_argument("--readme", action="store_true", help="write the table into README.md")
  parser.add_argument("--from-json", help="re-render a saved results file instead of measuring")
  parser.add_argument("--out", default=None, help="results file (default "
                      "results/engine_cpu.json)")
  args = parser.parse_args()
  if args.accelerator and not args.case:
    return accelerator_main(args)
  args.out = args.out or os.path.join(os.path.dirname(__file__), "results", "engine_cpu.json")
  readme = os.path.join(_ROOT, "README.md")
  if args.from_json:  # re-render a saved run (table, targets, README)
    with open(args.from_json) as f:
      result = render(json.load(f))
    print("\n".join([result["machine_desc"], result["table"]] + result["targets"]
                    + result["notes"]))
    with open(args.from_json, "w") as f:
      json.dump(result, f, indent=2)
    if args.readme:
      update_readme(result, readme)
    return
  if args.case:
    workload, impl, k, plan, chunk = args.case
    print(json.dumps(run_case(workload, impl, int(k), reps=3, plan=plan,
                              chunk_size=None if chunk == "none" else int(chunk),
                              params_out=args.params_out, devices=args.devices)))
    return
  import jax
  result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            **provenance(), "blas_threads": args.blas_threads or os.environ.get(
                "OPENBLAS_NUM_THREADS")}
  peak = matmul_peak_gflops()
  print(f"device: {result['device']} ({result['backend']}), {result['cores']} cores, "
        f"{result['cpu_model']}; f32 matmul peak {peak:.1f} GFLOP/s; commit {result['commit']}"
        f"{' (dirty)' if result['dirty'] else ''}", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for workload in args.workloads.split(","):
      sizes = WORKLOADS[workload]["sizes"][:1] if args.quick else WORKLOADS[workload]["sizes"]
      for k in sizes:
        impls = {"W1": ["numpy", "numpy_vec", "per_client"],
                 "W2": ["numpy", "numpy_vec", "per_client"],
                 "W3": ["per_client"]}.get(workload, [])
        cases = [(i, "auto", "none") for i in impls]
        for p in args.plans.split(","):
          plan, _, chunk = p.partition(":")
          cases.append(("engine", plan, chunk or "none"))
        if workload == "P":
          cases += [("engine_unbucketed", "auto", "none"), ("engine_equal_sizes", "auto", "none")]
        if workload == "S":
          cases += [("engine_streamed", "auto", "none")]
        if workload == "W1":  # other aggregators: the median (collect path), DP-FedAvg
          cases += [(impl, "auto", "none") for impl in AGGREGATORS]
        for impl, plan, chunk in cases:
          params_out = (os.path.join(tmp, f"{workload}_{k}_{impl}_{plan}.npz")
                        if workload == "S" else None)
          row = _subprocess_case([workload, impl, str(k), plan, chunk], params_out,
                                 args.blas_threads)
          if impl == "engine_streamed":  # same rounds, same seed: the params must agree
            on_device = os.path.join(tmp, f"{workload}_{k}_engine_{plan}.npz")
            if os.path.exists(on_device):
              row["params_max_abs_diff_vs_engine"] = max_abs_diff(on_device, params_out)
          rows.append(row)
          print(json.dumps(row), flush=True)
  result.update(matmul_peak_gflops=peak, rows=rows)
  render(result)
  print("\n".join([result["machine_desc"], result["table"]] + result["targets"]
                  + result["notes"]))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  if args.readme:
    update_readme(result, readme)


if __name__ == "__main__":
  main()
