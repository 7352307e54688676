"""The algorithm record the engine runs, its hooks, and the checks shared by every factory.

An :class:`Algorithm` is FedAvg's round (client SGD from the global model, weighted mean of the
client deltas, an optax server step) plus a few optional :class:`Hooks`, pure functions that say
how a variant departs from it. The engine calls the hooks inside the compiled, vmapped round; a
variant is one small module that builds them (``fedprox.py``, ``scaffold.py``, ``fednova.py``, ...).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

WEIGHTINGS = ("num_examples", "uniform")
Params = Any


class ClientContext(NamedTuple):
  """What one client sees during its local training (all leaves are traced arrays).

  Attributes:
    global_params: the server model the client started from (``x`` in SCAFFOLD, ``w^t`` in FedProx).
    round: the 1-based round number.
    hparams: the algorithm's numeric hyperparameters (:attr:`Algorithm.hparams`), passed to the
      compiled round as data so that a sweep can batch several values in one program.
    extra: ``Hooks.client_extra(server_extra, client_state)``, e.g. SCAFFOLD's ``c − c_i``.
    delta_scale: the factor on the client's update from ``Hooks.client_start`` (FedBuff's
      staleness weight), or ``None`` (1).
  """
  global_params: Params
  round: jax.Array
  hparams: dict
  extra: Any = None
  delta_scale: Any = None


class ClientOutput(NamedTuple):
  """One client's round, as :attr:`Hooks.client_result` sees it.

  Attributes:
    context: the client's :class:`ClientContext`.
    params: its params after local training (``y_i`` in SCAFFOLD).
    num_steps: ``τ_k``, local steps it actually took (int32 scalar).
    num_examples: ``n_k``.
    client_state: its persistent state before the round (``c_i``), or ``None``.
    full_gradient: ``fn(params) -> ∇F_k(params)``, the gradient of the client's mean loss over all
      its examples (zero for the model's state collections); only traced if a hook calls it.
    state_collections: the model's collections of ``params`` that are not trained by gradients
      (``("batch_stats",)`` for batch normalization; see :class:`~fedjax_sim.models.Model`).
  """
  context: ClientContext
  params: Params
  num_steps: jax.Array
  num_examples: jax.Array
  client_state: Any
  full_gradient: Callable[[Params], Params]
  state_collections: tuple = ()


class RoundSummary(NamedTuple):
  """The cohort's reduced results, as :attr:`Hooks.server_update` sees them.

  Attributes:
    mean_delta: ``Σ_k w_k (θ_k − θ) / Σ_k w_k`` over the clients that returned (f32).
    mean_message: the same weighted mean of each client's ``client_result`` message (or ``None``).
    participants: number of clients that returned an update this round (float32).
    num_clients: population size ``N``.
    drift: ``Σ_k p_k ‖θ_k − θ̄‖²`` with ``p_k = w_k / Σ w``, the cohort's spread around its mean.
    round: the 1-based round number.
    params: the server model before this round's step (``w^t``; FedBuff keeps it in its buffer).
  """
  mean_delta: Params
  mean_message: Any
  participants: jax.Array
  num_clients: int
  drift: jax.Array
  round: jax.Array
  params: Params = None


class Hooks(NamedTuple):
  """How an algorithm departs from FedAvg. Every field left ``None`` keeps FedAvg's behaviour.

  Attributes:
    gradient: ``fn(grads, params, context) -> grads``, applied to every mini-batch gradient before
      the client optimizer (FedProx's ``+ μ (w − w^t)``, SCAFFOLD's ``− c_i + c``).
    update_scale: ``fn(round) -> scalar`` multiplying every local update (per-round client
      learning-rate schedules).
    init_client_state: ``fn(params) -> state`` of one client; the engine keeps one per population
      client (``[num_clients, ...]`` on device), scattered back by client id after each round.
    init_server_extra: ``fn(params) -> extra``, algorithm state kept next to the server optimizer's.
    client_extra: ``fn(server_extra, client_state) -> extra`` put in each client's context.
    client_result: ``fn(ClientOutput) -> (message, new_client_state)``; the message is averaged with
      the server weights into :attr:`RoundSummary.mean_message`.
    server_update: ``fn(RoundSummary, hparams, server_extra) -> (delta, new_server_extra)``; the
      server optimizer then steps on the pseudo-gradient ``−delta`` (default: ``mean_delta``).
    round_steps: ``fn(server_extra, round) -> H`` local steps this round (``≤ local_steps``, which
      is the static bound); for Local-SGD schedules.
    local_loss: ``fn(model, params, batch, context) -> scalar``, the client's local objective on a
      mini-batch ``batch = (x, y, mask)`` (``mask`` marks the batch's real examples); its gradient
      replaces ``∇ model.loss(params, x, y, mask)``. For objectives that read the batch's inputs
      and other models (MOON's contrastive term reads the global and the previous local model).
    personal_params: ``fn(client_state) -> params``, the client's personal model held in its
      per-client state (Ditto's ``v_k``); evaluated rounds then also score every example of an
      evaluation set made of the training clients with its own client's personal model
      (``{set}_personal_*`` metrics, :mod:`fedjax_sim.engine.personal_eval`).
    client_start: ``fn(server_extra, params, key, hparams) -> (start_params, scale)``: the model a
      client starts from instead of the current server model ``params`` (it becomes the client's
      ``context.global_params``) and a factor on its update, ``Δ_k = scale · (y_k − start_params)``;
      ``key`` is the client's own, ``fold_in(keys.client_start, global id)`` (see
      :mod:`fedjax_sim.engine.cohort`). For asynchronous FL: FedBuff's stale models and staleness
      weights.
  """
  gradient: Callable | None = None
  update_scale: Callable | None = None
  init_client_state: Callable | None = None
  init_server_extra: Callable | None = None
  client_extra: Callable | None = None
  client_result: Callable | None = None
  server_update: Callable | None = None
  round_steps: Callable | None = None
  local_loss: Callable | None = None
  personal_params: Callable | None = None
  client_start: Callable | None = None


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
      for ``E · ⌈n_k / B⌉`` steps. With ``hooks.round_steps`` it is the largest ``H`` a round may use.
    shuffle: reshuffle each client's examples every epoch; ``False`` keeps them in order.
    weighting: ``"num_examples"`` (weights ``n_k``) or ``"uniform"`` for the server average.
    hooks: how the algorithm departs from FedAvg (see :class:`Hooks`).
    hparams: numeric hyperparameters, passed to the compiled round as data (so a sweep can give
      each run its own, see :func:`fedjax_sim.simulate_sweep`): those the hooks read from
      ``context.hparams`` (e.g. ``{"mu": 0.1}``) and those of the default optimizers
      (``client_lr``, ``server_lr``, ``momentum``, ``beta1``, ``tau``, ...; see
      :func:`hparam_optimizer`).
    constant_hparams: the keys of ``hparams`` that are compile-time constants unless a sweep
      varies them (the default optimizers' ``client_lr``, ``server_lr``, ``beta1``, ...): their
      consumers (:func:`hparam_optimizer`, hooks reading ``context.hparams.get(key, value)``) fall
      back to the factory's value when the key is absent, so a single run compiles exactly the
      program it would with the value written in. Other keys (``mu``) are always data.
    derived: ``fn(hparams) -> dict``, run on the host in double precision when a sweep makes
      hyperparameters data: quantities such as ``1 − β1`` that a factory computes in Python, so
      that their float32 roundings are the constants it writes into the program. ``None``: none.
  """
  name: str
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  local_epochs: int = 1
  batch_size: int | None = 32
  local_steps: int | None = None
  shuffle: bool = True
  weighting: str = "num_examples"
  hooks: Hooks = Hooks()
  hparams: dict = {}
  constant_hparams: frozenset = frozenset()
  derived: Callable | None = None


def check_optimizer(name: str, opt):
  if opt is not None and not isinstance(opt, optax.GradientTransformation):
    raise ValueError(f"{name} must be an optax.GradientTransformation, got {type(opt).__name__}")
  return opt


def check_weighting(weighting: str) -> str:
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
  return weighting


def learning_rate(name: str, value):
  """A positive float, or an optax schedule (any callable of the step count)."""
  if callable(value):
    return value
  from fedjax_sim._checks import positive_float
  return positive_float(name, value)


class HparamTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation whose float hyperparameters are data (see :func:`hparam_optimizer`).

  ``update(updates, state, params, hparams=run_hparams)`` uses the run's values; without
  ``hparams`` it is the transformation the factory's values built.
  """
  __slots__ = ()


def hparam_optimizer(factory: Callable[..., optax.GradientTransformation], keys: dict,
                     **args) -> HparamTransformation:
  """``factory(**args)`` with the float arguments named in ``keys`` read from the run's hparams.

  ``keys`` maps an argument of ``factory`` to the hyperparameter that feeds it, e.g.
  ``hparam_optimizer(optax.sgd, {"learning_rate": "client_lr"}, learning_rate=0.1)``. At every
  update the transformation is rebuilt from ``factory(**args)`` with each such argument replaced by
  ``hparams[key]`` (a traced float32 scalar; a key missing from ``hparams`` keeps its value in
  ``args``, a constant of the program, see :attr:`Algorithm.constant_hparams`), then applied to
  the state. Unlike ``optax.inject_hyperparams`` the values are not
  stored in the state, so the state's tree (and every checkpoint and golden run recorded from it)
  stays that of ``factory(**args)``; the factory must build a state whose tree does not depend on
  the values. Arguments that are ``None`` or callables (schedules) stay fixed.
  """
  data = {arg: key for arg, key in keys.items()
          if args.get(arg) is not None and not callable(args[arg])}
  base = factory(**args)

  def update(updates, state, params=None, *, hparams=None, **extra_args):
    del extra_args
    if not hparams:
      return base.update(updates, state, params)
    values = {arg: hparams.get(key, args[arg]) for arg, key in data.items()}
    return factory(**{**args, **values}).update(updates, state, params)

  return HparamTransformation(base.init, update)


def optimizer_update(optimizer: optax.GradientTransformation, updates, state, params, hparams):
  """``optimizer.update``, with the run's ``hparams`` for an :class:`HparamTransformation` (the
  engine's one call for the client and the server optimizer)."""
  if isinstance(optimizer, HparamTransformation):
    return optimizer.update(updates, state, params, hparams=hparams)
  return optimizer.update(updates, state, params)


def run_hparams(algo: Algorithm, overrides: dict | None = None, swept=()) -> dict:
  """The hyperparameters one run passes to the compiled round as data, as Python floats.

  ``algo.hparams`` updated by ``overrides``, less the :attr:`Algorithm.constant_hparams` that are
  not in ``swept`` (the keys some run of the sweep sets), plus, when anything is swept, the
  quantities :attr:`Algorithm.derived` computes from the run's values.
  """
  values = {k: float(v) for k, v in {**algo.hparams, **(overrides or {})}.items()}
  data = {k: v for k, v in values.items() if k not in algo.constant_hparams or k in swept}
  if swept and algo.derived is not None:
    data.update({k: float(v) for k, v in algo.derived(dict(values)).items()})
  return data


def step_lr_sum(client_lr, num_steps, round_num=None, per: str = "step"):
  """``Σ_{t<τ} η_t``, the sum of the learning rates of a client's ``τ = num_steps`` local steps.

  ``client_lr`` is a float (``τ·η``), a schedule of the local step count (``per="step"``: the
  count restarts at 0 every round, as a fresh optax optimizer's does), or a schedule of the 0-based
  round (``per="round"``: ``τ·η(round − 1)``). Traced under ``jit`` and ``vmap``: the per-step sum
  is a loop over the client's own ``τ``.
  """
  steps = jnp.asarray(num_steps, jnp.int32)
  if not callable(client_lr):
    return steps.astype(jnp.float32) * client_lr
  if per == "round":
    return steps.astype(jnp.float32) * jnp.asarray(client_lr(round_num - 1), jnp.float32)
  return jax.lax.fori_loop(0, steps, lambda t, acc: acc + jnp.asarray(client_lr(t), jnp.float32),
                           jnp.float32(0))
