"""The fake-device half of tests/test_composition.py (run as a script in a subprocess).

It needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before jax starts; it runs
every case below (pmap with ``axis_name``, sharded ``jit`` over a mesh, both with and without
``microbatches``) and prints one JSON line: the parameters after each step (replica 0), the
clean loss, whether every replica holds the same bits, and the refusals' messages.
"""

import json

# name -> (row, column, mode, microbatches)
CASES = {}
for _row in [
  "unified_sam(lambd=0)",
  "unified_sam(lambd=0.5)",
  "unified_sam(lambd=1)",
  "unified_sam(lambd='1/t')",
  "unified_sam(lambd='1-1/t')",
  "sam_sps",
  "sharpness_aware",
  "interval_sam",
  "looksam",
  "gsam",
  "dynamic_loss_scale",
]:
  for _mode in ("pmap", "jit"):
    CASES[f"{_row}-plain-{_mode}"] = (_row, "plain", _mode, None)
for _row in ["unified_sam(lambd=1)", "sam_sps", "looksam", "gsam", "dynamic_loss_scale"]:
  CASES[f"{_row}-plain-pmap-microbatches"] = (_row, "plain", "pmap", 2)
CASES["unified_sam(lambd=0.5)-plain-jit-microbatches"] = (
  "unified_sam(lambd=0.5)",
  "plain",
  "jit",
  2,
)
for _col in [
  "masked_around",
  "multi_transform_around",
  "inject",
  "apply_if_finite",
  "dynamic_loss_scale",
  "schedule_free_around",
  "multisteps_inside",
]:
  for _mode in ("pmap", "jit"):
    CASES[f"unified_sam(lambd=0.5)-{_col}-{_mode}"] = ("unified_sam(lambd=0.5)", _col, _mode, None)
CASES["sgd-one_pass-pmap"] = ("sgd", "one_pass", "pmap", None)
CASES["sgd-one_pass-jit-microbatches"] = ("sgd", "one_pass", "jit", 2)


def _worker():
  import jax
  import numpy as np
  import optax
  import test_composition as tc
  from _composition_common import BATCHES
  from _composition_common import LR
  from _composition_common import MU
  from _composition_common import X0
  from _composition_common import batch_as
  from _composition_common import loss_fn
  from _composition_common import to_dtype
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import sam_optax

  mesh = jax.make_mesh((jax.device_count(),), ("data",))

  def shards_identical(a):
    first = np.asarray(a.addressable_shards[0].data)
    return a.sharding.is_fully_replicated and all(
      np.array_equal(np.asarray(s.data), first) for s in a.addressable_shards
    )

  def make(row, col):
    if row == "sgd":
      return optax.sgd(LR, momentum=MU)
    return tc.cell(row, col)[0]()

  def run(row, col, mode, microbatches):
    opt = make(row, col)
    params = to_dtype(X0, np.float32)
    state = opt.init(params)
    kw = {"donate": False, "microbatches": microbatches}
    if mode == "pmap":
      step = jax.pmap(sam_optax.sam_step(loss_fn, opt, axis_name="d", **kw), axis_name="d")
      params, state = sam_optax.replicate((params, state))
    else:
      step = sam_optax.sam_step(loss_fn, opt, **kw)
      params, state = jax.device_put((params, state), NamedSharding(mesh, P()))
    out = {"row": row, "col": col, "params": [], "loss": [], "identical": []}
    for b in BATCHES:
      b = batch_as(b)
      b = sam_optax.shard_batch(b) if mode == "pmap" else sam_optax.global_batch(b, mesh)
      params, state, metrics = step(params, state, b)
      leaves = jax.tree.leaves((params, state, metrics))
      if mode == "pmap":
        same = all(bool(np.all(np.asarray(a) == np.asarray(a)[:1])) for a in leaves)
        host = jax.tree.map(lambda a: np.asarray(a)[0], (params, metrics))
      else:
        same = all(shards_identical(a) for a in leaves)
        host = jax.tree.map(np.asarray, (params, metrics))
      out["params"].append({k: np.asarray(v, np.float64).tolist() for k, v in host[0].items()})
      out["loss"].append(float(host[1]["loss"]))
      out["identical"].append(same)
    return out

  results = {"device_count": jax.device_count(), "cases": {}, "refusals": {}}
  for name, case in CASES.items():
    try:
      results["cases"][name] = run(*case)
    except Exception as e:  # noqa: BLE001  (reported to and asserted on by the tests)
      results["cases"][name] = {"exception": f"{type(e).__name__}: {e}"[:2000]}

  def refusal(row, col, mode):
    opt = make(row, col)
    fragment = tc.ERRORS[col][0].replace("\\", "")
    params = to_dtype(X0, np.float32)
    state = opt.init(params)
    b = batch_as(BATCHES[0])
    if mode == "pmap":
      step = jax.pmap(
        sam_optax.sam_step(loss_fn, opt, axis_name="d"), axis_name="d", donate_argnums=(0, 1)
      )
      params, state = sam_optax.replicate((params, state))
      b = sam_optax.shard_batch(b)
    else:
      step = sam_optax.sam_step(loss_fn, opt)
      params, state = jax.device_put((params, state), NamedSharding(mesh, P()))
      b = sam_optax.global_batch(b, mesh)
    message = None
    try:
      step(params, state, b)
    except ValueError as e:
      message = str(e)
    deleted = any(a.is_deleted() for a in jax.tree.leaves((params, state)))
    return {"message": message, "fragment": fragment, "deleted": deleted}

  for row, col, mode in [
    ("unified_sam(lambd=1)", "chain_before", "pmap"),
    ("gsam", "chain_before", "jit"),
    ("sam_sps", "multisteps_around", "pmap"),
    ("looksam", "lookahead", "jit"),
  ]:
    try:
      results["refusals"][f"{row}-{col}-{mode}"] = refusal(row, col, mode)
    except Exception as e:  # noqa: BLE001
      results["refusals"][f"{row}-{col}-{mode}"] = {
        "message": None,
        "fragment": f"{type(e).__name__}: {e}"[:2000],
        "deleted": None,
      }
  return results


if __name__ == "__main__":
  print(json.dumps(_worker()))
