"""Federated algorithms: each factory returns an :class:`Algorithm` record for the engine.

One module per algorithm; each cites its paper and states its update rule.
"""

from fedjax_sim.algorithms._base import (Algorithm, ClientContext, ClientOutput, Hooks,
                                         HparamTransformation, RoundSummary, hparam_optimizer,
                                         optimizer_update, run_hparams)
from fedjax_sim.algorithms.ditto import ditto
from fedjax_sim.algorithms.fedavg import fedavg, fedsgd
from fedjax_sim.algorithms.fedbuff import fedbuff
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedopt import fedadagrad, fedadam, fedavgm, fedyogi, reddi_adaptive
from fedjax_sim.algorithms.fedprox import fedprox
from fedjax_sim.algorithms.local_sgd import local_sgd, local_sgd_adaptive, local_sgd_growing
from fedjax_sim.algorithms.moon import moon
from fedjax_sim.algorithms.scaffold import scaffold

# name -> factory; the CLI, `fedjax-sim list` and the contract test read this.
REGISTRY = {
    "fedavg": fedavg,
    "fedsgd": fedsgd,
    "fedprox": fedprox,
    "scaffold": scaffold,
    "fedavgm": fedavgm,
    "fedadagrad": fedadagrad,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "fednova": fednova,
    "local_sgd": local_sgd,
    "local_sgd_growing": local_sgd_growing,
    "local_sgd_adaptive": local_sgd_adaptive,
    "moon": moon,
    "ditto": ditto,
    "fedbuff": fedbuff,
}

__all__ = ["Algorithm", "ClientContext", "ClientOutput", "Hooks", "HparamTransformation",
           "REGISTRY", "RoundSummary", *REGISTRY, "hparam_optimizer", "optimizer_update",
           "reddi_adaptive", "run_hparams"]
