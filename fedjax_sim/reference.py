"""Plain NumPy FedAvg: one client at a time, one mini-batch at a time.

This is the slow, obviously-correct implementation the engine is tested against (to 1e-5) and the
"seed-style NumPy loop" baseline of ``benchmarks/engine.py``. Models: ``"linear"`` (``½(w·x+b−y)²``),
``"softmax"`` (multinomial logistic regression) and ``"mlp"`` (ReLU hidden layers, softmax output).
Params use the layout of :mod:`fedjax_sim.models` (``{"kernel", "bias"}`` or a list of them).
"""

from __future__ import annotations

import numpy as np


def _softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def grad(kind: str, params, x, y):
  """Mean-over-batch gradient of the loss, same structure as ``params``."""
  n = len(x)
  if kind == "linear":
    r = x @ params["kernel"][:, 0] + params.get("bias", 0.0)
    r = r - y
    g = {"kernel": (x.T @ r / n)[:, None]}
    if "bias" in params:
      g["bias"] = np.array([r.mean()])
    return g
  layers = [params] if kind == "softmax" else params
  acts = [x.reshape(n, -1)]
  for layer in layers[:-1]:
    acts.append(np.maximum(acts[-1] @ layer["kernel"] + layer["bias"], 0.0))
  p = _softmax(acts[-1] @ layers[-1]["kernel"] + layers[-1]["bias"])
  p[np.arange(n), y] -= 1.0
  delta = p / n
  grads = []
  for i in range(len(layers) - 1, -1, -1):
    grads.append({"kernel": acts[i].T @ delta, "bias": delta.sum(axis=0)})
    if i > 0:
      delta = (delta @ layers[i]["kernel"].T) * (acts[i] > 0)
  grads.reverse()
  return grads[0] if kind == "softmax" else grads


def _tree(fn, *trees):
  if isinstance(trees[0], dict):
    return {k: _tree(fn, *(t[k] for t in trees)) for k in trees[0]}
  if isinstance(trees[0], (list, tuple)):
    return [_tree(fn, *parts) for parts in zip(*trees)]
  return fn(*trees)


def local_sgd(kind, params, x, y, lr, epochs, batch_size, rng=None):
  """E epochs of mini-batch SGD; ``rng`` reshuffles each epoch (``None``: in order)."""
  n = len(x)
  b = n if batch_size is None else batch_size
  w = _tree(np.copy, params)
  for _ in range(epochs):
    order = np.arange(n) if rng is None else rng.permutation(n)
    for start in range(0, n, b):
      idx = order[start:start + b]
      g = grad(kind, w, x[idx], y[idx])
      w = _tree(lambda p, q: p - p.dtype.type(lr) * q, w, g)
  return w


def fedavg(kind, params, clients, rounds, lr, epochs, batch_size, cohort=None, rng=None,
           weighting="num_examples", dtype=np.float64):
  """FedAvg over ``clients`` (a list of ``(x, y)``).

  Args:
    cohort: ``fn(round) -> client indices``; default every client every round.
    rng: a ``numpy.random.Generator`` for the epoch shuffles (``None``: in-order batches).
    dtype: arithmetic precision (float64 for tests, float32 for fair timing).
  """
  w = _tree(lambda a: np.asarray(a, dtype), params)
  for r in range(1, rounds + 1):
    ids = range(len(clients)) if cohort is None else cohort(r)
    total, acc = 0.0, None
    for k in ids:
      x, y = clients[k]
      wk = local_sgd(kind, w, x, y, lr, epochs, batch_size, rng)
      weight = dtype(len(x)) if weighting == "num_examples" else 1.0
      acc = _tree(lambda a: weight * a, wk) if acc is None else _tree(lambda a, b: a + weight * b, acc, wk)
      total += weight
    w = _tree(lambda a: a / dtype(total), acc)
  return w
