"""Same-run A/B of the engine against an earlier commit (e.g. the one before a refactor).

The earlier commit is checked out into a temporary git worktree; each case of
``benchmarks/engine.py`` (``--case WORKLOAD engine K auto none``) then runs alternately from the
old tree and the current one, each in its own process, ``--repeats`` times, so both see the same
machine state. Reports ms/round per run, the best of each side and the ratio new / old.

Usage: ``python benchmarks/ab.py --base COMMIT [--cases W1:10000,W2:1000,P:500] [--repeats 2]
[--out benchmarks/results/ab.json]``; a case ``WORKLOAD:K:IMPL`` runs another implementation of
``benchmarks/engine.py`` (e.g. ``S:500:engine_streamed``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_case(tree: str, workload: str, k: int, impl: str = "engine") -> float:
  out = subprocess.run([sys.executable, os.path.join(tree, "benchmarks", "engine.py"), "--case",
                        workload, impl, str(k), "auto", "none"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=tree), cwd=tree)
  if out.returncode != 0:
    raise RuntimeError(f"{tree}: case {workload} K={k} failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_round"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", required=True, help="the earlier commit")
  parser.add_argument("--cases", default="W1:10000,W2:1000,P:500")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--out", help="results JSON")
  args = parser.parse_args()
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip()
  base = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True,
                        text=True, check=True).stdout.strip()
  rows = []
  with tempfile.TemporaryDirectory(prefix="fedjax_sim_ab_") as tmp:
    old = os.path.join(tmp, "base")
    subprocess.run(["git", "worktree", "add", "--detach", old, base], cwd=ROOT, check=True,
                   capture_output=True)
    try:
      for case in args.cases.split(","):
        workload, k, *impl = case.split(":")
        impl = impl[0] if impl else "engine"
        times = {"base": [], "head": []}
        for _ in range(args.repeats):
          for side, tree in (("base", old), ("head", ROOT)):
            times[side].append(run_case(tree, workload, int(k), impl))
            print(f"{workload} K={k} {impl} {side}: {times[side][-1]:.1f} ms/round", flush=True)
        best = {side: min(v) for side, v in times.items()}
        rows.append({"workload": workload, "clients": int(k), "impl": impl, "ms_per_round": times,
                     "best": best, "head_over_base": best["head"] / best["base"]})
        print(f"{workload} K={k}: head/base {rows[-1]['head_over_base']:.3f}", flush=True)
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", old], cwd=ROOT, capture_output=True)
  result = {"base": base, "head": head, "rows": rows,
            "load_average": os.getloadavg()}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  for r in rows:
    print(f"{r['workload']:<4} K={r['clients']:<6} base {r['best']['base']:8.1f}  head "
          f"{r['best']['head']:8.1f} ms/round  head/base {r['head_over_base']:.3f}")


if __name__ == "__main__":
  main()
