"""Unit tests of sam_optax.unified_perturbation (docs/contract.md §1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

PARAMS = {"a": jnp.array([1.0, -2.0, 0.5]), "b": {"c": jnp.array([[0.3, -0.7], [2.0, 1.0]])}}
GRADS = {"a": jnp.array([0.5, -1.0, 2.0]), "b": {"c": jnp.array([[1.5, 0.0], [-0.25, 3.0]])}}


def _global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def _delta(rho, lambd, grads=GRADS, params=PARAMS, **kw):
  pert = sam_optax.unified_perturbation(rho, lambd, **kw)
  return pert.update(grads, pert.init(params), params)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("lambd", [0.0, 0.25, 0.5, 1.0])
def test_l2_formula_with_global_norm(lambd):
  rho = 0.07
  delta, state = _delta(rho, lambd)
  n = _global_norm(GRADS)
  expected = rho * (1 - lambd + lambd / (n + 1e-12)) * _flat(GRADS)
  np.testing.assert_allclose(_flat(delta), expected, rtol=1e-6)
  assert float(state.grad_norm) == pytest.approx(n, rel=1e-6)
  assert float(state.lambda_t) == pytest.approx(lambd)
  assert float(state.rho_t) == pytest.approx(rho)
  assert int(state.count) == 1


def test_sam_delta_has_norm_rho_and_usam_is_rho_g():
  delta, _ = _delta(0.05, 1.0)
  assert _global_norm(delta) == pytest.approx(0.05, rel=1e-6)
  delta, _ = _delta(0.05, 0.0)
  np.testing.assert_allclose(_flat(delta), 0.05 * _flat(GRADS), rtol=1e-6)


def test_norm_is_global_not_per_leaf():
  # Per-leaf normalisation would make each leaf's δ have norm ρ; global makes the whole δ.
  delta, _ = _delta(1.0, 1.0)
  per_leaf = [_global_norm(x) for x in jax.tree.leaves(delta)]
  assert sum(v**2 for v in per_leaf) == pytest.approx(1.0, rel=1e-6)
  assert all(v < 0.99 for v in per_leaf)


def _run_lambdas(lambd, steps):
  pert = sam_optax.unified_perturbation(1.0, lambd)
  state = pert.init(PARAMS)
  lams = []
  for _ in range(steps):
    _, state = pert.update(GRADS, state, PARAMS)
    lams.append(float(state.lambda_t))
  return lams


def test_time_schedules_count_from_one():
  np.testing.assert_allclose(_run_lambdas("1/t", 4), [1.0, 1 / 2, 1 / 3, 1 / 4], rtol=1e-6)
  np.testing.assert_allclose(_run_lambdas("1-1/t", 4), [0.0, 1 / 2, 2 / 3, 3 / 4], rtol=1e-6)
  # an optax schedule is called with the 0-based count
  sched = optax.linear_schedule(0.0, 1.0, transition_steps=4)
  np.testing.assert_allclose(_run_lambdas(sched, 3), [0.0, 0.25, 0.5], rtol=1e-6)


def test_first_step_of_time_schedules_equals_constant_lambda():
  one_over_t, _ = _delta(0.1, "1/t")
  sam, _ = _delta(0.1, 1.0)
  one_minus, _ = _delta(0.1, "1-1/t")
  usam, _ = _delta(0.1, 0.0)
  np.testing.assert_array_equal(_flat(one_over_t), _flat(sam))
  np.testing.assert_array_equal(_flat(one_minus), _flat(usam))


def test_rho_schedule():
  pert = sam_optax.unified_perturbation(optax.linear_schedule(0.1, 0.3, 2), 0.0)
  state = pert.init(PARAMS)
  rhos = []
  for _ in range(3):
    delta, state = pert.update(GRADS, state, PARAMS)
    rhos.append(float(state.rho_t))
  np.testing.assert_allclose(rhos, [0.1, 0.2, 0.3], rtol=1e-6)
  np.testing.assert_allclose(_flat(delta), 0.3 * _flat(GRADS), rtol=1e-6)


@pytest.mark.parametrize("lambd", [0.0, 0.5, 1.0, "1/t", "1-1/t"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_zero_gradient_gives_zero_delta(lambd, norm):
  zeros = jax.tree.map(jnp.zeros_like, GRADS)
  delta, state = _delta(0.05, lambd, grads=zeros, norm=norm)
  assert np.all(_flat(delta) == 0.0)
  assert float(state.grad_norm) == 0.0


def test_linf_ball():
  delta, _ = _delta(0.05, 1.0, norm="linf")
  np.testing.assert_allclose(_flat(delta), 0.05 * np.sign(_flat(GRADS)), rtol=1e-6)
  delta, _ = _delta(0.05, 0.5, norm="linf")
  g = _flat(GRADS)
  np.testing.assert_allclose(_flat(delta), 0.05 * (0.5 * g + 0.5 * np.sign(g)), rtol=1e-6)


@pytest.mark.parametrize("lambd", [0.0, 0.3, 1.0])
def test_adaptive_asam_formula(lambd):
  rho, eta = 0.5, 0.01
  delta, _ = _delta(rho, lambd, adaptive=True, eta=eta)
  t = np.abs(_flat(PARAMS)) + eta
  g = _flat(GRADS)
  tg_norm = np.linalg.norm(t * g)
  expected = rho * (1 - lambd + lambd / tg_norm) * t**2 * g
  np.testing.assert_allclose(_flat(delta), expected, rtol=1e-5)


def test_usable_after_clipping_in_a_chain():
  tx = optax.chain(optax.clip_by_global_norm(1.0), sam_optax.unified_perturbation(0.1, 0.0))
  delta, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  clipped = _flat(GRADS) / _global_norm(GRADS)
  np.testing.assert_allclose(_flat(delta), 0.1 * clipped, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_preserved_and_norm_accumulated_in_float32(dtype):
  # Components of 300 square to 9e4, beyond float16's range: the norm must not overflow.
  g = {"w": jnp.full((8,), 300.0, dtype), "v": jnp.full((3,), -1e-3, dtype)}
  p = jax.tree.map(jnp.ones_like, g)
  delta, state = _delta(0.05, 1.0, grads=g, params=p)
  assert delta["w"].dtype == dtype and delta["v"].dtype == dtype
  assert state.grad_norm.dtype == jnp.float32
  assert np.isfinite(float(state.grad_norm))
  assert _global_norm(delta) == pytest.approx(0.05, rel=1e-2)


def test_mixed_dtype_pytree():
  g = {"h": jnp.array([1.0, 2.0], jnp.bfloat16), "f": jnp.array([2.0], jnp.float32)}
  delta, _ = _delta(0.3, 1.0, grads=g, params=g)
  assert delta["h"].dtype == jnp.bfloat16 and delta["f"].dtype == jnp.float32
  np.testing.assert_allclose(
    _flat(delta), 0.3 * np.array([2, 1, 2]) / 3.0, rtol=1e-2
  )  # leaves f, h


def test_float64(x64):
  g = {"w": jnp.array([3.0, 4.0], jnp.float64)}
  delta, state = _delta(0.1, 0.5, grads=g, params=g)
  assert delta["w"].dtype == jnp.float64
  np.testing.assert_allclose(
    np.asarray(delta["w"]), 0.1 * (0.5 + 0.5 / (5.0 + 1e-12)) * np.array([3.0, 4.0]), rtol=1e-15
  )


def test_traced_hyperparameters_with_inject_hyperparams():
  tx = optax.inject_hyperparams(sam_optax.unified_perturbation)(rho=0.1, lambd=0.5)
  state = tx.init(PARAMS)
  state.hyperparams["rho"] = jnp.asarray(0.2)
  state.hyperparams["lambd"] = jnp.asarray(1.0)
  delta, _ = jax.jit(tx.update)(GRADS, state, PARAMS)
  assert _global_norm(delta) == pytest.approx(0.2, rel=1e-6)


def test_jit_and_state_is_int32_count():
  pert = sam_optax.unified_perturbation(0.1, "1-1/t")
  state = pert.init(PARAMS)
  update = jax.jit(pert.update)
  for _ in range(3):
    delta, state = update(GRADS, state, PARAMS)
  assert state.count.dtype == jnp.int32 and int(state.count) == 3
  assert float(state.lambda_t) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(rho=-0.1), "`rho` must be >= 0"),
    (dict(rho=float("nan")), "`rho` must be finite"),
    (dict(rho="big"), "`rho` must be a number"),
    (dict(lambd=1.5), "`lambd` must be <= 1"),
    (dict(lambd=-0.1), "`lambd` must be >= 0"),
    (dict(lambd="1/t^2"), r"`lambd` must be a float in \[0, 1\].*'1/t', '1-1/t'"),
    (dict(norm="l1"), r"`norm` must be one of \('l2', 'linf'\)"),
    (dict(eps=0.0), "`eps` must be > 0"),
    (dict(adaptive=True, eta=-1.0), "`eta` must be >= 0"),
  ],
)
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.unified_perturbation(**kwargs)


def test_adaptive_needs_params():
  pert = sam_optax.unified_perturbation(0.1, 1.0, adaptive=True)
  with pytest.raises(ValueError, match="needs `params`"):
    pert.update(GRADS, pert.init(PARAMS))
