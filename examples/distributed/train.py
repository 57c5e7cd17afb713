r"""Data-parallel SAM across processes with ``jax.distributed`` (one process per host).

Every process runs this script with its own ``--process-id``; process 0 also hosts
the coordinator. All devices of all processes form one mesh axis ``data``: the
parameters and optimizer state are replicated, each process feeds its slice of
every global batch, and ``sam_optax.sam_step`` under ``jax.jit`` averages the
gradients over all of them (``--ascent local`` perturbs each device with its own
gradient instead: m-sharpness through ``jax.shard_map``).

Here the "hosts" are CPU processes on 127.0.0.1 talking through gloo; on GPU/TPU
hosts the same script runs unchanged with the real coordinator address (drop
``--local-devices``). Start all processes with ``launch.py``, or by hand::

  python -m examples.distributed.train --num-processes 2 --process-id 0 &
  python -m examples.distributed.train --num-processes 2 --process-id 1

``--num-processes 1`` runs without ``jax.distributed`` (the single-process
reference on the same global batches). Process 0 writes the final parameters
and the loss history to ``--out`` (``.npz``).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

FEATURES, HIDDEN, CLASSES = 16, 32, 4


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--coordinator", default="127.0.0.1:12355", help="host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument(
    "--local-devices", type=int, default=1, help="CPU devices per process (ignored on GPU/TPU)"
  )
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--global-batch", type=int, default=64)
  parser.add_argument("--ascent", choices=("sync", "local"), default="sync")
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--lambd", default="1-1/t", help='a float, "1/t" or "1-1/t"')
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--timeout", type=int, default=60, help="seconds to wait for all processes to join"
  )
  parser.add_argument(
    "--heartbeat-timeout",
    type=int,
    default=10,
    help="seconds without a heartbeat after which a process counts as dead",
  )
  parser.add_argument("--out", default=None, help="where process 0 writes the result (.npz)")
  args = parser.parse_args(argv)
  if not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
  try:
    args.lambd = float(args.lambd)
  except ValueError:
    pass
  return args


def make_data(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """A fixed synthetic classification set (the same on every process)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(size, FEATURES)).astype(np.float32)
  teacher = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
  y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(size, CLASSES)), axis=1).astype(np.int32)
  return x, y


def init_params(seed: int) -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "w1": jax.random.normal(k1, (FEATURES, HIDDEN)) / np.sqrt(FEATURES),
    "b1": jnp.zeros(HIDDEN),
    "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
    "b2": jnp.zeros(CLASSES),
  }


def loss_fn(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_optimizer(args: argparse.Namespace):
  """Unified SAM over PyTorch-style SGD (momentum 0.9, coupled weight decay 5e-4)."""
  base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(args.lr, momentum=0.9))
  return sam_optax.unified_sam(base, rho=args.rho, lambd=args.lambd)


def build_step(optimizer, mesh, ascent: str):
  if ascent == "sync":
    # Global-batch semantics: jit over sharded arrays needs no axis name.
    return sam_optax.sam_step(loss_fn, optimizer)
  # m-sharpness: each device perturbs with its own gradient; the descent averages.
  local = sam_optax.sam_step(loss_fn, optimizer, axis_name="data", ascent="local", jit=False)
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P())
  return jax.jit(sharded, donate_argnums=(0, 1))


def main(argv=None) -> int:
  args = parse_args(argv)
  # Both settings must precede any JAX computation.
  jax.config.update("jax_num_cpu_devices", args.local_devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.num_processes > 1:
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=args.timeout,
      heartbeat_timeout_seconds=args.heartbeat_timeout,
      shutdown_timeout_seconds=args.timeout,
    )
  pid, nproc = jax.process_index(), jax.process_count()
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  if args.global_batch % nproc:
    raise ValueError(
      f"--global-batch {args.global_batch} is not divisible by the {nproc} processes."
    )
  local_batch = args.global_batch // nproc

  optimizer = make_optimizer(args)
  params = init_params(args.seed)
  replicated = NamedSharding(mesh, P())
  params, state = jax.device_put((params, optimizer.init(params)), replicated)
  step = build_step(optimizer, mesh, args.ascent)

  x, y = make_data(args.seed, args.steps * args.global_batch)
  losses = []
  start = time.perf_counter()
  for t in range(args.steps):
    # This process's slice of global batch t (the same examples in every run).
    lo = t * args.global_batch + pid * local_batch
    batch = sam_optax.global_batch(
      {"x": x[lo : lo + local_batch], "y": y[lo : lo + local_batch]}, mesh
    )
    params, state, metrics = step(params, state, batch)
    loss = float(metrics["loss"].addressable_data(0))
    losses.append(loss)
    print(f"[process {pid}/{nproc}] step {t + 1} loss {loss:.6f}", flush=True)

  # Every process and every device must hold the same parameters and state.
  host = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), (params, state))
  for a, leaf in zip(jax.tree.leaves((params, state)), jax.tree.leaves(host)):
    for shard in a.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), leaf)
  multihost_utils.assert_equal(host, "replicas differ across processes")
  print(
    f"[process {pid}/{nproc}] done: {args.steps} steps in "
    f"{time.perf_counter() - start:.2f}s, replicas identical",
    flush=True,
  )
  if pid == 0 and args.out:
    np.savez(args.out, losses=np.asarray(losses), **{k: v for k, v in host[0].items()})
  return 0


if __name__ == "__main__":
  sys.exit(main())
