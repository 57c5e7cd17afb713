"""sam_step: passes, metrics, donation, tracing, dtypes, skipping, errors (docs/contract.md §4, §8).

The optimizers' own math is tests/test_sam.py; dynamic_loss_scale is tests/test_loss_scale.py.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import sam_optax

from helpers import BATCH
from helpers import PARAMS
from helpers import assert_trees_close
from helpers import assert_trees_equal
from helpers import loss_fn
from helpers import run


def test_sam_step_metrics():
  opt = sam_optax.unified_sam(optax.sgd(0.1), rho=0.1, lambd="1-1/t")
  _, _, hist = run(opt, steps=2)
  m = hist[1]
  assert set(m) == {"loss", "perturbed_loss", "sharpness", "grad_norm", "lambda", "rho", "finite"}
  assert float(m["lambda"]) == pytest.approx(0.5)
  assert float(m["rho"]) == pytest.approx(0.1)
  assert float(m["sharpness"]) == pytest.approx(float(m["perturbed_loss"] - m["loss"]))
  assert float(m["sharpness"]) > 0  # ascent increases the loss on this problem
  # the reported clean loss and gradient norm are those at the step's starting point
  p1 = run(opt, steps=1)[0]
  assert float(m["loss"]) == pytest.approx(float(loss_fn(p1, BATCH)), rel=1e-6)
  assert float(m["grad_norm"]) == pytest.approx(
    float(optax.tree.norm(jax.grad(loss_fn)(p1, BATCH))), rel=1e-5
  )


def test_plain_optax_loop_equals_sam_step():
  opt = sam_optax.sam_sps(rho=0.1, lambd=0.5, weight_decay=5e-4)
  ours, _, _ = run(opt, steps=3)
  p, s = PARAMS, opt.init(PARAMS)
  for _ in range(3):
    g = jax.grad(loss_fn)(p, BATCH)
    u, s = opt.update(g, s, p, value_and_grad_fn=lambda q: jax.value_and_grad(loss_fn)(q, BATCH))
    p = optax.apply_updates(p, u)
  assert_trees_close(ours, p)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_preserved_through_sam_step(dtype):
  params = {"w": PARAMS["w"].astype(dtype), "b": PARAMS["b"].astype(jnp.float32)}  # mixed pytree

  def loss(p, batch):
    a, y = batch
    pred = jnp.tanh(a.astype(dtype) @ p["w"]).astype(jnp.float32) + p["b"]
    return 0.5 * jnp.mean((pred - y) ** 2)

  for opt in [sam_optax.unified_sam(optax.sgd(0.1, 0.9), 0.05, "1-1/t"), sam_optax.sam_sps(0.05)]:
    p, state, hist = run(opt, steps=3, params=params, loss=loss)
    assert p["w"].dtype == dtype and p["b"].dtype == jnp.float32
    assert hist[-1]["grad_norm"].dtype == jnp.float32
    assert float(hist[-1]["loss"]) < float(hist[0]["loss"])
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves((p, state)))


def test_checkpoint_round_trip_continues_bit_identically():
  opt = sam_optax.unified_sam(optax.sgd(0.1, momentum=0.9), rho=0.05, lambd="1-1/t")
  step = sam_optax.sam_step(loss_fn, opt, donate=False)
  p, s = PARAMS, opt.init(PARAMS)
  for _ in range(3):
    p, s, _ = step(p, s, BATCH)
  blob = serialization.to_bytes({"params": p, "opt_state": s})
  restored = serialization.from_bytes({"params": PARAMS, "opt_state": opt.init(PARAMS)}, blob)
  p2, s2 = restored["params"], restored["opt_state"]
  for _ in range(3):
    p, s, _ = step(p, s, BATCH)
    p2, s2, _ = step(p2, s2, BATCH)
  assert_trees_equal((p, s), (p2, s2))
  assert int(sam_optax.find_state(s2, sam_optax.UnifiedPerturbationState).count) == 6


def test_donation_by_default_consumes_inputs():
  opt = sam_optax.unified_sam(optax.sgd(0.1), 0.05)
  step = sam_optax.sam_step(loss_fn, opt)
  params = jax.tree.map(jnp.array, PARAMS)
  new, _, _ = step(params, opt.init(params), BATCH)
  assert params["w"].is_deleted() and not new["w"].is_deleted()


def test_each_pass_traces_the_loss_once_and_no_recompilation():
  calls = []

  def counted(params, batch):
    calls.append(1)
    return loss_fn(params, batch)

  for opt in [sam_optax.unified_sam(optax.sgd(0.1, 0.9), 0.05, "1-1/t"), sam_optax.sam_sps(0.05)]:
    calls.clear()
    step = sam_optax.sam_step(counted, opt, donate=False)
    p, s = PARAMS, opt.init(PARAMS)
    for _ in range(4):
      p, s, _ = step(p, s, BATCH)
    assert len(calls) == 2  # one clean and one perturbed forward+backward, traced once
    assert step._cache_size() == 1  # no recompilation across steps


@pytest.mark.parametrize(
  "make_opt",
  [
    lambda: sam_optax.sam_sps(0.05, lambd=0.5),
    lambda: sam_optax.interval_sam(sam_optax.unified_sam(optax.sgd(0.1), 0.05), every=2),
  ],
  ids=["sam_sps", "interval_sam"],
)
def test_eager_step_compiles_nothing_after_its_first_steps(make_opt, caplog):
  """jit=False: the overflow-safe norms, the finiteness checks and interval SAM's choice of
  pass run the branch a concrete predicate picks (a lax.cond would compile its fresh
  closures again on every call), and equal the compiled step."""
  opt = make_opt()
  steps = (
    sam_optax.sam_step(loss_fn, opt, jit=False),
    sam_optax.sam_step(loss_fn, opt, donate=False, host_dispatch=False),
  )
  states = [(PARAMS, opt.init(PARAMS))] * 2

  def two_steps():  # interval SAM: a SAM step, then a skipped one
    for _ in range(2):
      (p, s, m), (pc, sc, mc) = [step(*state, BATCH) for step, state in zip(steps, states)]
      assert_trees_close((p, s, m), (pc, sc, mc), rtol=1e-6, atol=1e-6)
      states[:] = [(p, s), (pc, sc)]

  two_steps()
  caplog.clear()
  with jax.log_compiles(True):
    two_steps()
  assert [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()] == []


def _call_step(loss, **kwargs):
  """A thunk that builds `sam_step(loss, unified_sam(sgd))` and runs one step."""

  def call():
    opt = sam_optax.unified_sam(optax.sgd(0.1), 0.05)
    return sam_optax.sam_step(loss, opt, donate=False, **kwargs)(PARAMS, opt.init(PARAMS), BATCH)

  return call


@pytest.mark.parametrize(
  "call, error, match",
  [
    pytest.param(
      _call_step(lambda p, batch: (batch[0] @ p["w"]) ** 2),
      TypeError,
      "must return a scalar loss",
      id="vector_loss",
    ),
    pytest.param(
      _call_step(lambda p, batch: (loss_fn(p, batch), 1.0)),
      TypeError,
      "did you mean has_aux=True",
      id="pair_without_has_aux",
    ),
    pytest.param(
      _call_step(loss_fn, has_aux=True),
      TypeError,
      r"must return a pair \(loss, aux\)",
      id="has_aux_without_pair",
    ),
    pytest.param(
      lambda: sam_optax.sam_step(loss_fn, sam_optax.unified_sam(optax.sgd(0.1)), ascent="async"),
      ValueError,
      "`ascent` must be one of",
      id="unknown_ascent",
    ),
  ],
)
def test_bad_inputs_are_refused_with_a_message(call, error, match):
  with pytest.raises(error, match=match):
    call()


# --- skip_nonfinite: an inf the state holds on purpose is not a non-finite step (§8) ------------


class SentinelState(NamedTuple):
  count: jax.Array  # int32
  best: jax.Array  # float32, inf until set: a non-finite value on purpose
  trace: jax.Array  # float32, finite from the start


def sentinel_sgd(lr, best_after, trace_after):
  """SGD whose state holds an inf from init; the new entries are `best_after(best)` etc."""

  def init(params):
    del params
    return SentinelState(
      jnp.zeros([], jnp.int32), jnp.asarray(jnp.inf, jnp.float32), jnp.zeros([], jnp.float32)
    )

  def update(updates, state, params=None):
    del params
    new = SentinelState(state.count + 1, best_after(state.best), trace_after(state.trace))
    return jax.tree.map(lambda g: -lr * g, updates), new

  return optax.GradientTransformation(init, update)


def _one_step(base, two_pass, skip_nonfinite=True):
  opt = sam_optax.unified_sam(base, rho=0.05, lambd=1.0) if two_pass else base
  step = sam_optax.sam_step(loss_fn, opt, donate=False, skip_nonfinite=skip_nonfinite)
  state = opt.init(PARAMS)
  return state, step(PARAMS, state, BATCH)


@pytest.mark.parametrize("two_pass", [False, True], ids=["one_pass", "two_pass"])
@pytest.mark.parametrize(
  "best_after, expected_best",
  [
    pytest.param(lambda b: b, jnp.inf, id="inf_kept"),
    pytest.param(lambda b: -b, -jnp.inf, id="inf_to_minus_inf"),
    pytest.param(lambda b: 0.0 * b, jnp.nan, id="inf_to_nan"),
    pytest.param(lambda b: jnp.minimum(b, 2.0), 2.0, id="inf_to_finite"),
  ],
)
def test_step_with_an_inf_held_on_purpose_is_taken(two_pass, best_after, expected_best):
  base = sentinel_sgd(0.1, best_after, lambda t: t + 1.0)
  _, (params, state, metrics) = _one_step(base, two_pass)
  assert bool(metrics["finite"])
  reference = sam_optax.unified_sam(optax.sgd(0.1), 0.05, 1.0) if two_pass else optax.sgd(0.1)
  assert_trees_close(params, run(reference, steps=1)[0])
  assert not np.allclose(params["w"], PARAMS["w"])
  expected = SentinelState(
    jnp.asarray(1, jnp.int32), jnp.asarray(expected_best, jnp.float32), jnp.asarray(1.0)
  )
  assert_trees_equal(sam_optax.find_state(state, SentinelState), expected)  # NaN == NaN here


@pytest.mark.parametrize("two_pass", [False, True], ids=["one_pass", "two_pass"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf], ids=["finite_to_nan", "finite_to_inf"])
def test_step_that_turns_a_finite_state_entry_non_finite_is_skipped(two_pass, bad):
  base = sentinel_sgd(0.1, lambda b: b, lambda t: t + bad)
  state0, (params, state, metrics) = _one_step(base, two_pass)
  assert not bool(metrics["finite"])
  assert_trees_equal(params, PARAMS)
  assert_trees_equal(state, state0)  # the whole state, counters included
  # The update itself was finite: without skipping, the step moves and poisons the state.
  _, (moved, poisoned, unchecked) = _one_step(base, two_pass, skip_nonfinite=False)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(moved))
  assert not np.allclose(moved["w"], PARAMS["w"])
  assert not np.isfinite(float(sam_optax.find_state(poisoned, SentinelState).trace))
  assert bool(unchecked["finite"])  # the loss, gradients and f(e) were finite


# --- The finite metric covers both passes; the skip is opt-in (§8) ------------------------------

# f(w) = -Σ √w at w = 1: g = -0.5, and USAM (λ = 0) with ρ = 2 puts e at 0, where f(e) = 0 is
# finite but ∇f(e) = -inf.
SQRT_LOSS = lambda p, b: -jnp.sum(jnp.sqrt(p["w"]))  # noqa: E731
SQRT_PARAMS = {"w": jnp.ones(1)}


def _sqrt_step(opt, **options):
  step = sam_optax.sam_step(SQRT_LOSS, opt, donate=False, **options)
  return step(SQRT_PARAMS, opt.init(SQRT_PARAMS), None)


def test_a_non_finite_perturbed_gradient_is_reported_and_propagates_by_default():
  params, _, metrics = _sqrt_step(sam_optax.unified_sam(optax.sgd(0.1), rho=2.0, lambd=0.0))
  assert not bool(metrics["finite"])
  assert np.isnan(float(metrics["perturbed_loss"]))  # f(e) = 0, reported as NaN: ∇f(e) = -inf
  assert float(params["w"][0]) == np.inf  # x - 0.1·(-inf): optax's usual behaviour
  params, state, metrics = _sqrt_step(
    sam_optax.unified_sam(optax.sgd(0.1), rho=2.0, lambd=0.0), skip_nonfinite=True
  )
  assert not bool(metrics["finite"])
  assert_trees_equal(params, SQRT_PARAMS)
  assert int(sam_optax.find_state(state, sam_optax.UnifiedPerturbationState).count) == 0


def test_sam_sps_reports_a_non_finite_perturbed_gradient_it_does_not_move_on():
  # γ_t = 0 maps ∇f(e) = -inf to a finite update, x stays; the step still says it was not
  # finite (before: finite = True, since only the update and f(e) were checked).
  params, _, metrics = _sqrt_step(sam_optax.sam_sps(rho=2.0, lambd=0.0))
  assert float(metrics["step_size"]) == 0.0
  assert_trees_equal(params, SQRT_PARAMS)
  assert not bool(metrics["finite"])


def test_apply_if_finite_around_sam_skips_a_non_finite_perturbed_pass():
  # apply_if_finite sees only the (finite) clean gradient; sam_step turns its guard on.
  opt = optax.apply_if_finite(sam_optax.unified_sam(optax.sgd(0.1), rho=2.0, lambd=0.0), 3)
  state0 = opt.init(SQRT_PARAMS)
  params, state, metrics = sam_optax.sam_step(SQRT_LOSS, opt, donate=False)(
    SQRT_PARAMS, state0, None
  )
  assert not bool(metrics["finite"])
  assert_trees_equal(params, SQRT_PARAMS)
  assert_trees_equal(state, state0)


def test_rarely_taken_branches_reserve_no_parameter_sized_buffer():
  """XLA reserves a branch's temporaries whether or not the branch runs, so the overflow
  fallbacks and the exact finiteness tests reduce in slices: sam_step's temporaries stay
  within one slice of the hand-written step's (before: + one parameter-sized buffer for
  SAM-SPS, + a quarter of one for SAM)."""
  params = {"w": jnp.full((2048, 1024), 0.001)}  # 8 MiB: reduced in 16 slices
  batch = (jnp.ones((8, 2048)), jnp.ones((8, 1024)))
  loss = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)  # noqa: E731
  grad_fn = jax.value_and_grad(loss)
  rho, lr, wd = 0.05, 0.1, 5e-4

  def ascent(p, b):
    value, g = grad_fn(p, b)
    delta = jax.tree.map(lambda x: rho * x / optax.tree.norm(g), g)
    return delta, grad_fn(optax.apply_updates(p, delta), b)

  def hand_sam(p, state, b):
    _, (_, g_e) = ascent(p, b)
    u, state = optax.sgd(lr, momentum=0.9).update(g_e, state, p)
    return optax.apply_updates(p, u), state

  def hand_sam_sps(p, state, b):
    delta, (value, g_e) = ascent(p, b)
    ratio = (value - optax.tree.vdot(g_e, delta)) / optax.tree.norm(g_e, squared=True)
    gamma = jnp.clip(ratio, 0.0, 1.0)
    return jax.tree.map(lambda x, g: x - gamma * (g + wd * x), p, g_e), state

  def temporaries(fn, state):
    compiled = fn.lower(params, state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  param_bytes = 2048 * 1024 * 4
  for opt, hand in [
    (sam_optax.unified_sam(optax.sgd(lr, momentum=0.9), rho=rho), hand_sam),
    (sam_optax.sam_sps(rho=rho, lambd=1.0, weight_decay=wd), hand_sam_sps),
  ]:
    hand_state = optax.sgd(lr, momentum=0.9).init(params) if hand is hand_sam else ()
    ours = temporaries(sam_optax.sam_step(loss, opt), opt.init(params))
    floor = temporaries(jax.jit(hand, donate_argnums=(0, 1)), hand_state)
    assert ours <= floor + param_bytes // 6, (ours, floor)  # a slice is 1/16
