"""dynamic_loss_scale: float16 loss scaling across both SAM passes (docs/contract.md §4, §8).

Pure JAX, no flax: the wrapper is part of sam_optax's core.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

from helpers import BATCH
from helpers import PARAMS
from helpers import loss_fn


def _f16_problem():
  params = {"w": jnp.ones((4,), jnp.float16)}

  def loss(p, batch):  # gradient w; at e = 2w it doubles
    return 0.5 * jnp.sum(p["w"].astype(jnp.float16) ** 2) * batch

  return params, loss


def test_float16_loss_scaling_matches_unscaled_step():
  params, loss = _f16_problem()
  base = sam_optax.unified_sam(optax.sgd(0.1), rho=0.5, lambd=1.0)
  scaled = sam_optax.dynamic_loss_scale(base, init_scale=2.0**8)
  p1, s1, m1 = sam_optax.sam_step(loss, scaled, donate=False)(
    params, scaled.init(params), jnp.float16(1.0)
  )
  p0, _, m0 = sam_optax.sam_step(loss, base, donate=False)(
    params, base.init(params), jnp.float16(1.0)
  )
  np.testing.assert_allclose(
    np.asarray(p1["w"], np.float32), np.asarray(p0["w"], np.float32), rtol=1e-3
  )
  assert p1["w"].dtype == jnp.float16
  assert float(m1["perturbed_loss"]) == pytest.approx(float(m0["perturbed_loss"]), rel=1e-3)
  assert float(m1["loss_scale"]) == 2.0**8 and not bool(m1["skipped"])


def test_float16_overflow_in_perturbed_pass_skips_the_whole_step():
  params, loss = _f16_problem()
  # clean pass: grad·scale = 2^15 is finite; perturbed point 1 + ρ·½ = 2 per coordinate
  # (ρ = 1, ‖g‖ = 2) gives grad·scale = 2^16 > float16 max: overflow only in pass two.
  opt = sam_optax.dynamic_loss_scale(
    sam_optax.unified_sam(optax.sgd(0.1, momentum=0.9), rho=2.0, lambd=1.0), init_scale=2.0**15
  )
  state = opt.init(params)
  step = sam_optax.sam_step(loss, opt, donate=False)
  p1, s1, m1 = step(params, state, jnp.float16(1.0))
  assert bool(m1["skipped"]) and float(m1["loss_scale"]) == 2.0**14
  np.testing.assert_array_equal(p1["w"], params["w"])
  inner0, inner1 = state.inner, s1.inner
  for a, b in zip(jax.tree.leaves(inner0), jax.tree.leaves(inner1)):
    np.testing.assert_array_equal(a, b)  # optimizer state untouched: count, momentum
  p2, s2, m2 = step(p1, s1, jnp.float16(1.0))  # the halved scale fits: the step is taken
  assert not bool(m2["skipped"]) and np.all(np.asarray(p2["w"]) < 1.0)
  assert int(sam_optax.find_state(s2, sam_optax.UnifiedPerturbationState).count) == 1


def test_loss_scale_grows_after_interval():
  params, loss = _f16_problem()
  opt = sam_optax.dynamic_loss_scale(
    sam_optax.unified_sam(optax.sgd(0.01), 0.01), init_scale=4.0, growth_interval=2
  )
  step = sam_optax.sam_step(loss, opt, donate=False)
  state = opt.init(params)
  scales = []
  for _ in range(4):
    params, state, m = step(params, state, jnp.float16(1.0))
    scales.append(float(m["loss_scale"]))
  assert scales == [4.0, 8.0, 8.0, 16.0]


def test_fresh_loss_scale_state_can_be_donated():
  # each state field owns its buffer, so the default donate=True works on a fresh state
  opt = sam_optax.dynamic_loss_scale(sam_optax.unified_sam(optax.sgd(0.1), 0.05))
  params = jax.tree.map(jnp.array, PARAMS)
  p, s, m = sam_optax.sam_step(loss_fn, opt)(params, opt.init(params), BATCH)
  assert not bool(m["skipped"]) and bool(m["finite"])
  assert params["w"].is_deleted() and not np.allclose(p["w"], PARAMS["w"])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    pytest.param({"init_scale": 0.0}, "`init_scale` must be > 0", id="init_scale"),
    pytest.param({"backoff_factor": 2.0}, "`backoff_factor`", id="backoff_factor"),
  ],
)
def test_loss_scale_bad_args(kwargs, match):
  opt = sam_optax.unified_sam(optax.sgd(0.1), 0.05)
  with pytest.raises(ValueError, match=match):
    sam_optax.dynamic_loss_scale(opt, **kwargs)
