"""fedjax_sim: federated learning simulated one whole cohort at a time, in one compiled program."""

from fedjax_sim import (aggregators, algorithms, attacks, checkpoint, client, data, datasets,
                        describe, distributed, engine, metrics, models, partition, personal,
                        privacy, reference, simulation, sweep, systems)
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.data import DataError, FederatedData
from fedjax_sim.models import Model
from fedjax_sim.engine import ServerState
from fedjax_sim.systems import Heterogeneity
from fedjax_sim.sweep import simulate_sweep
from fedjax_sim.simulation import SimulationResult, TrainingDiverged, simulate

__version__ = "0.1.0"


def __getattr__(name):
  """``fs.cli`` and ``fs.grid`` (which imports the CLI) on first use: not imported eagerly, so
  ``python -m fedjax_sim.cli`` runs it fresh."""
  if name in ("cli", "grid"):
    import importlib
    return importlib.import_module(f"fedjax_sim.{name}")
  raise AttributeError(f"module 'fedjax_sim' has no attribute {name!r}")

__all__ = ["Algorithm", "DataError", "FederatedData", "Heterogeneity", "Model", "ServerState",
           "SimulationResult", "TrainingDiverged", "aggregators", "algorithms", "attacks",
           "checkpoint", "cli", "client", "data", "datasets", "describe", "distributed", "engine",
           "grid", "metrics", "models", "partition", "personal", "privacy", "reference",
           "simulate", "simulate_sweep", "simulation", "sweep", "systems"]
