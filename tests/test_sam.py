"""unified_sam / sam_sps / sharpness_aware: descent, Polyak step (docs/contract.md §2, §3, §6, §7).

The step driver itself (metrics, donation, tracing, dtypes, its errors) is tests/test_step.py;
dynamic_loss_scale is tests/test_loss_scale.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

from helpers import BATCH
from helpers import PARAMS
from helpers import assert_trees_close
from helpers import assert_trees_equal
from helpers import loss_fn
from helpers import run


def sgd_torch_like(lr, momentum=0.0, wd=0.0):
  """PyTorch's SGD(lr, momentum, weight_decay) in optax (docs/contract.md §2)."""
  return optax.chain(optax.add_decayed_weights(wd), optax.trace(decay=momentum), optax.scale(-lr))


def hand_written_sam(base, rho, lambd, steps=5, eps=1e-12):
  """A plain two-pass SAM loop written from the formula."""
  grad = jax.grad(loss_fn)
  params, state = PARAMS, base.init(PARAMS)

  @jax.jit
  def one(params, state, t):
    g = grad(params, BATCH)
    norm = optax.tree.norm(g)
    lam = {"1/t": 1.0 / t, "1-1/t": 1.0 - 1.0 / t}.get(lambd, lambd)
    e = jax.tree.map(lambda x, gi: x + rho * (1 - lam + lam / (norm + eps)) * gi, params, g)
    updates, state = base.update(grad(e, BATCH), state, params)
    return optax.apply_updates(params, updates), state

  for t in range(1, steps + 1):
    params, state = one(params, state, float(t))
  return params


@pytest.mark.parametrize("lambd", [0.0, 0.5, 1.0, "1/t", "1-1/t"])
def test_unified_sam_matches_hand_written_loop(lambd):
  base = sgd_torch_like(0.1, momentum=0.9, wd=5e-4)
  params, _, _ = run(sam_optax.unified_sam(base, rho=0.1, lambd=lambd))
  assert_trees_close(params, hand_written_sam(base, 0.1, lambd))


def test_rho_zero_is_the_base_optimizer_bit_for_bit():
  for base in [sgd_torch_like(0.1, 0.9, 5e-4), optax.adam(1e-2)]:
    params, _, _ = run(sam_optax.unified_sam(base, rho=0.0, lambd="1-1/t"), steps=6)
    p, s = PARAMS, base.init(PARAMS)

    @jax.jit
    def plain(p, s):
      u, s = base.update(jax.grad(loss_fn)(p, BATCH), s, p)
      return optax.apply_updates(p, u), s

    for _ in range(6):
      p, s = plain(p, s)
    assert_trees_equal(params, p)


def test_lambda_one_matches_optax_contrib_sam():
  rho, lr = 0.05, 0.1
  ours, _, _ = run(sam_optax.unified_sam(optax.sgd(lr), rho=rho, lambd=1.0), steps=4)
  contrib = optax.contrib.sam(
    optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)), opaque_mode=True
  )
  p, s = PARAMS, contrib.init(PARAMS)
  for _ in range(4):
    g = jax.grad(loss_fn)(p, BATCH)
    u, s = contrib.update(g, s, p, grad_fn=lambda q, _: jax.grad(loss_fn)(q, BATCH))
    p = optax.apply_updates(p, u)
  assert_trees_close(ours, p)


def test_first_steps_of_schedules_equal_constant_lambda():
  base = optax.sgd(0.1, momentum=0.9)
  one = lambda lam: run(sam_optax.unified_sam(base, 0.2, lam), steps=1)[0]
  assert_trees_equal(one("1/t"), one(1.0))
  assert_trees_equal(one("1-1/t"), one(0.0))


def test_sam_sps_step_size_reported_and_matches_formula():
  opt = sam_optax.sam_sps(rho=0.05, lambd=1.0, f_star=0.0, gamma_b=5.0, weight_decay=0.0)
  params, state, hist = run(opt, steps=1)
  g = jax.grad(loss_fn)(PARAMS, BATCH)
  delta = jax.tree.map(lambda gi: 0.05 * gi / (optax.tree.norm(g) + 1e-12), g)
  e = optax.apply_updates(PARAMS, delta)
  fe, ge = jax.value_and_grad(loss_fn)(e, BATCH)
  inner = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(ge), jax.tree.leaves(delta)))
  gamma = min(max(float((fe - inner) / optax.tree.norm(ge) ** 2), 0.0), 5.0)
  assert float(hist[0]["step_size"]) == pytest.approx(gamma, rel=1e-5)
  assert float(
    sam_optax.find_state(state, sam_optax.PolyakStepSizeState).step_size
  ) == pytest.approx(gamma, rel=1e-5)
  assert_trees_close(params, jax.tree.map(lambda x, gi: x - gamma * gi, PARAMS, ge), rtol=1e-5)


def test_sam_sps_rho_zero_is_sps_max():
  opt = sam_optax.sam_sps(rho=0.0, gamma_b=100.0, weight_decay=0.0)
  _, _, hist = run(opt, steps=1)
  f, g = jax.value_and_grad(loss_fn)(PARAMS, BATCH)
  assert float(hist[0]["step_size"]) == pytest.approx(float(f / optax.tree.norm(g) ** 2), rel=1e-5)


def test_inject_hyperparams_traced_rho_and_lambda():
  opt = optax.inject_hyperparams(sam_optax.unified_sam)(optax.sgd(0.1), rho=0.1, lambd=1.0)
  step = sam_optax.sam_step(loss_fn, opt, donate=False)
  state = opt.init(PARAMS)
  state.hyperparams["rho"] = jnp.asarray(0.0)
  p, state, m = step(PARAMS, state, BATCH)
  assert float(m["rho"]) == 0.0 and float(m["sharpness"]) == 0.0
  plain = optax.apply_updates(
    PARAMS, jax.tree.map(lambda g: -0.1 * g, jax.grad(loss_fn)(PARAMS, BATCH))
  )
  assert_trees_close(p, plain)


def test_schedule_learning_rate_and_chain_base():
  base = optax.chain(optax.clip_by_global_norm(0.01), optax.sgd(optax.linear_schedule(0.1, 0.0, 4)))
  params, _, _ = run(sam_optax.unified_sam(base, 0.05, 1.0), steps=2)
  ref = hand_written_sam(base, 0.05, 1.0, steps=2)
  assert_trees_close(params, ref)
  step1 = jax.tree.map(
    lambda a, b: a - b, run(sam_optax.unified_sam(base, 0.05, 1.0), steps=1)[0], PARAMS
  )
  assert float(optax.tree.norm(step1)) == pytest.approx(0.1 * 0.01, rel=1e-4)  # clipped at x


def test_multisteps_base_accumulates_perturbed_gradients():
  base = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2).gradient_transformation()
  opt = sam_optax.unified_sam(base, rho=0.1, lambd=0.0)
  step = sam_optax.sam_step(loss_fn, opt, donate=False)
  state = opt.init(PARAMS)
  p1, state, _ = step(PARAMS, state, BATCH)
  assert_trees_equal(p1, PARAMS)  # first micro-step: no update yet
  p2, state, _ = step(p1, state, BATCH)
  g = jax.grad(loss_fn)(PARAMS, BATCH)
  ge = jax.grad(loss_fn)(jax.tree.map(lambda x, gi: x + 0.1 * gi, PARAMS, g), BATCH)
  assert_trees_close(p2, jax.tree.map(lambda x, gi: x - gi, PARAMS, ge))  # mean of two equal g_e


def test_partitioned_base_optimizer():
  base = optax.multi_transform(
    {"train": optax.sgd(0.1), "frozen": optax.set_to_zero()}, {"w": "train", "b": "frozen"}
  )
  params, _, _ = run(sam_optax.unified_sam(base, 0.05, "1-1/t"), steps=3)
  assert float(params["b"]) == float(PARAMS["b"])
  assert not np.allclose(params["w"], PARAMS["w"])


def test_float64_params(x64):
  params = jax.tree.map(lambda x: x.astype(jnp.float64), PARAMS)
  batch = jax.tree.map(lambda x: x.astype(jnp.float64), BATCH)
  p, state, hist = run(sam_optax.sam_sps(0.1), params=params, batch=batch, steps=2)
  assert p["w"].dtype == jnp.float64 and hist[-1]["step_size"].dtype == jnp.float64


@pytest.mark.parametrize("name", ["unified_sam", "sam_sps"])
def test_zero_gradient_loss_gives_finite_steps(name):
  opt = (
    sam_optax.unified_sam(optax.sgd(0.1), 0.05, 1.0)
    if name == "unified_sam"
    else sam_optax.sam_sps(0.05)
  )
  flat = lambda p, batch: jnp.asarray(1.0) + 0.0 * p["b"]
  p, state, hist = run(opt, steps=2, loss=flat)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((p, state, hist)))


def test_asam_mask_passes_through_unified_sam():
  kernels = {"w": True, "b": False}
  masked = sam_optax.unified_sam(optax.sgd(0.1), 0.5, 1.0, adaptive=True, mask=kernels)
  composed = sam_optax.sharpness_aware(
    sam_optax.unified_perturbation(0.5, 1.0, adaptive=True, mask=kernels), optax.sgd(0.1)
  )
  assert_trees_equal(run(masked, steps=2)[0], run(composed, steps=2)[0])


def test_update_without_value_and_grad_fn_is_refused():
  opt = sam_optax.unified_sam(optax.sgd(0.1), 0.05)
  with pytest.raises(ValueError, match="value_and_grad_fn"):
    opt.update(PARAMS, opt.init(PARAMS), PARAMS)


@pytest.mark.parametrize(
  "build, match",
  [
    pytest.param(
      lambda: sam_optax.unified_sam(0.1), "`base_optimizer` must be an optax", id="base"
    ),
    pytest.param(
      lambda: sam_optax.unified_sam(optax.sgd(0.1), lambd="1/t2"), "`lambd`", id="lambd_name"
    ),
    pytest.param(lambda: sam_optax.sam_sps(gamma_b=0.0), "`gamma_b` must be > 0", id="gamma_b"),
    pytest.param(lambda: sam_optax.sam_sps(rho=-1.0), "`rho` must be >= 0", id="negative_rho"),
    pytest.param(
      lambda: sam_optax.sam_sps(mask={"w": True, "b": False}),
      "needs adaptive=True",
      id="mask_without_adaptive",
    ),
  ],
)
def test_constructor_rejects_bad_arguments(build, match):
  with pytest.raises(ValueError, match=match):
    build()
