"""Data parallelism on one device: groups=m (m-sharpness), the checks, the batch helpers.

The multi-device tests are in test_parallel_devices.py (8 fake CPU devices, in a
subprocess) and test_parallel_distributed.py (2 processes). The model, data and
the hand-written m-sharpness reference below are shared with them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def loss_fn(params, batch, stats):
  """A small tanh regression; aux is a batch-norm-like running mean of the hidden units."""
  hidden = jnp.tanh(batch["x"] @ params["w"] + params["b"])
  loss = jnp.mean((hidden @ params["v"] - batch["y"]) ** 2)
  return loss, 0.9 * stats + 0.1 * jnp.mean(hidden, axis=0)


def make_problem(batch_size=32, steps=3, seed=0):
  """Float32 parameters, statistics and `steps` global batches, as NumPy arrays."""
  rng = np.random.default_rng(seed)
  params = {
    "w": rng.normal(size=(6, 8)).astype(np.float32),
    "b": (0.1 * rng.normal(size=8)).astype(np.float32),
    "v": rng.normal(size=8).astype(np.float32),
  }
  stats = np.zeros(8, np.float32)
  batches = [
    {
      "x": rng.normal(size=(batch_size, 6)).astype(np.float32),
      "y": rng.normal(size=batch_size).astype(np.float32),
    }
    for _ in range(steps)
  ]
  return params, stats, batches


def base_optimizer():
  """PyTorch's SGD(lr, momentum, weight_decay) in optax (docs/contract.md §2)."""
  return optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))


def hand_msharpness(params, stats, batches, shards, rho, lambd, eps=1e-12):
  """m-sharpness written from the formulas, one shard at a time (no sam_optax code).

  Shard k perturbs with its own gradient, e_k = x + ρ(1 - λ + λ/‖g_k‖) g_k; the
  descent is momentum SGD with coupled weight decay on mean_k ∇f_k(e_k). The
  statistics are the mean over shards of each shard's clean-pass update.
  Returns (params, stats, mean over shards of ‖g_k‖) after every step.
  """
  grad = jax.grad(lambda p, b, s: loss_fn(p, b, s)[0])

  @jax.jit
  def one(x, buf, stats, batch):
    parts = [jax.tree.map(lambda a: jnp.split(a, shards)[k], batch) for k in range(shards)]
    perturbed_grads, new_stats, norms = [], [], []
    for part in parts:
      g = grad(x, part, stats)
      norm = jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(g)))
      norms.append(norm)
      coef = rho * (1.0 - lambd + lambd / (norm + eps))
      e = jax.tree.map(lambda xi, gi: xi + coef * gi, x, g)
      perturbed_grads.append(grad(e, part, stats))
      new_stats.append(loss_fn(x, part, stats)[1])
    g_e = jax.tree.map(lambda *gs: sum(gs) / shards, *perturbed_grads)
    direction = jax.tree.map(lambda gi, xi: gi + WD * xi, g_e, x)
    buf = jax.tree.map(lambda b, d: MOMENTUM * b + d, buf, direction)
    x = jax.tree.map(lambda xi, b: xi - LR * b, x, buf)
    return x, buf, sum(new_stats) / shards, sum(norms) / shards

  x, buf = params, jax.tree.map(np.zeros_like, params)
  history = []
  for batch in batches:
    x, buf, stats, mean_norm = one(x, buf, stats, batch)
    history.append((x, stats, mean_norm))
  return history


def max_rel_error(a, b):
  """max over leaves of max|a - b| / max(1, max|b|)."""
  errors = [
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    / max(1.0, float(np.max(np.abs(np.asarray(y, np.float64)))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return max(errors)


def run_steps(step, params, state, stats, batches):
  history = []
  for batch in batches:
    params, state, metrics, stats = step(params, state, batch, stats)
    history.append((params, stats))
  return history


# ----------------------------------------------------------------------------- groups


def test_groups_equal_hand_written_m_sharpness_and_differ_from_sync():
  params, stats, batches = make_problem()
  rho, lambd = 0.2, 0.5
  opt = sam_optax.unified_sam(base_optimizer(), rho=rho, lambd=lambd)
  grouped = sam_optax.sam_step(loss_fn, opt, has_aux=True, ascent="local", groups=8, donate=False)
  p, state, st, got = params, opt.init(params), stats, []
  for batch in batches:
    p, state, metrics, st = grouped(p, state, batch, st)
    got.append((p, st))
  want = hand_msharpness(params, stats, batches, shards=8, rho=rho, lambd=lambd)
  for step_got, step_want in zip(got, want, strict=True):
    assert max_rel_error(step_got, step_want[:2]) < 1e-5
  # The state and metrics hold the mean over groups of each group's ‖g_k‖.
  pert = sam_optax.find_state(state, sam_optax.UnifiedPerturbationState)
  assert int(pert.count) == len(batches)
  np.testing.assert_allclose(metrics["grad_norm"], want[-1][2], rtol=1e-5)
  np.testing.assert_allclose(pert.grad_norm, want[-1][2], rtol=1e-5)

  synced = sam_optax.sam_step(loss_fn, opt, has_aux=True, donate=False)
  sync = run_steps(synced, params, opt.init(params), stats, batches)
  assert max_rel_error(sync[-1][0], got[-1][0]) > 1e-3  # m-sharpness is another algorithm
  # ... and the hand reference with one shard is the synced step.
  one_shard = hand_msharpness(params, stats, batches, shards=1, rho=rho, lambd=lambd)
  assert max_rel_error(sync[-1], one_shard[-1][:2]) < 1e-5


def test_one_group_is_the_synced_step():
  params, stats, batches = make_problem(steps=2)
  opt = sam_optax.unified_sam(base_optimizer(), rho=0.1, lambd="1-1/t")
  one = sam_optax.sam_step(loss_fn, opt, has_aux=True, ascent="local", groups=1, donate=False)
  plain = sam_optax.sam_step(loss_fn, opt, has_aux=True, donate=False)
  got = run_steps(one, params, opt.init(params), stats, batches)
  want = run_steps(plain, params, opt.init(params), stats, batches)
  assert max_rel_error(got, want) < 1e-6


def test_axis_name_under_vmap_averages_floating_metrics_and_keeps_flags():
  # vmap with an axis name behaves like pmap on one device: a cheap check of the sync path.
  params, stats, batches = make_problem(steps=1)
  opt = sam_optax.dynamic_loss_scale(sam_optax.unified_sam(optax.sgd(0.1), rho=0.05))
  step = sam_optax.sam_step(loss_fn, opt, has_aux=True, axis_name="b", jit=False)
  split = sam_optax.shard_batch(batches[0], num_devices=4)
  _, _, metrics, new_stats = jax.vmap(
    step, in_axes=(None, None, 0, None), out_axes=None, axis_name="b"
  )(params, opt.init(params), split, stats)
  assert metrics["skipped"].dtype == jnp.bool_ and not bool(metrics["skipped"])
  assert float(metrics["loss_scale"]) == 2.0**15
  np.testing.assert_allclose(metrics["loss"], loss_fn(params, batches[0], stats)[0], rtol=1e-6)
  np.testing.assert_allclose(new_stats, loss_fn(params, batches[0], stats)[1], rtol=1e-6)


# ----------------------------------------------------------------------------- bad input


def _fresh():
  params, stats, batches = make_problem(batch_size=30, steps=1)
  params = jax.tree.map(jnp.asarray, params)
  opt = sam_optax.unified_sam(base_optimizer(), rho=0.1, lambd=1.0)
  return params, opt, opt.init(params), stats, batches[0]


def test_groups_batch_not_divisible_fails_before_compute():
  params, opt, state, stats, batch = _fresh()
  step = sam_optax.sam_step(loss_fn, opt, has_aux=True, ascent="local", groups=8)
  with pytest.raises(ValueError, match=r"`batch` has 30 examples .* not divisible by groups=8"):
    step(params, state, batch, stats)
  # Raised while tracing: nothing was donated or computed.
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((params, state)))


def test_axis_name_without_pmap_fails_before_compute():
  params, opt, state, stats, batch = _fresh()
  step = sam_optax.sam_step(loss_fn, opt, has_aux=True, axis_name="batch")
  with pytest.raises(ValueError, match=r"axis_name='batch'.*no enclosing jax.pmap"):
    step(params, state, batch, stats)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((params, state)))


def test_unknown_axis_name_inside_vmap_names_both():
  params, opt, state, stats, batch = _fresh()
  step = sam_optax.sam_step(loss_fn, opt, has_aux=True, axis_name="batch", jit=False)
  stacked = jax.tree.map(lambda a: a.reshape(2, 15, *a.shape[1:]), batch)
  with pytest.raises(ValueError, match=r"binds the axis 'batch'.*names must match"):
    jax.vmap(step, in_axes=(None, None, 0, None), axis_name="devices")(
      params, state, stacked, stats
    )


@pytest.mark.parametrize(
  "opt, message",
  [
    (sam_optax.sam_sps(rho=0.1), r"not supported with the Polyak step size \(sam_sps\)"),
    (
      sam_optax.dynamic_loss_scale(sam_optax.unified_sam(optax.sgd(0.1), rho=0.1)),
      r"not supported with dynamic_loss_scale",
    ),
  ],
)
def test_local_ascent_rejects_what_would_split_the_replicas(opt, message):
  params, _, _, stats, batch = _fresh()
  step = sam_optax.sam_step(loss_fn, opt, has_aux=True, ascent="local", groups=2)
  with pytest.raises(ValueError, match=message):
    step(params, opt.init(params), batch, stats)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(groups=0, ascent="local"), r"`groups` must be a positive int"),
    (dict(groups=True, ascent="local"), r"`groups` must be a positive int"),
    (dict(groups=2.0, ascent="local"), r"`groups` must be a positive int"),
    (dict(groups=4), r"`groups` .* needs ascent='local'"),
    (dict(ascent="local"), r"needs an `axis_name` .* or `groups=m`"),
    (dict(ascent="per-device", axis_name="b"), r"`ascent` must be one of"),
    (dict(axis_name=0), r"`axis_name` must be a string"),
  ],
)
def test_bad_arguments_at_construction(kwargs, message):
  opt = sam_optax.unified_sam(optax.sgd(0.1), rho=0.1)
  with pytest.raises(ValueError, match=message):
    sam_optax.sam_step(loss_fn, opt, **kwargs)


# ----------------------------------------------------------------------------- helpers


def test_check_batch_divisible():
  batch = {"x": np.zeros((12, 3)), "y": np.zeros(12)}
  assert sam_optax.check_batch_divisible(batch, 4) == 12
  with pytest.raises(ValueError, match=r"12 examples .* not divisible by 5 shards"):
    sam_optax.check_batch_divisible(batch, 5)
  with pytest.raises(ValueError, match=r"disagree on the leading .*batch\['y'\]: 11"):
    sam_optax.check_batch_divisible({"x": np.zeros((12, 3)), "y": np.zeros(11)}, 2)
  with pytest.raises(ValueError, match=r"`batch\['y'\]` is a scalar"):
    sam_optax.check_batch_divisible({"x": np.zeros((12, 3)), "y": np.float32(1)}, 2)
  with pytest.raises(ValueError, match=r"`num_shards` must be a positive int"):
    sam_optax.check_batch_divisible(batch, 0)


def test_shard_batch_replicate_unreplicate_on_one_device():
  batch = {"x": np.arange(12.0).reshape(6, 2)}
  sharded = sam_optax.shard_batch(batch, num_devices=3)
  np.testing.assert_array_equal(sharded["x"], np.arange(12.0).reshape(3, 2, 2))
  with pytest.raises(ValueError, match=r"6 examples .* not divisible by the 4 devices"):
    sam_optax.shard_batch(batch, num_devices=4)
  tree = {"w": jnp.arange(3.0), "count": jnp.int32(7)}
  replicated = sam_optax.replicate(tree)
  assert replicated["w"].shape == (jax.local_device_count(), 3)
  back = sam_optax.unreplicate(replicated)
  np.testing.assert_array_equal(back["w"], tree["w"])
  assert back["count"].dtype == jnp.int32 and int(back["count"]) == 7


def test_local_ascent_rejects_variants_whose_descent_uses_the_clean_gradient():
  import optax

  import sam_optax as so

  params = {"w": jnp.ones((3,))}
  batch = jnp.ones((4, 3))
  loss = lambda p, b: jnp.mean((b @ p["w"]) ** 2)
  base = so.unified_sam(optax.sgd(0.1), 0.05)
  for opt, name in [
    (so.gsam(base, 0.1), "gsam"),
    (so.interval_sam(base, 2), "interval_sam"),
    (so.looksam(base, 2, 0.5), "looksam"),
  ]:
    with pytest.raises(ValueError, match=f"not supported with .*{name}"):
      so.sam_step(loss, opt, ascent="local", groups=2, donate=False)(
        params, opt.init(params), batch
      )


def test_groups_reject_non_floating_aux_clearly():
  import optax

  import sam_optax as so

  params = {"w": jnp.ones((3,))}
  opt = so.unified_sam(optax.sgd(0.1), 0.05)

  def loss(p, b):
    out = b @ p["w"]
    return jnp.mean(out**2), {"correct": jnp.sum(out > 0), "mean": jnp.mean(out)}

  step = so.sam_step(loss, opt, has_aux=True, ascent="local", groups=2, donate=False)
  with pytest.raises(TypeError, match=r"aux\['correct'\] has dtype int32"):
    step(params, opt.init(params), jnp.ones((4, 3)))
