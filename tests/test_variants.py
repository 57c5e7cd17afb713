"""interval_sam, looksam, gsam, the ASAM mask, and where clipping / weight decay go.

Every variant is checked against a NumPy loop written from its formula on a
quadratic (gradients H(x - c), no JAX in the reference), and against its base
case bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

RNG = np.random.default_rng(0)
M = RNG.normal(size=(4, 4))
H = M @ M.T / 4 + np.eye(4)
C = RNG.normal(size=4)
X0 = RNG.normal(size=4)
EPS = 1e-12


def to_params(x, dtype):
  return {"b": jnp.asarray(x[0], dtype), "w": jnp.asarray(x[1:], dtype)}


def to_vector(params):
  return np.concatenate([np.atleast_1d(np.asarray(params["b"])), np.asarray(params["w"])])


def quadratic(params, batch):
  h, c = batch
  r = jnp.concatenate([params["b"][None], params["w"]]) - c
  return 0.5 * r @ h @ r


def np_grad(x):
  return H @ (x - C)


def np_loss(x):
  return 0.5 * (x - C) @ H @ (x - C)


def batch(dtype):
  return (jnp.asarray(H, dtype), jnp.asarray(C, dtype))


def run(opt, steps, dtype=jnp.float32, loss=quadratic):
  params = to_params(X0, dtype)
  step = sam_optax.sam_step(loss, opt, donate=False)
  state = opt.init(params)
  xs, metrics = [], []
  for _ in range(steps):
    params, state, m = step(params, state, batch(dtype))
    xs.append(to_vector(params))
    metrics.append({k: float(v) for k, v in m.items()})
  return np.stack(xs), metrics, state


def reference(steps, *, rho, lambd, lr, mu, every=1, looksam_alpha=None, gsam_alpha=0.0):
  """NumPy: Unified SAM + heavy-ball SGD, every `every` steps, LookSAM / GSAM rules."""
  x, buf, g_v = X0.copy(), np.zeros(4), np.zeros(4)
  xs, perturbed_losses = [], []
  for t in range(1, steps + 1):
    g = np_grad(x)
    if (t - 1) % every == 0:
      r, lam = rho(t - 1), lambd(t)
      e = x + r * (1 - lam + lam / (np.linalg.norm(g) + EPS)) * g
      g_s = np_grad(e)
      perturbed_losses.append(np_loss(e))
      if looksam_alpha is not None:
        g_v = g_s - np.linalg.norm(g_s) * (g @ g_s) / (
          np.linalg.norm(g) * np.linalg.norm(g_s)
        ) * g / np.linalg.norm(g)
      g_perp = g - (g @ g_s) / (g_s @ g_s) * g_s
      d = g_s - gsam_alpha * g_perp
    else:
      perturbed_losses.append(perturbed_losses[-1])
      d = g
      if looksam_alpha:
        d = g + looksam_alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    buf = d + mu * buf
    x = x - lr(t - 1) * buf
    xs.append(x)
  return np.stack(xs), perturbed_losses, g_v


def rho_schedule(count):
  return 0.05 + 0.02 * count


def lambd_1_over_t(t):
  return 1.0 / t


def sam_sgd(rho=0.05, lambd=1.0, lr=0.1, mu=0.9):
  return sam_optax.unified_sam(optax.sgd(lr, momentum=mu), rho=rho, lambd=lambd)


# ------------------------------------------------------------------ interval SAM


def test_interval_every_1_is_sam_bit_for_bit():
  base, _, _ = run(sam_sgd(rho=rho_schedule, lambd="1-1/t"), 6)
  xs, _, _ = run(sam_optax.interval_sam(sam_sgd(rho=rho_schedule, lambd="1-1/t"), every=1), 6)
  np.testing.assert_array_equal(xs, base)


def test_interval_matches_hand_reference(x64):
  xs, metrics, state = run(
    sam_optax.interval_sam(sam_sgd(rho=rho_schedule, lambd="1/t"), every=3), 8, jnp.float64
  )
  ref, perturbed, _ = reference(
    8, rho=rho_schedule, lambd=lambd_1_over_t, lr=lambda _: 0.1, mu=0.9, every=3
  )
  np.testing.assert_allclose(xs, ref, rtol=1e-12, atol=1e-14)
  # The perturbation's count advances on skipped steps: ρ_t and λ_t follow the step number.
  np.testing.assert_allclose(
    [m["rho"] for m in metrics], [rho_schedule(t) for t in range(8)], rtol=1e-12
  )
  np.testing.assert_allclose(
    [m["lambda"] for m in metrics], [1 / t for t in range(1, 9)], rtol=1e-12
  )
  # Skipped steps keep the last SAM step's perturbed loss.
  np.testing.assert_allclose([m["perturbed_loss"] for m in metrics], perturbed, rtol=1e-12)
  assert int(state.count) == 8
  assert int(sam_optax.find_state(state, sam_optax.UnifiedPerturbationState).count) == 8


def test_interval_skipped_steps_follow_the_base_optimizer_schedule(x64):
  lr = lambda count: 0.2 - 0.03 * count  # a decaying learning rate
  opt = sam_optax.interval_sam(sam_optax.unified_sam(optax.sgd(lr), rho=0.1), every=2)
  xs, _, _ = run(opt, 6, jnp.float64)
  ref, _, _ = reference(6, rho=lambda _: 0.1, lambd=lambda _: 1.0, lr=lr, mu=0.0, every=2)
  np.testing.assert_allclose(xs, ref, rtol=1e-12, atol=1e-14)


def counting_loss(counter):
  """The quadratic, reporting each time it is *executed* (not traced)."""

  def loss(params, batch):
    jax.debug.callback(lambda: counter.append(1))
    return quadratic(params, batch)

  return loss


@pytest.mark.parametrize(
  "wrap", [lambda o: sam_optax.interval_sam(o, 3), lambda o: sam_optax.looksam(o, 3, 0.5)]
)
def test_skipped_steps_evaluate_the_loss_once(wrap):
  counter = []
  opt = wrap(sam_sgd())
  step = sam_optax.sam_step(counting_loss(counter), opt, donate=False)
  params, state = to_params(X0, jnp.float32), opt.init(to_params(X0, jnp.float32))
  passes = []
  for _ in range(7):
    counter.clear()
    params, state, _ = step(params, state, batch(jnp.float32))
    jax.effects_barrier()
    passes.append(len(counter))
  assert passes == [2, 1, 1, 2, 1, 1, 2]


# ----------------------------------------------------------------------- LookSAM


def test_looksam_matches_hand_reference(x64):
  xs, _, state = run(sam_optax.looksam(sam_sgd(rho=0.1), every=3, alpha=0.7), 8, jnp.float64)
  ref, _, g_v = reference(
    8, rho=lambda _: 0.1, lambd=lambda _: 1.0, lr=lambda _: 0.1, mu=0.9, every=3, looksam_alpha=0.7
  )
  np.testing.assert_allclose(xs, ref, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(to_vector(state.orthogonal), g_v, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(float(state.orthogonal_norm), np.linalg.norm(g_v), rtol=1e-12)


def test_looksam_alpha_zero_is_interval_sam_bit_for_bit():
  a, _, _ = run(sam_optax.looksam(sam_sgd(), every=3, alpha=0.0), 7)
  b, _, _ = run(sam_optax.interval_sam(sam_sgd(), every=3), 7)
  np.testing.assert_array_equal(a, b)


def test_looksam_reuse_changes_the_skipped_steps_only():
  a, _, _ = run(sam_optax.looksam(sam_sgd(), every=3, alpha=0.7), 3)
  b, _, _ = run(sam_optax.interval_sam(sam_sgd(), every=3), 3)
  np.testing.assert_array_equal(a[0], b[0])
  assert np.abs(a[1] - b[1]).max() > 1e-4


# -------------------------------------------------------------------------- GSAM


def test_gsam_alpha_zero_is_sam_bit_for_bit():
  base, base_metrics, _ = run(sam_sgd(rho=0.1), 6)
  xs, metrics, _ = run(sam_optax.gsam(sam_sgd(rho=0.1), alpha=0.0), 6)
  np.testing.assert_array_equal(xs, base)
  assert metrics == base_metrics


def test_gsam_matches_hand_reference_with_rho_tied_to_lr(x64):
  lr = optax.cosine_decay_schedule(0.2, 6)
  rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.2, rho_min=0.02, lr_max=0.2, lr_min=0.0)
  opt = sam_optax.gsam(sam_optax.unified_sam(optax.sgd(lr, momentum=0.5), rho=rho), alpha=0.3)
  xs, metrics, _ = run(opt, 6, jnp.float64)
  np_rho = lambda count: 0.02 + 0.18 * float(lr(count)) / 0.2
  ref, _, _ = reference(6, rho=np_rho, lambd=lambda _: 1.0, lr=lr, mu=0.5, gsam_alpha=0.3)
  np.testing.assert_allclose(xs, ref, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose([m["rho"] for m in metrics], [np_rho(t) for t in range(6)], rtol=1e-12)
  assert metrics[0]["rho"] == pytest.approx(0.2)


def test_gsam_descent_direction_is_the_perturbed_gradient_minus_alpha_g_perp(x64):
  # One step of plain SGD(lr=1): the update is -(g_s - α g_⊥), and g_⊥ ⟂ g_s.
  opt = sam_optax.gsam(sam_optax.unified_sam(optax.sgd(1.0), rho=0.3), alpha=0.5)
  xs, _, _ = run(opt, 1, jnp.float64)
  g = np_grad(X0)
  g_s = np_grad(X0 + 0.3 * g / np.linalg.norm(g))
  g_perp = g - (g @ g_s) / (g_s @ g_s) * g_s
  assert abs(g_perp @ g_s) < 1e-12 * np.linalg.norm(g) * np.linalg.norm(g_s)
  np.testing.assert_allclose(X0 - xs[0], g_s - 0.5 * g_perp, rtol=1e-12)


def test_gsam_rho_schedule_values():
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.4, 10, 110, end_value=0.0)
  rho = sam_optax.gsam_rho_schedule(lr, 0.1, 0.02, lr_max=0.4, lr_min=0.0)
  assert float(rho(0)) == pytest.approx(0.02)
  assert float(rho(10)) == pytest.approx(0.1)
  assert float(rho(110)) == pytest.approx(0.02)
  assert float(rho(60)) == pytest.approx(0.02 + 0.08 * float(lr(60)) / 0.4)
  assert sam_optax.gsam_rho_schedule(0.1, 0.05, lr_max=0.1, lr_min=0.1)(7) == 0.05


def test_gsam_alpha_can_be_injected():
  opt = optax.inject_hyperparams(sam_optax.gsam, static_args=("optimizer",))(sam_sgd(), alpha=0.0)
  xs, _, _ = run(opt, 4)
  base, _, _ = run(sam_sgd(), 4)
  np.testing.assert_allclose(xs, base, rtol=1e-6)


# -------------------------------------------------------------------- ASAM mask


def nested_params(dtype=jnp.float64):
  return {
    "dense": {
      "kernel": jnp.asarray([[0.5, -2.0], [1.5, 0.1]], dtype),
      "bias": jnp.asarray([0.0, 0.3], dtype),
    },
    "scale": jnp.asarray([1.0, 0.8], dtype),
  }


def test_asam_all_true_mask_is_unmasked_bit_for_bit():
  params = to_params(X0, jnp.float32)
  grads = jax.grad(quadratic)(params, batch(jnp.float32))
  plain = sam_optax.unified_perturbation(0.5, adaptive=True)
  for mask in ({"b": True, "w": True}, True, lambda p: jax.tree.map(lambda _: True, p)):
    masked = sam_optax.unified_perturbation(0.5, adaptive=True, mask=mask)
    a, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    b, _ = jax.jit(masked.update)(grads, masked.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


def test_asam_mask_gives_masked_out_leaves_t_equal_1(x64):
  params = nested_params()
  grads = jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.2, params)
  eta, rho = 0.01, 0.7
  # A prefix mask: the whole "dense" subtree is scaled, "scale" is not.
  pert = sam_optax.unified_perturbation(
    rho, adaptive=True, eta=eta, mask={"dense": True, "scale": False}
  )
  delta, _ = pert.update(grads, pert.init(params), params)
  leaves = ["dense/bias", "dense/kernel", "scale"]
  x = {k: np.asarray(v) for k, v in zip(leaves, jax.tree.leaves(params))}
  g = {k: np.asarray(v) for k, v in zip(leaves, jax.tree.leaves(grads))}
  t = {k: (np.abs(x[k]) + eta if k.startswith("dense") else np.ones_like(x[k])) for k in leaves}
  norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in leaves))
  for k, d in zip(leaves, jax.tree.leaves(delta)):
    np.testing.assert_allclose(np.asarray(d), rho * t[k] ** 2 * g[k] / norm, rtol=1e-12)
  # The callable form, as in optax.masked: kernels only.
  kernels_only = sam_optax.unified_perturbation(
    rho, adaptive=True, eta=eta, mask=lambda p: jax.tree.map(lambda v: v.ndim > 1, p)
  )
  delta2, _ = kernels_only.update(grads, kernels_only.init(params), params)
  t["dense/bias"] = np.ones(2)
  norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in leaves))
  for k, d in zip(leaves, jax.tree.leaves(delta2)):
    np.testing.assert_allclose(np.asarray(d), rho * t[k] ** 2 * g[k] / norm, rtol=1e-12)


def test_asam_mask_errors():
  params = nested_params(jnp.float32)
  grads = params
  with pytest.raises(ValueError, match="`mask`.*adaptive=True"):
    sam_optax.unified_perturbation(0.1, mask={"dense": True, "scale": False})
  bad_structure = sam_optax.unified_perturbation(0.1, adaptive=True, mask={"dense": True})
  with pytest.raises(ValueError, match="`mask` must have the structure"):
    bad_structure.update(grads, bad_structure.init(params), params)
  traced = sam_optax.unified_perturbation(
    0.1, adaptive=True, mask=lambda p: jax.tree.map(lambda v: v > 0, p)
  )
  with pytest.raises(TypeError, match="`mask` leaves must be Python bools"):
    traced.update(grads, traced.init(params), params)


# ----------------------------------------- gradient clipping and weight decay


def test_clipping_on_the_descent_by_default(x64):
  # The clip inside the base optimizer acts on ∇f(e); the ascent uses the raw g.
  clip, rho, lr = 0.5, 0.2, 0.1
  opt = sam_optax.unified_sam(
    optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr)), rho=rho, lambd=0.0
  )
  xs, _, _ = run(opt, 1, jnp.float64)
  g = np_grad(X0)
  g_s = np_grad(X0 + rho * g)  # USAM: δ = ρ g, unclipped
  assert np.linalg.norm(g_s) > 2 * clip
  np.testing.assert_allclose(xs[0], X0 - lr * g_s * clip / np.linalg.norm(g_s), rtol=1e-12)


def test_clipping_the_ascent_gradient_instead(x64):
  clip, rho, lr = 0.5, 0.2, 0.1
  ascent = optax.chain(
    optax.clip_by_global_norm(clip), sam_optax.unified_perturbation(rho, lambd=0.0)
  )
  opt = sam_optax.sharpness_aware(ascent, optax.sgd(lr))
  xs, metrics, _ = run(opt, 1, jnp.float64)
  g = np_grad(X0)
  assert np.linalg.norm(g) > 2 * clip
  g_s = np_grad(X0 + rho * g * clip / np.linalg.norm(g))
  np.testing.assert_allclose(xs[0], X0 - lr * g_s, rtol=1e-12)
  assert metrics[0]["grad_norm"] == pytest.approx(
    float(np.linalg.norm(np_grad(X0))), rel=1e-5
  )  # ‖g‖


def test_weight_decay_stays_out_of_the_perturbation_by_default(x64):
  wd, rho, lr = 0.3, 0.2, 0.1
  opt = sam_optax.unified_sam(optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr)), rho=rho)
  xs, _, _ = run(opt, 1, jnp.float64)
  g = np_grad(X0)
  g_s = np_grad(X0 + rho * g / np.linalg.norm(g))
  np.testing.assert_allclose(xs[0], X0 - lr * (g_s + wd * X0), rtol=1e-12)


def test_weight_decay_in_the_perturbation_opt_in(x64):
  wd, rho, lr = 0.3, 0.2, 0.1
  ascent = optax.chain(optax.add_decayed_weights(wd), sam_optax.unified_perturbation(rho))
  opt = sam_optax.sharpness_aware(ascent, optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr)))
  xs, _, _ = run(opt, 1, jnp.float64)
  g = np_grad(X0) + wd * X0
  g_s = np_grad(X0 + rho * g / np.linalg.norm(g))
  np.testing.assert_allclose(xs[0], X0 - lr * (g_s + wd * X0), rtol=1e-12)


# ------------------------------------------------ compilation, composition, errors


OPTIONS = {
  "interval": lambda: sam_optax.interval_sam(sam_sgd(rho=rho_schedule, lambd="1/t"), every=3),
  "looksam": lambda: sam_optax.looksam(sam_sgd(), every=2, alpha=0.7),
  "gsam": lambda: sam_optax.gsam(
    sam_sgd(
      rho=sam_optax.gsam_rho_schedule(optax.cosine_decay_schedule(0.1, 10), 0.1, 0.01, lr_max=0.1)
    ),
    alpha=0.2,
  ),
  "gsam_injected": lambda: optax.inject_hyperparams(sam_optax.gsam, static_args=("optimizer",))(
    sam_sgd(), alpha=0.2
  ),
  "asam_mask": lambda: sam_optax.sharpness_aware(
    sam_optax.unified_perturbation(0.5, adaptive=True, mask={"b": False, "w": True}), optax.sgd(0.1)
  ),
  "interval_gsam": lambda: sam_optax.interval_sam(sam_optax.gsam(sam_sgd(), 0.1), every=2),
  "scaled_looksam": lambda: sam_optax.dynamic_loss_scale(sam_optax.looksam(sam_sgd(), every=2)),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_no_recompilation_after_the_first_step(name):
  traces = []

  def loss(params, batch):
    traces.append(1)  # runs when traced only
    return quadratic(params, batch)

  opt = OPTIONS[name]()
  # One program (host_dispatch=False); the host-dispatched kinds: test_host_dispatch_*.
  step = sam_optax.sam_step(loss, opt, host_dispatch=False)  # donating, as in training
  params = to_params(X0, jnp.float32)
  # Fresh buffers: unified_perturbation's init shares one zero among three leaves,
  # which a donating step rejects once dynamic_loss_scale reads the old state.
  state = jax.tree.map(jnp.array, opt.init(params))
  params, state, _ = step(params, state, batch(jnp.float32))
  after_first = len(traces)
  assert after_first >= 2
  for _ in range(5):
    params, state, metrics = step(params, state, batch(jnp.float32))
  assert len(traces) == after_first
  assert step._cache_size() == 1
  assert np.isfinite(float(metrics["loss"]))


def test_loss_scaled_interval_sam_matches_unscaled():
  a, _, _ = run(
    sam_optax.dynamic_loss_scale(sam_optax.interval_sam(sam_sgd(), every=2), init_scale=2.0**10), 5
  )
  b, _, _ = run(sam_optax.interval_sam(sam_sgd(), every=2), 5)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_variant_errors():
  with pytest.raises(ValueError, match="`every` must be a positive int"):
    sam_optax.interval_sam(sam_sgd(), every=0)
  with pytest.raises(ValueError, match="`every` must be a positive int"):
    sam_optax.looksam(sam_sgd(), every=2.5)
  with pytest.raises(ValueError, match="`alpha`"):
    sam_optax.looksam(sam_sgd(), alpha=-0.1)
  with pytest.raises(ValueError, match="`alpha`"):
    sam_optax.gsam(sam_sgd(), alpha="big")
  with pytest.raises(TypeError, match="`optimizer` of interval_sam"):
    sam_optax.interval_sam(0.1)
  params = to_params(X0, jnp.float32)
  with pytest.raises(TypeError, match="no SAMState"):
    sam_optax.gsam(optax.sgd(0.1)).init(params)
  with pytest.raises(ValueError, match="Polyak step size"):
    sam_optax.interval_sam(sam_optax.sam_sps()).init(params)
  with pytest.raises(ValueError, match="Wrap dynamic_loss_scale around looksam"):
    sam_optax.looksam(sam_optax.dynamic_loss_scale(sam_sgd())).init(params)
  opt = sam_optax.interval_sam(sam_sgd(), every=2)
  with pytest.raises(ValueError, match="value_and_grad_fn"):
    opt.update(params, opt.init(params), params)
  with pytest.raises(ValueError, match="`rho_min` must be <= `rho_max`"):
    sam_optax.gsam_rho_schedule(0.1, 0.01, 0.1, lr_max=0.1)
  with pytest.raises(ValueError, match="`lr_min` must be <= `lr_max`"):
    sam_optax.gsam_rho_schedule(0.1, 0.1, lr_max=0.1, lr_min=0.2)


# ------------------------------------------------------------------ documentation


def test_docstring_examples():
  import doctest

  from sam_optax import _variants

  result = doctest.testmod(_variants, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0


def test_docs_examples_build_working_optimizers():
  import pathlib
  import re
  import textwrap

  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "variants.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert len(blocks) == 8
  for block in blocks:
    namespace = {
      "jax": jax,
      "jnp": jnp,
      "optax": optax,
      "sam_optax": sam_optax,
      "loss_fn": quadratic,
    }
    exec(textwrap.dedent(block), namespace)
    opt = namespace["opt"]
    params = to_params(X0, jnp.float32)
    step = sam_optax.sam_step(quadratic, opt, donate=False)
    state = opt.init(params)
    for _ in range(3):
      params, state, metrics = step(params, state, batch(jnp.float32))
    assert float(metrics["loss"]) < np_loss(X0)


def test_pmap_with_axis_name_matches_single_device():
  # The cond holds the perturbed pass and its pmean; the predicate is the same on every replica.
  opt = sam_optax.looksam(sam_sgd(), every=2, alpha=0.7)
  step = jax.pmap(sam_optax.sam_step(quadratic, opt, axis_name="d", jit=False), axis_name="d")
  replicate = lambda tree: jax.tree.map(lambda x: x[None], tree)
  params = to_params(X0, jnp.float32)
  pparams, pstate = replicate(params), replicate(opt.init(params))
  xs, _, _ = run(opt, 4)
  for t in range(4):
    pparams, pstate, _ = step(pparams, pstate, replicate(batch(jnp.float32)))
    np.testing.assert_allclose(to_vector(jax.tree.map(lambda x: x[0], pparams)), xs[t], rtol=1e-6)


# Host-side pass selection (sam_step(host_dispatch=...)): two compiled programs on CPU.


def _mlp_problem(traces=None):
  rng = np.random.default_rng(3)
  params = {
    "w1": jnp.asarray(rng.normal(size=(6, 8)) / 3, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(8, 1)) / 3, jnp.float32),
  }
  batch = (
    jnp.asarray(rng.normal(size=(16, 6)), jnp.float32),
    jnp.asarray(rng.normal(size=(16, 1)), jnp.float32),
  )

  def loss(p, b):
    if traces is not None:
      traces.append(1)  # runs once per trace, never per call of a compiled step
    return jnp.mean((jnp.tanh(b[0] @ p["w1"]) @ p["w2"] - b[1]) ** 2)

  return params, batch, loss


def _trajectory(opt, host_dispatch, steps=7, params=None, state=None, traces=None):
  p0, batch, loss = _mlp_problem(traces)
  params = p0 if params is None else params
  step = sam_optax.sam_step(loss, opt, donate=False, host_dispatch=host_dispatch)
  state = opt.init(params) if state is None else state
  out = []
  for _ in range(steps):
    params, state, m = step(params, state, batch)
    out.append((params, state, m, len(traces) if traces is not None else 0))
  return out


def _assert_trees_allclose(a, b, exact=False):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
  "make",
  [
    lambda: sam_optax.interval_sam(sam_optax.unified_sam(optax.sgd(0.1, momentum=0.9), 0.1), 3),
    lambda: sam_optax.looksam(sam_optax.unified_sam(optax.sgd(0.1, momentum=0.9), 0.1), 3, 0.7),
  ],
  ids=["interval_sam", "looksam"],
)
def test_host_dispatch_equals_the_cond_program_and_compiles_each_kind_once(make):
  traces = []
  host = _trajectory(make(), True, traces=traces)
  cond = _trajectory(make(), False)
  for (ph, sh, mh, _), (pc, sc, mc, _) in zip(host, cond):
    _assert_trees_allclose((ph, sh), (pc, sc))
    assert float(mh["perturbed_loss"]) == pytest.approx(float(mc["perturbed_loss"]), rel=1e-6)
  # Step 1 runs the single program (which finds the selector), steps 2 (skipped) and 4
  # (SAM) compile one program per kind; from then on nothing is traced again.
  assert host[3][3] > host[1][3] > host[0][3] > 0
  assert host[-1][3] == host[3][3]


def test_host_dispatch_resumes_mid_cycle_like_an_uninterrupted_run():
  make = lambda: sam_optax.interval_sam(sam_optax.unified_sam(optax.sgd(0.1), 0.1), 3)  # noqa: E731
  full = _trajectory(make(), True, steps=7)
  params, state, _, _ = _trajectory(make(), True, steps=2)[-1]
  # A checkpoint round trip: host copies, then fresh device arrays.
  params, state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), (params, state))
  rest = _trajectory(make(), True, steps=5, params=params, state=state)
  for (p, s, _, _), (q, t, _, _) in zip(full[2:], rest):
    _assert_trees_allclose((p, s), (q, t), exact=True)


def test_traced_every_falls_back_to_the_cond_program():
  opt = optax.inject_hyperparams(sam_optax.interval_sam)(
    sam_optax.unified_sam(optax.sgd(0.1), 0.1), every=3
  )
  injected = _trajectory(opt, True, steps=4)
  plain = _trajectory(
    sam_optax.interval_sam(sam_optax.unified_sam(optax.sgd(0.1), 0.1), 3), False, steps=4
  )
  for (p, _, m, _), (q, _, n, _) in zip(injected, plain):
    _assert_trees_allclose(p, q)
    assert float(m["perturbed_loss"]) == pytest.approx(float(n["perturbed_loss"]), rel=1e-6)
