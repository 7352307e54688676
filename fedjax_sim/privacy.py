"""Privacy accounting of DP federated training, through Google's ``dp-accounting`` library.

What is protected: **user-level** differential privacy, one *client's whole dataset* being the
unit. Each round releases the clipped, noised sum of the cohort's updates (the Gaussian mechanism
with noise multiplier ``z``: std ``z·C`` for clip norm ``C``, :func:`fedjax_sim.aggregators.
dp_mean`), and ``T`` rounds compose. The DP event depends on how cohorts are drawn:

* ``sampling="poisson"`` (each client joins with probability ``q``): neighbouring populations
  differ by adding or removing one client; the round is a Poisson-subsampled Gaussian with
  sensitivity ``C``: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``. This is the setting of
  McMahan et al. 2018 (arXiv:1710.06963) and of most published DP-FL numbers.
* ``sampling="fixed"`` (``m`` of ``N`` without replacement): the population size is public, so
  neighbours *replace* one client's data (dp-accounting supports only this relation for the
  event); replacing one clipped update moves the sum by up to ``2C``, so the event is
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``. Expect a larger ε than
  Poisson sampling at the same ``z`` and rate.

Adaptive clipping (Andrew et al. 2021) also releases a noised count; :func:`~fedjax_sim.
aggregators.dp_mean` splits its noise so that ``z`` here is the *effective* multiplier of the
whole round (see there), so no extra event is needed.

Accountants: ``"rdp"`` (Rényi DP, fast, slightly loose) and ``"pld"`` (privacy loss distributions,
tighter, slower; Poisson sampling only).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import NamedTuple

from fedjax_sim._checks import non_negative_float, positive_float, positive_int

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")
MAX_NOISE_MULTIPLIER = 1e4  # the calibration's search bracket


class Accounting(NamedTuple):
  """How a DP aggregator's rounds are accounted: the ``delta`` of the reported ε (``None``:
  ``1 / N^1.1``, below ``1/N`` as is customary) and the accountant."""
  delta: float | None = None
  accountant: str = "rdp"


def default_delta(num_clients: int) -> float:
  """``1 / N^1.1``: the δ used when none is given (smaller than one over the population)."""
  return 1.0 / num_clients ** 1.1


def _check(sampling_rate, steps, delta, accountant, sampling, num_clients):
  if not isinstance(sampling_rate, (int, float)) or isinstance(sampling_rate, bool) \
      or not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
  if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta!r}")
  positive_int("steps", steps)
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
  if sampling == "fixed":
    positive_int("num_clients (needed for sampling='fixed')", num_clients)
    if accountant == "pld":
      raise ValueError("accountant 'pld' cannot account fixed-size sampling without replacement "
                       "(dp-accounting supports it with 'rdp' only); use accountant='rdp'")


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int, *,
             sampling: str = "poisson", num_clients: int | None = None):
  """The ``dp_accounting.DpEvent`` of ``steps`` DP rounds (see the module docstring).

  For ``sampling="fixed"`` the cohort is ``round(sampling_rate · num_clients)`` clients.
  """
  import dp_accounting  # on first use: importing it takes about 1 s (half of fedjax_sim's import)
  z = non_negative_float("noise_multiplier", noise_multiplier)
  if sampling == "fixed":
    cohort = max(1, round(sampling_rate * num_clients))
    one = dp_accounting.SampledWithoutReplacementDpEvent(
        num_clients, cohort, dp_accounting.GaussianDpEvent(z / 2))
  else:
    one = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(z))
  return dp_accounting.SelfComposedDpEvent(one, steps)


@contextlib.contextmanager
def _quiet():
  """dp-accounting logs (through absl) each RDP order it drops as numerically unstable; those
  orders are excluded from the minimum, which is still a valid bound, so the lines are noise."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _accountant(name: str, sampling: str):
  import dp_accounting
  from dp_accounting import pld, rdp
  if name == "pld":
    return pld.PLDAccountant()
  relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if sampling == "fixed"
              else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  return rdp.RdpAccountant(neighboring_relation=relation)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float, *,
            accountant: str = "rdp", sampling: str = "poisson",
            num_clients: int | None = None) -> float:
  """ε after ``steps`` DP rounds at ``delta`` (``inf`` without noise).

  Args:
    noise_multiplier: ``z``, the noise std over the clip norm.
    sampling_rate: ``q`` (Poisson), or ``m / N`` for fixed-size cohorts.
    steps: rounds.
    delta: the δ of the (ε, δ) guarantee, in (0, 1).
    accountant: ``"rdp"`` or ``"pld"``.
    sampling: ``"poisson"`` or ``"fixed"`` (then ``num_clients`` is needed).
  """
  _check(sampling_rate, steps, delta, accountant, sampling, num_clients)
  z = non_negative_float("noise_multiplier", noise_multiplier)
  if z == 0:
    return math.inf
  acc = _accountant(accountant, sampling)
  with _quiet():
    acc.compose(dp_event(z, sampling_rate, steps, sampling=sampling, num_clients=num_clients))
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(epsilon: float, delta: float, sampling_rate: float, steps: int, *,
                         accountant: str = "rdp", sampling: str = "poisson",
                         num_clients: int | None = None) -> float:
  """The smallest noise multiplier whose ``steps`` rounds spend at most ``epsilon`` at ``delta``
  (dp-accounting's calibration; arguments as in :func:`epsilon`).

  Raises:
    ValueError: a bad argument, or an ε that no noise multiplier up to 10⁴ reaches.
  """
  import dp_accounting
  target = positive_float("epsilon", epsilon)
  _check(sampling_rate, steps, delta, accountant, sampling, num_clients)
  make_event = lambda z: dp_event(z, sampling_rate, steps, sampling=sampling,
                                  num_clients=num_clients)
  with _quiet():
    worst = _accountant(accountant, sampling)
    worst.compose(make_event(MAX_NOISE_MULTIPLIER))
    if worst.get_epsilon(delta) > target:
      raise ValueError(f"epsilon={epsilon!r} is unreachable at delta={delta!r} over {steps} "
                       f"steps with sampling rate {sampling_rate!r}: even noise_multiplier="
                       f"{MAX_NOISE_MULTIPLIER:g} spends more")
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant, sampling), make_event, target, delta,
        dp_accounting.ExplicitBracketInterval(0.0, MAX_NOISE_MULTIPLIER)))
