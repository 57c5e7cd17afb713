"""The CIFAR trainer's variant options: each is off by default, and checked on values when on.

The optimizer the trainer builds (``train.create_optimizer``) is checked on a toy
parameter tree against the formulas of docs/variants.md, with a fixed perturbed
gradient; the options are then run for two steps of the real trainer on a tiny model.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from test_cifar_synthetic import make_archive  # noqa: E402

import sam_optax  # noqa: E402
from examples.cifar import train  # noqa: E402
from examples.cifar.configs import default  # noqa: E402

LR, WD, RHO = 0.1, 5e-4, 0.1
SPE = 4  # steps per epoch of the toy optimizer


def toy_config(**overrides):
  c = default.get_config()
  c.optimizer, c.learning_rate, c.weight_decay, c.rho = "unified_sam", LR, WD, RHO
  c.lambd, c.num_epochs, c.schedule = "1", 2, "cosine"
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def tree(seed, scale=1.0):
  r = np.random.default_rng(seed)
  return {
    "conv": {"kernel": jnp.asarray(scale * r.normal(size=(3, 3, 2, 4)), jnp.float32)},
    "bn": {"scale": jnp.asarray(1.0 + 0.1 * r.normal(size=4), jnp.float32)},
    "head": {
      "kernel": jnp.asarray(scale * r.normal(size=(4, 3)), jnp.float32),
      "bias": jnp.asarray(scale * r.normal(size=3), jnp.float32),
    },
  }


X, G, GS = tree(0), tree(1), tree(2, scale=3.0)  # x, g = ∇f(x), ∇f(e) (‖∇f(e)‖ ≈ 19)


def first_update(config, grads_at_e=GS):
  """(δ = e - x, the descent gradient, new state) of the first step of the trainer's optimizer.

  The base optimizer starts with zero momentum, so its first update is
  -lr_0 (d + wd·x) for the descent gradient d (at step 0 the schedule is at its peak).
  """
  tx, _ = train.create_optimizer(config, SPE)
  seen = []

  def value_and_grad_fn(e):
    seen.append(e)
    return jnp.float32(1.0), grads_at_e

  updates, state = tx.update(G, tx.init(X), X, value_and_grad_fn=value_and_grad_fn)
  # (Under interval SAM / LookSAM the perturbed pass is traced inside a lax.cond.)
  traced = isinstance(jax.tree.leaves(seen[0])[0], jax.core.Tracer)
  delta = None if traced else jax.tree.map(lambda e, x: e - x, seen[0], X)
  descent = jax.tree.map(lambda u, x: -u / LR - WD * x, updates, X)
  return delta, descent, state


def flat(t):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])


# δ = e - x is read off e in float32: absolute error up to the spacing of x (~2e-7 here).
DELTA_ATOL = 5e-7


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ------------------------------------------------------------- the optimizer, on values


def test_defaults_build_the_plain_optimizer():
  """All options off (the defaults): the same transformation as before they existed."""
  config = toy_config(eta=0.5)  # η is used only with adaptive=True
  tx, schedule = train.create_optimizer(config, SPE)
  plain = sam_optax.unified_sam(
    optax.chain(
      optax.add_decayed_weights(WD), optax.trace(decay=0.9), optax.scale_by_learning_rate(schedule)
    ),
    rho=RHO,
    lambd=1.0,
  )
  assert jax.tree.structure(tx.init(X)) == jax.tree.structure(plain.init(X))
  fn = lambda e: (jnp.float32(1.0), GS)  # noqa: E731
  ours = tx.update(G, tx.init(X), X, value_and_grad_fn=fn)
  theirs = plain.update(G, plain.init(X), X, value_and_grad_fn=fn)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert np.array_equal(a, b)
  delta, descent, _ = first_update(config)
  assert_trees_close(
    delta, jax.tree.map(lambda g: RHO * g / np.linalg.norm(flat(G)), G), atol=DELTA_ATOL
  )
  assert_trees_close(descent, GS)


def test_gsam_descends_along_the_corrected_gradient():
  delta, descent, _ = first_update(toy_config(gsam_alpha=0.3))
  g, gs = flat(G), flat(GS)
  orthogonal = g - (g @ gs) / (gs @ gs) * gs  # the clean gradient's part ⟂ ∇f(e)
  np.testing.assert_allclose(flat(descent), gs - 0.3 * orthogonal, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    flat(delta), RHO * g / np.linalg.norm(g), rtol=1e-5, atol=DELTA_ATOL
  )  # the ascent is SAM's


@pytest.mark.parametrize(
  "schedule,warmup", [("cosine", 0), ("cosine", 1), ("step", 0), ("constant", 0)]
)
def test_gsam_rho_follows_the_learning_rate(schedule, warmup):
  config = toy_config(
    gsam_rho_min=0.02, schedule=schedule, warmup_epochs=warmup, lr_boundaries=(1,), lr_decay=0.2
  )
  tx, lr = train.create_optimizer(config, SPE)
  state = tx.init(X)
  fn = lambda e: (jnp.float32(1.0), GS)  # noqa: E731
  rhos = []
  for _ in range(2 * SPE):
    _, state = tx.update(G, state, X, value_and_grad_fn=fn)
    rhos.append(float(sam_optax.find_state(state, sam_optax.UnifiedPerturbationState).rho_t))
  lrs = np.array([float(lr(t)) for t in range(2 * SPE)])
  if lrs.max() == lrs.min():  # a constant learning rate: ρ stays at rho
    expected = np.full_like(lrs, RHO)
  else:  # ρ_t runs from rho at the highest lr to gsam_rho_min at the lowest
    expected = 0.02 + (RHO - 0.02) * (lrs - lrs.min()) / (lrs.max() - lrs.min())
  np.testing.assert_allclose(rhos, expected, rtol=1e-5, atol=1e-7)
  assert max(rhos) == pytest.approx(RHO)
  if schedule != "constant":
    assert min(rhos) == pytest.approx(0.02)


@pytest.mark.parametrize("mask", ["all", "kernels"])
def test_asam_perturbation(mask):
  eta, rho = 0.05, 0.5
  delta, descent, _ = first_update(toy_config(adaptive=True, eta=eta, rho=rho, asam_mask=mask))
  # T = |x| + η on the scaled leaves, 1 elsewhere; δ = ρ T²g / ‖T g‖ (λ = 1).
  kernels = {("conv", "kernel"), ("head", "kernel")}  # not the BN scale, not the bias
  t = {
    k: {
      n: jnp.abs(x) + eta if mask == "all" or (k, n) in kernels else jnp.ones_like(x)
      for n, x in v.items()
    }
    for k, v in X.items()
  }
  tg = jax.tree.map(lambda a, b: a * b, t, G)
  expected = jax.tree.map(lambda a, b: rho * a * b / np.linalg.norm(flat(tg)), t, tg)
  assert_trees_close(delta, expected, atol=DELTA_ATOL)
  assert_trees_close(descent, GS)


def test_clip_norm_clips_the_descent_gradient_only():
  c = 0.5
  delta, descent, _ = first_update(toy_config(clip_norm=c, lambd="0"))  # USAM: δ = ρ g
  np.testing.assert_allclose(
    flat(delta), RHO * flat(G), rtol=1e-5, atol=DELTA_ATOL
  )  # the ascent is not clipped
  np.testing.assert_allclose(flat(descent), flat(GS) * c / np.linalg.norm(flat(GS)), rtol=1e-5)
  # SGD: the one gradient is clipped, then weight decay is added.
  tx, _ = train.create_optimizer(toy_config(clip_norm=c, optimizer="sgd"), SPE)
  updates, _ = tx.update(GS, tx.init(X), X)
  np.testing.assert_allclose(
    flat(updates), -LR * (flat(GS) * c / np.linalg.norm(flat(GS)) + WD * flat(X)), rtol=1e-5
  )
  # A bound above ‖∇f(e)‖ changes nothing, bit for bit.
  _, loose, _ = first_update(toy_config(clip_norm=1e6))
  _, plain, _ = first_update(toy_config())
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loose), jax.tree.leaves(plain)))


def test_wrapping_order():
  """ascent → unified_sam → gsam → looksam / interval_sam (the outermost state)."""
  _, descent, state = first_update(toy_config(gsam_alpha=0.3, sam_every=3, looksam_alpha=0.5))
  assert isinstance(state, sam_optax.IntervalSAMState) and state.orthogonal is not None
  assert isinstance(state.inner, sam_optax.SAMState)  # gsam keeps the wrapped state
  _, gsam_descent, _ = first_update(toy_config(gsam_alpha=0.3))  # step 1 is a SAM step
  assert_trees_close(descent, gsam_descent)
  _, _, state = first_update(toy_config(sam_every=3))
  assert isinstance(state, sam_optax.IntervalSAMState) and state.orthogonal is None


def test_resume_with_another_state_layout_is_a_clear_error(tmp_path):
  def save(config):  # a checkpoint of the optimizer state the config builds
    tx, _ = train.create_optimizer(config, SPE)
    manager = train.checkpoint_manager(str(tmp_path / str(len(os.listdir(tmp_path)))), config)
    train.save_checkpoint(
      manager, 1, {"params": X, "opt_state": tx.init(X)}, train.checkpoint_metadata(config, 10)
    )
    return manager

  def resume(manager, config):
    tx, _ = train.create_optimizer(config, SPE)
    return train.restore_checkpoint(
      manager, 1, {"params": X, "opt_state": tx.init(X)}, train.checkpoint_metadata(config, 10)
    )

  plain = toy_config()
  resume(save(toy_config(gsam_alpha=0.1)), plain)  # gsam keeps the wrapped state's layout
  with pytest.raises(train.CheckpointMismatchError, match="another layout.*sam_every=3"):
    resume(save(toy_config(sam_every=3)), plain)
  with pytest.raises(train.CheckpointMismatchError, match="clip_norm=0.5"):
    resume(save(toy_config(clip_norm=0.5)), plain)
  resume(save(toy_config(sam_every=3)), toy_config(sam_every=5))  # the same layout
  resume(save(plain), toy_config(rho=0.3))  # ρ may change on resume


@pytest.mark.parametrize(
  "overrides,match",
  [
    # The trainer's own checks: keys an optimizer does not use, values only it knows.
    (dict(optimizer="sgd", gsam_alpha=0.1), "gsam_alpha=0.1: not used by optimizer='sgd'"),
    (dict(optimizer="sgd", m_sharpness=4), "m_sharpness=4: not used by optimizer='sgd'"),
    (
      dict(optimizer="sam_sps", gsam_rho_min=0.01),
      "gsam_rho_min=0.01: not used by optimizer='sam_sps'",
    ),
    (dict(optimizer="sam_sps", clip_norm=1.0), "clip_norm=1.0: not used by optimizer='sam_sps'"),
    (dict(looksam_alpha=0.5), "looksam_alpha=0.5 .*needs sam_every > 1"),
    (dict(adaptive=True, asam_mask="biases"), "asam_mask must be one of"),
    (dict(clip_norm=0.0), "clip_norm must be > 0"),
    (dict(m_sharpness=3), "m_sharpness .*must divide batch_size=16, got 3"),
    (dict(m_sharpness=0), "m_sharpness .*must divide batch_size=16, got 0"),
    (dict(num_devices=-1), r"num_devices must be an int in \[0, 1\]"),
    # sam_optax's errors, raised by setup() before any step runs.
    (dict(sam_every=0), "`every` must be a positive int, got 0"),
    (dict(looksam_alpha=-0.1, sam_every=2), "`alpha` must be >= 0.0, got -0.1"),
    (dict(optimizer="sam_sps", sam_every=5), "interval_sam cannot wrap the Polyak step size"),
    (dict(gsam_rho_min=0.5), "`rho_min` must be <= `rho_max`, got 0.5 > 0.1"),
    (dict(gsam_alpha=-1.0), "`alpha` must be >= 0.0, got -1.0"),
    (dict(asam_mask="kernels"), "`mask` selects the leaves that ASAM scales and needs adaptive"),
    (dict(adaptive=True, eta=-0.01), "`eta` must be >= 0.0"),
    (
      dict(m_sharpness=4, optimizer="sam_sps"),
      "m-sharpness.*not supported with the Polyak step size",
    ),
    (dict(m_sharpness=4, sam_every=2), "m-sharpness.*not supported with interval_sam"),
    (dict(m_sharpness=4, gsam_alpha=0.1), "m-sharpness.*not supported with gsam"),
  ],
)
def test_bad_combinations_are_clear_errors(overrides, match, data_dir):
  from test_cifar_devices import tiny_config

  with pytest.raises(ValueError, match=match):
    train.setup(tiny_config(**overrides), data_dir)


# --------------------------------------------------------- the options in the trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("cifar_variants")
  make_archive(d, "cifar10", n_train=64, n_test=24, seed=0)
  return str(d)


def trainer_steps(data_dir, steps=2, **overrides):
  from test_cifar_devices import tiny_config

  run = train.setup(tiny_config(**overrides), data_dir)
  batches = train.input_pipeline.TrainBatches(run.data.train, 16, 0)
  state, states, outs = run.state, [], []
  for i in range(steps):
    state, out = run.train_step(state, run.put_batch(batches(i)))
    states.append(jax.device_get(state))
    outs.append(jax.device_get(out))
  return run, batches, states, outs


@pytest.fixture(scope="module")
def plain(data_dir):
  return trainer_steps(data_dir)


@pytest.mark.slow
def test_interval_sam_skipped_step_is_sgd_on_the_clean_gradient(data_dir):
  run, batches, (s1, s2), _ = trainer_steps(data_dir, sam_every=2)
  assert run.train_step._cache_size() == 1  # SAM and skipped steps: one compiled step
  sam_state = lambda s: sam_optax.find_state(s["opt_state"], sam_optax.SAMState)  # noqa: E731
  # No perturbed pass on step 2: f(e) is still step 1's.
  assert sam_state(s2).perturbed_loss == sam_state(s1).perturbed_loss
  pert = sam_optax.find_state(s2["opt_state"], sam_optax.UnifiedPerturbationState)
  assert int(pert.count) == 2  # the ascent's schedules (ρ, λ) advance on every step
  # Step 2 by hand: momentum SGD on g = ∇f(x_1), the clean gradient of batch 2.
  x1, m1 = s1["params"], sam_state(s1).descent[1].trace
  g = jax.grad(lambda p: run.loss_fn(p, batches(1), s1["batch_stats"], None)[0])(x1)
  lr = float(run.schedule(1))
  expected = jax.tree.map(lambda x, m, g: x - lr * (0.9 * m + g + WD * x), x1, m1, g)
  assert_trees_close(s2["params"], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
  "overrides",
  [
    dict(sam_every=2, looksam_alpha=0.5),
    dict(gsam_alpha=0.2, gsam_rho_min=0.02),
    dict(adaptive=True, rho=1.0, asam_mask="kernels"),
    dict(clip_norm=0.05),
    dict(m_sharpness=4),
    dict(optimizer="sam_sps", lambd="1", gsam_alpha=0.2, adaptive=True),
  ],
  ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_each_option_trains(overrides, data_dir, plain):
  run, _, states, outs = trainer_steps(data_dir, **overrides)
  assert run.train_step._cache_size() == 1
  _, _, plain_states, plain_outs = plain
  if "m_sharpness" not in overrides:  # m-sharpness normalizes each group of 4 on its own
    # Step 1's clean loss is at the same x on the same batch as plain SAM's.
    assert float(outs[0]["loss"]) == pytest.approx(float(plain_outs[0]["loss"]), rel=1e-6)
  for out in outs:
    assert np.isfinite(float(out["loss"])) and 0.0 <= float(out["accuracy"]) <= 1.0
  ours, theirs = flat(states[-1]["params"]), flat(plain_states[-1]["params"])
  assert np.all(np.isfinite(ours))
  assert np.max(np.abs(ours - theirs)) > 1e-4  # the option changes the training
