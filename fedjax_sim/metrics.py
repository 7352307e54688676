"""What evaluated rounds measure: loss and accuracy, per-client fairness, gradient dissimilarity.

All functions build pure JAX evaluators that run inside the compiled block of rounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_sim import client as client_lib
from fedjax_sim import personal
from fedjax_sim.models import Model, correct_from_outputs, loss_from_outputs

EVAL_BATCH = 4096


CLIENT_ARRAY_TAG = "_per_client_"  # in the key of a [num_clients] metric, e.g. test_per_client_loss


def dataset_evaluator(model: Model, total: int, prefix: str, unroll: bool = False,
                      num_clients: int | None = None, local: tuple | None = None,
                      client_arrays: bool = False):
  """``fn(params, (x, y, client_of_row, count), local_clients=None) -> metrics`` over the first
  ``count ≤ total`` flat examples (``total`` is the static row count; see :func:`eval_arrays`).

  With ``local`` (the mask of a model's local leaves, :mod:`fedjax_sim.personal`), each example is
  scored by its client's own model: ``params`` with that client's row of ``local_clients``.

  Metrics: ``{prefix}_loss`` and ``{prefix}_accuracy``, example-weighted (which equals the mean
  over the flat example array). For classifiers with ``num_clients``, also the fairness of the
  global model across clients (Li et al. 2020, "Fair Resource Allocation in Federated Learning",
  arXiv:1905.10497): the unweighted mean and the 10th / 90th percentiles of the per-client accuracy,
  ``{prefix}_client_accuracy_mean|p10|p90``. With ``client_arrays`` (needs ``num_clients``), also
  every client's own mean loss and (classifiers) accuracy, ``[num_clients]`` arrays
  ``{prefix}_per_client_loss`` and ``{prefix}_per_client_accuracy`` (the accuracies the spread is
  computed from).
  """
  if client_arrays and num_clients is None:
    raise ValueError("client_arrays needs num_clients")
  batch = min(EVAL_BATCH, total)
  num_batches = -(-total // batch)
  per_client = model.is_classifier and num_clients is not None
  by_client_shape = num_clients if per_client else ()
  loss_shape = num_clients if client_arrays else ()

  def evaluate(params, arrays, local_clients=None):
    x, y, client_of_row, count = arrays
    def body(acc, i):
      rows = i * batch + jnp.arange(batch)
      real = (rows < count).astype(jnp.float32)
      rows = jnp.minimum(rows, total - 1)
      if local is None:
        out = model.apply(params, x[rows])
      else:  # padding rows belong to client num_clients: any client's model, never counted
        owners = jnp.minimum(client_of_row[rows], num_clients - 1)
        out = personal.personalized_apply(model.apply, params, [a[owners] for a in local_clients],
                                          local, x[rows])
      losses = loss_from_outputs(model.task, out, y[rows]) * real
      loss_by_client = (jax.ops.segment_sum(losses, client_of_row[rows], num_segments=num_clients)
                        if client_arrays else acc[3])
      if not model.is_classifier:
        return (acc[0] + jnp.sum(losses), acc[1], acc[2], acc[3] + loss_by_client * client_arrays
                ), None
      correct = correct_from_outputs(model.task, out, y[rows]) * real
      by_client = (jax.ops.segment_sum(correct, client_of_row[rows], num_segments=num_clients)
                   if per_client else acc[2])
      return (acc[0] + jnp.sum(losses), acc[1] + jnp.sum(correct), acc[2] + by_client * per_client,
              acc[3] + loss_by_client * client_arrays), None
    init = (jnp.float32(0), jnp.float32(0), jnp.zeros(by_client_shape, jnp.float32),
            jnp.zeros(loss_shape, jnp.float32))
    (loss, correct, by_client, loss_by_client), _ = lax.scan(body, init, jnp.arange(num_batches),
                                                             unroll=unroll)
    count = count.astype(jnp.float32)
    metrics = {f"{prefix}_loss": loss / count}
    if model.is_classifier:
      metrics[f"{prefix}_accuracy"] = correct / count
    if per_client or client_arrays:
      counts = jax.ops.segment_sum(jnp.ones(total, jnp.float32), client_of_row[:total],
                                   num_segments=num_clients)  # padding rows have id num_clients
      counts = jnp.maximum(counts, 1.0)
    if per_client:
      accuracy = by_client / counts
      metrics[f"{prefix}_client_accuracy_mean"] = jnp.mean(accuracy)
      metrics[f"{prefix}_client_accuracy_p10"] = jnp.percentile(accuracy, 10)
      metrics[f"{prefix}_client_accuracy_p90"] = jnp.percentile(accuracy, 90)
      if client_arrays:
        metrics[f"{prefix}{CLIENT_ARRAY_TAG}accuracy"] = accuracy
    if client_arrays:
      metrics[f"{prefix}{CLIENT_ARRAY_TAG}loss"] = loss_by_client / counts
    return metrics
  return evaluate


def split_client_arrays(metrics: dict) -> dict:
  """Removes the ``[..., num_clients]`` per-client metrics (``*_per_client_*`` keys) from
  ``metrics`` and returns them."""
  return {k: metrics.pop(k) for k in [k for k in metrics if CLIENT_ARRAY_TAG in k]}


def client_of_row(num_examples: np.ndarray) -> np.ndarray:
  """``[total]`` int32: the client index of each flat example."""
  return np.repeat(np.arange(len(num_examples), dtype=np.int32), num_examples)


def eval_arrays(data, rows: int | None = None):
  """``(x, y, client_of_row, count)`` of a dataset for :func:`dataset_evaluator`, zero-padded to
  ``rows`` examples (padding rows belong to no client and are not counted)."""
  rows = data.total_examples if rows is None else rows
  pad = rows - data.total_examples
  padded = lambda a, fill=0: np.concatenate([a, np.full((pad, *a.shape[1:]), fill, a.dtype)])
  if pad == 0:
    x, y = data.device_arrays()
  else:
    x, y = jnp.asarray(padded(data.x)), jnp.asarray(padded(data.y))
  owner = padded(client_of_row(data.num_examples), data.num_clients)
  return x, y, jnp.asarray(owner), jnp.int32(data.total_examples)


def gradient_dissimilarity(model: Model, max_rows_per_chunk: int = 1 << 16):
  """``fn(params, device_data, buckets) -> {"grad_dissimilarity", "grad_norm_sq"}``.

  The gradient dissimilarity plotted in the FedProx paper (Li et al. 2020, arXiv:1812.06127,
  Fig. 2 bottom row) over the whole training population at the global model ``w``:
  ``E_k ‖∇F_k(w) − ∇f(w)‖² = Σ_k p_k ‖∇F_k(w)‖² − ‖∇f(w)‖²`` with ``p_k = n_k / n`` and
  ``∇f = Σ_k p_k ∇F_k`` (``grad_norm_sq`` is ``‖∇f(w)‖²``). Each client's full gradient is computed
  over its own rows (:func:`client.full_gradient`), vmapped over chunks of the clients of one size
  bucket (found from ``device_data.bucket_of``) so that memory stays near ``max_rows_per_chunk``
  rows.
  """
  def measure(params, d, buckets):
    total_n = jnp.sum(d.counts).astype(jnp.float32)
    sum_sq, sum_grad = jnp.float32(0), jax.tree.map(jnp.zeros_like, params)
    for b, bucket in enumerate(buckets):
      size = bucket.shape.max_examples
      chunk = max(1, min(bucket.members, max_rows_per_chunk // size))
      slots = -(-bucket.members // chunk) * chunk
      ids = jnp.nonzero(d.bucket_of == b, size=slots, fill_value=-1)[0].reshape(-1, chunk)

      def one_chunk(acc, ids, size=size):
        safe = jnp.maximum(ids, 0)
        n = jnp.where(ids >= 0, d.counts[safe], 0)
        grads = jax.vmap(lambda off, n_k: client_lib.full_gradient(
            model, d.x, d.y, off, n_k, size, params))(d.offsets[safe], n)
        p = n.astype(jnp.float32) / total_n
        sq = sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads))
        weighted = jax.tree.map(lambda g: jnp.tensordot(p, g, axes=1), grads)
        return (acc[0] + jnp.sum(p * sq), jax.tree.map(jnp.add, acc[1], weighted)), None

      (sum_sq, sum_grad), _ = lax.scan(one_chunk, (sum_sq, sum_grad), ids)
    mean_sq = sum(jnp.sum(g * g) for g in jax.tree.leaves(sum_grad))
    return {"grad_dissimilarity": jnp.maximum(sum_sq - mean_sq, 0.0), "grad_norm_sq": mean_sq}
  return measure
