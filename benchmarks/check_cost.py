"""What the default step's finiteness checks cost on a memory-bound model (diagnostic).

The MLP of ``benchmarks.step_time`` (1.8M parameters, batch 128, its base optimizer,
SAM with λ = 1; the same builders, ``_models`` and ``_steps``): the hand-written jit SAM
step, and ``sam_step`` five ways: as shipped; with the check of ∇f(e) behind the
``finite`` metric in two other forms (a sum of squares without the exact fallback's
``lax.cond``; a plain sum with it); without that check; without any finiteness check
(patched in ``sam_optax._protocol`` while the step is traced).
Rounds are interleaved (the first variant rotates) and timed in process CPU time; a
ratio is the median over rounds of the per-round ratio to the hand-written step.

Run: ``taskset -c 1 python -m benchmarks.check_cost 300`` (rounds; about 3 minutes).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import sam_optax
from benchmarks import _models
from benchmarks import _steps
from sam_optax import _common
from sam_optax import _protocol


def _as_float(value):
  value = jnp.asarray(value)
  return value.astype(jnp.promote_types(value.dtype, jnp.float32))


def _finite_by(reduce):
  """A ``nan_unless_finite`` whose check is ``isfinite(reduce(float leaves))``."""

  def nan_unless_finite(value, grads):
    leaves = [x for x in jax.tree.leaves(grads) if _protocol.is_floating(x)]
    return jnp.where(jnp.isfinite(reduce(leaves)), _as_float(value), jnp.nan)

  return nan_unless_finite


def _sum_of_squares(leaves):
  return _common.tree_sum_of_squares(leaves, _common.accumulation_dtype(leaves))


def _plain_sum_with_fallback(leaves):
  total = sum(jnp.sum(x.astype(_common.accumulation_dtype(leaves))) for x in leaves)
  exact = lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))  # noqa: E731
  ok = jax.lax.cond(jnp.isfinite(total), lambda _: jnp.array(True), exact, leaves)
  return jnp.where(ok, 0.0, jnp.nan)


PATCHES = {
  "sam_step": {},
  "sam_step_grad_e_sumsq_no_cond": {"nan_unless_finite": _finite_by(_sum_of_squares)},
  "sam_step_grad_e_sum_with_cond": {"nan_unless_finite": _finite_by(_plain_sum_with_fallback)},
  "sam_step_no_grad_e_check": {"nan_unless_finite": lambda value, grads: _as_float(value)},
  "sam_step_no_checks": {
    "nan_unless_finite": lambda value, grads: _as_float(value),
    "all_finite": lambda tree: jnp.array(True),
  },
}


def main(rounds: int) -> None:
  _, params, batch_stats, batch, loss_fn = _models.make_problem("mlp")
  sam = lambda: sam_optax.unified_sam(_steps.base_optimizer(), rho=_steps.RHO, lambd=1.0)  # noqa: E731
  variants = {"hand_written_sam": _steps.hand_written_sam(loss_fn)}
  states = {}
  originals = {name: getattr(_protocol, name) for name in ("nan_unless_finite", "all_finite")}
  for name in PATCHES:
    variants[name] = _steps.sam_step(loss_fn, name, name, sam())
  for name, variant in variants.items():
    for attr, fn in PATCHES.get(name, {}).items():
      setattr(_protocol, attr, fn)
    state = variant.fresh_state(params, batch_stats)
    for _ in range(2):  # traced (with the patch) and warmed up
      state = jax.block_until_ready(variant.step(state, batch))
    states[name] = state
    for attr, fn in originals.items():
      setattr(_protocol, attr, fn)

  names = list(variants)
  samples = {n: [] for n in names}
  for r in range(rounds):
    for n in names[r % len(names) :] + names[: r % len(names)]:
      start = time.process_time()
      state = states[n]
      for _ in range(3):
        state = variants[n].step(state, batch)
      states[n] = jax.block_until_ready(state)
      samples[n].append(time.process_time() - start)
  for n in names:
    ratio = np.array(samples[n]) / np.array(samples["hand_written_sam"])
    p25, median, p75 = np.percentile(ratio, [25, 50, 75])
    print(
      f"{n:30s} {1e3 * np.median(samples[n]) / 3:7.2f} ms/step  "
      f"× hand-written {median:.3f} [{p25:.3f}–{p75:.3f}]"
    )


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
