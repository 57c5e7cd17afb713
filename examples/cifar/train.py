"""CIFAR training loop: SGD, Unified SAM or SAM-SPS on a Flax model, driven by sam_optax.sam_step.

``train_and_evaluate(config, workdir, data_dir=...)`` trains, evaluates every
``eval_every_epochs`` epochs and writes into ``workdir``: ``metrics.jsonl`` (one record
per epoch), ``steps.jsonl`` (every ``log_every_steps`` steps), ``plots/*.png``,
``report.json`` (the final evaluation), ``config.json`` and orbax checkpoints in
``checkpoints/`` (every ``checkpoint_every_steps`` steps, at the end, and on SIGINT or
SIGTERM).

Read from the top: the train step (all of sam_optax's part), the optimizers (one table
from ``config.optimizer`` to the transformation and what it reports), the loop.

Every run is data parallel over the local devices (a sharded ``jit`` that computes the
one-device step on the whole batch). A resumed run computes bit for bit what the
uninterrupted run computes: every batch is a pure function of ``(seed, step)``
(input_pipeline.py), the dropout key is ``fold_in(key, step)``, and the running sums of
the epoch's metrics are part of the checkpointed state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import platform
import signal
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from examples.cifar import input_pipeline
from examples.cifar import models
from examples.cifar.configs import default as default_config

# Metrics summed over an epoch inside the compiled step (checkpointed with the state).
_SUM_KEYS = ("loss", "correct", "count", "perturbed_loss", "sharpness", "grad_norm", "lr")


# ----------------------------------------------------------------------- the step


def cross_entropy(logits, labels, num_classes, smoothing=0.0):
  targets = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def make_loss_fn(model: models.Model, config, mean, std, num_classes) -> Callable:
  """``loss_fn(params, batch, batch_stats, rng) -> (loss, aux)``, the function sam_step drives."""
  mean, std = jnp.asarray(mean), jnp.asarray(std)

  def loss_fn(params, batch, batch_stats, rng):
    images = input_pipeline.normalize(batch["image"], mean, std)
    logits, new_batch_stats = model.apply(params, batch_stats, images, True, rng)
    loss = cross_entropy(logits, batch["label"], num_classes, config.label_smoothing).mean()
    # A float count: sam_step averages the floating-point aux over m-sharpness groups.
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"], dtype=jnp.float32)
    return loss, {"batch_stats": new_batch_stats, "correct": correct}

  return loss_fn


def make_train_step(
  loss_fn,
  tx,
  config,
  schedule,
  steps_per_epoch: int,
  mesh: jax.sharding.Mesh,
  nnx_model: tuple | None = None,
) -> Callable:
  """The jitted step ``(state, batch) -> (state, out)``; ``state`` is donated.

  The state is replicated over ``mesh`` and the batch split along its ``"data"`` axis;
  jit computes the one-device step on the whole batch, on one device or many. An NNX
  model, ``nnx_model = (make_module(rngs), nnx_loss_fn)``, is stepped by
  ``sam_optax.nnx.sam_step``.
  """
  optimizer = OPTIMIZERS[config.optimizer]
  groups, sam_options = 1, {}
  if config.m_sharpness is not None:  # m-sharpness: one ascent per group of m examples
    groups = config.batch_size // config.m_sharpness
    sam_options = dict(ascent="local", groups=groups)
  if nnx_model is not None and optimizer.two_pass:
    step_fn = _nnx_sam_step(*nnx_model, tx, **sam_options)
  else:  # SAM and SGD alike: sam_step drives a one-pass optimizer as a plain step
    step_fn = sam_optax.sam_step(loss_fn, tx, has_aux=True, jit=False, **sam_options)
  key = jax.random.key(config.seed + 1)

  def train_step(state, batch):
    step = state["step"]
    # Both passes see the same dropout key, a pure function of the step.
    params, opt_state, metrics, aux = step_fn(
      state["params"],
      state["opt_state"],
      batch,
      state["batch_stats"],
      jax.random.fold_in(key, step),
    )
    # sam_step skips a non-finite step; the trainer reports it as a NaN loss and stops.
    loss = jnp.where(metrics["finite"], metrics["loss"], jnp.nan)
    rate = metrics["step_size"] if optimizer.rate == "step_size" else schedule(step)
    lr = jnp.asarray(rate, jnp.float32)
    n = batch["label"].shape[0]
    correct = jnp.round(aux["correct"] * groups)  # sam_step returns the groups' mean
    new = {
      "loss": loss * n,
      "correct": correct,
      "count": n,
      "perturbed_loss": metrics.get("perturbed_loss", loss) * n,
      "sharpness": metrics.get("sharpness", 0.0) * n,
      "grad_norm": metrics["grad_norm"] * n,
      "lr": lr * n,
    }
    fresh = step % steps_per_epoch == 0  # the sums restart with each epoch
    sums = {
      k: jnp.where(fresh, 0.0, state["sums"][k]) + jnp.asarray(new[k], jnp.float32)
      for k in _SUM_KEYS
    }
    state = {
      "step": step + 1,
      "params": params,
      "opt_state": opt_state,
      "batch_stats": aux["batch_stats"],
      "sums": sums,
    }
    return state, {"loss": loss, "accuracy": correct / n, "lr": lr}

  replicated = NamedSharding(mesh, P())
  return jax.jit(
    train_step,
    in_shardings=(replicated, NamedSharding(mesh, P("data"))),
    out_shardings=replicated,
    donate_argnums=0,
  )


def make_nnx_loss_fn(config, mean, std, num_classes) -> Callable:
  """``loss_fn(module, batch, rng) -> (loss, aux)`` for sam_optax.nnx.sam_step."""
  mean, std = jnp.asarray(mean), jnp.asarray(std)

  def loss_fn(module, batch, rng):
    del rng  # the NNX ResNet has no dropout
    logits = module(input_pipeline.normalize(batch["image"], mean, std))
    loss = cross_entropy(logits, batch["label"], num_classes, config.label_smoothing).mean()
    return loss, {"correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"], dtype=jnp.float32)}

  return loss_fn


def _nnx_sam_step(make_module, loss_fn, tx, **sam_options):
  """sam_optax.nnx.sam_step on a module and ``nnx.Optimizer`` built from the pure state.

  The trainer's state stays plain dicts (for orbax, the sharded jit and evaluation);
  inside the compiled step they become a live module and optimizer, which
  sam_optax.nnx.sam_step updates in place, and are read back.
  """
  from flax import nnx

  import sam_optax.nnx

  graphdef, params_def, stats_def = nnx.split(
    nnx.eval_shape(lambda: make_module(nnx.Rngs(0))), nnx.Param, nnx.BatchStat
  )
  nnx_step = sam_optax.nnx.sam_step(loss_fn, has_aux=True, jit=False, **sam_options)
  is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

  def step(params, opt_state, batch, batch_stats, rng):
    p, b = jax.tree.map(lambda x: x, (params_def, stats_def))  # fresh copies to fill in
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(b, batch_stats)
    module = nnx.merge(graphdef, p, b)
    module.train()
    optimizer = nnx.Optimizer(module, tx, wrt=nnx.Param)
    # The same optax state with nnx.State nodes for dicts: the same leaves, in the same order.
    paths = lambda tree: [
      jax.tree_util.keystr(k)
      for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]  # noqa: E731
    ]
    if paths(nnx.as_pure(optimizer.opt_state)) != paths(opt_state):
      raise ValueError("the nnx.Optimizer's state does not have the trainer's layout")
    for variable, x in zip(
      jax.tree.leaves(optimizer.opt_state, is_leaf=is_variable), jax.tree.leaves(opt_state)
    ):
      variable[...] = x
    metrics, aux = nnx_step(module, optimizer, batch, rng)
    opt_state = jax.tree.unflatten(
      jax.tree.structure(opt_state), jax.tree.leaves(nnx.as_pure(optimizer.opt_state))
    )
    return (
      nnx.to_pure_dict(nnx.state(module, nnx.Param)),
      opt_state,
      metrics,
      {"batch_stats": nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)), **aux},
    )

  return step


def nnx_module_fn(config, num_classes) -> Callable:
  """``make(rngs)`` for ``config.model = "nnx_resnet<depth>"``, as models.create_model builds it."""
  depth = int(config.model[len("nnx_resnet") :])
  return lambda rngs: models.NNXResNet(
    depth, config.model_width or 16, num_classes, dtype=jnp.dtype(config.dtype), rngs=rngs
  )


def make_eval_step(model: models.Model, mean, std, num_classes) -> Callable:
  mean, std = jnp.asarray(mean), jnp.asarray(std)

  @jax.jit
  def eval_step(params, batch_stats, batch):
    images = input_pipeline.normalize(batch["image"], mean, std)
    logits, _ = model.apply(params, batch_stats, images, False, None)
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {
      "loss": jnp.sum(cross_entropy(logits, batch["label"], num_classes) * mask),
      "correct": jnp.sum(correct * mask),
      "count": jnp.sum(mask),
    }

  return eval_step


def evaluate(eval_step, params, batch_stats, split, batch_size, put=None) -> dict[str, float]:
  totals = None
  for batch in input_pipeline.eval_batches(split, batch_size):
    out = eval_step(params, batch_stats, put(batch) if put else batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count}


def make_sharpness_fn(model: models.Model, config, data, put) -> Callable | None:
  """``diagnostics(params, batch_stats, epoch) -> dict`` from sam_optax.sharpness, or None (off).

  The loss is the inference-mode cross-entropy (running batch statistics) on the first
  ``sharpness_batches`` training batches without augmentation: the same function every
  time, so the figures of different epochs (and runs) compare. ``sharpness_seconds`` is
  the evaluation's wall time (the first one includes compilation).
  """
  if not config.sharpness_every_epochs:
    return None
  from sam_optax import sharpness

  fixed = input_pipeline.TrainBatches(
    data.train, config.batch_size, config.seed, augment_images=False
  )
  batch = put(
    jax.tree.map(
      lambda *xs: np.concatenate(xs), *[fixed(i) for i in range(config.sharpness_batches)]
    )
  )
  mean, std = jnp.asarray(data.mean), jnp.asarray(data.std)
  key = jax.random.key(config.seed + 2)

  def loss_fn(params, batch, batch_stats):
    images = input_pipeline.normalize(batch["image"], mean, std)
    logits, _ = model.apply(params, batch_stats, images, False, None)
    return cross_entropy(logits, batch["label"], data.num_classes).mean()

  # Eager, not jitted: sam_optax.sharpness then loops on the host around one compiled
  # step (compiled once per run), as XLA:CPU runs convolutions far slower in a loop body.
  def diagnostics(params, batch_stats, epoch):
    eig_key, trace_key = jax.random.split(jax.random.fold_in(key, epoch))
    args = (loss_fn, params, batch, batch_stats)
    out = {
      "top_hessian_eigenvalue": sharpness.top_hessian_eigenvalue(
        *args, num_iters=config.sharpness_num_iters, key=eig_key
      )
    }
    if config.sharpness_num_samples:
      out["hessian_trace"] = sharpness.hessian_trace(
        *args, num_samples=config.sharpness_num_samples, key=trace_key
      )
    if config.sharpness_rho:
      out["rho_sharpness"] = sharpness.worst_case_sharpness(*args, rho=config.sharpness_rho)
    return out

  def run(params, batch_stats, epoch):
    start = time.perf_counter()
    out = {k: float(v) for k, v in jax.device_get(diagnostics(params, batch_stats, epoch)).items()}
    return {**out, "sharpness_seconds": time.perf_counter() - start}

  return run


# --------------------------------------------------------------------- optimizers


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  total = config.num_epochs * steps_per_epoch
  warmup = config.warmup_epochs * steps_per_epoch
  lr = config.learning_rate
  if config.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif config.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
  else:
    boundaries = {int(e * steps_per_epoch) - warmup: config.lr_decay for e in config.lr_boundaries}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def parse_lambda(value) -> float | str:
  """λ from the config: numbers become floats, '1/t' and '1-1/t' stay (sam_optax checks both)."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return str(value)


def _sgd(config, schedule, steps_per_epoch):
  """torch.optim.SGD(lr, momentum, weight_decay): coupled L2 at x, then momentum, then -lr."""
  del steps_per_epoch
  clip = () if config.clip_norm is None else (optax.clip_by_global_norm(config.clip_norm),)
  return optax.chain(
    *clip,
    optax.add_decayed_weights(config.weight_decay),
    optax.trace(decay=config.momentum, nesterov=config.nesterov),
    optax.scale_by_learning_rate(schedule),
  )


def _ascent(config) -> dict[str, Any]:
  """ASAM's options of the perturbation; ``"kernels"`` scales only kernels (ndim > 1)."""
  kernels = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)  # noqa: E731
  return dict(
    adaptive=config.adaptive,
    eta=config.eta,
    mask=kernels if config.asam_mask == "kernels" else None,
  )


def _unified_sam(config, schedule, steps_per_epoch):
  rho = config.rho
  if config.gsam_rho_min is not None:  # GSAM: ρ_t follows the learning rate over the run
    lrs = np.asarray(schedule(jnp.arange(config.num_epochs * steps_per_epoch)))
    rho = sam_optax.gsam_rho_schedule(
      schedule, config.rho, config.gsam_rho_min, lr_max=float(lrs.max()), lr_min=float(lrs.min())
    )
  return sam_optax.unified_sam(
    _sgd(config, schedule, steps_per_epoch),
    rho=rho,
    lambd=parse_lambda(config.lambd),
    **_ascent(config),
  )


def _sam_sps(config, schedule, steps_per_epoch):
  del schedule, steps_per_epoch  # γ_t is the step size
  return sam_optax.sam_sps(
    rho=config.rho,
    lambd=parse_lambda(config.lambd),
    f_star=config.f_star,
    gamma_b=config.gamma_b,
    weight_decay=config.weight_decay,
    **_ascent(config),
  )


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """What the trainer needs to know about one value of ``config.optimizer``."""

  build: Callable  # (config, lr schedule, steps_per_epoch) -> optax transformation
  rate: str = "learning_rate"  # the per-step rate it reports: "learning_rate" | "step_size"
  two_pass: bool = True  # False: one gradient per step, no perturbed point to report
  unused: tuple[str, ...] = ()  # config keys it ignores, which must keep their defaults


_SAM_KEYS = (
  "sam_every",
  "looksam_alpha",
  "gsam_alpha",
  "gsam_rho_min",
  "adaptive",
  "asam_mask",
  "m_sharpness",
)
OPTIMIZERS = {
  "sgd": Optimizer(_sgd, two_pass=False, unused=_SAM_KEYS),
  "unified_sam": Optimizer(_unified_sam),
  "sam_sps": Optimizer(_sam_sps, rate="step_size", unused=("gsam_rho_min", "clip_norm")),
}
# Config keys that change the optimizer state's layout (named when a resume mismatches).
_STATE_OPTIONS = ("sam_every", "looksam_alpha", "gsam_alpha", "clip_norm")


def create_optimizer(config, steps_per_epoch: int):
  """(optax transformation, learning-rate schedule; SAM-SPS ignores the schedule).

  The SAM variants wrap the optimizer from the inside out: ``gsam``, then ``looksam`` or
  ``interval_sam``. With every option off (the defaults) it is the plain optimizer.
  sam_optax rejects bad values and combinations here, or when the state is built.
  """
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = OPTIMIZERS[config.optimizer].build(config, schedule, steps_per_epoch)
  if config.gsam_alpha:
    tx = sam_optax.gsam(tx, alpha=config.gsam_alpha)
  if config.looksam_alpha:
    tx = sam_optax.looksam(tx, every=config.sam_every, alpha=config.looksam_alpha)
  elif config.sam_every != 1:
    tx = sam_optax.interval_sam(tx, every=config.sam_every)
  return tx, schedule


# ------------------------------------------------------------------------- config


class ConfigError(ValueError):
  """The config has unknown keys, or values this trainer does not know."""


_CHOICES = {
  "optimizer": tuple(OPTIMIZERS),
  "schedule": ("cosine", "step", "constant"),
  "dtype": ("float32", "bfloat16"),
  "asam_mask": ("all", "kernels"),
  "dataset": input_pipeline.DATASETS,
}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for what sam_optax cannot check: this trainer's keys and names.

  Values of ρ, λ, f*, γ_b, the variants and their combinations are checked by sam_optax
  (ValueError/TypeError) when setup() builds the optimizer and traces the step.
  """
  defaults = default_config.get_config()
  unknown = sorted(set(config.keys()) - set(defaults.keys()))
  if unknown:
    hints = [
      f"{k!r}"
      + "".join(
        f" (did you mean {c!r}?)" for c in difflib.get_close_matches(k, list(defaults.keys()), n=1)
      )
      for k in unknown
    ]
    raise ConfigError(
      f"unknown config key(s): {', '.join(hints)}. Known keys: {', '.join(sorted(defaults.keys()))}"
    )
  for key, allowed in _CHOICES.items():
    if config[key] not in allowed:
      raise ConfigError(f"{key} must be one of {allowed}, got {config[key]!r}")
  unused = [
    f"{k}={config[k]!r}" for k in OPTIMIZERS[config.optimizer].unused if config[k] != defaults[k]
  ]
  if unused:
    raise ConfigError(
      f"{', '.join(unused)}: not used by optimizer={config.optimizer!r}; "
      "leave at the default or choose another optimizer"
    )
  m, n, available = config.m_sharpness, config.num_devices, jax.local_device_count()
  rules = [
    (
      0.0 <= config.label_smoothing < 1.0,
      f"label_smoothing must be in [0, 1), got {config.label_smoothing}",
    ),
    (
      config.clip_norm is None or config.clip_norm > 0,
      f"clip_norm must be > 0 (or None: no clipping), got {config.clip_norm}",
    ),
    (
      not config.looksam_alpha or config.sam_every > 1,
      f"looksam_alpha={config.looksam_alpha} reuses the SAM direction between SAM steps "
      "and needs sam_every > 1 (the steps per SAM step)",
    ),
    (
      m is None or (isinstance(m, int) and m >= 1 and config.batch_size % m == 0),
      f"m_sharpness (examples per ascent) must divide batch_size={config.batch_size}, got {m!r}",
    ),
    (
      isinstance(n, int) and 0 <= n <= available,
      f"num_devices must be an int in [0, {available}] (0: all local devices), got {n!r}",
    ),
    (
      jax.process_count() == 1,
      "the CIFAR trainer runs in one process; for several processes see examples/distributed",
    ),
  ]
  for ok, message in rules:
    if not ok:
      raise ConfigError(message)


def _options_on(config) -> dict[str, Any]:
  """The variant, clipping and m-sharpness options that differ from their defaults."""
  defaults = default_config.get_config()
  return {k: config[k] for k in _SAM_KEYS + ("eta", "clip_norm") if config[k] != defaults[k]}


def make_mesh(config) -> jax.sharding.Mesh:
  """A 1-D ``"data"`` mesh over ``num_devices`` local devices (0: all).

  The axis is Auto (not jax's default Explicit): ``sam_step(groups=...)`` (m-sharpness)
  splits the sharded batch inside ``vmap``, which jax cannot do over an Explicit axis.
  """
  n = config.num_devices or jax.local_device_count()
  return jax.make_mesh(
    (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.local_devices()[:n]
  )


# ---------------------------------------------------------------------- the setup


@dataclasses.dataclass
class Run:
  """What train_and_evaluate builds before the loop (also for tests and benchmarks)."""

  config: Any
  data: input_pipeline.Dataset
  model: models.Model
  tx: Any
  schedule: Any
  steps_per_epoch: int
  total_steps: int
  loss_fn: Callable
  train_step: Callable
  eval_step: Callable
  state: dict
  mesh: jax.sharding.Mesh
  put_batch: Callable  # host batch -> global array split over the mesh's devices
  eval_batch_size: int  # config.eval_batch_size rounded up to a multiple of the devices
  sharpness: Callable | None  # (params, batch_stats, epoch) -> diagnostics, or None (off)


def setup(config, data_dir: str) -> Run:
  """Checks the config, loads the data, builds model, optimizer, steps and state.

  Every error of the config (the trainer's and sam_optax's) is raised here, before
  anything is computed or written: the step is traced once (``jax.eval_shape``).
  """
  check_config(config)
  data = input_pipeline.load(data_dir, config.dataset)
  model = models.create_model(
    config.model,
    data.num_classes,
    dtype=jnp.dtype(config.dtype),
    dropout_rate=config.dropout_rate,
    width=config.model_width,
  )
  spe = input_pipeline.steps_per_epoch(len(data.train), config.batch_size)
  total = config.num_epochs * spe
  if config.num_train_steps > 0:
    total = min(total, config.num_train_steps)
  tx, schedule = create_optimizer(config, spe)
  mesh = make_mesh(config)
  batch = {
    "image": jax.ShapeDtypeStruct((config.batch_size, 32, 32, 3), jnp.uint8),
    "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
  }
  sam_optax.check_batch_divisible(batch, mesh.size, what=f"the {mesh.size} devices")

  # An "rbg" key (XLA's RngBitGenerator) for the initializers: compiling threefry for
  # every parameter takes 5x longer on a CPU. Checkpoints hold the exact values.
  init_key = jax.random.key(config.seed, impl="rbg")
  params, batch_stats = jax.jit(model.init)(init_key, jnp.zeros((1, 32, 32, 3), jnp.float32))
  state = {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "opt_state": tx.init(params),
    "batch_stats": batch_stats,
    "sums": {k: jnp.zeros((), jnp.float32) for k in _SUM_KEYS},
  }
  state = jax.device_put(state, NamedSharding(mesh, P()))  # one copy on every device
  loss_fn = make_loss_fn(model, config, data.mean, data.std, data.num_classes)
  nnx_model = None
  if model.kind == "nnx":
    nnx_model = (
      nnx_module_fn(config, data.num_classes),
      make_nnx_loss_fn(config, data.mean, data.std, data.num_classes),
    )
  train_step = make_train_step(loss_fn, tx, config, schedule, spe, mesh, nnx_model)
  jax.eval_shape(train_step, state, batch)  # sam_optax's trace-time checks
  n = mesh.size  # padded, masked test examples make any eval batch size exact
  put = lambda b: sam_optax.global_batch(b, mesh)  # noqa: E731
  return Run(
    config,
    data,
    model,
    tx,
    schedule,
    spe,
    total,
    loss_fn,
    train_step,
    make_eval_step(model, data.mean, data.std, data.num_classes),
    state,
    mesh,
    put,
    -(-config.eval_batch_size // n) * n,
    make_sharpness_fn(model, config, data, put),
  )


# -------------------------------------------------------------------- checkpoints


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written for another model, dataset or layout."""


class TrainingInterrupted(Exception):
  """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

  def __init__(self, signum: int, step: int, saved: bool):
    self.signum, self.step, self.saved = signum, step, saved
    where = f"checkpoint saved at step {step}" if saved else "no new checkpoint"
    super().__init__(
      f"training stopped by {signal.Signals(signum).name} at step {step}; "
      f"{where}; rerun with --resume to continue"
    )


_IDENTITY = ("model", "model_width", "dataset", "num_classes", "optimizer")


def checkpoint_manager(directory: str, config) -> ocp.CheckpointManager:
  # Synchronous saves: a checkpoint is complete on disk when save() returns.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(
    directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
  )


def checkpoint_metadata(config, num_classes: int) -> dict[str, Any]:
  """Saved with each checkpoint (orbax's ``custom_metadata``) and checked on resume."""
  return {
    "model": config.model,
    "model_width": config.model_width,
    "dataset": config.dataset,
    "num_classes": num_classes,
    "optimizer": config.optimizer,
    "state_options": {k: config[k] for k in _STATE_OPTIONS},
  }


def save_checkpoint(manager, step: int, state, metadata) -> bool:
  """Saves unless ``step`` is already on disk (orbax never overwrites); never a non-finite state."""
  # The epoch sums hold a NaN loss for a step that sam_step skipped as non-finite.
  tree = (state["params"], state.get("sums", {}))
  floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not all(bool(jnp.isfinite(x).all()) for x in floats):
    raise FloatingPointError(
      f"parameters or losses are not finite at step {step}; not saving a checkpoint (the last good "
      f"one, step {manager.latest_step()}, is kept in {manager.directory})"
    )
  return manager.save(step, args=ocp.args.StandardSave(state), custom_metadata=metadata)


def restore_checkpoint(manager, step: int, state, metadata):
  """``state`` restored from checkpoint ``step``; CheckpointMismatchError if of another run."""
  written = manager.metadata(step).custom_metadata or {}
  for key in _IDENTITY:
    if written.get(key) != metadata[key]:
      raise CheckpointMismatchError(
        f"the checkpoint in {manager.directory} was written for {key}={written.get(key)!r}, "
        f"but this config has {key}={metadata[key]!r}. Use another --workdir, or the config "
        "that wrote it."
      )
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except ValueError as e:  # orbax: another tree structure or other shapes
    options = ", ".join(f"{k}={v!r}" for k, v in written.get("state_options", {}).items())
    raise CheckpointMismatchError(
      f"the checkpoint in {manager.directory} holds a state of another layout: it was "
      f"written with {options}. Resume with the config that wrote it. ({e})"
    ) from e


@contextlib.contextmanager
def _stop_on_signals():
  """SIGINT/SIGTERM set ``stop[0]``; the loop saves and stops at the next step boundary.

  A second Ctrl-C falls back to Python's KeyboardInterrupt.
  """
  stop, previous = [0], {}

  def handle(signum, frame):
    stop[0] = signum
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  if threading.current_thread() is threading.main_thread():
    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield stop
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


# ------------------------------------------------------------------------ the loop


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  data_dir: str,
  resume: bool = False,
  hooks: Sequence[Callable[[int, dict], None]] = (),
) -> dict:
  """Trains and evaluates; returns the final report (also written to workdir/report.json).

  Args:
    config: a config from ``configs/`` (unknown keys are an error).
    workdir: where metrics, plots, checkpoints and the report go.
    data_dir: folder holding ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``.
    resume: continue from the latest checkpoint in ``workdir/checkpoints``.
    hooks: called as ``hook(step, out)`` after each step (``step`` counts finished steps).

  Raises:
    ConfigError, ValueError/TypeError (sam_optax), input_pipeline.DatasetError,
    FileNotFoundError, FileExistsError, CheckpointMismatchError, FloatingPointError,
    TrainingInterrupted.
  """
  run = setup(config, data_dir)
  manager = checkpoint_manager(os.path.abspath(os.path.join(workdir, "checkpoints")), config)
  try:
    return _train(run, workdir, manager, resume, hooks)
  finally:
    manager.close()


def _train(run: Run, workdir, manager, resume, hooks):
  from tqdm.auto import tqdm

  config, data, state = run.config, run.data, run.state
  metadata = checkpoint_metadata(config, data.num_classes)
  latest = manager.latest_step()
  if latest is not None and not resume:
    raise FileExistsError(
      f"{manager.directory} already holds a checkpoint (step {latest}); pass --resume to "
      "continue it, or choose a new --workdir (a fresh run never overwrites it)"
    )
  if latest is not None:
    state = restore_checkpoint(manager, latest, state, metadata)
    print(f"Resumed from {manager.directory} at step {int(state['step'])}.", flush=True)
  start = step = int(state["step"])
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  steps_path = os.path.join(workdir, "steps.jsonl")
  for path in (metrics_path, steps_path):  # drop records written after the checkpoint
    _write_jsonl(path, [r for r in _read_jsonl(path) if r["step"] <= start])
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  optimizer = OPTIMIZERS[config.optimizer]
  spe, total = run.steps_per_epoch, run.total_steps
  print(
    f"{config.name}: {config.model} ({models.count_params(state['params']):,} parameters, "
    f"{config.dtype}) on {config.dataset} ({len(data.train)} train / {len(data.test)} "
    f"test), {config.optimizer}{_describe(_options_on(config))}, {spe} steps/epoch, steps "
    f"{start}..{total}, batch split over {run.mesh.size} device(s); {_hardware()}",
    flush=True,
  )
  bar = tqdm(
    total=total, initial=start, unit="step", dynamic_ncols=True, disable=not config.progress_bar
  )
  saved_at, ips_history = latest, []
  log_clock = epoch_clock = (time.perf_counter(), step)

  def save():
    nonlocal saved_at
    if save_checkpoint(manager, step, state, metadata):
      saved_at = step

  def not_finite(what, value, where):
    return FloatingPointError(
      f"{what} is {value} {where}; stopping without saving (the last "
      f"good checkpoint, step {saved_at}, is kept)"
    )

  def log_step(out):
    nonlocal log_clock
    out = {k: float(v) for k, v in jax.device_get(out).items()}
    now = time.perf_counter()
    ips = (step - log_clock[1]) * config.batch_size / max(now - log_clock[0], 1e-9)
    log_clock = (now, step)
    if not math.isfinite(out["loss"]):
      raise not_finite("loss", out["loss"], f"at step {step}")
    _append_jsonl(steps_path, {"step": step, **out})
    bar.set_postfix(
      loss=f"{out['loss']:.3f}",
      acc=f"{out['accuracy']:.3f}",
      **{"γ" if optimizer.rate == "step_size" else "lr": f"{out['lr']:.3g}"},
      img_s=f"{ips:.0f}",
      refresh=False,
    )

  def finish_epoch(epoch):
    nonlocal epoch_clock
    elapsed = time.perf_counter() - epoch_clock[0]  # training only, not evaluation
    sums = {k: float(v) for k, v in jax.device_get(state["sums"]).items()}
    mean = {k: v / sums["count"] for k, v in sums.items()}
    record = {
      "epoch": epoch,
      "step": step,
      "train_loss": mean["loss"],
      "train_accuracy": mean["correct"],
    }
    if optimizer.two_pass:
      record.update(train_perturbed_loss=mean["perturbed_loss"], train_sharpness=mean["sharpness"])
    record.update(train_grad_norm=mean["grad_norm"], **{optimizer.rate: mean["lr"]})
    if not math.isfinite(record["train_loss"]):
      raise not_finite("the training loss", record["train_loss"], f"in epoch {epoch}")
    if epoch % config.eval_every_epochs == 0 or step == total:
      test = evaluate(
        run.eval_step,
        state["params"],
        state["batch_stats"],
        data.test,
        run.eval_batch_size,
        run.put_batch,
      )
      record.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
    if run.sharpness and (epoch % config.sharpness_every_epochs == 0 or step == total):
      record.update(run.sharpness(state["params"], state["batch_stats"], epoch))
    if step > epoch_clock[1]:  # the first epoch of a (resumed) run includes compilation
      record["images_per_s"] = (step - epoch_clock[1]) * config.batch_size / elapsed
      ips_history.append(record["images_per_s"])
    _append_jsonl(metrics_path, record)
    if config.plots:
      write_plots(workdir, optimizer.rate)
    bar.write(
      " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
    )
    epoch_clock = (time.perf_counter(), step)

  batches = input_pipeline.TrainBatches(
    data.train, config.batch_size, config.seed, augment_images=config.augment
  )
  stream = batches.iterate(start, total, prefetch=config.prefetch, put=run.put_batch)
  try:
    with _stop_on_signals() as stop:
      for batch in stream:
        state, out = run.train_step(state, batch)
        step += 1
        bar.update(1)
        for hook in hooks:
          hook(step, out)
        if step % config.log_every_steps == 0 or step == total:
          log_step(out)
        if step % spe == 0 or step == total:
          finish_epoch(-(-step // spe))
        if step % config.checkpoint_every_steps == 0 or stop[0]:
          save()
        if stop[0]:
          raise TrainingInterrupted(stop[0], step, saved_at == step)
  except KeyboardInterrupt:
    # From a hook or a second Ctrl-C: save if the state is intact (not donated mid-step).
    intact = not any(x.is_deleted() for x in jax.tree.leaves(state))
    if intact:
      save()
    raise TrainingInterrupted(signal.SIGINT, step, intact and saved_at == step) from None
  finally:
    stream.close()  # stops the prefetch thread on every path
    bar.close()

  save()
  test = evaluate(
    run.eval_step,
    state["params"],
    state["batch_stats"],
    data.test,
    run.eval_batch_size,
    run.put_batch,
  )
  tested = [r for r in _read_jsonl(metrics_path) if "test_accuracy" in r]
  best = max(tested, key=lambda r: r["test_accuracy"]) if tested else None
  report = {
    "name": config.name,
    "dataset": config.dataset,
    "model": config.model,
    "parameters": models.count_params(state["params"]),
    "optimizer": config.optimizer,
    "rho": config.rho,
    "lambd": str(config.lambd),
    "seed": config.seed,
    "options": _options_on(config),
    "devices": run.mesh.size,
    "steps": step,
    "epochs": step / spe,
    "test_accuracy": test["accuracy"],
    "test_loss": test["loss"],
    "best_test_accuracy": best["test_accuracy"] if best else test["accuracy"],
    "best_epoch": best["epoch"] if best else None,
    "images_per_s": float(np.median(ips_history)) if ips_history else None,
    "hardware": _hardware(),
  }
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  if config.plots:
    write_plots(workdir, optimizer.rate)
  print(
    f"Final evaluation ({step} steps, {step / spe:.2f} epochs): test accuracy "
    f"{100 * test['accuracy']:.2f}%, test loss {test['loss']:.4f}; best "
    f"{100 * report['best_test_accuracy']:.2f}% (epoch {report['best_epoch']}). "
    f"Report: {os.path.join(workdir, 'report.json')}",
    flush=True,
  )
  return report


# ----------------------------------------------------------------- logs and plots


def _read_jsonl(path) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path, records) -> None:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def _append_jsonl(path, record) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


_RATE_LABELS = {"learning_rate": "learning rate", "step_size": "Polyak step size γ_t"}
_SHARPNESS_LABELS = {
  "top_hessian_eigenvalue": "top Hessian eigenvalue λ_max",
  "hessian_trace": "Hessian trace",
  "rho_sharpness": "ρ-ball sharpness",
}


def write_plots(workdir: str, rate: str = "learning_rate") -> list[str]:
  """Loss/accuracy curves and the lr (or γ_t) trace as PNG files in workdir/plots."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  epochs = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  steps = _read_jsonl(os.path.join(workdir, "steps.jsonl"))
  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  written = []

  def save(fig, name):
    fig.tight_layout()
    written.append(os.path.join(out_dir, name))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

  def curves(ax, keys, ylabel, title, scale=1.0):
    for key, style, label in keys:
      rows = [r for r in epochs if key in r]
      if rows:
        ax.plot([r["epoch"] for r in rows], [scale * r[key] for r in rows], style, label=label)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.legend()

  if epochs:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    curves(
      ax1,
      [
        ("train_loss", "o-", "train (clean pass)"),
        ("train_perturbed_loss", "o--", "train, perturbed f(e)"),
        ("test_loss", "s-", "test"),
      ],
      "cross-entropy",
      "loss",
    )
    curves(
      ax2,
      [("train_accuracy", "o-", "train"), ("test_accuracy", "s-", "test")],
      "accuracy (%)",
      "accuracy",
      scale=100,
    )
    save(fig, "curves.png")
  diagnostics = [k for k in _SHARPNESS_LABELS if any(k in r for r in epochs)]
  if diagnostics:
    fig, axes = plt.subplots(1, len(diagnostics), figsize=(5 * len(diagnostics), 4), squeeze=False)
    for ax, key in zip(axes[0], diagnostics):
      curves(
        ax,
        [(key, "o-", "training batches, inference mode")],
        _SHARPNESS_LABELS[key],
        _SHARPNESS_LABELS[key],
      )
    save(fig, "sharpness.png")
  if steps:
    label = _RATE_LABELS[rate]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in steps], [r["lr"] for r in steps])
    ax.set(xlabel="step", ylabel=label, title=f"{label} (every logged step)")
    save(fig, "step_size.png")
  return written


def _describe(options: dict) -> str:
  return f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""


def _hardware() -> str:
  cpu = platform.processor() or platform.machine()
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  d = jax.devices()[0]
  return (
    f"{jax.device_count()}x {getattr(d, 'device_kind', d.platform)} ({d.platform}); "
    f"host {cpu}, {os.cpu_count()} cores; jax {jax.__version__}"
  )
