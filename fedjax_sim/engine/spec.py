"""The static description of a compiled round: :class:`Plan` (how the cohort is executed) and
:class:`RoundSpec` (everything every stage reads that is not an array)."""

from __future__ import annotations

from typing import Any, NamedTuple

PLANS = ("auto", "vmap", "chunked", "scan", "host_loop")


class Plan(NamedTuple):
  """How the cohort is executed (results are the same up to float reassociation).

  * ``vmap``: each bucket's sampled clients in one vmap (with partial participation, in chunks of
    the bucket's expected share of the cohort, rounded up to a power of two).
  * ``chunked``: vmap over chunks of ``chunk_size`` clients, ``lax.scan`` over the chunks with a
    running weighted sum (bounded memory).
  * ``scan``: ``chunk_size = 1``, one client at a time inside the compiled program.
  * ``host_loop``: Python drives rounds, chunks and local steps, one compiled call per step (the
    schedule, masks and randomness are the same functions). XLA:CPU runs convolutions about 10×
    slower inside any loop (jax-ml/jax#12868), so convolutional models on CPU use this plan.
  ``unroll`` fully unrolls scanned local steps and evaluation batches (convolutions on CPU).
  """
  name: str
  chunk_size: int | None
  unroll: bool


class RoundSpec(NamedTuple):
  """Static inputs of every stage of a round (closed over by the compiled programs).

  Attributes:
    model, algo, aggregator: what trains, how, and how updates are combined.
    buckets: the size buckets (:class:`fedjax_sim.engine.buckets.Bucket`).
    num_clients: population size ``N``.
    cohort_size: clients per round ``m``.
    system: stragglers and dropouts (:class:`fedjax_sim.systems.Heterogeneity`).
    plan: the execution :class:`Plan`.
    shuffle_method: ``"fisher_yates"`` or ``"sort"`` (:func:`fedjax_sim.client.shuffle_method`).
    streaming: the round's data holds exactly its cohort (host-streamed population).
    sampling: how cohorts are drawn (:class:`fedjax_sim.engine.cohort.Sampling`); for Poisson
      sampling ``cohort_size`` is the slot capacity.
    attack: Byzantine clients (:class:`fedjax_sim.attacks.Attack`) or ``None``.
    local: which model leaves stay on each client (a mask in leaf order,
      :mod:`fedjax_sim.personal`), or ``None``.
    mesh: the ``clients`` mesh each chunk is split over (:mod:`fedjax_sim.engine.mesh`), or
      ``None`` (one device).
  """
  model: Any
  algo: Any
  aggregator: Any
  buckets: list
  num_clients: int
  cohort_size: int
  system: Any
  plan: Plan
  shuffle_method: str
  streaming: bool = False
  sampling: Any = None
  attack: Any = None
  local: tuple | None = None
  mesh: Any = None

  @property
  def poisson(self) -> bool:
    return self.sampling is not None and self.sampling.kind == "poisson"

  @property
  def collect(self) -> bool:
    """The cohort's updates are held at once: a collect aggregator, or an omniscient attack
    (its attackers read the honest updates)."""
    return (self.aggregator.reduction == "collect"
            or (self.attack is not None and self.attack.omniscient))

  @property
  def slot_offsets(self) -> list[int]:
    """First collect slot of each bucket (the cohort's slots, bucket after bucket)."""
    offsets, start = [], 0
    for b in self.buckets:
      offsets.append(start)
      start += b.num_chunks * b.chunk
    return offsets + [start]
