"""The algorithm record the engine runs, and the checks shared by every algorithm factory."""

from __future__ import annotations

from typing import NamedTuple

import optax

WEIGHTINGS = ("num_examples", "uniform")


class Algorithm(NamedTuple):
  """What one federated round does, as data the engine compiles.

  Attributes:
    name: registry name, e.g. ``"fedavg"``.
    client_optimizer: optax transformation applied to each client's mini-batch gradient; its state
      starts fresh every round.
    server_optimizer: optax transformation applied to the pseudo-gradient
      ``server_params − mean_k(client_params_k)``; ``optax.sgd(1.0)`` makes the new global model the
      weighted mean of the client models (FedAvg).
    local_epochs: ``E``, passes over the client's data per round (ignored when ``local_steps`` is set).
    batch_size: ``B``, examples per local step; ``None`` means the client's whole dataset.
    local_steps: ``H``, a fixed number of local steps per round (datacenter Local SGD), or ``None``
      for ``E · ⌈n_k / B⌉`` steps.
    shuffle: reshuffle each client's examples every epoch; ``False`` keeps them in order.
    weighting: ``"num_examples"`` (weights ``n_k``) or ``"uniform"`` for the server average.
  """
  name: str
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  local_epochs: int = 1
  batch_size: int | None = 32
  local_steps: int | None = None
  shuffle: bool = True
  weighting: str = "num_examples"


def check_optimizer(name: str, opt):
  if opt is not None and not isinstance(opt, optax.GradientTransformation):
    raise ValueError(f"{name} must be an optax.GradientTransformation, got {type(opt).__name__}")
  return opt


def check_weighting(weighting: str) -> str:
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
  return weighting
