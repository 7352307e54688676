"""Summaries of a federated dataset's heterogeneity: client sizes and per-client label mixes."""

from __future__ import annotations

import numpy as np

from fedjax_sim._checks import positive_int
from fedjax_sim.data import FederatedData
from fedjax_sim.partition import label_distribution

_LABELS = {
    "num_clients": "clients",
    "total_examples": "total examples",
    "size_min": "client size: min",
    "size_p10": "client size: 10th percentile",
    "size_median": "client size: median",
    "size_p90": "client size: 90th percentile",
    "size_max": "client size: max",
    "size_mean": "client size: mean",
    "num_classes": "classes",
    "classes_per_client_mean": "classes per client: mean",
    "classes_per_client_min": "classes per client: min",
    "classes_per_client_max": "classes per client: max",
    "max_class_fraction_mean": "largest-class fraction: mean",
    "label_entropy_mean": "label entropy (bits): mean",
}


def _has_class_labels(fd: FederatedData) -> bool:
  return np.issubdtype(fd.y.dtype, np.integer) or fd.y.dtype == np.bool_


def describe(fd: FederatedData, num_classes: int | None = None) -> dict:
  """Heterogeneity statistics of ``fd``.

  Always: ``num_clients``, ``total_examples`` and the client sizes' ``size_min``, ``size_p10``,
  ``size_median``, ``size_p90``, ``size_max``, ``size_mean`` (percentiles linearly interpolated).
  For integer labels also ``num_classes``, ``classes_per_client_mean/min/max`` (classes present on a
  client), ``max_class_fraction_mean`` (mean over clients of the largest class's share) and
  ``label_entropy_mean`` (mean over clients of the label entropy, in bits). Means are unweighted
  over clients. Float (regression) labels get no label statistics.

  Args:
    fd: the dataset.
    num_classes: for integer labels; defaults to the largest label plus one.
  """
  n = fd.num_examples
  stats = {"num_clients": fd.num_clients, "total_examples": fd.total_examples,
           "size_min": int(n.min()), "size_p10": float(np.percentile(n, 10)),
           "size_median": float(np.median(n)), "size_p90": float(np.percentile(n, 90)),
           "size_max": int(n.max()), "size_mean": float(n.mean())}
  if not _has_class_labels(fd):
    return stats
  counts = label_distribution(fd, num_classes)
  frac = counts / counts.sum(axis=1, keepdims=True)
  present = (counts > 0).sum(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    entropy = -np.where(frac > 0, frac * np.log2(frac), 0.0).sum(axis=1)
  stats.update(num_classes=counts.shape[1], classes_per_client_mean=float(present.mean()),
               classes_per_client_min=int(present.min()), classes_per_client_max=int(present.max()),
               max_class_fraction_mean=float(frac.max(axis=1).mean()),
               label_entropy_mean=float(entropy.mean()))
  return stats


def format_description(stats: dict) -> str:
  """A two-column text table of :func:`describe`'s ``stats`` (unknown keys are shown as named)."""
  def fmt(value):
    if isinstance(value, float):
      return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)

  rows = [(_LABELS.get(key, key), fmt(value)) for key, value in stats.items()]
  width = max(len(name) for name, _ in rows)
  value_width = max(len(value) for _, value in rows)
  rule = "-" * (width + 2 + value_width)
  return "\n".join([rule] + [f"{name:<{width}}  {value:>{value_width}}" for name, value in rows]
                   + [rule])


def plot_label_distribution(fd: FederatedData, path: str, num_classes: int | None = None,
                            max_clients: int = 100) -> None:
  """Saves a PNG: label fractions per client (stacked bars) beside a histogram of client sizes.

  The bar chart shows the first ``max_clients`` clients (by position), largest first; regression
  data (float labels) gets only the size histogram. Uses Matplotlib's Agg canvas directly, so no
  global backend is changed.
  """
  import matplotlib
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  max_clients = positive_int("max_clients", max_clients)
  labelled = _has_class_labels(fd)
  fig = Figure(figsize=(12 if labelled else 6, 4.5))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2 if labelled else 1, squeeze=False)[0]
  if labelled:
    shown = np.arange(min(max_clients, fd.num_clients))
    shown = shown[np.argsort(-fd.num_examples[shown], kind="stable")]
    counts = label_distribution(fd, num_classes)[shown]
    frac = counts / counts.sum(axis=1, keepdims=True)
    c = counts.shape[1]
    if c <= 20:
      colors = matplotlib.colormaps["tab10" if c <= 10 else "tab20"](np.arange(c))
    else:
      colors = matplotlib.colormaps["viridis"](np.linspace(0, 1, c))
    ax, bottom, pos = axes[0], np.zeros(len(shown)), np.arange(len(shown))
    for cls in range(c):
      ax.bar(pos, frac[:, cls], bottom=bottom, width=1.0, color=colors[cls],
             label=str(cls), linewidth=0)
      bottom += frac[:, cls]
    ax.set(xlim=(-0.5, len(shown) - 0.5), ylim=(0, 1), xlabel="client (largest first)",
           ylabel="label fraction",
           title=f"Label mix of {len(shown)} of {fd.num_clients} clients")
    if c <= 20:
      ax.legend(title="class", fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
  ax = axes[-1]
  ax.hist(fd.num_examples, bins=min(50, max(10, fd.num_clients // 5)), color="0.4")
  ax.set(xlabel="examples per client", ylabel="clients",
         title=f"Client sizes ({fd.total_examples} examples)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
