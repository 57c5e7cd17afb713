"""The training steps being compared: one place that builds every JAX variant.

Every variant takes the same model, batch, dtype, base optimizer (PyTorch's
``SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)``) and ρ, is jit-compiled and
donates its parameters and optimizer state, exactly as a user would run it.
``step_time.py`` times them and ``memory.py`` reads their compiled memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import sam_optax

LR, MOMENTUM, WEIGHT_DECAY, RHO = 0.1, 0.9, 5e-4, 0.05


def base_optimizer() -> optax.GradientTransformation:
  """torch.optim.SGD(lr, momentum, weight_decay): coupled L2, then heavy-ball momentum."""
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))


@dataclasses.dataclass
class Variant:
  """One way of taking a training step.

  ``jitted(*args)`` is the compiled function a user calls; ``args(state)``
  builds its arguments from the carried state ``(params, opt_state,
  batch_stats)`` and ``carry(outputs)`` extracts the next state. One optimizer
  step is ``calls_per_step`` calls (2 for optax.contrib.sam's default mode).
  """

  name: str
  label: str
  passes: int  # forward/backward passes per optimizer step
  jitted: Callable[..., Any]
  init_state: Callable[[Any], Any]  # params -> opt_state
  args: Callable[[tuple, Any], tuple]
  carry: Callable[[tuple], tuple]
  calls_per_step: int = 1

  def fresh_state(self, params: Any, batch_stats: Any) -> tuple:
    # Own copies: every call donates params and opt_state, which must not be shared.
    params = jax.tree.map(jnp.copy, params)
    batch_stats = jax.tree.map(jnp.copy, batch_stats)
    return params, self.init_state(params), batch_stats

  def step(self, state: tuple, batch: Any) -> tuple:
    for _ in range(self.calls_per_step):
      state = self.carry(self.jitted(*self.args(state, batch)))
    return state


def _plain_args(state, batch):
  params, opt_state, batch_stats = state
  return params, opt_state, batch, batch_stats


def _plain_carry(out):
  params, opt_state, batch_stats, _ = out
  return params, opt_state, batch_stats


def _sam_step_carry(out):
  params, opt_state, _, batch_stats = out  # sam_step returns (params, state, metrics, aux)
  return params, opt_state, batch_stats


def _jit(fn):
  return jax.jit(fn, donate_argnums=(0, 1))


def sgd(loss_fn) -> Variant:
  """The base optimizer alone, through sam_step's one-pass path (what a user A/B-tests)."""
  tx = base_optimizer()
  step = sam_optax.sam_step(loss_fn, tx, has_aux=True)
  return Variant("sgd", "SGD (one pass, sam_step)", 1, step, tx.init, _plain_args, _sam_step_carry)


def hand_written_sam(loss_fn) -> Variant:
  """SAM written out by hand in one jit: the floor for any two-pass step."""
  tx = base_optimizer()
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(params, opt_state, batch, batch_stats):
    (loss, new_batch_stats), grads = grad_fn(params, batch, batch_stats)
    scale = RHO / (optax.tree.norm(grads) + 1e-12)
    perturbed = jax.tree.map(lambda p, g: p + scale * g, params, grads)
    _, perturbed_grads = grad_fn(perturbed, batch, batch_stats)
    updates, opt_state = tx.update(perturbed_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_batch_stats, loss

  return Variant(
    "hand_written_sam",
    "hand-written SAM (two passes, jit)",
    2,
    _jit(step),
    tx.init,
    _plain_args,
    _plain_carry,
  )


def hand_written_sam_sps(loss_fn) -> Variant:
  """SAM-SPS (λ = 1, f* = 0, γ_b = 1) written out by hand in one jit: SAM-SPS's own floor.

  It needs more than SAM's floor: ⟨∇f(e), δ⟩ and ‖∇f(e)‖² are two reductions
  over all parameters that must finish before the update can start.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(params, opt_state, batch, batch_stats):
    (loss, new_batch_stats), grads = grad_fn(params, batch, batch_stats)
    scale = RHO / (optax.tree.norm(grads) + 1e-12)
    delta = jax.tree.map(lambda g: scale * g, grads)
    (perturbed_loss, _), perturbed_grads = grad_fn(
      optax.apply_updates(params, delta), batch, batch_stats
    )
    ratio = (perturbed_loss - optax.tree.vdot(perturbed_grads, delta)) / jnp.maximum(
      optax.tree.norm(perturbed_grads, squared=True), 1e-12
    )
    gamma = jnp.clip(ratio, 0.0, 1.0)
    params = jax.tree.map(lambda x, g: x - gamma * (g + WEIGHT_DECAY * x), params, perturbed_grads)
    return params, opt_state, new_batch_stats, loss

  return Variant(
    "hand_written_sam_sps",
    "hand-written SAM-SPS (two passes, jit)",
    2,
    _jit(step),
    lambda params: (),
    _plain_args,
    _plain_carry,
  )


def sam_step(loss_fn, name: str, label: str, optimizer, **options) -> Variant:
  step = sam_optax.sam_step(loss_fn, optimizer, has_aux=True, **options)  # jit + donation
  return Variant(name, label, 2, step, optimizer.init, _plain_args, _sam_step_carry)


def microbatch_variants(loss_fn, ks=(1, 2, 4)) -> list[Variant]:
  """sam_step + unified_sam(λ=1) with ``microbatches=k`` (exact accumulation), for memory."""
  opt = lambda: sam_optax.unified_sam(base_optimizer(), rho=RHO, lambd=1.0)  # noqa: E731
  return [
    sam_step(
      loss_fn,
      f"sam_step_microbatches_{k}",
      f"sam_step + SAM, microbatches={k}",
      opt(),
      microbatches=k,
    )
    for k in ks
  ]


def _contrib_sam(opaque: bool):
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
  return optax.contrib.sam(base_optimizer(), adversary, sync_period=2, opaque_mode=opaque)


def optax_contrib_sam_opaque(loss_fn) -> Variant:
  """optax.contrib.sam(opaque_mode=True): the mode its docs prescribe for batch norm."""
  tx = _contrib_sam(opaque=True)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(params, opt_state, batch, batch_stats):
    (loss, new_batch_stats), grads = grad_fn(params, batch, batch_stats)
    adv_grad = jax.grad(lambda p, _: loss_fn(p, batch, batch_stats)[0])
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=adv_grad)
    return optax.apply_updates(params, updates), opt_state, new_batch_stats, loss

  return Variant(
    "optax_contrib_sam_opaque",
    "optax.contrib.sam, opaque_mode=True (one call)",
    2,
    _jit(step),
    tx.init,
    _plain_args,
    _plain_carry,
  )


def optax_contrib_sam_transparent(loss_fn) -> Variant:
  """optax.contrib.sam's default mode: every update is one pass, so a SAM step is two calls."""
  tx = _contrib_sam(opaque=False)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(params, opt_state, batch, batch_stats):
    (loss, batch_stats), grads = grad_fn(params, batch, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, batch_stats, loss

  # Its state caches the parameters; a copy, or donating both would donate one buffer twice.
  init = lambda params: tx.init(jax.tree.map(jnp.copy, params))
  return Variant(
    "optax_contrib_sam",
    "optax.contrib.sam, default mode (two calls)",
    2,
    _jit(step),
    init,
    _plain_args,
    _plain_carry,
    calls_per_step=2,
  )


REQUIRED = ("sgd", "hand_written_sam")  # every ratio is taken to one of these
# The opt-in non-finite guard: reported beside the default step, not held to the 3% floor.
GUARDED = "sam_step_unified_l1_skip_nonfinite"
# The hand-written step of the same algorithm: the floor a sam_step variant is held to.
FLOOR = {"sam_step_sam_sps": "hand_written_sam_sps"}


def all_variants(loss_fn, only: list[str] | None = None) -> list[Variant]:
  """SGD, the hand-written floors, sam_step (four optimizers, SAM also with the non-finite
  guard), optax.contrib.sam (two modes).

  ``only`` keeps the named variants (plus the two references of the ratios).
  """
  u = lambda lambd: sam_optax.unified_sam(base_optimizer(), rho=RHO, lambd=lambd)
  variants = [
    sgd(loss_fn),
    hand_written_sam(loss_fn),
    sam_step(loss_fn, "sam_step_unified_l1", "sam_step + unified_sam(λ=1) (SAM)", u(1.0)),
    sam_step(
      loss_fn,
      GUARDED,
      "sam_step + unified_sam(λ=1), skip_nonfinite=True",
      u(1.0),
      skip_nonfinite=True,
    ),
    sam_step(loss_fn, "sam_step_unified_l0", "sam_step + unified_sam(λ=0) (USAM)", u(0.0)),
    sam_step(loss_fn, "sam_step_unified_1-1/t", 'sam_step + unified_sam(λ="1-1/t")', u("1-1/t")),
    hand_written_sam_sps(loss_fn),
    sam_step(
      loss_fn,
      "sam_step_sam_sps",
      "sam_step + sam_sps(λ=1)",
      sam_optax.sam_sps(rho=RHO, lambd=1.0, gamma_b=1.0, weight_decay=WEIGHT_DECAY),
    ),
    optax_contrib_sam_opaque(loss_fn),
    optax_contrib_sam_transparent(loss_fn),
  ]
  if only is None:
    return variants
  unknown = set(only) - {v.name for v in variants}
  if unknown:
    raise ValueError(f"`variants`: unknown {sorted(unknown)}; known: {[v.name for v in variants]}")
  keep = set(only) | set(REQUIRED) | {FLOOR[n] for n in only if n in FLOOR}
  return [v for v in variants if v.name in keep]
