"""Per-client evaluation: each training client's own model scored on its own examples.

Two personalized metrics of evaluated rounds, on every evaluation set made of the training clients
(``train``, and a ``test`` holding each training client's held-out split):

* **fine-tuned** (``{set}_finetuned_*``), the standard personalized-FL metric (e.g. Wang et al.
  2019, "Federated Evaluation of On-device Personalization", arXiv:1910.10252): every client of
  the population starts from the current global model (with its own local parameters, if any),
  takes ``k`` local steps on its own *training* examples, and is evaluated on its examples of the
  set. The steps are the algorithm's local training without its hooks (its client optimizer,
  batch size and shuffling; no proximal term or control variate): client ``c`` of the population
  uses the key ``fold_in(fold_in(round_key, FINETUNE_STREAM), c)`` for its shuffles (and dropout),
  a stream no round uses, so measuring never changes the training's numbers;
* **personal** (``{set}_personal_*``), for algorithms that keep a personal model per client
  (``Hooks.personal_params``, e.g. Ditto's ``v_k``): each client's personal model, no training.

Both run inside the compiled block, in the pattern of :func:`fedjax_sim.metrics.
gradient_dissimilarity`: per size bucket, a ``lax.scan`` over chunks of the bucket's clients, each
chunk's models vmapped. Each client's examples of a set are read in slices (``SLICE`` rows), up to
the largest member of its bucket in that set. Metrics per set: the example-weighted ``loss`` and
``accuracy`` (the same weighting as ``{set}_loss``), and for classifiers the spread across clients
``client_accuracy_mean|p10|p90`` (over the clients with at least one example in the set).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_sim import client as client_lib
from fedjax_sim.algorithms import ClientContext, Hooks
from fedjax_sim.engine import round_step as rs
from fedjax_sim.models import correct_from_outputs, loss_from_outputs

# fold_in(round key, FINETUNE_STREAM) keys fine-tuning. The round's own streams are split(key, 3)
# and fold_in(key, 1001 … 1004) (engine/cohort.py); this constant is used by nothing else.
FINETUNE_STREAM = 2001
SLICE = 256  # rows of a client's examples scored at once


class ClientSet(NamedTuple):
  """An evaluation set made of the training clients.

  Attributes:
    name: the set's name (``"train"``, ``"test"``), the prefix of its metrics.
    index: its position in the evaluation arrays passed to the compiled block.
    sizes: ``[num_clients]``, each training client's number of examples in the set (its rows are
      contiguous, client after client, as :func:`fedjax_sim.metrics.eval_arrays` lays them out).
  """
  name: str
  index: int
  sizes: np.ndarray


def client_scores(model, params, x, y, offset, count, length: int):
  """``(Σ loss, Σ correct)`` of one client's model over its rows ``offset … offset + count − 1``
  (``length``: the static bound on ``count``). ``correct`` is 0 for non-classifiers."""
  width = min(SLICE, length)

  def body(acc, i):
    pos = i * width + jnp.arange(width, dtype=jnp.int32)
    real = (pos < count).astype(jnp.float32)
    rows = offset + jnp.where(pos < count, pos, 0)
    out = model.apply(params, x[rows])
    loss = jnp.sum(loss_from_outputs(model.task, out, y[rows]) * real)
    correct = (jnp.sum(correct_from_outputs(model.task, out, y[rows]) * real)
               if model.is_classifier else jnp.float32(0))
    return (acc[0] + loss, acc[1] + correct), None

  (loss, correct), _ = lax.scan(body, (jnp.float32(0), jnp.float32(0)),
                                jnp.arange(-(-length // width)))
  return loss, correct


def set_metrics(model, name: str, suffix: str, loss, correct, counts) -> dict:
  """``{name}_{suffix}_*`` of per-client sums ``[num_clients]``."""
  total = jnp.maximum(jnp.sum(counts), 1.0)
  out = {f"{name}_{suffix}_loss": jnp.sum(loss) / total}
  if model.is_classifier:
    out[f"{name}_{suffix}_accuracy"] = jnp.sum(correct) / total
    accuracy = jnp.where(counts > 0, correct / jnp.maximum(counts, 1.0), jnp.nan)
    out[f"{name}_{suffix}_client_accuracy_mean"] = jnp.nanmean(accuracy)
    out[f"{name}_{suffix}_client_accuracy_p10"] = jnp.nanpercentile(accuracy, 10)
    out[f"{name}_{suffix}_client_accuracy_p90"] = jnp.nanpercentile(accuracy, 90)
  return out


def per_client_evaluator(model, sets: list[ClientSet], groups: list[np.ndarray],
                         chunks: list[int], suffix: str):
  """``fn(models_of, eval_data) -> metrics``: every training client's model (``models_of(ids, b)``
  → params stacked over the chunk ``ids`` of bucket ``b``, ``-1`` for empty slots) scored on its
  own examples of each set."""
  num_clients = int(sum(len(g) for g in groups))
  starts = [np.concatenate([[0], np.cumsum(s.sizes)[:-1]]).astype(np.int32) for s in sets]

  def evaluate(models_of: Callable, eval_data) -> dict:
    zeros = jnp.zeros(num_clients, jnp.float32)
    acc = tuple((zeros, zeros) for _ in sets)
    for b, group in enumerate(groups):
      chunk = max(1, min(chunks[b], len(group)))
      ids = np.full(-(-len(group) // chunk) * chunk, -1, np.int32)
      ids[:len(group)] = group
      lengths = [max(1, int(s.sizes[group].max())) for s in sets]

      def one_chunk(acc, ids_c, b=b, lengths=lengths):
        params = models_of(ids_c, b)
        safe = jnp.maximum(ids_c, 0)
        into = jnp.where(ids_c >= 0, ids_c, num_clients)
        new = []
        for s, start, length, (loss_sum, correct_sum) in zip(sets, starts, lengths, acc):
          x, y = eval_data[s.index][0], eval_data[s.index][1]
          n = jnp.where(ids_c >= 0, jnp.asarray(s.sizes, jnp.int32)[safe], 0)
          off = jnp.asarray(start)[safe]
          loss, correct = rs.over_chunk(lambda w, o, n_k, length=length: client_scores(
              model, w, x, y, o, n_k, length))(params, off, n)
          new.append((loss_sum.at[into].add(loss, mode="drop"),
                      correct_sum.at[into].add(correct, mode="drop")))
        return tuple(new), None

      ids = jnp.asarray(ids.reshape(-1, chunk))
      if ids.shape[0] == 1:
        acc, _ = one_chunk(acc, ids[0])
      else:
        acc, _ = lax.scan(one_chunk, acc, ids)
    metrics = {}
    for s, (loss, correct) in zip(sets, acc):
      metrics.update(set_metrics(model, s.name, suffix, loss, correct,
                                 jnp.asarray(s.sizes, jnp.float32)))
    return metrics
  return evaluate


def finetune_algorithm(algo, steps: int):
  """The algorithm's local training for fine-tuning: ``steps`` local steps, its client optimizer,
  batch size and shuffling, none of its hooks."""
  return algo._replace(local_steps=steps, hooks=Hooks())


def build(spec, groups: list[np.ndarray], train_sizes: np.ndarray, sets: list[ClientSet],
          finetune_steps: int | None):
  """``fn(state, d, eval_data, round_key) -> metrics`` of evaluated rounds (the fine-tuned and the
  personal metrics that apply), or ``None`` when none does."""
  model, algo = spec.model, spec.algo
  personal_of = algo.hooks.personal_params
  if not sets or (finetune_steps is None and personal_of is None):
    return None
  chunks = [b.chunk for b in spec.buckets]
  evaluate = per_client_evaluator(model, sets, groups, chunks, "finetuned")
  evaluate_personal = per_client_evaluator(model, sets, groups, chunks, "personal")
  if finetune_steps:
    tuned = finetune_algorithm(algo, finetune_steps)
    shapes = [client_lib.bucket_shape(train_sizes[g], tuned) for g in groups]

  def metrics(state, d, eval_data, round_key):
    out = {}
    if finetune_steps is not None:
      key = jax.random.fold_in(round_key, FINETUNE_STREAM)

      def finetuned(ids, b):
        safe = jnp.maximum(ids, 0)
        local = (ids if state.local_clients is None
                 else jax.tree.map(lambda a: a[safe], state.local_clients))
        start = lambda local_k: rs.start_params(spec, state.params, local_k)
        if not finetune_steps:
          return rs.over_chunk(start)(local)
        n = jnp.where(ids >= 0, d.counts[safe], 0)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(d.global_id(safe))
        shape = shapes[b]
        orders = client_lib.epoch_orders(keys, n, shape, tuned.shuffle, spec.shuffle_method)
        step_keys = jax.vmap(client_lib.step_key_of)(keys) if model.stochastic else None
        jobs = client_lib.ClientJob(d.offsets[safe], n, jnp.where(n > 0, finetune_steps, 0),
                                    orders, None, step_keys)
        context = ClientContext(state.params, jnp.int32(0), {}, None)
        return rs.over_chunk(lambda job, local_k: client_lib.local_train(
            model, tuned, shape, start(local_k), d.x, d.y, job, context,
            unroll=spec.plan.unroll))(jobs, local)
      out.update(evaluate(finetuned, eval_data))
    if personal_of is not None:
      def personal_models(ids, b):
        states = jax.tree.map(lambda a: a[jnp.maximum(ids, 0)], state.client_states)
        return rs.over_chunk(personal_of)(states)
      out.update(evaluate_personal(personal_models, eval_data))
    return out
  return metrics


__all__ = ["ClientSet", "FINETUNE_STREAM", "build", "client_scores", "finetune_algorithm",
           "per_client_evaluator"]
