"""Reproduces Figure 2 of the FedProx paper (Li et al. 2020, arXiv:1812.06127) in one compiled sweep.

Protocol (the paper's §5 and ../shared/REFERENCES.md): Synthetic-IID, Synthetic(0,0), (0.5,0.5) and
(1,1), 30 devices each; multinomial logistic regression; client SGD lr 0.01, batch 10, E = 20;
10 of 30 devices per round, drawn uniformly; n_k-weighted averaging; 200 rounds; μ ∈ {0, 1}
(μ = 0 is FedAvg); no stragglers. Logged: the example-weighted training loss over all 30 devices
and the gradient dissimilarity ``E_k‖∇F_k(w) − ∇f(w)‖²`` at every round. Each configuration runs
with ``--seeds`` data/training seeds (default 3), so the figure is 4 × 2 × 3 = 24 runs, all in one
flattened sweep (:func:`fedjax_sim.simulate_sweep`: the runs' cohorts as one cohort per round).
``--lockstep`` runs the lockstep sweep instead (the block vmapped over runs), one per data seed
(``--one-sweep``: all 24 in one).

Outputs (``--out``, default benchmarks/results/): ``fedprox_figure2.png`` (top: training loss,
mean over seeds with min–max band; bottom: dissimilarity), ``fedprox_figure2.md`` (final losses
and the paper's claims checked), ``fedprox_figure2.json`` (every curve and the timings).

``--sequential N`` also times N of the runs one after another with :func:`fedjax_sim.simulate`
(each compiles its own program) and reports the sweep's speed-up over running all runs that way,
estimated from those N.

``--from-json FILE`` re-renders ``FILE``'s ``.md`` (and the claims in ``FILE``) from the curves and
timings saved in it, without running anything.

Usage: ``python benchmarks/fedprox_figure2.py [--seeds 3] [--rounds 200] [--sequential 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import fedjax_sim as fs
from fedjax_sim.datasets import fedprox_synthetic

DATASETS = [("Synthetic-IID", None), ("Synthetic(0,0)", (0.0, 0.0)),
            ("Synthetic(0.5,0.5)", (0.5, 0.5)), ("Synthetic(1,1)", (1.0, 1.0))]
MUS = (0.0, 1.0)


def make_runs(seeds: int):
  """(dataset name, mu, seed, train) for every run, in a fixed order."""
  runs = []
  for name, ab in DATASETS:
    for seed in range(seeds):
      train, _ = (fedprox_synthetic(iid=True, seed=seed) if ab is None
                  else fedprox_synthetic(*ab, seed=seed))
      for mu in MUS:
        runs.append((name, mu, seed, train))
  return runs


def algorithm():
  return fs.algorithms.fedprox(mu=0.0, client_lr=0.01, local_epochs=20, batch_size=10)


def run_sweep(runs, rounds: int, by_seed: bool, flatten: bool = True):
  """Runs every run in one sweep, or one sweep per data seed (``by_seed``).

  Runs of one data seed have identical client sizes (the generator draws sizes first), so their
  sweep's size buckets are exactly theirs; mixing seeds makes every run pay, in lockstep, for the
  largest client of any seed (seed 2 has one of 3,049 examples: 6,100 local steps per round).
  """
  groups = sorted({r[2] for r in runs}) if by_seed else [None]
  start = time.perf_counter()
  results, infos = [None] * len(runs), []
  for group in groups:
    index = [i for i, r in enumerate(runs) if group is None or r[2] == group]
    out = fs.simulate_sweep(
        algorithm(), fs.models.softmax_regression(60, 10), [runs[i][3] for i in index],
        seeds=[runs[i][2] for i in index], hparams=[{"mu": runs[i][1]} for i in index],
        rounds=rounds, clients_per_round=10, eval_every=1, rounds_per_block=min(rounds, 50),
        dissimilarity=True, flatten=flatten)
    for i, res in zip(index, out):
      results[i] = res
    infos.append(dict(runs=len(index), seconds=out[0].info["seconds"],
                      first_block=out[0].info["block_seconds"][0],
                      largest_client=out[0].info["bucket_max_examples"][-1],
                      flattened=out[0].info["flattened"]))
  return results, time.perf_counter() - start, infos


def time_sequential(runs, rounds: int, count: int) -> float:
  """Mean wall seconds of one run through ``simulate`` (compilation included), over ``count``
  runs spread evenly across the list (so across data seeds, whose largest clients differ)."""
  seconds = []
  for name, mu, seed, train in runs[::max(1, len(runs) // count)][:count]:
    start = time.perf_counter()
    fs.simulate(algorithm()._replace(hparams={"mu": mu}), fs.models.softmax_regression(60, 10),
                train, rounds=rounds, clients_per_round=10, seed=seed, eval_every=1,
                rounds_per_block=min(rounds, 50), dissimilarity=True)
    seconds.append(time.perf_counter() - start)
  return float(np.mean(seconds))


def summarize(saved):
  """{dataset: {mu: {"loss": [seeds, rounds], "dissimilarity": [seeds, rounds]}}} from the saved
  results (``runs``, ``train_loss`` and ``grad_dissimilarity``, in run order)."""
  table = {}
  for run, loss, dissimilarity in zip(saved["runs"], saved["train_loss"],
                                      saved["grad_dissimilarity"]):
    entry = table.setdefault(run["dataset"], {}).setdefault(float(run["mu"]),
                                                             {"loss": [], "dissimilarity": []})
    entry["loss"].append(loss)
    entry["dissimilarity"].append(dissimilarity)
  return table


def claims(table) -> list[tuple[str, bool, str]]:
  """The paper's Figure 2 claims, checked on the last 20 rounds (mean over seeds)."""
  out = []
  tail = lambda curves: np.asarray(curves)[:, -20:]
  for name, _ in DATASETS:
    l0, l1 = tail(table[name][0.0]["loss"]), tail(table[name][1.0]["loss"])
    jitter = lambda c: float(np.mean(np.abs(np.diff(np.asarray(c), axis=1))))  # mean |Δloss| per round
    j0, j1 = jitter(table[name][0.0]["loss"]), jitter(table[name][1.0]["loss"])
    if name == "Synthetic-IID":
      ok = bool(l1.mean() >= l0.mean())
      out.append((f"{name}: μ = 1 does not beat μ = 0 (IID data needs no proximal term)", ok,
                  f"final loss μ=0 {l0.mean():.3f}, μ=1 {l1.mean():.3f}"))
    else:
      out.append((f"{name}: μ = 1 ends lower than μ = 0", bool(l1.mean() < l0.mean()),
                  f"final loss μ=0 {l0.mean():.3f}, μ=1 {l1.mean():.3f}"))
      out.append((f"{name}: μ = 1 is less jittery", bool(j1 < j0),
                  f"mean |Δloss|/round μ=0 {j0:.3f}, μ=1 {j1:.3f} (ratio {j1 / j0:.2f})"))
  return out


def plot(table, rounds: int, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, len(DATASETS), figsize=(4 * len(DATASETS), 6.4), sharex=True)
  x = np.arange(1, rounds + 1)
  for col, (name, _) in enumerate(DATASETS):
    for mu, color in zip(MUS, ("tab:blue", "tab:red")):
      label = "FedAvg (μ=0)" if mu == 0 else f"FedProx (μ={mu:g})"
      for row, key in enumerate(("loss", "dissimilarity")):
        curves = np.asarray(table[name][mu][key])
        ax = axes[row, col]
        ax.plot(x, curves.mean(0), color=color, label=label, lw=1.2)
        ax.fill_between(x, curves.min(0), curves.max(0), color=color, alpha=0.2, lw=0)
    axes[0, col].set_title(name)
    axes[1, col].set_yscale("log")
    axes[1, col].set_xlabel("# rounds")
  axes[0, 0].set_ylabel("training loss")
  axes[1, 0].set_ylabel("gradient dissimilarity")
  axes[0, 0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def markdown(saved, table, checked) -> list[str]:
  """The ``.md`` report, from the saved results alone."""
  runs, rounds, groups = len(saved["runs"]), len(saved["train_loss"][0]), saved["sweeps"]
  lines = [f"# FedProx Figure 2, reproduced ({runs} runs, {rounds} rounds)", "",
           f"{len(groups)} `simulate_sweep` call(s) "
           f"({'one per data seed' if len(groups) > 1 else 'all runs'}): "
           f"**{saved['sweep_seconds']:.1f} s** wall on {saved['machine']} ({saved['cores']} cores, "
           f"backend {saved['backend']}), compilation included.", ""]
  lines += [f"- {'flattened' if g.get('flattened') else 'lockstep'} sweep of {g['runs']} runs "
            f"(largest client {g['largest_client']} examples): "
            f"{g['seconds']:.1f} s, first block of {min(rounds, 50)} rounds incl. compilation "
            f"{g['first_block']:.1f} s" for g in groups] + [""]
  lockstep = saved.get("lockstep_seconds")
  if lockstep:
    lines += [f"Lockstep sweeps (`flatten=False`, one per data seed, measured before): "
              f"{lockstep:.0f} s; the flattened sweep is {lockstep / saved['sweep_seconds']:.1f}× "
              "faster.", ""]
  sequential = saved["sequential_seconds_per_run"]
  if sequential is not None:
    lines += [f"Sequential baseline: {sequential:.1f} s per run with `simulate` (mean of "
              f"{saved['sequential_runs']}), i.e. about {sequential * runs:.0f} s for all {runs} "
              f"runs; the sweep is {sequential * runs / saved['sweep_seconds']:.1f}× faster.", ""]
  lines += ["| dataset | μ | final training loss (mean ± std over seeds) | final dissimilarity |",
            "|---|---|---|---|"]
  for name, _ in DATASETS:
    for mu in MUS:
      loss = np.asarray(table[name][mu]["loss"])[:, -1]
      dis = np.asarray(table[name][mu]["dissimilarity"])[:, -1]
      lines.append(f"| {name} | {mu:g} | {loss.mean():.4f} ± {loss.std():.4f} | {dis.mean():.3g} |")
  lines += ["", "| the paper's claim | holds here | numbers |", "|---|---|---|"]
  cell = lambda text: text.replace("|", "\\|")  # |Δloss| must not end the table cell
  lines += [f"| {cell(c)} | {'yes' if ok else 'no'} | {cell(n)} |" for c, ok, n in checked]
  return lines


def write_reports(saved, base) -> list[str]:
  """Recomputes the claims from ``saved`` and writes ``base``.md and ``base``.json."""
  table = summarize(saved)
  checked = claims(table)
  saved["claims"] = [dict(claim=c, holds=ok, numbers=n) for c, ok, n in checked]
  lines = markdown(saved, table, checked)
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(base + ".json", "w") as f:
    json.dump(saved, f)
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=200)
  parser.add_argument("--sequential", type=int, default=0,
                      help="also time this many runs one by one with simulate()")
  parser.add_argument("--one-sweep", action="store_true",
                      help="lockstep: all runs in a single sweep instead of one per data seed")
  parser.add_argument("--lockstep", action="store_true",
                      help="the lockstep sweep (vmapped over runs) instead of the flattened one")
  parser.add_argument("--lockstep-seconds", type=float, default=None,
                      help="the lockstep sweeps' wall seconds measured earlier, for the ratio")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--from-json", help="re-render the .md (and claims) of a saved .json")
  args = parser.parse_args()
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    print("\n".join(write_reports(saved, os.path.splitext(args.from_json)[0])))
    return
  os.makedirs(args.out, exist_ok=True)

  runs = make_runs(args.seeds)
  results, sweep_seconds, groups = run_sweep(runs, args.rounds,
                                             args.lockstep and not args.one_sweep,
                                             flatten=not args.lockstep)
  sequential = time_sequential(runs, args.rounds, args.sequential) if args.sequential else None
  saved = {"runs": [dict(dataset=n, mu=mu, seed=s) for n, mu, s, _ in runs],
           "train_loss": [r.history["train_loss"] for r in results],
           "grad_dissimilarity": [r.history["grad_dissimilarity"] for r in results],
           "sweep_seconds": sweep_seconds, "sequential_seconds_per_run": sequential,
           "sequential_runs": args.sequential, "sweeps": groups,
           "lockstep_seconds": args.lockstep_seconds,
           "machine": platform.machine(), "cores": os.cpu_count(),
           "backend": results[0].info["backend"]}
  base = os.path.join(args.out, "fedprox_figure2")
  plot(summarize(saved), args.rounds, base + ".png")
  print("\n".join(write_reports(saved, base)))


if __name__ == "__main__":
  main()
