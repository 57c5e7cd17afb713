"""What the default step's finiteness checks cost on a memory-bound model (diagnostic).

The MLP of ``benchmarks.step_time`` (1.8M parameters, batch 128, SGD with momentum and
weight decay, SAM with λ = 1): a hand-written jit SAM step, and ``sam_step`` three ways:
as shipped; without the check of ∇f(e) behind the ``finite`` metric; without any
finiteness check (both patched out of ``sam_optax._protocol`` while the step is traced).
Rounds are interleaved (the first variant rotates) and timed in process CPU time; a
ratio is the median over rounds of the per-round ratio to the hand-written step.

Run: ``taskset -c 1 python benchmarks/check_cost.py 150`` (rounds; about 3 minutes).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax import _protocol

RHO = 0.05


def problem():
  k = jax.random.split(jax.random.key(0), 4)
  params = {
    "w1": jax.random.normal(k[0], (3072, 512)) * 0.02,
    "w2": jax.random.normal(k[1], (512, 512)) * 0.04,
    "w3": jax.random.normal(k[2], (512, 10)) * 0.04,
  }
  batch = (jax.random.normal(k[3], (128, 3072)), jnp.zeros((128,), jnp.int32))

  def loss(p, b):
    h = jax.nn.relu(jax.nn.relu(b[0] @ p["w1"]) @ p["w2"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w3"], b[1]).mean()

  return params, batch, loss


def as_float(value):
  value = jnp.asarray(value)
  return value.astype(jnp.promote_types(value.dtype, jnp.float32))


PATCHES = {
  "sam_step": {},
  "sam_step_no_grad_e_check": {"nan_unless_finite": lambda value, grads: as_float(value)},
  "sam_step_no_checks": {
    "nan_unless_finite": lambda value, grads: as_float(value),
    "all_finite": lambda tree: jnp.array(True),
  },
}


def main(rounds: int) -> None:
  params, batch, loss = problem()
  base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  opt = sam_optax.unified_sam(base, RHO, 1.0)

  def hand(p, s, b):
    g = jax.grad(loss)(p, b)
    scale = RHO / (optax.tree.norm(g) + 1e-12)
    ge = jax.grad(loss)(jax.tree.map(lambda a, gi: a + scale * gi, p, g), b)
    u, s = base.update(ge, s, p)
    return optax.apply_updates(p, u), s, 0

  steps = {"hand_written_sam": jax.jit(hand, donate_argnums=(0, 1))}
  states = {"hand_written_sam": [jax.tree.map(jnp.copy, params), base.init(params)]}
  originals = {name: getattr(_protocol, name) for name in ("nan_unless_finite", "all_finite")}
  for name, patch in PATCHES.items():
    for attr, fn in patch.items():
      setattr(_protocol, attr, fn)
    steps[name] = sam_optax.sam_step(loss, opt)
    p = jax.tree.map(jnp.copy, params)
    states[name] = [p, opt.init(p)]
    for _ in range(2):  # traced (with the patch) and warmed up
      states[name] = list(steps[name](*states[name], batch)[:2])
    for attr, fn in originals.items():
      setattr(_protocol, attr, fn)
  for _ in range(2):
    states["hand_written_sam"] = list(
      steps["hand_written_sam"](*states["hand_written_sam"], batch)[:2]
    )
  jax.block_until_ready(states)

  names = list(steps)
  samples = {n: [] for n in names}
  for r in range(rounds):
    for n in names[r % len(names) :] + names[: r % len(names)]:
      start = time.process_time()
      for _ in range(3):
        states[n] = list(steps[n](*states[n], batch)[:2])
      jax.block_until_ready(states[n])
      samples[n].append(time.process_time() - start)
  for n in names:
    ratio = np.array(samples[n]) / np.array(samples["hand_written_sam"])
    p25, median, p75 = np.percentile(ratio, [25, 50, 75])
    print(
      f"{n:26s} {1e3 * np.median(samples[n]) / 3:7.2f} ms/step  "
      f"× hand-written {median:.3f} [{p25:.3f}–{p75:.3f}]"
    )


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
