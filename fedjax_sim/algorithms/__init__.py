"""Federated algorithms: each factory returns an :class:`Algorithm` record for the engine."""

from fedjax_sim.algorithms._base import (Algorithm, ClientContext, ClientOutput, Hooks,
                                         RoundSummary)
from fedjax_sim.algorithms.fedavg import fedavg, fedsgd, local_sgd

# name -> factory; the CLI and `fedjax-sim list` read this.
REGISTRY = {
    "fedavg": fedavg,
    "fedsgd": fedsgd,
    "local_sgd": local_sgd,
}

__all__ = ["Algorithm", "ClientContext", "ClientOutput", "Hooks", "REGISTRY", "RoundSummary",
           "fedavg", "fedsgd", "local_sgd"]
