"""Where a W1 round's time goes: each part of the engine's round timed alone, with the round's shapes.

W1 (benchmarks/engine.py): softmax regression 60→10, K clients × 64 examples, E=1, B=16 (4 local
steps), full participation, plan chunked with chunk 1024, example-weighted FedAvg. One bucket of
``capacity = K`` slots in ``⌈K/1024⌉`` chunks.

Parts (each a jitted function over the same shapes as the round, best of ``--reps`` calls):
  sampling     round keys, cohort (top-m or arange), bucket slots, per-slot conditions
  shuffles     client keys ``fold_in(client_key, id)`` + ``client.epoch_orders`` for every slot
  batch rows   every local step's batch: order lookup + row gather of x and y (the engine's layout)
  fwd/bwd      ``vmap(grad(model.loss))`` of every step's 16×60 batch (batches precomputed)
  update       the client optimizer's update + ``apply_updates`` of every step
  reduction    each chunk's weighted delta sums and norms (``RoundSums``)
  server       mean delta + server optimizer
The whole round is the engine's steady-state round (``simulate``, one round per block, best block);
"overlap/other" is the round minus the parts' sum (loop and fusion effects; negative when fused
parts run faster together than alone).

With ``--ops``, also the XLA:CPU operations of one steady-state round of the engine itself, from a
``jax.profiler`` trace (thunk events of the compiled block, summed per HLO instruction; nested
loops/conds are not listed, only leaf operations), each with the JAX operation it came from.

Usage: ``python benchmarks/profile_w1.py [--clients 10000] [--out benchmarks/results/profile_w1_cpu.json]``
(wrap in ``flock /tmp/cpu.lock`` on the shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

TMP = tempfile.mkdtemp()
if "--ops" in sys.argv:  # XLA reads its flags once, when the backend starts
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={TMP}/hlo"

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fedjax_sim as fs  # noqa: E402
from fedjax_sim import client as client_lib  # noqa: E402
from fedjax_sim import engine as round_lib  # noqa: E402
from fedjax_sim import systems  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine as bench  # noqa: E402


def best_ms(fn, *args, reps=5):
  jax.block_until_ready(fn(*args))  # compile
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best * 1e3


def profile(num_clients: int, reps: int, chunk: int = 1024):
  spec = bench.WORKLOADS["W1"]
  model = fs.models.softmax_regression(60, 10)
  algo = fs.algorithms.fedavg(client_lr=spec["lr"], local_epochs=1, batch_size=spec["batch"])
  xs, ys = bench._data("W1", num_clients)
  train = fs.FederatedData.from_arrays(xs, ys)
  buckets, bucket_of, _ = round_lib.make_buckets(train.num_examples, algo, num_clients, chunk)
  (bucket,) = buckets
  shape = bucket.shape
  d = round_lib.device_data(train, bucket_of)
  params = model.init(jax.random.key(0))
  key = jax.random.key(1)
  num_chunks, steps = bucket.num_chunks, shape.num_steps
  slots = num_chunks * bucket.chunk
  system = systems.check(None)
  parts = {}

  @jax.jit
  def sampling(key, d):
    sample, clients, sys_key = jax.random.split(jax.random.fold_in(key, 1), 3)
    cohort = round_lib.sample_cohort(sample, num_clients, num_clients)
    cond = systems.cohort_conditions(sys_key, num_clients, system)
    ids, pos = round_lib.buckets.bucket_slots(cohort, d.bucket_of, 0, bucket)
    return ids, jnp.append(cond.returns, False)[pos], clients
  ids, returns, client_key = sampling(key, d)
  parts["sampling"] = best_ms(sampling, key, d, reps=reps)

  @jax.jit
  def shuffles(client_key, ids, d):
    flat = ids.reshape(-1)
    keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(flat)
    return client_lib.epoch_orders(keys, d.counts[flat], shape, True)
  orders = shuffles(client_key, ids, d)
  parts["shuffles"] = best_ms(shuffles, client_key, ids, d, reps=reps)

  offsets = d.offsets[ids.reshape(-1)].reshape(num_chunks, bucket.chunk)
  counts = d.counts[ids.reshape(-1)].reshape(num_chunks, bucket.chunk)
  orders = orders.reshape(num_chunks, bucket.chunk, *orders.shape[1:])

  def step_rows(t, offset, n, order):  # client.local_step's row selection
    spe = jnp.maximum(client_lib.steps_per_epoch(n, algo.batch_size), 1)
    epoch, j = t // spe, t % spe
    pos = j * shape.batch + jnp.arange(shape.batch, dtype=jnp.int32)
    real = pos < n
    local = order[jnp.minimum(epoch, shape.num_epochs - 1), jnp.minimum(pos, shape.max_examples - 1)]
    return offset + jnp.where(real, local, 0), real

  @jax.jit
  def batch_rows(d, offsets, counts, orders):
    def chunk_fn(_, c):
      off, n, order = c
      def step(t, acc):
        rows, _ = jax.vmap(lambda o, k, od: step_rows(t, o, k, od))(off, n, order)
        return acc + jnp.sum(d.x[rows]) + jnp.sum(d.y[rows])  # every gathered element
      return None, lax.fori_loop(0, steps, step, jnp.float32(0))
    return lax.scan(chunk_fn, None, (offsets, counts, orders))[1]
  parts["batch rows"] = best_ms(batch_rows, d, offsets, counts, orders, reps=reps)

  # Pre-gathered batches [chunks, steps, chunk, B, ...] for the compute-only parts.
  rows_all = jax.jit(jax.vmap(jax.vmap(lambda t, o, n, od: step_rows(t, o, n, od)[0],
                                       in_axes=(None, 0, 0, 0)), in_axes=(0, None, None, None)))
  xb = jnp.stack([d.x[rows_all(jnp.arange(steps), offsets[c], counts[c], orders[c])]
                  for c in range(num_chunks)])
  yb = jnp.stack([d.y[rows_all(jnp.arange(steps), offsets[c], counts[c], orders[c])]
                  for c in range(num_chunks)])
  w0 = jax.tree.map(lambda a: jnp.broadcast_to(a, (bucket.chunk, *a.shape)), params)

  @jax.jit
  def fwd_bwd(w0, xb, yb):
    def chunk_fn(_, c):
      x, y = c
      def step(t, acc):
        g = jax.vmap(jax.grad(model.loss))(w0, x[t], y[t])
        return jax.tree.map(jnp.add, acc, g)
      return None, lax.fori_loop(0, steps, step, jax.tree.map(jnp.zeros_like, w0))
    return lax.scan(chunk_fn, None, (xb, yb))[1]
  parts["fwd/bwd"] = best_ms(fwd_bwd, w0, xb, yb, reps=reps)

  @jax.jit
  def update(w0):
    def chunk_fn(_, c):
      def step(t, w):
        g = jax.tree.map(lambda a: a * 1e-3, w)  # stands in for the gradient
        u, _ = jax.vmap(algo.client_optimizer.update)(g, jax.vmap(algo.client_optimizer.init)(w), w)
        return optax.apply_updates(w, u)
      return None, lax.fori_loop(0, steps, step, w0)
    return lax.scan(chunk_fn, None, jnp.arange(num_chunks))[1]
  parts["update"] = best_ms(update, w0, reps=reps)

  @jax.jit
  def reduction(w0, counts):
    def chunk_fn(_, n):
      weights = n.astype(jnp.float32)
      deltas = jax.tree.map(lambda a, p: a - p, w0, params)
      wsum = jax.tree.map(lambda a: jnp.tensordot(weights, a, axes=1), deltas)
      sq = sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1) for a in jax.tree.leaves(deltas))
      return None, (wsum, jnp.sum(weights * sq), jnp.max(jnp.sqrt(sq)))
    return lax.scan(chunk_fn, None, counts)[1]
  parts["reduction"] = best_ms(reduction, w0, counts, reps=reps)

  @jax.jit
  def server(params, total):
    opt = algo.server_optimizer
    g = jax.tree.map(lambda a: -a / 3.0, total)
    u, _ = opt.update(g, opt.init(params), params)
    return optax.apply_updates(params, u)
  parts["server"] = best_ms(server, params, params, reps=reps)

  round_ms = bench.run_case("W1", "engine", num_clients, reps=reps, plan="auto",
                            chunk_size=None)["ms_per_round"]
  return parts, round_ms


def hlo_ops(num_clients: int, top: int = 12):
  """``[(ms, calls, hlo name, jax op)]`` of the most expensive leaf ops of one engine round."""
  import glob
  import gzip
  import re
  from collections import Counter
  tmp = TMP
  xs, ys = bench._data("W1", num_clients)
  train = fs.FederatedData.from_arrays(xs, ys)
  model = fs.models.softmax_regression(60, 10)
  algo = fs.algorithms.fedavg(client_lr=0.1, local_epochs=1, batch_size=16)
  run = lambda: fs.simulate(algo, model, train, rounds=3, rounds_per_block=1, eval_every=10 ** 6)
  run()  # compiles (and dumps the optimized HLO)
  jax.profiler.start_trace(f"{tmp}/trace", create_perfetto_trace=True)
  run()
  jax.profiler.stop_trace()
  events = json.load(gzip.open(glob.glob(f"{tmp}/trace/**/*.trace.json.gz", recursive=True)[0]))
  events = [e for e in events["traceEvents"] if e.get("ph") == "X"]
  starts = sorted(e["ts"] for e in events if e["name"] == "PjitFunction(block)")
  starts = [t for i, t in enumerate(starts) if i == 0 or t - starts[i - 1] > 1e3]  # nested
  lo, hi = starts[-2], starts[-1]  # the second block (round 2): steady state, no evaluation
  hlo = open(sorted(glob.glob(f"{tmp}/hlo/*jit_block.cpu_after_optimizations.txt"))[-1]).read()
  origin = {k: "/".join(v.split("/")[-3:]) for k, v in re.findall(r'%([\w.-]+) = .*?op_name="([^"]+)"', hlo)}
  loops = set(re.findall(r"%((?:while|cond|conditional)[\w.]*) = ", hlo))
  ms, calls = Counter(), Counter()
  for e in events:
    if lo <= e["ts"] < hi and e["name"] in origin and e["name"] not in loops:
      ms[e["name"]] += e["dur"] / 1e3
      calls[e["name"]] += 1
  return [(v, calls[k], k, origin[k]) for k, v in ms.most_common(top)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, default=10000)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--out", default=None)
  parser.add_argument("--ops", action="store_true", help="also the XLA ops of one engine round")
  args = parser.parse_args()
  parts, round_ms = profile(args.clients, args.reps)
  total = sum(parts.values())
  rows = dict(parts, **{"sum of parts": total, "overlap/other": round_ms - total,
                        "whole round (engine)": round_ms})
  lines = [f"W1 K={args.clients}: ms/round per part (each timed alone), % of the whole round",
           f"{'part':<22} {'ms/round':>9} {'% round':>8}"]
  lines += [f"{k:<22} {v:>9.1f} {100 * v / round_ms:>7.1f}%" for k, v in rows.items()]
  ops = hlo_ops(args.clients) if args.ops else []
  if ops:
    lines += ["", "XLA:CPU ops of one engine round (profiler trace, ms summed over calls)",
              f"{'ms':>7} {'calls':>5}  {'HLO op':<30} JAX op"]
    lines += [f"{v:>7.1f} {c:>5}  {k:<30} {o}" for v, c, k, o in ops]
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"clients": args.clients, "jax": jax.__version__, "cores": os.cpu_count(),
                 "ms_per_round": rows,
                 "hlo_ops": [dict(ms=v, calls=c, hlo=k, jax_op=o) for v, c, k, o in ops],
                 "table": text}, f, indent=2)


if __name__ == "__main__":
  main()
