"""Byzantine robustness: final test accuracy against the fraction of attackers, per attack × rule.

Setup (full run):
  data       scikit-learn's 8×8 digits (1,797 images, 64 features, 10 classes) split over 100
             clients by a Dirichlet(α = 0.5) label partition (``load_digits_federated``, data
             seed 0: 4–38 training examples per client, 1,442 in all); ``test`` is every client's
             held-out 20 % (355 examples), so test accuracy is that of the global distribution
  model      MLP 64 → 32 → 10 (``fs.models.mlp(64, (32,), 10)``, 2,410 parameters)
  algorithm  FedAvg, client SGD lr 0.1, E = 2, B = 10, 20 of 100 clients per round (uniform,
             without replacement), 100 rounds; clean FedAvg reaches 0.93 by round 70 and 0.94 at
             100 (the clean curve is in the .md)
  seeds      3 simulation seeds per point (initial model, cohorts, shuffles and the Byzantine set),
             run as one vmapped program (``fs.simulate_sweep``); cells are the mean over seeds
  attackers  a fixed ``round(fraction · 100)`` clients, fraction ∈ {0, 0.1, 0.2, 0.3, 0.4};
             ``history["attackers"]`` (every round evaluated) gives how many each cohort sampled
  attacks    sign_flip(scale=4): −4·u; gaussian(std=1): N(0, 1) per coordinate (norm ≈ 49 against
             honest update norms ≈ 0.3); scaling(factor=10): 10·u; alie(): μ − z·σ of the honest
             cohort, Baruch et al.'s z (0.39 at 4 attackers of 20, 1.04 at 8); ipm(ε=0.5): −0.5·μ;
             label_flip(): y → 9 − y in the attackers' training data
  rules      mean (FedAvg's weighted mean); median (coordinate-wise); trimmed_mean(β = 0.2: 4 of
             20 cut at each end); krum(f = 8, the most a cohort of 20 allows: 20 > 2f + 2);
             geometric_median (RFA); centered_clip(τ = 0.3, L = 3 iterations); clip(0.3) around the
             mean (norm bounding). Both radii are about the clean run's mean update norm (0.32)
  fraction 0 is one clean run per rule (no attack), shared by every attack's table.

Each (attack, rule, fraction) is its own compiled program (the attack and the size of the
Byzantine set are static), and compilation, not training, is most of a point's time. With XLA's
optimizations off (``jax_disable_most_optimizations``) a point compiles in about 4 s instead of 8
and its 100 rounds × 3 seeds train in about 1.5 s instead of 0.5, so the study runs that way (the
numbers are the same up to float reassociation; ``--optimize`` turns them back on).

Measured here (benchmarks/results/robustness.md; accuracies at 40 % unless said): the mean falls
to sign flipping (chance from 20 %, non-finite at 40 %) and to Gaussian noise (0.53), but not to
scaling (a longer step in the honest direction), nor to IPM with ε = 0.5 (0.91: −0.5·μ only shrinks
the mean). The omniscient attacks defeat the rules built on order statistics and distances: IPM
brings Krum down from 10 % (0.61), the median from 20 % (0.72), the geometric median and the
trimmed mean from 30 %; ALIE brings Krum (0.28) and the median (0.67) down at 30 %, and at 40 % the
median, trimmed mean, Krum and geometric median all end as the same constant-class predictor
(0.10), while the mean (0.46), norm bounding (0.53) and centered clipping (0.73) degrade less.
Against the non-omniscient attacks those rules hold: the median, geometric median and centered
clipping stay ≥ 0.90 under Gaussian noise, Krum stays at its clean 0.84 throughout (its clean
accuracy is the lowest: one non-IID client's update a round), and the trimmed mean breaks once the
attackers outnumber the 4 it cuts (sign flip: 0.54 at 30 %, 0.12 at 40 %). Centered clipping has
the best worst case: ≥ 0.85 in every cell up to 30 %, ≥ 0.58 at 40 %; norm bounding is second
(≥ 0.80 up to 30 %). At 40 %, 42 % of the rounds sample more than Krum's f = 8 attackers and 25 %
half the cohort or more. Label flipping is mild for every rule (0.73–0.84 at 40 %).

The collect path's cost per rule (every cohort update held at once, order statistics) is measured
elsewhere, in benchmarks/engine.py's W1 cases (engine_median, engine_trimmed_mean, engine_krum),
not here.

Outputs (``--out``, default benchmarks/results/): ``robustness.json`` (every point's per-seed
final accuracies, accuracy every 10 rounds, a histogram of the attackers each round sampled,
settings and provenance: git commit, JAX version, CPU, cores, total wall time),
``robustness.md`` (one table per attack: rows rules, columns attacker fraction, cells final test
accuracy) and ``robustness.png`` (a panel per attack, accuracy against fraction, a line per rule).


Usage: ``flock /tmp/cpu.lock python benchmarks/robustness.py [--quick]`` (``--quick``: 2 attacks,
2 rules, fractions 0 and 0.2, 10 rounds, one seed, a smoke test under a minute; writes
``robustness_quick.*``); ``--from-json FILE`` re-renders the .md and .png from a saved run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import provenance  # noqa: E402  (git commit, versions, CPU, cores)

A = None  # fs.aggregators / fs.attacks, bound in main() after the JAX flags are set
T = None

SETTINGS = dict(num_clients=100, alpha=0.5, data_seed=0, test_fraction=0.2, hidden=32,
                clients_per_round=20, client_lr=0.1, local_epochs=2, batch_size=10)
FULL = dict(rounds=100, seeds=[0, 1, 2], fractions=[0.0, 0.1, 0.2, 0.3, 0.4], attacks=None,
            rules=None, curve_every=10)
QUICK = dict(rounds=10, seeds=[0], fractions=[0.0, 0.2], attacks=["sign_flip", "alie"],
             rules=["mean", "median"], curve_every=1)

ATTACKS = {  # name -> fraction -> Attack
    "sign_flip": lambda f: T.sign_flip(f, scale=4.0),
    "gaussian": lambda f: T.gaussian(f, std=1.0),
    "scaling": lambda f: T.scaling(f, factor=10.0),
    "alie": lambda f: T.alie(f),
    "ipm": lambda f: T.ipm(f, epsilon=0.5),
    "label_flip": lambda f: T.label_flip(f),
}
ATTACK_LABELS = {"sign_flip": "sign flip (−4·u)", "gaussian": "Gaussian (std 1)",
                 "scaling": "scaling (10·u)", "alie": "ALIE (default z)", "ipm": "IPM (ε = 0.5)",
                 "label_flip": "label flip"}
RULES = {  # name -> () -> Aggregator
    "mean": lambda: A.mean(),
    "median": lambda: A.median(),
    "trimmed_mean(0.2)": lambda: A.trimmed_mean(0.2),
    "krum(f=8)": lambda: A.krum(num_byzantine=8),
    "geometric_median": lambda: A.geometric_median(),
    "centered_clip(0.3, L=3)": lambda: A.centered_clip(0.3, iters=3),
    "clip(0.3) + mean": lambda: A.clip(0.3),
}


def summarize(seed, diverged_at_round, test_accuracy, attackers, c, s):
  """One run's record from its per-round history (every round is evaluated): the final
  accuracy, the accuracy every ``curve_every`` rounds, and a histogram of the attackers each
  round's cohort sampled (``[k]``: rounds with ``k`` attackers)."""
  every = c["curve_every"]
  return {"seed": seed, "diverged_at_round": diverged_at_round,
          "final_test_accuracy": None if diverged_at_round is not None
          else float(test_accuracy[-1]),
          "test_accuracy_curve": [round(float(a), 4) for a in test_accuracy[every - 1::every]],
          "attackers_histogram": np.bincount(np.asarray(attackers, int),
                                             minlength=s["clients_per_round"] + 1).tolist()}


def run_point(fs, train, test, c, s, attack, rule, fraction):
  """One (attack, rule, fraction) point: ``len(seeds)`` runs in one compiled sweep."""
  start = time.perf_counter()
  results = fs.simulate_sweep(
      fs.algorithms.fedavg(client_lr=s["client_lr"], local_epochs=s["local_epochs"],
                           batch_size=s["batch_size"]),
      fs.models.mlp(64, (s["hidden"],), 10), train, seeds=c["seeds"], tests=test,
      rounds=c["rounds"], clients_per_round=s["clients_per_round"], eval_every=1,
      bucketing=False, plan="vmap", aggregator=RULES[rule](),
      attack=None if attack is None else ATTACKS[attack](fraction))
  seconds = time.perf_counter() - start
  runs = [summarize(seed, r.info.get("diverged_at_round"), r.history["test_accuracy"],
                    r.history.get("attackers", [0] * len(r.history["round"])), c, s)
          for seed, r in zip(c["seeds"], results)]
  finals = [r["final_test_accuracy"] for r in runs if r["final_test_accuracy"] is not None]
  return {"attack": attack, "rule": rule, "fraction": fraction, "seconds": seconds,
          "mean": float(np.mean(finals)) if finals else None,
          "std": float(np.std(finals)) if finals else None,
          "diverged": sum(r["diverged_at_round"] is not None for r in runs), "runs": runs}


def cell(out, attack, rule, fraction):
  """The point behind a table cell: fraction 0 is the rule's clean run."""
  want = (None, rule, 0.0) if fraction == 0 else (attack, rule, fraction)
  return next(p for p in out["points"] if (p["attack"], p["rule"], p["fraction"]) == want)


def markdown(out):
  c, s = out["config"], out["settings"]
  fr = c["fractions"]
  lines = [
      "# Byzantine robustness: final test accuracy against the fraction of attackers", "",
      f"Digits (8×8, scikit-learn) over {s['num_clients']} clients, Dirichlet(α = {s['alpha']}) "
      f"label partition; MLP 64-{s['hidden']}-10; FedAvg (client lr {s['client_lr']}, "
      f"E = {s['local_epochs']}, B = {s['batch_size']}), {s['clients_per_round']} clients per "
      f"round, {c['rounds']} rounds. Each cell: final test accuracy, mean ± std over "
      f"{len(c['seeds'])} seed(s) (seeds {c['seeds']}: model init, cohorts and the Byzantine "
      f"set). Column 0 % is each rule's clean run (the same in every table). Chance is 0.10. "
      f"\"diverged\": the model became non-finite (the sweep stops that run); the mean is over "
      f"the runs that did not.",
      "",
      f"Commit {str(out['commit'])[:12]}{' (dirty)' if out['dirty'] else ''}, JAX {out['jax']}, "
      f"{out['cpu_model']}, {out['cores']} cores; total wall time {out['total_seconds']:.0f} s "
      f"({len(out['points'])} compiled sweeps, XLA optimizations "
      f"{'on' if c['optimize'] else 'off'}). Collect-path cost per rule: benchmarks/engine.py W1 "
      f"cases (engine_median, engine_trimmed_mean, engine_krum), not measured here.", ""]
  for attack in c["attacks"]:
    lines += [f"## {ATTACK_LABELS[attack]}", "",
              "| rule | " + " | ".join(f"{f:.0%}" for f in fr) + " |",
              "|---|" + "---|" * len(fr)]
    for rule in c["rules"]:
      cells = []
      for f in fr:
        p = cell(out, attack, rule, f)
        runs = len(p["runs"])
        if p["mean"] is None:
          cells.append(f"diverged ({p['diverged']}/{runs})")
        else:
          cells.append(f"{p['mean']:.3f} ± {p['std']:.3f}"
                       + (f" ({p['diverged']}/{runs} diverged)" if p["diverged"] else ""))
      lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Attackers sampled per round", "",
            "Over every round, seed, attack and rule (cohort of "
            f"{s['clients_per_round']}; Krum assumes f = 8, the trimmed mean cuts 4 per side):", "",
            "| fraction | mean attackers / round | max | rounds with > 4 | rounds with > 8 | "
            "rounds with ≥ 10 (half) |", "|---|---|---|---|---|---|"]
  for f in fr[1:]:
    hist = np.sum([r["attackers_histogram"] for p in out["points"] if p["fraction"] == f
                   for r in p["runs"]], axis=0)
    k, share = np.arange(len(hist)), hist / hist.sum()
    lines.append(f"| {f:.0%} | {k @ share:.2f} | {k[hist > 0].max()} | {share[5:].sum():.0%} | "
                 f"{share[9:].sum():.0%} | {share[10:].sum():.0%} |")
  clean = cell(out, None, "mean", 0.0)
  curve = np.mean([r["test_accuracy_curve"] for r in clean["runs"]], axis=0)
  lines += ["", "Clean FedAvg (mean) test accuracy by round, mean over seeds (convergence "
            "check): " + ", ".join(f"{(i + 1) * c['curve_every']}: {a:.3f}"
                                   for i, a in enumerate(curve)) + "."]
  return "\n".join(lines) + "\n"


def figure(out, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  c = out["config"]
  n = len(c["attacks"])
  cols = min(3, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows + 0.7), squeeze=False,
                           sharex=True, sharey=True)
  x = [100 * f for f in c["fractions"]]
  for ax, attack in zip(axes.flat, c["attacks"]):
    for rule in c["rules"]:
      ys = [cell(out, attack, rule, f)["mean"] for f in c["fractions"]]
      line, = ax.plot(x, [np.nan if y is None else y for y in ys], "o-", ms=3, lw=1.2, label=rule)
      gone = [xi for xi, y in zip(x, ys) if y is None]  # every run diverged: an × on the axis
      ax.plot(gone, [0.02] * len(gone), "x", ms=6, color=line.get_color(), clip_on=False)
    ax.axhline(0.1, color="gray", ls=":", lw=0.8)
    ax.set_title(ATTACK_LABELS[attack], fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_ylim(0, 1)
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
  for ax in axes.flat[n:]:
    ax.axis("off")
  for ax in axes[-1]:
    ax.set_xlabel("attackers (% of clients)", fontsize=8)
  for ax in axes[:, 0]:
    ax.set_ylabel("final test accuracy", fontsize=8)
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.suptitle("final test accuracy against attackers (× on the axis: every seed diverged; "
               "dotted: chance)", fontsize=8)
  fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7.5,
             frameon=False)
  legend_rows = -(-len(labels) // 4)
  fig.subplots_adjust(left=0.07, right=0.99, top=1 - 0.6 / fig.get_figheight(),
                      bottom=(0.55 + 0.2 * legend_rows) / fig.get_figheight(), hspace=0.3,
                      wspace=0.08)
  fig.savefig(path, dpi=110)


def write(out, stem):
  with open(stem + ".md", "w") as f:
    f.write(markdown(out))
  figure(out, stem + ".png")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 attacks, 2 rules, 10 rounds")
  parser.add_argument("--optimize", action="store_true", help="keep XLA's optimizations on")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--from-json", help="re-render the .md and .png of a saved run")
  args = parser.parse_args()
  if args.from_json:
    with open(args.from_json) as f:
      out = json.load(f)
    write(out, os.path.splitext(args.from_json)[0])
    print(markdown(out))
    return

  import jax
  if not args.optimize:
    jax.config.update("jax_disable_most_optimizations", True)
  import fedjax_sim as fs
  from fedjax_sim.datasets.digits import load_digits_federated
  global A, T
  A, T = fs.aggregators, fs.attacks

  c = dict(QUICK if args.quick else FULL, optimize=args.optimize)
  c["attacks"] = c["attacks"] or list(ATTACKS)
  c["rules"] = c["rules"] or list(RULES)
  s = SETTINGS
  start = time.perf_counter()
  train, test = load_digits_federated("dirichlet", num_clients=s["num_clients"], alpha=s["alpha"],
                                      seed=s["data_seed"], test_fraction=s["test_fraction"])
  jobs = [(None, rule, 0.0) for rule in c["rules"]]
  jobs += [(a, rule, f) for a in c["attacks"] for rule in c["rules"] for f in c["fractions"] if f]
  points = []
  for i, (attack, rule, fraction) in enumerate(jobs):
    p = run_point(fs, train, test, c, s, attack, rule, fraction)
    points.append(p)
    print(f"[{i + 1}/{len(jobs)}] {attack or 'clean':>10} {rule:>24} {fraction:4.0%}  "
          f"acc {p['mean'] if p['mean'] is None else round(p['mean'], 4)}  "
          f"diverged {p['diverged']}  {p['seconds']:.1f} s  "
          f"(elapsed {time.perf_counter() - start:.0f} s)", flush=True)
  out = {**provenance(), "config": c, "settings": s,
         "data": {"train_examples": int(train.num_examples.sum()),
                  "test_examples": int(test.num_examples.sum()),
                  "client_sizes_min_max": [int(train.num_examples.min()),
                                           int(train.num_examples.max())]},
         "points": points, "total_seconds": time.perf_counter() - start}
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, "robustness" + ("_quick" if args.quick else ""))
  with open(stem + ".json", "w") as f:
    json.dump(out, f, separators=(",", ":"))  # compact: one record per run
  write(out, stem)
  print(markdown(out))


if __name__ == "__main__":
  main()
