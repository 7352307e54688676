"""Byzantine clients: a fixed set of the population whose updates (or training labels) are
replaced inside the compiled round.

``simulate(..., attack=fs.attacks.sign_flip(0.2, scale=4.0))``. The Byzantine set is either a
``fraction`` of the population, exactly ``round(fraction · N)`` clients drawn from the seed (the key
of round 0, which no round uses, so the set is the same every round and in every plan), or
explicit global ``ids``. Each round the history records ``attackers``, the Byzantine clients the
cohort sampled.

Model-update attacks replace each Byzantine client's whole update ``{"delta", "message"}`` (the
algorithm's message too) before the aggregator sees it:

* ``sign_flip(fraction, scale)``: ``−scale · u_k``;
* ``gaussian(fraction, std)``: ``N(0, std²)`` per coordinate;
* ``scaling(fraction, factor)``: ``factor · u_k`` (model replacement, Bagdasaryan et al. 2020);
* omniscient ones, which read the *honest* cohort's coordinate-wise mean ``μ`` and standard
  deviation ``σ`` of what the aggregator receives (after its per-client transform): every
  attacker sends the same vector. ``alie(fraction, z)``: ``μ − z·σ`` (Baruch et al. 2019; by
  default ``z = Φ⁻¹((n − s)/n)``, ``s = ⌊n/2 + 1⌋ − f`` for the round's ``n`` returning clients of
  which ``f`` attackers); ``ipm(fraction, epsilon)``: ``−ε·μ`` (Xie et al. 2020). They need every
  cohort update at once, so any aggregator then runs on the collect path.

Data poisoning, ``label_flip(fraction)``: Byzantine clients train honestly on labels
``y → C − 1 − y`` (``C`` the model's classes).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from fedjax_sim._checks import non_negative_float, positive_float


class HonestStats(NamedTuple):
  """The honest cohort's coordinate-wise statistics (pytrees like one update)."""
  mean: Any
  std: Any
  honest: jax.Array  # number of honest clients that returned
  attackers: jax.Array  # number of attackers that returned


class Attack(NamedTuple):
  """A Byzantine attack (see the module docstring).

  Attributes:
    name: e.g. ``"sign_flip"``.
    fraction: the Byzantine share of the population (``ids`` given: ignored).
    ids: explicit global ids of the Byzantine clients, or ``None``.
    update: ``fn(update, stats, *, key) -> update``, a Byzantine client's update; ``stats`` is
      :class:`HonestStats` for omniscient attacks, else ``None``.
    omniscient: ``update`` reads the honest cohort's statistics.
    label_map: ``fn(num_classes) -> int array [num_classes]``, the label each class becomes in a
      Byzantine client's training data (data poisoning).
  """
  name: str
  fraction: float
  ids: tuple | None = None
  update: Callable | None = None
  omniscient: bool = False
  label_map: Callable | None = None
  classes: int | None = None  # the model's classes, filled in by :func:`check`


def _fraction(fraction, ids):
  if ids is not None:
    ids = tuple(int(i) for i in np.asarray(ids).reshape(-1))
    if not ids or min(ids) < 0:
      raise ValueError(f"ids must be non-negative client ids, got {ids!r}")
    return 0.0, ids
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
      or not 0 <= fraction < 1:
    raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
  return float(fraction), None


def _tree_scale(tree, factor):
  return jax.tree.map(lambda a: (factor * a).astype(a.dtype), tree)


def sign_flip(fraction: float = 0.0, scale: float = 1.0, *, ids=None) -> Attack:
  """Byzantine clients send ``−scale · u_k``."""
  fraction, ids = _fraction(fraction, ids)
  scale = positive_float("scale", scale)
  return Attack("sign_flip", fraction, ids,
                update=lambda u, stats, *, key: _tree_scale(u, -scale))


def scaling(fraction: float = 0.0, factor: float = 10.0, *, ids=None) -> Attack:
  """Byzantine clients send ``factor · u_k`` (model replacement)."""
  fraction, ids = _fraction(fraction, ids)
  factor = positive_float("factor", factor)
  return Attack("scaling", fraction, ids, update=lambda u, stats, *, key: _tree_scale(u, factor))


def gaussian(fraction: float = 0.0, std: float = 1.0, *, ids=None) -> Attack:
  """Byzantine clients send Gaussian noise of standard deviation ``std``."""
  fraction, ids = _fraction(fraction, ids)
  std = positive_float("std", std)

  def update(u, stats, *, key):
    leaves, treedef = jax.tree.flatten(u)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [std * jax.random.normal(k, a.shape, a.dtype)
                                        for a, k in zip(leaves, keys)])
  return Attack("gaussian", fraction, ids, update=update)


def alie_z(n, f):
  """Baruch et al.'s default ``z = Φ⁻¹((n − s)/n)`` with ``s = ⌊n/2 + 1⌋ − f``."""
  n = jnp.maximum(n, 1.0)
  s = jnp.floor(n / 2 + 1) - f
  return norm.ppf(jnp.clip((n - s) / n, 1e-6, 1 - 1e-6))


def alie(fraction: float = 0.0, z: float | None = None, *, ids=None) -> Attack:
  """"A little is enough": every attacker sends ``μ − z·σ`` of the honest updates."""
  fraction, ids = _fraction(fraction, ids)
  z = None if z is None else non_negative_float("z", z)

  def update(u, stats, *, key):
    zz = alie_z(stats.honest + stats.attackers, stats.attackers) if z is None else z
    return jax.tree.map(lambda m, s: m - zz * s, stats.mean, stats.std)
  return Attack("alie", fraction, ids, update=update, omniscient=True)


def ipm(fraction: float = 0.0, epsilon: float = 0.5, *, ids=None) -> Attack:
  """Inner-product manipulation: every attacker sends ``−ε·μ`` of the honest updates."""
  fraction, ids = _fraction(fraction, ids)
  if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) \
      or not math.isfinite(epsilon):
    raise ValueError(f"epsilon must be a finite number, got {epsilon!r}")
  epsilon = float(epsilon)
  return Attack("ipm", fraction, ids, omniscient=True,
                update=lambda u, stats, *, key: _tree_scale(stats.mean, -epsilon))


def label_flip(fraction: float = 0.0, *, ids=None) -> Attack:
  """Data poisoning: Byzantine clients train on labels ``y → C − 1 − y``.

  ``C`` is the model's number of classes (a multiclass model is needed)."""
  fraction, ids = _fraction(fraction, ids)
  return Attack("label_flip", fraction, ids,
                label_map=lambda c: jnp.arange(c - 1, -1, -1, dtype=jnp.int32))


REGISTRY = {"sign_flip": sign_flip, "gaussian": gaussian, "scaling": scaling, "alie": alie,
            "ipm": ipm, "label_flip": label_flip}


def check(attack, num_clients: int, num_classes: int | None = None) -> Attack | None:
  """Validates an attack against the population and the model (``num_classes`` of a multiclass
  model, else ``None``); returns it with ``classes`` filled in (``None``: no attack)."""
  if attack is None:
    return None
  if not isinstance(attack, Attack):
    raise ValueError(f"attack must be a fedjax_sim.attacks.Attack (e.g. "
                     f"fedjax_sim.attacks.sign_flip(0.2)), got {type(attack).__name__}")
  if attack.ids is not None and max(attack.ids) >= num_clients:
    raise ValueError(f"attack ids must be below the population size {num_clients}, got "
                     f"{max(attack.ids)}")
  if attack.label_map is not None and num_classes is None:
    raise ValueError(f"attack {attack.name!r} flips class labels; it needs a multiclass model")
  return attack._replace(classes=num_classes)


def num_byzantine(attack: Attack, num_clients: int) -> int:
  return len(set(attack.ids)) if attack.ids is not None else round(attack.fraction * num_clients)


def members(attack: Attack, key: jax.Array, num_clients: int) -> jax.Array:
  """``[num_clients]`` booleans: the Byzantine set (exactly :func:`num_byzantine` clients)."""
  if attack.ids is not None:
    return jnp.zeros(num_clients, bool).at[jnp.asarray(attack.ids)].set(True)
  count = num_byzantine(attack, num_clients)
  if count == 0:
    return jnp.zeros(num_clients, bool)
  _, ids = jax.lax.top_k(jax.random.bits(key, (num_clients,)), count)
  return jnp.zeros(num_clients, bool).at[ids].set(True)


def honest_stats(updates, mask, attackers) -> HonestStats:
  """Coordinate-wise mean and standard deviation over the honest slots (``mask & ~attackers``)."""
  honest = mask & ~attackers
  h = jnp.sum(honest.astype(jnp.float32))
  col = lambda a: honest.reshape(-1, *([1] * (a.ndim - 1)))
  mean = jax.tree.map(lambda a: jnp.sum(jnp.where(col(a), a, 0.0), 0) / jnp.maximum(h, 1.0),
                      updates)
  std = jax.tree.map(lambda a, m: jnp.sqrt(jnp.sum(jnp.where(col(a), (a - m) ** 2, 0.0), 0)
                                           / jnp.maximum(h, 1.0)), updates, mean)
  return HonestStats(mean, std, h, jnp.sum((mask & attackers).astype(jnp.float32)))


def apply(attack: Attack, updates, attackers, *, key=None, mask=None):
  """The cohort's updates as the server receives them under ``attack``: stacked updates (leading
  client axis) with the ``attackers`` slots replaced (``mask``: slots that returned)."""
  attackers = jnp.asarray(attackers, bool)
  num = attackers.shape[0]
  mask = jnp.ones(num, bool) if mask is None else jnp.asarray(mask, bool)
  key = jax.random.key(0) if key is None else key
  if attack.update is None:
    return updates
  if attack.omniscient:
    vector = attack.update(None, honest_stats(updates, mask, attackers), key=key)
    return jax.tree.map(
        lambda a, v: jnp.where(attackers.reshape(-1, *([1] * (a.ndim - 1))), v[None], a),
        updates, vector)
  keys = jax.random.split(key, num)
  bad = jax.vmap(lambda u, k: attack.update(u, None, key=k))(updates, keys)
  return jax.tree.map(lambda a, b: jnp.where(attackers.reshape(-1, *([1] * (a.ndim - 1))), b, a),
                      updates, bad)
