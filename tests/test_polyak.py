"""Unit tests of sam_optax.polyak_step_size (docs/contract.md §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

X = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
G = {"w": jnp.array([0.6, -0.8]), "b": jnp.array(0.0)}  # ‖G‖² = 1
D = {"w": jnp.array([0.1, 0.2]), "b": jnp.array(0.3)}  # <G, D> = 0.06 - 0.16 = -0.1


def _step(value, f_star=0.0, gamma_b=10.0, weight_decay=0.0, perturbation=D, grads=G):
  sps = sam_optax.polyak_step_size(f_star, gamma_b, weight_decay=weight_decay)
  return sps.update(grads, sps.init(X), X, value=jnp.asarray(value), perturbation=perturbation)


def test_unclipped_step_size_and_update():
  u, s = _step(0.4, f_star=0.1)
  gamma = (0.4 - 0.1 - (-0.1)) / 1.0
  assert float(s.step_size) == pytest.approx(gamma, rel=1e-6)
  np.testing.assert_allclose(u["w"], -gamma * np.array([0.6, -0.8]), rtol=1e-6)
  assert int(s.count) == 1


def test_clipped_at_gamma_b():
  _, s = _step(5.0, gamma_b=0.7)
  assert float(s.step_size) == pytest.approx(0.7)


def test_negative_ratio_gives_zero():
  u, s = _step(0.1, f_star=2.0)
  assert float(s.step_size) == 0.0
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


def test_nan_ratio_gives_zero_and_no_nan_update():
  u, s = _step(float("nan"))
  assert float(s.step_size) == 0.0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))


def test_zero_gradient_is_finite():
  zeros = jax.tree.map(jnp.zeros_like, G)
  u, s = _step(1.0, grads=zeros, gamma_b=3.0)
  assert float(s.step_size) == 3.0  # ratio 1/eps, capped
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


def test_weight_decay_only_in_update_not_in_ratio():
  wd = 0.1
  u, s = _step(0.4, weight_decay=wd)
  gamma = (0.4 + 0.1) / 1.0
  assert float(s.step_size) == pytest.approx(gamma, rel=1e-6)
  np.testing.assert_allclose(
    u["w"], -gamma * (np.array([0.6, -0.8]) + wd * np.array([1.0, -2.0])), rtol=1e-6
  )
  np.testing.assert_allclose(u["b"], -gamma * wd * 0.5, rtol=1e-6)


def test_without_perturbation_is_classical_polyak_on_a_quadratic():
  # f(x) = ½ xᵀ A x, f* = 0: the classical Polyak step is f(x)/‖∇f(x)‖².
  a = jnp.diag(jnp.array([1.0, 4.0, 9.0]))
  x = jnp.array([1.0, 1.0, -1.0])
  f = 0.5 * x @ a @ x
  g = a @ x
  sps = sam_optax.polyak_step_size(0.0, 100.0)
  u, s = sps.update(g, sps.init(x), x, value=f)
  assert float(s.step_size) == pytest.approx(float(f / (g @ g)), rel=1e-6)


def test_gamma_b_schedule_and_traced_hyperparams():
  sps = sam_optax.polyak_step_size(0.0, optax.linear_schedule(0.1, 0.3, 2))
  s = sps.init(X)
  caps = []
  for _ in range(3):
    _, s = sps.update(G, s, X, value=jnp.asarray(10.0))
    caps.append(float(s.step_size))
  np.testing.assert_allclose(caps, [0.1, 0.2, 0.3], rtol=1e-6)
  tx = optax.inject_hyperparams(sam_optax.polyak_step_size)(f_star=0.0, gamma_b=1.0)
  state = tx.init(X)
  state.hyperparams["gamma_b"] = jnp.asarray(0.05)
  _, state = jax.jit(lambda g, st, x: tx.update(g, st, x, value=jnp.asarray(10.0)))(G, state, X)
  assert float(state.inner_state.step_size) == pytest.approx(0.05)


def test_low_precision_leaves_reduce_in_float32():
  g = {"w": jnp.full((4,), 200.0, jnp.float16)}  # ‖g‖² = 1.6e5 overflows float16
  x = {"w": jnp.ones((4,), jnp.float16)}
  sps = sam_optax.polyak_step_size(0.0, 10.0)
  u, s = sps.update(g, sps.init(x), x, value=jnp.asarray(8.0, jnp.float16))
  assert u["w"].dtype == jnp.float16 and s.step_size.dtype == jnp.float32
  assert float(s.step_size) == pytest.approx(8.0 / 1.6e5, rel=1e-3)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(gamma_b=0.0), "`gamma_b` must be > 0"),
    (dict(gamma_b=-1.0), "`gamma_b` must be > 0"),
    (dict(weight_decay=-1e-4), "`weight_decay` must be >= 0"),
    (dict(f_star=float("inf")), "`f_star` must be finite"),
    (dict(eps=-1.0), "`eps` must be > 0"),
  ],
)
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.polyak_step_size(**kwargs)


def test_missing_value_or_params():
  sps = sam_optax.polyak_step_size()
  with pytest.raises(ValueError, match="value=loss"):
    sps.update(G, sps.init(X), X)
  sps = sam_optax.polyak_step_size(weight_decay=1e-3)
  with pytest.raises(ValueError, match="needs `params`"):
    sps.update(G, sps.init(X), value=jnp.asarray(1.0))
