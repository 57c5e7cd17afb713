"""Why interval SAM / LookSAM are slow on CPU with convolutions: a conv gradient in `lax.cond`.

Times the weight gradient of one 3×3 convolution (batch 64, 16×16×32, NHWC) compiled at top
level and inside a `lax.cond` branch, in one process. On XLA:CPU the second is tens of times
slower (jax-ml/jax#12868); run it on a GPU to see that the gap is CPU-specific.

    python3 benchmarks/cond_conv_cpu.py
"""

import statistics
import time

import jax
import jax.numpy as jnp


def main(repeats: int = 5) -> dict:
  x = jnp.ones((64, 16, 16, 32))
  w = jnp.ones((3, 3, 32, 32)) * 0.01

  def loss(w, x):
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(y**2)

  grad = jax.grad(loss)
  variants = {
    "top level": (jax.jit(grad), (w, x)),
    "inside lax.cond": (
      jax.jit(lambda w, x, p: jax.lax.cond(p, grad, lambda w, x: jnp.zeros_like(w), w, x)),
      (w, x, True),
    ),
  }
  times = {name: [] for name in variants}
  for fn, args in variants.values():
    jax.block_until_ready(fn(*args))  # compile outside the timed region
  for _ in range(repeats):  # interleaved, so both see the same machine load
    for name, (fn, args) in variants.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(1e3 * (time.perf_counter() - start))
  result = {name: statistics.median(t) for name, t in times.items()}
  print(f"device: {jax.devices()[0].device_kind}")
  for name, ms in result.items():
    print(
      f"{name:16s} median {ms:8.2f} ms  (min {min(times[name]):.2f}, max {max(times[name]):.2f})"
    )
  print(f"ratio cond / top level: {result['inside lax.cond'] / result['top level']:.1f}x")
  return result


if __name__ == "__main__":
  main()
