"""Local (personal) parameters: parts of the model that never leave the client.

Two personalization families keep some parameters on each client instead of averaging them:

* **FedBN** (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
  Normalization", arXiv:2102.07623): every batch-normalization layer (its scale and bias and its
  running statistics) stays local; the rest is FedAvg.
* **FedPer** (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers",
  arXiv:1912.00818): the last layers (the "personalization layers") stay local; the base layers
  are averaged.

Mechanics, for a boolean mask over the model's leaves: the engine keeps one copy of the masked
leaves per population client on the device (``[num_clients, ...]``, initialized from the initial
global model and scattered back by global client id after each round, as SCAFFOLD's control
variates are). A sampled client starts from the global shared leaves and its own local ones; its
update to the local leaves is kept on the client and is zero in what the server aggregates, so
the server's copy of them stays as initialized. Evaluation is personalized: every example of an
evaluation set is scored by the model of the client it belongs to, which needs evaluation sets
made of the training clients (``train``, and a ``test`` holding each client's held-out split).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

import jax

Params = Any
PRESETS = ("batch_norm", "batch_stats")


def leaf_paths(params: Params) -> list[str]:
  """``"/"``-joined key paths of every leaf, in ``jax.tree`` order (e.g.
  ``"params/Dense_1/kernel"``)."""
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return ["/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(
      params)[0]]


def local_mask(params: Params, which) -> tuple[bool, ...] | None:
  """Which leaves of ``params`` are local.

  Args:
    which: ``None`` (none); ``"batch_norm"`` (FedBN: every leaf of a module that has batch
      statistics, its scale and bias included); ``"batch_stats"`` (the running statistics only);
      a sequence of glob patterns over :func:`leaf_paths` (``["params/Dense_1/*"]``, FedPer); or a
      function ``path -> bool``.

  Raises:
    ValueError: an unknown preset, a preset the model has nothing for, or a selection that is
      empty or covers every leaf, naming the paths there are.
  """
  if which is None:
    return None
  paths = leaf_paths(params)
  if isinstance(which, str) and which in PRESETS:
    stats = [p for p in paths if p.startswith("batch_stats/")]
    if not stats:
      raise ValueError(f"local_params={which!r}: the model has no batch statistics "
                       f"(its leaves are {paths})")
    if which == "batch_stats":
      mask = [p.startswith("batch_stats/") for p in paths]
    else:
      modules = {p.split("/", 1)[1].rsplit("/", 1)[0] for p in stats}
      mask = [p.split("/", 1)[-1].rsplit("/", 1)[0] in modules for p in paths]
  elif isinstance(which, str):
    raise ValueError(f"local_params must be one of {', '.join(PRESETS)}, a list of path patterns "
                     f"or a function of the path, got {which!r}")
  elif callable(which):
    mask = [bool(which(p)) for p in paths]
  elif isinstance(which, Sequence) and all(isinstance(w, str) for w in which):
    mask = [any(fnmatch.fnmatchcase(p, w) for w in which) for p in paths]
  else:
    raise ValueError(f"local_params must be a preset, a list of path patterns or a function, "
                     f"got {which!r}")
  if not any(mask):
    raise ValueError(f"local_params={which!r} selects no parameter; the paths are {paths}")
  if all(mask):
    raise ValueError(f"local_params={which!r} selects every parameter, so nothing would be "
                     "federated; train each client alone instead")
  return tuple(mask)


def split(params: Params, mask: Sequence[bool]) -> list:
  """The local leaves of ``params`` (a list, in leaf order)."""
  return [leaf for leaf, m in zip(jax.tree.leaves(params), mask) if m]


def merge(params: Params, local: list, mask: Sequence[bool]) -> Params:
  """``params`` with its local leaves replaced by ``local``."""
  leaves, treedef = jax.tree.flatten(params)
  it = iter(local)
  return jax.tree.unflatten(treedef, [next(it) if m else leaf for leaf, m in zip(leaves, mask)])


def zero_local(tree: Params, mask: Sequence[bool]) -> Params:
  """``tree`` with its local leaves set to zero (a client's update as the server sees it)."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [leaf * 0 if m else leaf for leaf, m in zip(leaves, mask)])


def personalized_apply(apply: Callable, params: Params, local: list, mask, x: jax.Array):
  """Outputs of ``x[i]`` under the model of row ``i``'s client: ``local`` holds the gathered local
  leaves ``[rows, ...]``; the shared leaves are not batched, so dense layers stay one matmul."""
  return jax.vmap(lambda loc, xi: apply(merge(params, loc, mask), xi[None])[0])(local, x)
