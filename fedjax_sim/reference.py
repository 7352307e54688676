"""Plain NumPy FedAvg, SCAFFOLD and FedNova: one client at a time, one mini-batch at a time.

These are the slow, obviously-correct implementations the engine is tested against (to 1e-5);
:func:`fedavg` is also the "seed-style NumPy loop" baseline of ``benchmarks/engine.py``. Epoch
orders come from a ``numpy.random.Generator``, in order, or from an ``orders`` function that
replays the engine's own permutations (so the shuffled path is checked, not only in-order
batches). Models: ``"linear"`` (``½(w·x+b−y)²``), ``"softmax"`` (multinomial logistic regression)
and ``"mlp"`` (ReLU hidden layers, softmax output).
Params use the layout of :mod:`fedjax_sim.models` (``{"kernel", "bias"}`` or a list of them).

:func:`vectorized_fedavg_round` is the same FedAvg round written the fast NumPy way (all clients at
once, batched matmuls): the ``numpy_vec`` baseline, checked against :func:`fedavg` in
``tests/test_benchmark_baseline.py``.
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


def local_sgd(kind, params, x, y, lr, epochs, batch_size, rng=None, orders=None, correction=None):
  """E epochs of mini-batch SGD on one client.

  Args:
    rng: reshuffles each epoch (``None``: in order).
    orders: ``[epochs, n]`` example order of each epoch (overrides ``rng``).
    correction: a params-shaped tree added to every mini-batch gradient (SCAFFOLD's ``c − c_i``).

  Returns the final params; :func:`local_sgd_steps` also returns the number of steps taken.
  """
  return local_sgd_steps(kind, params, x, y, lr, epochs, batch_size, rng, orders, correction)[0]


def local_sgd_steps(kind, params, x, y, lr, epochs, batch_size, rng=None, orders=None,
                    correction=None):
  """:func:`local_sgd` returning ``(params, number of steps τ)``; ``lr`` may be a schedule of the
  step count (from 0 every call)."""
  n = len(x)
  b = n if batch_size is None else batch_size
  w = _tree(np.copy, params)
  steps = 0
  for e in range(epochs):
    if orders is not None:
      order = np.asarray(orders[e])[:n]
    else:
      order = np.arange(n) if rng is None else rng.permutation(n)
    for start in range(0, n, b):
      idx = order[start:start + b]
      g = grad(kind, w, x[idx], y[idx])
      if correction is not None:
        g = _tree(lambda q, c: q + c, g, correction)
      rate = float(lr(steps)) if callable(lr) else lr
      w = _tree(lambda p, q: p - p.dtype.type(rate) * q, w, g)
      steps += 1
  return w, steps


def _orders_of(orders, r, k):
  return None if orders is None else orders(r, k)


def fedavg(kind, params, clients, rounds, lr, epochs, batch_size, cohort=None, rng=None,
           weighting="num_examples", dtype=np.float64, orders=None):
  """FedAvg over ``clients`` (a list of ``(x, y)``).

  Args:
    cohort: ``fn(round) -> client indices``; default every client every round.
    rng: a ``numpy.random.Generator`` for the epoch shuffles (``None``: in-order batches).
    dtype: arithmetic precision (float64 for tests, float32 for fair timing).
    orders: ``fn(round, client) -> [epochs, n]`` epoch orders (replaces ``rng``).
  """
  w = _tree(lambda a: np.asarray(a, dtype), params)
  for r in range(1, rounds + 1):
    ids = range(len(clients)) if cohort is None else cohort(r)
    total, acc = 0.0, None
    for k in ids:
      x, y = clients[k]
      wk = local_sgd(kind, w, x, y, lr, epochs, batch_size, rng, _orders_of(orders, r, k))
      weight = dtype(len(x)) if weighting == "num_examples" else 1.0
      acc = _tree(lambda a: weight * a, wk) if acc is None else _tree(lambda a, b: a + weight * b, acc, wk)
      total += weight
    w = _tree(lambda a: a / dtype(total), acc)
  return w


def fednova(kind, params, clients, rounds, lr, epochs, batch_size, cohort=None, orders=None):
  """FedNova with plain client SGD (Wang et al. 2020): client ``k`` sends ``Δ_k / τ_k``; the server
  adds ``τ_eff Σ p_k Δ_k / τ_k`` with ``p_k = n_k / Σ n_j`` and ``τ_eff = Σ p_k τ_k`` (float64).
  With ``lr`` a schedule of the local step, ``τ_k`` is replaced by ``Σ_{t<τ_k} η_t``."""
  w = _tree(lambda a: np.asarray(a, np.float64), params)
  for r in range(1, rounds + 1):
    ids = list(range(len(clients)) if cohort is None else cohort(r))
    total = float(sum(len(clients[k][0]) for k in ids))
    tau_eff, acc = 0.0, _tree(np.zeros_like, w)
    for k in ids:
      x, y = clients[k]
      wk, tau = local_sgd_steps(kind, w, x, y, lr, epochs, batch_size,
                                orders=_orders_of(orders, r, k))
      p = len(x) / total
      if callable(lr):
        tau = sum(float(lr(t)) for t in range(tau))
      tau_eff += p * tau
      acc = _tree(lambda a, b, c: a + p * (b - c) / tau, acc, wk, w)
    w = _tree(lambda a, d: a + tau_eff * d, w, acc)
  return w


def scaffold(kind, params, clients, rounds, lr, epochs, batch_size, server_lr=1.0, option="II",
             cohort=None, orders=None):
  """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1) in float64; returns ``(x, c, [c_i])``.

  Client: ``y ← y − η(g(y) − c_i + c)`` for ``K`` steps; option I ``c_i⁺ = ∇f_i(x)``, option II
  ``c_i⁺ = c_i − c + (x − y)/(Kη)`` (``Σ_{t<K} η_t`` for ``Kη`` when ``lr`` is a schedule of the
  local step). Server (unweighted means over the cohort ``S`` of ``N``):
  ``x ← x + η_g mean(Δy)``, ``c ← c + |S|/N · mean(Δc)``.
  """
  x_global = _tree(lambda a: np.asarray(a, np.float64), params)
  zeros = lambda: _tree(np.zeros_like, x_global)
  c, c_clients = zeros(), [zeros() for _ in clients]
  for r in range(1, rounds + 1):
    ids = list(range(len(clients)) if cohort is None else cohort(r))
    sum_dy, sum_dc = zeros(), zeros()
    for k in ids:
      x, y = clients[k]
      corr = _tree(lambda a, b: a - b, c, c_clients[k])
      yk, steps = local_sgd_steps(kind, x_global, x, y, lr, epochs, batch_size,
                                  orders=_orders_of(orders, r, k), correction=corr)
      if option == "I":
        new_ci = grad(kind, x_global, x, y)
      else:
        rates = sum(float(lr(t)) for t in range(steps)) if callable(lr) else steps * lr
        new_ci = _tree(lambda ci, cc, a, b: ci - cc + (a - b) / rates, c_clients[k], c,
                       x_global, yk)
      sum_dy = _tree(lambda s, a, b: s + (a - b), sum_dy, yk, x_global)
      sum_dc = _tree(lambda s, a, b: s + (a - b), sum_dc, new_ci, c_clients[k])
      c_clients[k] = new_ci
    m, n = len(ids), len(clients)
    x_global = _tree(lambda a, d: a + server_lr * d / m, x_global, sum_dy)
    c = _tree(lambda a, d: a + (m / n) * d / m, c, sum_dc)
  return x_global, c, c_clients


def vectorized_fedavg_round(kind, params, x, y, lr, batch_size, rng=None, order=None,
                            chunk_size=None):
  """One FedAvg round (E = 1) over equal-size clients, every client at once, in batched NumPy.

  The fast NumPy baseline of ``benchmarks/engine.py`` (``numpy_vec``): the clients' mini-batches
  are gathered with fancy indexing and each SGD step is a few batched matmuls over a leading
  client axis, so there is no Python loop over clients, only over the ``ceil(n / B)`` local steps.

  Args:
    kind: ``"softmax"`` or ``"mlp"`` (the models and params layout of :func:`grad`).
    params: the global params (NumPy arrays); the arithmetic runs in their dtype (float32 for
      timing), the per-client copies are ``[K, ...]`` stacks of them.
    x: ``[K, n, ...]`` features, ``y``: ``[K, n]`` integer labels (K clients of n examples each).
    rng: a ``numpy.random.Generator``; every client gets its own permutation of its examples
      (``rng.permuted`` on a ``[K, n]`` index array). ``None`` with ``order`` ``None``: in order.
    order: ``[K, n]`` explicit per-client example orders (overrides ``rng``).
    chunk_size: clients updated together (``None``: all K); a memory/cache knob, same result.

  Returns the new global params: the mean of the clients' updated params, weighted by their
  numbers of examples (all n here, so the plain mean).
  """
  num_clients, n = y.shape
  if order is None:
    order = np.broadcast_to(np.arange(n), (num_clients, n))
    if rng is not None:
      order = rng.permuted(order, axis=1)
  layers = [params] if kind == "softmax" else list(params)
  dtype = layers[0]["kernel"].dtype
  chunk = num_clients if chunk_size is None else chunk_size
  sums = [{k: np.zeros_like(v) for k, v in layer.items()} for layer in layers]
  for lo in range(0, num_clients, chunk):
    hi = min(lo + chunk, num_clients)
    ws = _local_sgd_batched(layers, x[lo:hi], y[lo:hi], order[lo:hi], dtype.type(lr), batch_size)
    for total, w in zip(sums, ws):
      for k in total:
        total[k] += w[k].sum(axis=0)
  weight = dtype.type(n) / dtype.type(n * num_clients)  # every client has n examples
  new = [{k: v * weight for k, v in layer.items()} for layer in sums]
  return new[0] if kind == "softmax" else new


def _local_sgd_batched(layers, x, y, order, lr, batch_size):
  """One epoch of mini-batch SGD for a chunk of C clients at once; returns ``[C, ...]`` params."""
  c, n = y.shape
  x_rows, y_rows = x.reshape(c * n, -1), y.reshape(c * n)
  first_row = (np.arange(c) * n)[:, None]
  ws = [{k: np.repeat(v[None], c, axis=0) for k, v in layer.items()} for layer in layers]
  for start in range(0, n, batch_size):
    rows = (first_row + order[:, start:start + batch_size]).ravel()  # each client's own batch
    b = len(rows) // c
    xb = np.take(x_rows, rows, axis=0).reshape(c, b, -1)  # [C, b, d] (faster than x[i, idx])
    acts = [xb]
    for w in ws[:-1]:
      h = np.matmul(acts[-1], w["kernel"])
      h += w["bias"][:, None, :]
      acts.append(np.maximum(h, 0, out=h))
    z = np.matmul(acts[-1], ws[-1]["kernel"])
    z += ws[-1]["bias"][:, None, :]
    z -= z.max(axis=2, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=2, keepdims=True)
    classes = z.shape[2]
    z.reshape(-1)[np.arange(c * b) * classes + np.take(y_rows, rows)] -= 1  # softmax − one-hot
    delta = z
    delta *= lr / z.dtype.type(b)  # lr · (mean-over-batch gradient of the logits)
    for i in range(len(ws) - 1, -1, -1):
      w = ws[i]
      back = np.matmul(delta, w["kernel"].swapaxes(1, 2)) if i > 0 else None
      w["kernel"] -= np.matmul(acts[i].swapaxes(1, 2), delta)
      w["bias"] -= delta.sum(axis=1)
      if i > 0:
        back *= acts[i] > 0
        delta = back
  return ws
