"""The algorithm suite against its reference identities (I5–I7), hand-computed steps and fixed points."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import algorithms as alg
from fedjax_sim import metrics, reference, systems
from fedjax_sim.algorithms.fednova import aggregation_norm
from fedjax_sim.simulation import STREAM_TRAIN
from helpers import cohort, replay_orders, to_numpy


def _leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def _equal(a, b):
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


def _close(a, b, tol=1e-5):
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def classification():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 3))
  sizes = [7, 12, 5, 20, 9, 14]
  xs = [rng.normal(loc=i * 0.3, size=(n, 5)).astype(np.float32) for i, n in enumerate(sizes)]
  ys = [np.argmax(x @ w + rng.normal(size=(len(x), 3)), 1).astype(np.int32) for x in xs]
  return fs.FederatedData.from_arrays(xs, ys), fs.models.softmax_regression(5, 3)


FEDAVG_E2 = dict(client_lr=0.1, local_epochs=2, batch_size=4)  # the shared runs' local training
E2_ARGS = dict(rounds=3, clients_per_round=4, seed=1)


@pytest.fixture(scope="module")
def fedavg_e2(classification):
  """FedAvg, E = 2 epochs of B = 4, 3 rounds of 4 of the 6 clients: the baseline that FedProx
  (μ = 0), MOON (μ = 0) and FedNova are compared with (one compilation for all of them; the runs
  compared with it use the same configuration, so each of their programs is also compiled once
  and shared with the NumPy-reference tests of the same algorithm)."""
  fd, model = classification
  return fs.simulate(alg.fedavg(**FEDAVG_E2), model, fd, **E2_ARGS)


def _quadratic_clients(num_clients=3, dim=2, n=8, seed=0):
  """Linear-regression clients whose losses are heterogeneous quadratics ½(x−x_i*)ᵀA_i(x−x_i*) + c."""
  rng = np.random.default_rng(seed)
  xs, ys, a_mats, optima = [], [], [], []
  for i in range(num_clients):
    x = rng.normal(scale=0.5 + i, size=(n, dim)).astype(np.float32)
    y = (x @ rng.normal(size=dim) + rng.normal(scale=0.3, size=n)).astype(np.float32)
    xs.append(x), ys.append(y)
    a_mats.append(x.T.astype(np.float64) @ x / n)
    optima.append(np.linalg.solve(a_mats[-1], x.T.astype(np.float64) @ y / n))
  return fs.FederatedData.from_arrays(xs, ys), a_mats, optima


# I5 ---------------------------------------------------------------------------------------------

def test_fedprox_mu_zero_is_fedavg_bit_for_bit(classification, fedavg_e2):
  fd, model = classification
  args, kw, a = E2_ARGS, FEDAVG_E2, fedavg_e2
  b = fs.simulate(alg.fedprox(mu=0.0, **kw), model, fd, **args)
  _equal(a.params, b.params)
  assert a.history["train_loss"] == b.history["train_loss"]
  c = fs.simulate(alg.fedprox(mu=0.5, **kw), model, fd, **args)
  assert not np.allclose(_leaves(a.params)[0], _leaves(c.params)[0])  # μ > 0 changes training


def test_fedprox_one_local_step_is_fedavg_for_any_mu(classification):
  fd, model = classification
  kw = dict(client_lr=0.1, local_steps=1, batch_size=4)
  a = fs.simulate(alg.fedavg(**kw), model, fd, rounds=3, seed=2)
  b = fs.simulate(alg.fedprox(mu=3.0, **kw), model, fd, rounds=3, seed=2)
  _close(a.params, b.params, 1e-6)


def test_fedprox_local_optimum_on_a_quadratic():
  """Many full-batch local steps reach argmin F_k(w) + μ/2‖w − w0‖² = (H + μI)⁻¹(Xᵀy/n + μ w0)."""
  fd, a_mats, _ = _quadratic_clients(num_clients=1, dim=3, n=10)
  x, y = fd.client(0)
  mu, w0 = 0.7, np.array([0.3, -0.2, 0.5])
  model = fs.models.linear_regression(3, use_bias=False)
  algo = alg.fedprox(mu=mu, client_lr=0.1, local_steps=400, batch_size=None)
  res = fs.simulate(algo, model, fd, rounds=1,
                    init_params={"kernel": jnp.asarray(w0[:, None], jnp.float32)})
  expected = np.linalg.solve(a_mats[0] + mu * np.eye(3), x.T.astype(np.float64) @ y / len(y) + mu * w0)
  np.testing.assert_allclose(res.params["kernel"][:, 0], expected, rtol=1e-4, atol=1e-5)


# I6 ---------------------------------------------------------------------------------------------

def test_scaffold_first_round_is_uniform_fedavg(classification):
  fd, model = classification
  kw = dict(client_lr=0.1, local_epochs=2, batch_size=4)
  a = fs.simulate(alg.fedavg(weighting="uniform", **kw), model, fd, rounds=1, clients_per_round=4)
  b = fs.simulate(alg.scaffold(**kw), model, fd, rounds=1, clients_per_round=4)
  _close(a.params, b.params, 1e-6)


@pytest.mark.parametrize("option", ["I", "II"])
def test_scaffold_server_control_is_mean_of_client_controls(classification, option):
  fd, model = classification
  for rounds, server_lr in ((1, 1.0), (3, 0.7)):  # the server step moves x, not c
    # 4 clients per round: the programs of the runs below (first round, option I's control,
    # the NumPy replays) with another seed, which is data
    algo = alg.scaffold(client_lr=0.1, server_lr=server_lr, local_epochs=2, batch_size=4,
                        option=option)
    res = fs.simulate(algo, model, fd, rounds=rounds, clients_per_round=4, seed=5)
    c, c_i = res.state.extra, res.state.client_states
    assert jax.tree.leaves(c_i)[0].shape[0] == fd.num_clients
    _close(c, jax.tree.map(lambda a: a.mean(0), c_i), 1e-6)
    touched = np.any(np.abs(_leaves(c_i)[0].reshape(fd.num_clients, -1)) > 0, axis=1)
    assert 4 <= touched.sum() <= min(fd.num_clients, 4 * rounds)  # only sampled clients change
    if rounds == 1:
      assert touched.sum() == 4


def test_heterogeneous_quadratics_fedavg_is_biased_scaffold_is_not():
  fd, a_mats, optima = _quadratic_clients()
  eta, k, dim = 0.1, 5, 2
  m_mats = [np.linalg.matrix_power(np.eye(dim) - eta * a, k) for a in a_mats]
  fedavg_point = np.linalg.solve(sum(np.eye(dim) - m for m in m_mats),
                                 sum((np.eye(dim) - m) @ x for m, x in zip(m_mats, optima)))
  optimum = np.linalg.solve(sum(a_mats), sum(a @ x for a, x in zip(a_mats, optima)))
  assert np.linalg.norm(fedavg_point - optimum) > 0.05  # the bias this test is about
  model = fs.models.linear_regression(dim, use_bias=False)
  args = dict(rounds=300, rounds_per_block=100, eval_every=300)
  common = dict(client_lr=eta, local_steps=k, batch_size=None, shuffle=False)
  favg = fs.simulate(alg.fedavg(weighting="uniform", **common), model, fd, **args)
  scaf = fs.simulate(alg.scaffold(**common), model, fd, **args)
  np.testing.assert_allclose(favg.params["kernel"][:, 0], fedavg_point, atol=1e-4)
  np.testing.assert_allclose(scaf.params["kernel"][:, 0], optimum, atol=1e-4)


def _clients(fd):
  return [fd.client(i) for i in range(fd.num_clients)]


def _init(model):
  return to_numpy(jax.tree.map(lambda a: a + 0.1, model.init(jax.random.key(0))))


@pytest.mark.parametrize("option", ["I", "II"])
def test_scaffold_matches_numpy_with_epochs_and_unequal_sizes(classification, option):
  """Three rounds, 4 of 6 clients, E = 2 reshuffled epochs of unequal lengths (K_i differs),
  server step 0.7: x, c and every client's c_i against Algorithm 1 in float64."""
  fd, model = classification
  init, seed, m = _init(model), 3, 4
  res = fs.simulate(alg.scaffold(client_lr=0.1, server_lr=0.7, local_epochs=2, batch_size=4,
                                 option=option), model, fd, rounds=3, clients_per_round=m,
                    seed=seed, init_params=init)
  clients = _clients(fd)
  x, c, c_i = reference.scaffold("softmax", init, clients, 3, 0.1, 2, 4, server_lr=0.7,
                                 option=option, cohort=lambda r: cohort(seed, r, len(clients), m),
                                 orders=replay_orders(seed, clients, 2))
  _close(res.params, x)
  _close(res.state.extra, c)
  _close(res.state.client_states, jax.tree.map(lambda *a: np.stack(a), *c_i))


def test_scaffold_option_ii_with_a_step_schedule_matches_numpy(classification):
  """A client learning-rate schedule: option II divides x − y by Σ_{t<K} η_t (K times the mean
  rate over the steps taken), against Algorithm 1 with that divisor in float64."""
  import optax
  fd, model = classification
  init, seed, m = _init(model), 3, 4
  schedule = optax.linear_schedule(0.2, 0.02, 6)
  res = fs.simulate(alg.scaffold(client_lr=schedule, local_epochs=2, batch_size=4), model, fd,
                    rounds=2, clients_per_round=m, seed=seed, init_params=init)
  clients = _clients(fd)
  x, c, c_i = reference.scaffold("softmax", init, clients, 2, schedule, 2, 4,
                                 cohort=lambda r: cohort(seed, r, len(clients), m),
                                 orders=replay_orders(seed, clients, 2))
  _close(res.params, x)
  _close(res.state.client_states, jax.tree.map(lambda *a: np.stack(a), *c_i))


def test_scaffold_option_i_control_is_the_full_gradient_at_the_server_model(classification):
  """After one round, a sampled client's c_i is ∇f_i(x₀) — not the gradient at its final point."""
  fd, model = classification
  init = _init(model)
  res = fs.simulate(alg.scaffold(client_lr=0.1, local_epochs=2, batch_size=4, option="I"), model,
                    fd, rounds=1, clients_per_round=4, seed=3, init_params=init)
  sampled = cohort(3, 1, fd.num_clients, 4)
  for i in range(fd.num_clients):
    got = jax.tree.map(lambda a: np.asarray(a[i]), res.state.client_states)
    want = (reference.grad("softmax", init, *fd.client(i)) if i in sampled
            else jax.tree.map(np.zeros_like, init))
    _close(got, want)


# I7 and the FedOpt family ----------------------------------------------------------------------

def test_fedavgm_without_momentum_and_sgd_server_are_fedavg(classification):
  fd, model = classification
  kw = dict(client_lr=0.1, local_epochs=1, batch_size=4)
  args = dict(rounds=3, clients_per_round=4, seed=3)
  base = fs.simulate(alg.fedavg(**kw), model, fd, **args)
  _close(base.params, fs.simulate(alg.fedavgm(server_lr=1.0, momentum=0.0, **kw), model, fd,
                                  **args).params, 1e-6)
  _close(base.params, fs.simulate(alg.fedavg(server_optimizer=optax.sgd(1.0), **kw), model, fd,
                                  **args).params, 1e-6)
  moved = fs.simulate(alg.fedavgm(server_lr=1.0, momentum=0.9, **kw), model, fd, **args)
  assert not np.allclose(_leaves(moved.params)[0], _leaves(base.params)[0])


DELTA = np.array([0.5, -2.0])  # the mean client delta of the first round


def _first_step(algo):
  opt = algo.server_optimizer
  x = jnp.zeros(2)
  updates, _ = opt.update(jnp.asarray(-DELTA), opt.init(x), x)
  return np.asarray(updates)


def test_paper_convention_first_server_steps():
  """Reddi et al. with m₀ = 0, v₀ = τ², η = 0.1, β1 = 0.9, β2 = 0.99, τ = 1e-3, worked by hand."""
  kw = dict(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
  m = 0.1 * DELTA                      # (1 − β1) Δ
  v_adagrad = 1e-6 + DELTA ** 2         # τ² + Δ²: 0.250001, 4.000001
  v_adam = 0.99e-6 + 0.01 * DELTA ** 2  # β2 τ² + (1 − β2) Δ²
  v_yogi = 1e-6 + 0.01 * DELTA ** 2     # τ² − (1 − β2) Δ² sign(τ² − Δ²), and τ² < Δ²
  np.testing.assert_allclose(_first_step(alg.fedadagrad(**kw)), 0.1 * m / (np.sqrt(v_adagrad) + 1e-3), rtol=1e-5)
  np.testing.assert_allclose(_first_step(alg.fedadam(**kw)), 0.1 * m / (np.sqrt(v_adam) + 1e-3), rtol=1e-5)
  np.testing.assert_allclose(_first_step(alg.fedyogi(**kw)), 0.1 * m / (np.sqrt(v_yogi) + 1e-3), rtol=1e-5)
  # the same numbers written out for the first coordinate (Δ = 0.5)
  np.testing.assert_allclose(_first_step(alg.fedadagrad(**kw))[0], 0.005 / 0.501001, rtol=1e-5)
  np.testing.assert_allclose(_first_step(alg.fedadam(**kw))[0], 0.005 / (np.sqrt(0.00250099) + 1e-3), rtol=1e-5)
  # a large v₀ makes β2's decay of v visible: v = 0.99 · 1 + 0.01 Δ²
  np.testing.assert_allclose(_first_step(alg.fedadam(initial_accumulator=1.0, **kw)),
                             0.1 * m / (np.sqrt(0.99 + 0.01 * DELTA ** 2) + 1e-3), rtol=1e-5)


def test_optax_convention_first_server_steps():
  kw = dict(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3, convention="optax")
  g = -DELTA
  # optax.adam: bias-corrected m̂ = g, v̂ = g² → step −η g / (|g| + τ)
  np.testing.assert_allclose(_first_step(alg.fedadam(**kw)), -0.1 * g / (np.abs(g) + 1e-3), rtol=1e-5)
  # optax.yogi: m and v start at 1e-6, bias-corrected
  m = 0.9 * 1e-6 + 0.1 * g
  v = 1e-6 - 0.01 * g * g * np.sign(1e-6 - g * g)
  expected = -0.1 * (m / 0.1) / (np.sqrt(v / 0.01) + 1e-3)
  np.testing.assert_allclose(_first_step(alg.fedyogi(**kw)), expected, rtol=1e-5)
  # optax.adagrad: v starts at 0.1, step −η g / √(v + τ)
  np.testing.assert_allclose(_first_step(alg.fedadagrad(**kw)),
                             -0.1 * g / np.sqrt(0.1 + g * g + 1e-3), rtol=1e-5)


def test_fedadam_applies_its_step_to_the_mean_client_delta(classification):
  fd, model = classification
  kw = dict(client_lr=0.1, local_epochs=1, batch_size=4)
  init = model.init(jax.random.key(0))
  base = fs.simulate(alg.fedavg(**kw), model, fd, rounds=1, init_params=init)
  adam = fs.simulate(alg.fedadam(server_lr=0.1, tau=1e-3, **kw), model, fd, rounds=1,
                     init_params=init)
  for w0, w_avg, w_adam in zip(_leaves(init), _leaves(base.params), _leaves(adam.params)):
    delta = w_avg - w0
    step = 0.1 * (0.1 * delta) / (np.sqrt(0.99e-6 + 0.01 * delta ** 2) + 1e-3)
    np.testing.assert_allclose(w_adam, w0 + step, rtol=1e-4, atol=1e-6)


# FedNova ----------------------------------------------------------------------------------------

def test_fednova_equals_fedavg_when_all_clients_take_the_same_steps(classification):
  fd, model = classification
  kw = dict(local_steps=3, batch_size=4)
  args = dict(rounds=3, clients_per_round=4, seed=4)
  _close(fs.simulate(alg.fedavg(client_lr=0.1, **kw), model, fd, **args).params,
         fs.simulate(alg.fednova(client_lr=0.1, **kw), model, fd, **args).params, 1e-5)


def test_fednova_matches_numpy_with_epochs_and_unequal_sizes(classification):
  """τ_k = E·⌈n_k/B⌉ differs between clients: Δ = τ_eff Σ p_k Δ_k/τ_k against a float64 loop."""
  fd, model = classification
  init, seed, m = _init(model), 2, 4
  res = fs.simulate(alg.fednova(client_lr=0.1, local_epochs=2, batch_size=4), model, fd,
                    rounds=3, clients_per_round=m, seed=seed, init_params=init)
  clients = _clients(fd)
  expected = reference.fednova("softmax", init, clients, 3, 0.1, 2, 4,
                               cohort=lambda r: cohort(seed, r, len(clients), m),
                               orders=replay_orders(seed, clients, 2))
  _close(res.params, expected)


def test_fednova_with_a_step_schedule_matches_numpy(classification):
  """τ_k becomes Σ_{t<τ_k} η_t under a schedule of the local step (unequal τ_k). The same run
  (one compilation) keeps its per-client metrics: checked in :func:`_check_per_client`."""
  import optax
  fd, model = classification
  init, seed, m = _init(model), 2, 4
  schedule = optax.cosine_decay_schedule(0.2, 8, 0.1)
  test, seen = fd.subset([1, 3, 5]), []
  res = fs.simulate(alg.fednova(client_lr=schedule, local_epochs=2, batch_size=4), model, fd,
                    rounds=3, eval_every=2, clients_per_round=m, seed=seed, init_params=init,
                    test=test, per_client_metrics=True, client_callback=seen.extend)
  clients = _clients(fd)
  expected = reference.fednova("softmax", init, clients, 3, schedule, 2, 4,
                               cohort=lambda r: cohort(seed, r, len(clients), m),
                               orders=replay_orders(seed, clients, 2))
  _close(res.params, expected)
  _check_per_client(res, fd, seen)


def _check_per_client(res, fd, seen):
  """``per_client_metrics=True``: every client's metrics at the evaluated rounds (2 and 3 of 3,
  train and a 3-client test set), consistent with the history's spread and means and with what
  ``client_callback`` received."""
  c = res.clients
  assert c["round"].tolist() == res.history["round"] == [2, 3] == [r["round"] for r in seen]
  assert c["train_accuracy"].shape == (2, fd.num_clients) and c["test_loss"].shape == (2, 3)
  np.testing.assert_allclose(c["train_accuracy"].mean(1), res.history["train_client_accuracy_mean"],
                             rtol=1e-6)
  np.testing.assert_allclose(np.percentile(c["test_accuracy"], 10, axis=1),
                             res.history["test_client_accuracy_p10"], rtol=1e-6)
  np.testing.assert_allclose(c["train_loss"] @ fd.num_examples / fd.total_examples,
                             res.history["train_loss"], rtol=1e-5)
  np.testing.assert_array_equal(seen[-1]["test_loss"], c["test_loss"][-1])
  with pytest.raises(ValueError, match="per_client_metrics must be True or False, got 1"):
    fs.simulate(alg.fedavg(), fs.models.softmax_regression(5, 3), fd, rounds=1,
                per_client_metrics=1)


def test_fednova_aggregation_norms_of_a_schedule_are_rate_sums():
  """A constant schedule gives η times the closed forms (the factor cancels in the rule); a
  varying one sums each gradient's coefficient."""
  const = lambda t: 0.1
  for kw in ({}, {"momentum": 0.5}, {"mu": 2.0}):
    np.testing.assert_allclose(aggregation_norm(3, const, **kw), 0.1 * aggregation_norm(3, 0.1, **kw),
                               rtol=1e-6)
  rates = [0.3, 0.2, 0.1]
  lr = lambda t: jnp.asarray(rates)[t]
  np.testing.assert_allclose(aggregation_norm(3, lr), 0.6, rtol=1e-6)
  # momentum 0.5: g_0 is applied with 0.3 + 0.2·0.5 + 0.1·0.25, g_1 with 0.2 + 0.1·0.5, g_2 0.1
  np.testing.assert_allclose(aggregation_norm(3, lr, momentum=0.5), 0.425 + 0.25 + 0.1, rtol=1e-6)
  # proximal μ = 1: g_0 shrunk by (1 − 0.2)(1 − 0.1), g_1 by (1 − 0.1)
  np.testing.assert_allclose(aggregation_norm(3, lr, mu=1.0), 0.3 * 0.72 + 0.2 * 0.9 + 0.1,
                             rtol=1e-6)


def test_fednova_aggregation_norms():
  np.testing.assert_allclose(aggregation_norm(4, 0.1), 4.0)
  rho, tau = 0.5, 3  # momentum: [τ − ρ(1 − ρ^τ)/(1 − ρ)]/(1 − ρ) = (3 − 0.875)/0.5
  np.testing.assert_allclose(aggregation_norm(tau, 0.1, momentum=rho), 4.25)
  # proximal: Σ_{t<τ} (1 − ημ)^t
  np.testing.assert_allclose(aggregation_norm(3, 0.1, mu=2.0),
                             1 + 0.8 + 0.64, rtol=1e-6)


def test_fednova_differs_from_fedavg_with_unequal_steps(classification, fedavg_e2):
  fd, model = classification
  a = fedavg_e2  # FedNova's program is the NumPy test's (seed and initial model are data)
  b = fs.simulate(alg.fednova(**FEDAVG_E2), model, fd, **E2_ARGS)
  assert not np.allclose(_leaves(a.params)[0], _leaves(b.params)[0], atol=1e-4)


# Stragglers and dropouts -----------------------------------------------------------------------

def _returning_clients(seed, round_num, cohort_size, system):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), STREAM_TRAIN), round_num)
  _, _, system_key = jax.random.split(key, 3)
  return np.asarray(systems.cohort_conditions(system_key, cohort_size, system).returns)


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_drop_policy_removes_exactly_the_stragglers_weight(weighting):
  """Full participation, one full-batch step: the new model is the (n_k- or uniformly) weighted
  mean of one GD step on each returning client, i.e. the stragglers leave both numerator and
  denominator."""
  fd, _, _ = _quadratic_clients(num_clients=6, dim=2, n=5, seed=3)
  fd = fs.FederatedData.from_arrays([fd.client(i)[0][:3 + i] for i in range(6)],
                                    [fd.client(i)[1][:3 + i] for i in range(6)])
  model = fs.models.linear_regression(2, use_bias=False)
  system = fs.Heterogeneity(straggler_fraction=0.5, straggler_policy="drop")
  algo = alg.fedavg(client_lr=0.1, batch_size=None, weighting=weighting)
  res = fs.simulate(algo, model, fd, rounds=1, seed=7, system=system,
                    init_params={"kernel": jnp.zeros((2, 1))})
  returns = _returning_clients(7, 1, 6, system)
  assert returns.sum() == 3 and res.history["participants"] == [3.0]
  steps = [0.1 * x.T @ y / len(y) for x, y in (fd.client(i) for i in range(6) if returns[i])]
  weights = [len(fd.client(i)[1]) if weighting == "num_examples" else 1.0
             for i in range(6) if returns[i]]
  np.testing.assert_allclose(res.params["kernel"][:, 0], np.average(steps, axis=0, weights=weights),
                             rtol=1e-5)


def test_partial_stragglers_never_exceed_e_epochs():
  u = jnp.linspace(0, 0.999999, 1001)
  spe = jnp.full_like(u, 4, dtype=jnp.int32)
  steps = np.asarray(systems.partial_steps(u, spe * 5, spe, local_epochs=5))
  assert steps.min() == 4 and steps.max() == 20 and np.all(steps % 4 == 0)
  assert set(np.unique(steps // 4)) == {1, 2, 3, 4, 5}
  h_steps = np.asarray(systems.partial_steps(u, jnp.full_like(spe, 7), spe, local_epochs=None))
  assert h_steps.min() == 1 and h_steps.max() == 7


def test_partial_stragglers_with_one_epoch_change_nothing(classification):
  fd, model = classification
  algo = alg.fedprox(mu=0.1, client_lr=0.1, local_epochs=1, batch_size=4)
  # the no-straggler runs use a rate of 0 of the same system, so each pair shares one program
  run = lambda algo, rate: fs.simulate(algo, model, fd, rounds=2, clients_per_round=4, seed=1,
                                       system=fs.Heterogeneity(rate, "partial"))
  a, b = run(algo, 0.0), run(algo, 0.9)
  _close(a.params, b.params, 1e-6)
  algo5 = algo._replace(local_epochs=5)
  c, d = run(algo5, 0.0), run(algo5, 0.9)
  assert c.history["participants"] == [4.0, 4.0]
  assert not np.allclose(_leaves(c.params)[0], _leaves(d.params)[0])
  assert d.history["participants"] == [4.0, 4.0]


def test_everyone_dropping_out_leaves_the_server_unchanged(classification):
  fd, model = classification
  init = model.init(jax.random.key(0))
  res = fs.simulate(alg.fedavgm(momentum=0.9, client_lr=0.1), model, fd, rounds=2,
                    init_params=init, system=fs.Heterogeneity(dropout_rate=1.0))
  _equal(res.params, init)
  assert res.history["participants"] == [0.0, 0.0]


def test_a_round_nobody_returns_from_keeps_the_moving_server_still(classification):
  """Round 1 trains (FedAvgM's momentum is now non-zero), round 2's only client drops out: the
  server must not coast on its momentum through the empty round."""
  fd, model = classification
  system = fs.Heterogeneity(dropout_rate=0.5)
  seed = next(s for s in range(100) if _returning_clients(s, 1, 1, system)[0]
              and not _returning_clients(s, 2, 1, system)[0])
  args = dict(clients_per_round=1, seed=seed, system=system)
  algo = alg.fedavgm(momentum=0.9, client_lr=0.1, server_lr=1.0)
  one = fs.simulate(algo, model, fd, rounds=1, **args)
  two = fs.simulate(algo, model, fd, rounds=2, rounds_per_block=1, **args)
  assert two.history["participants"] == [1.0, 0.0]
  assert max(np.abs(a).max() for a in _leaves(one.state.opt_state)) > 0
  _equal(two.params, one.params)


def test_bad_heterogeneity_is_named():
  with pytest.raises(ValueError, match="straggler_policy"):
    systems.check(fs.Heterogeneity(0.5, "wait"))
  with pytest.raises(ValueError, match="dropout_rate"):
    systems.check(fs.Heterogeneity(dropout_rate=1.5))


# Schedules --------------------------------------------------------------------------------------

def test_growing_local_steps_schedule(classification):
  fd, model = classification
  algo = alg.local_sgd_growing(client_lr=0.05, initial_steps=1, factor=2, every=2,
                               max_local_steps=4, batch_size=4)
  res = fs.simulate(algo, model, fd, rounds=7, rounds_per_block=7)
  assert res.history["local_steps"] == [1, 1, 2, 2, 4, 4, 4]


def test_adaptive_local_steps_grow_while_clients_agree():
  """Identical clients never disagree (ρ = 0), so H doubles every round up to the cap."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 3)).astype(np.float32)
  y = (x @ np.array([1.0, -1.0, 0.5])).astype(np.float32)
  fd = fs.FederatedData.from_arrays([x] * 4, [y] * 4)
  model = fs.models.linear_regression(3)
  algo = alg.local_sgd_adaptive(client_lr=0.05, initial_steps=1, max_local_steps=8,
                                batch_size=4, shuffle=False)
  res = fs.simulate(algo, model, fd, rounds=6)
  assert res.history["local_steps"] == [1, 2, 4, 8, 8, 8]
  assert max(res.history["drift"]) < 1e-10


def test_adaptive_local_steps_shrink_when_clients_diverge(classification):
  fd, model = classification
  algo = alg.local_sgd_adaptive(client_lr=0.3, initial_steps=8, max_local_steps=8, target=0.01,
                                batch_size=2)
  res = fs.simulate(algo, model, fd, rounds=4)
  assert res.history["local_steps"][0] == 8 and min(res.history["local_steps"]) < 8


def test_client_learning_rate_schedules(classification):
  fd, model = classification
  args = dict(rounds=3, seed=2)
  one_round = fs.simulate(alg.fedavg(client_lr=0.1, batch_size=4), model, fd, rounds=1, seed=2)
  per_round = alg.fedavg(client_lr=lambda r: jnp.where(r == 0, 0.1, 0.0), client_lr_per="round",
                         batch_size=4)
  _close(fs.simulate(per_round, model, fd, **args).params, one_round.params, 1e-6)
  one_step = fs.simulate(alg.fedavg(client_lr=0.1, local_steps=1, batch_size=4), model, fd,
                         rounds=1, seed=2)
  per_step = alg.fedavg(client_lr=optax.piecewise_constant_schedule(0.1, {1: 0.0}),
                        local_steps=3, batch_size=4)
  _close(fs.simulate(per_step, model, fd, rounds=1, seed=2).params, one_step.params, 1e-6)


def test_server_learning_rate_schedule(classification):
  fd, model = classification
  init = model.init(jax.random.key(0))
  frozen = alg.fedavgm(server_lr=optax.constant_schedule(0.0), momentum=0.5, client_lr=0.1)
  _equal(fs.simulate(frozen, model, fd, rounds=2, init_params=init).params, init)


# Drift and fairness metrics ----------------------------------------------------------------------

def test_drift_is_zero_for_identical_clients_and_positive_otherwise(classification):
  fd, model = classification
  x, y = fd.client(3)
  same = fs.FederatedData.from_arrays([x] * 3, [y] * 3)
  algo = alg.fedavg(client_lr=0.1, local_epochs=2, batch_size=4, shuffle=False)
  flat = fs.simulate(algo, model, same, rounds=2)
  assert max(flat.history["drift"]) < 1e-12
  np.testing.assert_allclose(flat.history["update_norm_mean"], flat.history["update_norm_max"], rtol=1e-6)
  varied = fs.simulate(algo, model, fd, rounds=1)  # the program of the formula test below
  assert min(varied.history["drift"]) > 0
  assert all(a <= b for a, b in zip(varied.history["update_norm_mean"], varied.history["update_norm_max"]))


def test_drift_and_update_norms_match_their_formulas(classification):
  """One round, full participation, in-order batches: drift Σ p_k‖θ_k − θ̄‖² with p_k = n_k/Σn,
  and the mean and max of ‖θ_k − θ‖, from client models trained by the NumPy loop."""
  fd, model = classification
  init = _init(model)
  res = fs.simulate(alg.fedavg(client_lr=0.1, local_epochs=2, batch_size=4, shuffle=False), model,
                    fd, rounds=1, init_params=init)
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
  thetas = np.stack([flat(reference.local_sgd("softmax", init, x, y, 0.1, 2, 4))
                     for x, y in _clients(fd)])
  p = fd.num_examples / fd.num_examples.sum()
  mean = p @ thetas
  norms = np.linalg.norm(thetas - flat(init), axis=1)
  np.testing.assert_allclose(res.history["drift"][0], p @ ((thetas - mean) ** 2).sum(1), rtol=1e-4)
  np.testing.assert_allclose(res.history["update_norm_mean"][0], norms.mean(), rtol=1e-5)
  np.testing.assert_allclose(res.history["update_norm_max"][0], norms.max(), rtol=1e-5)
  assert res.history["participants"][0] == fd.num_clients


def test_per_client_accuracy_percentiles():
  model = fs.models.softmax_regression(2, 2)
  params = {"kernel": jnp.array([[1.0, 0.0], [0.0, 0.0]]), "bias": jnp.zeros(2)}  # predicts x0 > 0
  # four clients with accuracies 1, 0.5, 0, 1
  xs = [np.array([[1.0, 0], [-1, 0]]), np.array([[1.0, 0], [1, 0]]), np.array([[1.0, 0]]),
        np.array([[-1.0, 0]])]
  ys = [np.array([0, 1]), np.array([0, 1]), np.array([1]), np.array([1])]
  fd = fs.FederatedData.from_arrays(xs, ys)
  ev = metrics.dataset_evaluator(model, fd.total_examples, "test", num_clients=4)
  out = ev(params, metrics.eval_arrays(fd))
  padded = metrics.dataset_evaluator(model, 9, "test", num_clients=4)(
      params, metrics.eval_arrays(fd, rows=9))
  for k in out:
    np.testing.assert_allclose(out[k], padded[k], rtol=1e-6)
  acc = np.array([1.0, 0.5, 0.0, 1.0])
  np.testing.assert_allclose(out["test_accuracy"], 4 / 6)
  np.testing.assert_allclose(out["test_client_accuracy_mean"], acc.mean())
  np.testing.assert_allclose(out["test_client_accuracy_p10"], np.percentile(acc, 10))
  np.testing.assert_allclose(out["test_client_accuracy_p90"], np.percentile(acc, 90))


def test_per_client_metric_arrays_are_each_clients_own():
  """client_arrays: every client's accuracy (the values behind the spread) and mean loss, also
  with padding rows and for a regression model (loss only)."""
  model = fs.models.softmax_regression(2, 2)
  params = {"kernel": jnp.array([[1.0, 0.0], [0.0, 0.0]]), "bias": jnp.zeros(2)}
  xs = [np.array([[1.0, 0], [-1, 0]]), np.array([[1.0, 0], [1, 0]]), np.array([[1.0, 0]])]
  ys = [np.array([0, 1]), np.array([0, 1]), np.array([1])]
  fd = fs.FederatedData.from_arrays(xs, ys)
  out = metrics.dataset_evaluator(model, 7, "train", num_clients=3, client_arrays=True)(
      params, metrics.eval_arrays(fd, rows=7))
  np.testing.assert_allclose(out["train_per_client_accuracy"], [1.0, 0.5, 0.0])
  want = [float(model.loss(params, jnp.asarray(x), jnp.asarray(y))) for x, y in zip(xs, ys)]
  np.testing.assert_allclose(out["train_per_client_loss"], want, rtol=1e-6)
  assert metrics.split_client_arrays(out).keys() == {"train_per_client_accuracy",
                                                     "train_per_client_loss"}
  assert "train_per_client_loss" not in out and "train_client_accuracy_p10" in out
  reg = fs.models.linear_regression(2, use_bias=False)
  zero = jax.tree.map(jnp.zeros_like, reg.init(jax.random.key(0)))
  fd_reg = fs.FederatedData.from_arrays(xs, [np.array([1.5, 0.5]), np.array([2.5, 1.0]),
                                             np.array([0.5])])
  out = metrics.dataset_evaluator(reg, 5, "test", num_clients=3, client_arrays=True)(
      zero, metrics.eval_arrays(fd_reg))
  np.testing.assert_allclose(out["test_per_client_loss"], [0.625, 1.8125, 0.125], rtol=1e-6)
  assert "test_per_client_accuracy" not in out


def test_gradient_dissimilarity_matches_numpy():
  fd, a_mats, optima = _quadratic_clients(num_clients=4, dim=3, n=6, seed=2)
  fd = fs.FederatedData.from_arrays([fd.client(i)[0][:2 + i] for i in range(4)],
                                    [fd.client(i)[1][:2 + i] for i in range(4)])
  model = fs.models.linear_regression(3, use_bias=False)
  w = np.array([0.2, -0.4, 0.1])
  grads = [fd.client(i)[0].T @ (fd.client(i)[0] @ w - fd.client(i)[1]) / fd.num_examples[i]
           for i in range(4)]
  p = fd.num_examples / fd.total_examples
  mean = sum(pk * g for pk, g in zip(p, grads))
  expected = sum(pk * np.sum((g - mean) ** 2) for pk, g in zip(p, grads))
  from fedjax_sim import engine as engine_lib
  buckets, bucket_of, _ = engine_lib.make_buckets(fd.num_examples, alg.fedavg(), 4, None)
  buckets[0] = buckets[0]._replace(shape=buckets[0].shape._replace(max_examples=3))
  bucket_of = np.array([0, 0, 1, 1], np.int32)  # two buckets of two, whatever size_buckets chose
  buckets = [buckets[0]._replace(members=2), buckets[0]._replace(
      members=2, shape=buckets[0].shape._replace(max_examples=5))]
  d = engine_lib.device_data(fd, bucket_of)
  measure = metrics.gradient_dissimilarity(model, max_rows_per_chunk=8)
  out = jax.jit(lambda prm: measure(prm, d, buckets))({"kernel": jnp.asarray(w[:, None], jnp.float32)})
  np.testing.assert_allclose(out["grad_dissimilarity"], expected, rtol=1e-5)
  np.testing.assert_allclose(out["grad_norm_sq"], np.sum(mean ** 2), rtol=1e-5)


# MOON and the local-objective hook ----------------------------------------------------------------

def test_moon_with_mu_zero_is_fedavg(classification, fedavg_e2):
  fd, model = classification
  args, kw, plain = E2_ARGS, FEDAVG_E2, fedavg_e2.params
  _close(plain, fs.simulate(alg.moon(mu=0.0, **kw), model, fd, **args).params, 1e-6)
  contrastive = fs.simulate(alg.moon(mu=1.0, **kw), model, fd, **args).params  # μ is data
  assert max(np.abs(a - b).max() for a, b in zip(_leaves(plain), _leaves(contrastive))) > 1e-4


def test_moon_local_objective_matches_numpy():
  """ℓ_sup + μ ℓ_con on one masked batch, with a representation function, against NumPy."""
  rng = np.random.default_rng(0)
  w = {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros(3)}
  represent = lambda p, x: jnp.tanh(x @ p["kernel"])
  model = fs.models.from_functions(lambda k: w, lambda p, x: x @ p["kernel"] + p["bias"],
                                   "multiclass", represent=represent)
  params, glob, prev = [jax.tree.map(lambda a: a + 0.3 * i, w) for i in range(3)]
  x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  y, mask = jnp.array([0, 2, 1, 1, 0]), jnp.array([True, True, True, False, True])
  context = alg.ClientContext(glob, jnp.int32(1), {"mu": jnp.float32(0.7)}, prev)
  got = alg.moon(mu=0.7, temperature=0.5).hooks.local_loss(model, params, (x, y, mask), context)
  xn = np.asarray(x, np.float64)
  z, zg, zp = [np.tanh(xn @ np.asarray(p["kernel"], np.float64)) for p in (params, glob, prev)]
  cos = lambda a, b: (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  sg, sp = np.exp(cos(z, zg) / 0.5), np.exp(cos(z, zp) / 0.5)
  con = -np.log(sg / (sg + sp))
  logits = xn @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"])
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  sup = -logp[np.arange(5), np.asarray(y)]
  m = np.asarray(mask, np.float64)
  np.testing.assert_allclose(float(got), (sup * m).sum() / 4 + 0.7 * (con * m).sum() / 4, rtol=1e-5)


def test_custom_model_loss_is_trained(classification):
  """A user-supplied per-example loss (here 2 × cross-entropy) replaces the task's: one full-batch
  step of size η on it equals a step of 2η on the task's loss."""
  fd, model = classification
  doubled = fs.models.from_functions(model.init, model.apply, "multiclass", loss=lambda out, y:
                                     2 * fs.models.loss_from_outputs("multiclass", out, y))
  a = fs.simulate(alg.fedavg(client_lr=0.05, batch_size=None), doubled, fd, rounds=1)
  b = fs.simulate(alg.fedavg(client_lr=0.1, batch_size=None), model, fd, rounds=1)
  _close(a.params, b.params, 1e-6)
  with pytest.raises(ValueError, match="loss must be a function"):
    fs.models.from_functions(model.init, model.apply, "multiclass", loss=3)


# Contract: every registered algorithm -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(alg.REGISTRY))
def test_every_registered_algorithm_trains_compiles_once_and_keeps_state_shapes(name, classification):
  fd, model = classification
  kwargs = {"fedsgd": dict(server_lr=0.5), "fedadam": dict(server_lr=0.05),
            "fedyogi": dict(server_lr=0.05), "fedadagrad": dict(server_lr=0.05)}.get(name, {})
  if name not in ("fedsgd",):
    kwargs.setdefault("client_lr", 0.05)
  algo = alg.REGISTRY[name](**kwargs)
  res = fs.simulate(algo, model, fd, rounds=8, rounds_per_block=4, eval_every=1,
                    system=fs.Heterogeneity(0.3, "partial") if name == "fedprox" else None)
  loss = res.history["train_loss"]
  assert np.all(np.isfinite(loss)) and loss[-1] < 0.9 * loss[0], (name, loss)
  # Two blocks, one compilation: the second block took the first one's output state, so the
  # state kept its tree, shapes and dtypes (a changed aval would have compiled again).
  assert res.info["compilations"] == 1, name
  assert isinstance(res.state, fs.ServerState)


# Sweeps -----------------------------------------------------------------------------------------

def test_sweep_runs_reproduce_single_simulations(classification):
  fd, model = classification
  other = fs.FederatedData.from_arrays([fd.client(i)[0][:4] for i in range(fd.num_clients)],
                                       [fd.client(i)[1][:4] for i in range(fd.num_clients)])
  algo = alg.fedprox(mu=0.0, client_lr=0.1, local_epochs=2, batch_size=4)
  runs = [(fd, 0, 0.0), (other, 1, 0.5), (fd, 2, 1.0)]
  args = dict(rounds=4, clients_per_round=3, eval_every=2, system=fs.Heterogeneity(0.4, "partial"))
  swept = fs.simulate_sweep(algo, model, [r[0] for r in runs], seeds=[r[1] for r in runs],
                            hparams=[{"mu": r[2]} for r in runs], **args)
  assert swept[0].info["compilations"] == 1
  for (data, seed, mu), res in zip(runs, swept):
    alone = fs.simulate(algo._replace(hparams={"mu": mu}), model, data, seed=seed, **args)
    _close(alone.params, res.params, 1e-5)
    np.testing.assert_allclose(alone.history["train_loss"], res.history["train_loss"], rtol=1e-5)
    assert alone.history["round"] == res.history["round"]


def test_sweep_rejects_mismatched_runs(classification):
  fd, model = classification
  with pytest.raises(ValueError, match="hparams"):
    fs.simulate_sweep(alg.fedavg(), model, fd, seeds=[0, 1], hparams=[{"mu": 1.0}, {}])
  with pytest.raises(ValueError, match="clients"):
    fs.simulate_sweep(alg.fedavg(), model, [fd, fd.subset([0, 1])], seeds=[0, 1])
