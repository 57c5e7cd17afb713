"""The main job: one small CNN trained on scikit-learn's digits with five optimizers.

SGD, SAM (λ = 1), USAM (λ = 0), Unified SAM (λ_t = 1 - 1/t) and SAM-SPS train the
same Flax Linen CNN (two 3×3 convolutions with BatchNorm, one dense layer) from
the same initial weights on the same batches, side by side: each batch is stepped
by every optimizer in turn, so their step times share the machine's load. The
data set ships with scikit-learn (1,797 8×8 grey-scale images, 10 classes), so
nothing is downloaded. The two-pass optimizers run through :func:`sam_optax.sam_step`
with ``has_aux=True`` (batch-norm statistics from the clean pass); SGD runs
through the same ``sam_step`` (its one-pass path).

On request (``--optimizers``), the variants of docs/variants.md join the
comparison: interval SAM and LookSAM (a SAM step every k steps), GSAM and ASAM
with a kernels-only mask, all around SAM (λ = 1) with the same base SGD.

After training, each optimizer's final parameters are measured for sharpness
(:mod:`sam_optax.sharpness`) on the whole training set with batch norm in
inference mode (the running statistics): the top Hessian eigenvalue by power
iteration and the ρ-ball sharpness max_{‖d‖≤ρ} f(x + d) - f(x) by projected
ascent. ``--seeds N`` repeats the run for N seeds and reports mean ± std; a PNG
shows the training curves, the test accuracy and the sharpness per optimizer.

Deterministic: a fixed stratified train/test split, parameters initialised and
batches shuffled from ``seed``; two runs give identical losses, accuracies and
sharpness.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax import sharpness

# name -> label (formatted with the Config's fields); the order of the results table.
OPTIMIZERS = {
  "sgd": "SGD",
  "sam": "SAM (λ=1)",
  "usam": "USAM (λ=0)",
  "unified": "Unified SAM (λ=1-1/t)",
  "sam_sps": "SAM-SPS (λ=1)",
  # The variants (docs/variants.md), run only when named in --optimizers.
  "interval": "Interval SAM (k={sam_every})",
  "looksam": "LookSAM (k={sam_every}, α={looksam_alpha})",
  "gsam": "GSAM (α={gsam_alpha})",
  "asam": "ASAM (ρ={asam_rho}, η={asam_eta})",
}
DEFAULT_OPTIMIZERS = ("sgd", "sam", "usam", "unified", "sam_sps")
# The Config fields (and flags) each variant reads besides the shared ones.
VARIANT_FIELDS = {
  "interval": ("sam_every",),
  "looksam": ("sam_every", "looksam_alpha"),
  "gsam": ("gsam_alpha",),
  "asam": ("asam_rho", "asam_eta"),
}

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the train/test split does not move with --seed


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyper-parameters of the run; every optimizer sees the same ones."""

  epochs: int = 20
  batch_size: int = 64
  seed: int = 0
  learning_rate: float = 0.05  # SGD and the Unified SAM family's base SGD
  momentum: float = 0.9
  weight_decay: float = 5e-4
  rho: float = 0.05
  gamma_b: float = 1.0  # SAM-SPS's cap on γ_t
  sam_every: int = 5  # interval SAM and LookSAM: a SAM step every k steps
  looksam_alpha: float = 0.7  # LookSAM's weight of the reused direction
  gsam_alpha: float = 0.1  # GSAM's weight of the clean gradient's orthogonal part
  asam_rho: float = 0.5  # ASAM's radius: about 10× SAM's (docs/variants.md)
  asam_eta: float = 0.01  # ASAM's offset in T = |x| + η
  train_examples: int | None = None  # a subset of the training split (tests)
  # Sharpness of the final parameters (full training set, inference-mode batch norm).
  eig_iters: int = 20  # power iterations (Hessian-vector products) at most
  eig_tol: float = 1e-3  # stop once λ changes by less than this, relatively
  sharpness_rho: float | None = None  # the ball's radius; None: the training ρ
  sharpness_steps: int = 5  # ascent points of the ρ-ball sharpness


class CNN(nn.Module):
  """conv3×3(w)-BN-ReLU, conv3×3/2(2w)-BN-ReLU, dense(10)."""

  width: int = 32
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    x = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    x = nn.relu(norm()(nn.Conv(2 * self.width, (3, 3), strides=(2, 2), use_bias=False)(x)))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


MODEL = CNN()


@jax.jit
def evaluate(params, batch_stats, images, labels):
  """(mean cross-entropy, accuracy) of the model in inference mode."""
  logits = MODEL.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_eval_loss_fn(model: CNN) -> Callable[..., Any]:
  """loss_fn(params, batch, batch_stats) -> mean cross-entropy, batch norm in inference mode.

  The loss whose sharpness is measured: a deterministic function of the parameters
  (the running statistics are fixed), unlike the training-mode loss.
  """

  def loss_fn(params, batch, batch_stats):
    logits = model.apply(
      {"params": params, "batch_stats": batch_stats}, batch["image"], train=False
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  return loss_fn


EVAL_LOSS = make_eval_loss_fn(MODEL)


def sharpness_diagnostics(
  params: Any,
  batch_stats: Any,
  batch: dict[str, jax.Array],
  key: jax.Array,
  *,
  rho: float,
  eig_iters: int,
  eig_tol: float,
  sharpness_steps: int,
) -> dict[str, jax.Array]:
  """The top Hessian eigenvalue and the ρ-ball sharpness of the inference-mode loss.

  Called eagerly, not under ``jax.jit``: sam_optax.sharpness then runs the power
  iteration on the host around one compiled step (compiled once for all optimizers),
  as XLA:CPU runs convolutions far slower inside a compiled loop.
  """
  return {
    "top_hessian_eigenvalue": sharpness.top_hessian_eigenvalue(
      EVAL_LOSS, params, batch, batch_stats, num_iters=eig_iters, tol=eig_tol, key=key
    ),
    "worst_case_sharpness": sharpness.worst_case_sharpness(
      EVAL_LOSS, params, batch, batch_stats, rho=rho, num_steps=sharpness_steps
    ),
  }


def measure_sharpness(
  params: Any, batch_stats: Any, data: dict[str, np.ndarray], cfg: Config
) -> dict[str, float]:
  """Both diagnostics on the whole training set, as floats, and the seconds they took."""
  start = time.perf_counter()
  batch = {"image": jnp.asarray(data["x_train"]), "label": jnp.asarray(data["y_train"])}
  out = sharpness_diagnostics(
    params,
    batch_stats,
    batch,
    jax.random.key(cfg.seed),
    rho=cfg.rho if cfg.sharpness_rho is None else cfg.sharpness_rho,
    eig_iters=cfg.eig_iters,
    eig_tol=cfg.eig_tol,
    sharpness_steps=cfg.sharpness_steps,
  )
  out = {k: float(v) for k, v in out.items()}
  out["sharpness_seconds"] = time.perf_counter() - start
  return out


def load_data(train_examples: int | None = None) -> dict[str, np.ndarray]:
  """The digits as NHWC float32 images in [0, 1], split 80/20, stratified."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
  )
  if train_examples is not None:
    if not 1 <= train_examples <= len(y_train):
      raise ValueError(
        f"`train_examples` must be in [1, {len(y_train)}] or None, got {train_examples}."
      )
    x_train, y_train = x_train[:train_examples], y_train[:train_examples]
  return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def asam_mask(params: Any) -> Any:
  """ASAM scales the kernels only (ndim > 1): not the dense bias nor BatchNorm's scale and offset."""
  return jax.tree.map(lambda x: x.ndim > 1, params)


def label(name: str, cfg: Config) -> str:
  """The table's label of an optimizer, with the variant's hyper-parameters."""
  return OPTIMIZERS[name].format(**dataclasses.asdict(cfg))


def parse_optimizers(text: str) -> list[str]:
  """'sgd,sam' -> ['sgd', 'sam']; a ValueError names any unknown optimizer."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in OPTIMIZERS]
  if unknown or not names:
    raise ValueError(
      f"--optimizers: unknown optimizer(s) {unknown or [text]}; "
      f"choose a comma-separated subset of {', '.join(OPTIMIZERS)}."
    )
  return list(dict.fromkeys(names))  # drop repeats, keep order


def make_optimizer(name: str, cfg: Config) -> optax.GradientTransformation:
  """The optax transformation for one optimizer name (two-pass unless 'sgd')."""
  # PyTorch's SGD(lr, momentum, weight_decay): coupled L2 at x, then heavy ball.
  sgd = optax.chain(
    optax.add_decayed_weights(cfg.weight_decay),
    optax.trace(decay=cfg.momentum),
    optax.scale(-cfg.learning_rate),
  )
  if name == "sgd":
    return sgd
  if name in ("sam", "usam", "unified"):
    lambd = {"sam": 1.0, "usam": 0.0, "unified": "1-1/t"}[name]
    return sam_optax.unified_sam(sgd, rho=cfg.rho, lambd=lambd)
  if name == "sam_sps":
    return sam_optax.sam_sps(
      rho=cfg.rho, lambd=1.0, gamma_b=cfg.gamma_b, weight_decay=cfg.weight_decay
    )
  if name in VARIANT_FIELDS:
    try:
      return _make_variant(name, cfg, sgd)
    except (ValueError, TypeError) as e:  # name the flags behind the library's argument
      flags = ", ".join(f"--{f} {getattr(cfg, f)}" for f in VARIANT_FIELDS[name])
      raise type(e)(f"{name} ({flags}): {e}") from e
  raise ValueError(f"`name` must be one of {list(OPTIMIZERS)}, got {name!r}.")


def _make_variant(
  name: str, cfg: Config, sgd: optax.GradientTransformation
) -> optax.GradientTransformation:
  """The variants, all around SAM (λ = 1) with the same base SGD."""
  if name == "asam":
    return sam_optax.unified_sam(
      sgd, rho=cfg.asam_rho, lambd=1.0, adaptive=True, eta=cfg.asam_eta, mask=asam_mask
    )
  sam = sam_optax.unified_sam(sgd, rho=cfg.rho, lambd=1.0)
  if name == "interval":
    return sam_optax.interval_sam(sam, every=cfg.sam_every)
  if name == "looksam":
    return sam_optax.looksam(sam, every=cfg.sam_every, alpha=cfg.looksam_alpha)
  # GSAM ties ρ to the learning rate (sam_optax.gsam_rho_schedule); with this job's
  # constant learning rate that schedule is the constant ρ.
  return sam_optax.gsam(sam, alpha=cfg.gsam_alpha)


def make_loss_fn(model: CNN) -> Callable[..., Any]:
  """loss_fn(params, batch, batch_stats) -> (mean cross-entropy, new batch_stats)."""

  def loss_fn(params, batch, batch_stats):
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      batch["image"],
      train=True,
      mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, updates["batch_stats"]

  return loss_fn


def step_time_ms(
  times: Sequence[float], every: int = 1
) -> tuple[float, float | None, float | None]:
  """(ms per step, ms per SAM step, ms per skipped step) from step times in seconds.

  With ``every = 1`` the median step, leaving out the first (it compiles); the
  other two are None. With ``every = k > 1`` (interval SAM, LookSAM: steps 0, k,
  2k, ... are SAM steps) the medians of the SAM steps (the compiling first one
  left out) and of the skipped steps, and the mean over a k-step cycle of one
  SAM and k - 1 skipped steps: what a step costs on average, with the medians
  keeping out the stalls of a shared machine.
  """
  if every == 1:
    return 1e3 * statistics.median(times[1:] or times), None, None
  sam = times[every::every] or times[:1]
  skipped = [t for i, t in enumerate(times) if i % every] or sam
  ms_sam, ms_skipped = 1e3 * statistics.median(sam), 1e3 * statistics.median(skipped)
  return (ms_sam + (every - 1) * ms_skipped) / every, ms_sam, ms_skipped


class _Trainee:
  """One optimizer's training state, step timings and per-epoch history."""

  def __init__(
    self,
    name: str,
    label: str,
    tx: optax.GradientTransformation,
    variables: dict[str, Any],
    every: int = 1,
  ):
    self.name, self.label = name, label
    self.every = every  # interval SAM and LookSAM: steps 0, k, 2k, ... are SAM steps
    # The steps donate their inputs, so each trainee starts from its own copy.
    self.params, self.batch_stats = jax.tree.map(
      jnp.copy, (variables["params"], variables["batch_stats"])
    )
    self.opt_state = tx.init(self.params)
    loss_fn = make_loss_fn(MODEL)
    # One step function for all: sam_step drives SGD as a plain one-pass step.
    self._step = sam_optax.sam_step(loss_fn, tx, has_aux=True)
    self.step_times, self.step_sizes, self.losses, self.history = [], [], [], []
    self.sharpness: dict[str, float] = {}

  def step(self, batch: dict[str, jax.Array]) -> None:
    start = time.perf_counter()
    self.params, self.opt_state, metrics, self.batch_stats = self._step(
      self.params, self.opt_state, batch, self.batch_stats
    )
    jax.block_until_ready((self.params, self.opt_state, metrics, self.batch_stats))
    self.step_times.append(time.perf_counter() - start)
    self.losses.append(float(metrics["loss"]))
    if "step_size" in metrics:
      self.step_sizes.append(float(metrics["step_size"]))

  def end_epoch(self, epoch: int, data: dict[str, np.ndarray]) -> None:
    test_loss, test_acc = evaluate(self.params, self.batch_stats, data["x_test"], data["y_test"])
    self.history.append(
      {
        "epoch": epoch,
        "train_loss": float(np.mean(self.losses)),  # mean clean-pass loss of the epoch
        "test_loss": float(test_loss),
        "test_accuracy": float(test_acc),
      }
    )
    self.losses = []
    if not np.isfinite(self.history[-1]["train_loss"]):
      raise FloatingPointError(
        f"{self.name} diverged: mean training loss {self.history[-1]['train_loss']} in "
        f"epoch {epoch}; lower --lr, --rho or --gamma_b."
      )

  def result(self) -> dict[str, Any]:
    ms_per_step, ms_sam, ms_skipped = step_time_ms(self.step_times, self.every)
    return {
      "optimizer": self.name,
      "label": self.label,
      "train_loss": self.history[-1]["train_loss"],
      "test_loss": self.history[-1]["test_loss"],
      "test_accuracy": self.history[-1]["test_accuracy"],
      "ms_per_step": ms_per_step,
      "ms_per_sam_step": ms_sam,
      "ms_per_skipped_step": ms_skipped,
      "mean_step_size": float(np.mean(self.step_sizes)) if self.step_sizes else None,
      **self.sharpness,
      "steps": len(self.step_times),
      "history": self.history,
    }


def run(
  cfg: Config,
  names: Sequence[str] = DEFAULT_OPTIMIZERS,
  *,
  progress: bool = True,
) -> list[dict[str, Any]]:
  """Trains the named optimizers side by side; returns one result dict each.

  Every optimizer starts from the same weights and takes its step on the same
  batch before the next batch is drawn, so the step times of all of them are
  measured under the same machine load and their ratios are fair.
  """
  for name in names:
    if name not in OPTIMIZERS:
      raise ValueError(f"`names`: unknown optimizer {name!r}; choose from {list(OPTIMIZERS)}.")
  if not names:
    raise ValueError("`names` must name at least one optimizer.")
  if cfg.epochs < 1:
    raise ValueError(f"`epochs` must be at least 1, got {cfg.epochs}.")
  # Build every optimizer first, so a bad hyper-parameter fails before any training.
  txs = {name: make_optimizer(name, cfg) for name in names}
  data = load_data(cfg.train_examples)
  n_train = len(data["y_train"])
  if not 1 <= cfg.batch_size <= n_train:
    raise ValueError(
      f"`batch_size` must be in [1, {n_train}] (the training set), got {cfg.batch_size}."
    )
  variables = MODEL.init(jax.random.key(cfg.seed), data["x_train"][:1], train=False)
  trainees = [
    _Trainee(
      name,
      label(name, cfg),
      tx,
      variables,
      every=cfg.sam_every if "sam_every" in VARIANT_FIELDS.get(name, ()) else 1,
    )
    for name, tx in txs.items()
  ]

  steps_per_epoch = n_train // cfg.batch_size  # drop the remainder: one compiled shape
  rng = np.random.default_rng(cfg.seed)
  bar = _ProgressBar(cfg.epochs * steps_per_epoch, progress)
  for epoch in range(1, cfg.epochs + 1):
    order = rng.permutation(n_train)
    for i in range(steps_per_epoch):
      idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
      # On the device once, outside the timed steps.
      batch = {
        "image": jnp.asarray(data["x_train"][idx]),
        "label": jnp.asarray(data["y_train"][idx]),
      }
      for trainee in trainees:
        trainee.step(batch)
      bar.update()
    for trainee in trainees:
      trainee.end_epoch(epoch, data)
    bar.show(epoch, {t.name: t.history[-1]["test_accuracy"] for t in trainees})
  bar.close()
  for trainee in trainees:  # after training: the step timings are not disturbed
    trainee.sharpness = measure_sharpness(trainee.params, trainee.batch_stats, data, cfg)
  return [{"seed": cfg.seed, **trainee.result()} for trainee in trainees]


# The numbers averaged over seeds by --seeds (mean ± std).
SUMMARY_KEYS = (
  "train_loss",
  "test_loss",
  "test_accuracy",
  "top_hessian_eigenvalue",
  "worst_case_sharpness",
  "ms_per_step",
  "mean_step_size",
)


def run_seeds(
  cfg: Config,
  names: Sequence[str] = DEFAULT_OPTIMIZERS,
  seeds: int = 1,
  *,
  progress: bool = True,
) -> list[dict[str, Any]]:
  """:func:`run` for seeds ``cfg.seed, cfg.seed + 1, ...``; the rows of all, seed by seed."""
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"`seeds` must be a positive int, got {seeds!r}.")
  rows = []
  for seed in range(cfg.seed, cfg.seed + seeds):
    rows += run(dataclasses.replace(cfg, seed=seed), names, progress=progress)
  return rows


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per optimizer (first-seen order): mean, sample std (ddof = 1; 0 for one seed) and the
  per-seed values of each of SUMMARY_KEYS (None where the optimizer has no such number)."""
  by_name: dict[str, list[dict[str, Any]]] = {}
  for r in results:
    by_name.setdefault(r["optimizer"], []).append(r)
  summary = []
  for name, rows in by_name.items():
    entry = {"optimizer": name, "label": rows[0]["label"], "seeds": [r["seed"] for r in rows]}
    for key in SUMMARY_KEYS:
      values = [r[key] for r in rows]
      if any(v is None for v in values):
        entry[key] = None
        continue
      entry[key] = {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "values": [float(v) for v in values],
      }
    summary.append(entry)
  return summary


TABLE_COLUMNS = (
  "optimizer",
  "train loss",
  "test acc (%)",
  "λ_max",
  "ρ-sharpness",
  "ms/step",
  "× SGD",
  "mean γ_t",
)


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """The results as a markdown table (× SGD only when SGD was run)."""
  sgd_ms = next((r["ms_per_step"] for r in results if r["optimizer"] == "sgd"), None)
  rows = [TABLE_COLUMNS, tuple("-" * len(c) for c in TABLE_COLUMNS)]
  for r in results:
    rows.append(
      (
        r["label"],
        f"{r['train_loss']:.4f}",
        f"{100 * r['test_accuracy']:.2f}",
        f"{r['top_hessian_eigenvalue']:.3f}",
        f"{r['worst_case_sharpness']:.5f}",
        f"{r['ms_per_step']:.2f}",
        "-" if sgd_ms is None else f"{r['ms_per_step'] / sgd_ms:.2f}",
        "-" if r["mean_step_size"] is None else f"{r['mean_step_size']:.4f}",
      )
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
  return "\n".join(
    "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows
  )


def format_summary_table(summary: Sequence[dict[str, Any]]) -> str:
  """The mean ± std over seeds as a markdown table (× SGD from the mean step times)."""
  sgd = next((s for s in summary if s["optimizer"] == "sgd"), None)
  pm = lambda v, fmt, scale=1.0: (
    "-" if v is None else f"{scale * v['mean']:{fmt}} ± {scale * v['std']:{fmt}}"
  )
  rows = [TABLE_COLUMNS, tuple("-" * len(c) for c in TABLE_COLUMNS)]
  for s in summary:
    rows.append(
      (
        s["label"],
        pm(s["train_loss"], ".4f"),
        pm(s["test_accuracy"], ".2f", 100.0),
        pm(s["top_hessian_eigenvalue"], ".3f"),
        pm(s["worst_case_sharpness"], ".5f"),
        pm(s["ms_per_step"], ".2f"),
        "-" if sgd is None else f"{s['ms_per_step']['mean'] / sgd['ms_per_step']['mean']:.2f}",
        pm(s["mean_step_size"], ".4f"),
      )
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
  return "\n".join(
    "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows
  )


def plot(results: Sequence[dict[str, Any]], path: str) -> str:
  """A PNG: training loss and test accuracy per epoch (mean over seeds), and bars of the
  top Hessian eigenvalue and the ρ-ball sharpness per optimizer (mean ± std)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  summary = summarize(results)
  fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
  for s in summary:
    rows = [r for r in results if r["optimizer"] == s["optimizer"]]
    epochs = [h["epoch"] for h in rows[0]["history"]]
    for ax, key, scale in ((axes[0], "train_loss", 1.0), (axes[1], "test_accuracy", 100.0)):
      curve = np.mean([[scale * h[key] for h in r["history"]] for r in rows], axis=0)
      ax.plot(epochs, curve, label=s["label"])
  axes[0].set(title="training loss (mean of epoch)", xlabel="epoch", yscale="log")
  axes[1].set(title="test accuracy (%)", xlabel="epoch")
  axes[1].set_ylim(bottom=max(0.0, axes[1].get_ylim()[0]))
  axes[0].legend(fontsize=7)
  labels = [s["label"].replace(" (", "\n(") for s in summary]
  colors = [f"C{i}" for i in range(len(summary))]
  for ax, key, title in (
    (axes[2], "top_hessian_eigenvalue", "top Hessian eigenvalue λ_max"),
    (axes[3], "worst_case_sharpness", "ρ-ball sharpness"),
  ):
    ax.bar(
      range(len(summary)),
      [s[key]["mean"] for s in summary],
      yerr=[s[key]["std"] for s in summary],
      color=colors,
      capsize=3,
    )
    ax.set_xticks(range(len(summary)), labels, fontsize=6)
    ax.set_title(title)
  seeds = sorted({r["seed"] for r in results})
  fig.suptitle(
    f"digits, seeds {', '.join(map(str, seeds))}: sharpness measured on the "
    "training set, batch norm in inference mode",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def format_step_costs(results: Sequence[dict[str, Any]]) -> str:
  """One line per interval SAM / LookSAM row: its SAM and skipped steps apart."""
  sgd_ms = next((r["ms_per_step"] for r in results if r["optimizer"] == "sgd"), None)
  ratio = lambda ms: "" if sgd_ms is None else f" ({ms / sgd_ms:.2f} × SGD)"
  return "\n".join(
    f"{r['label']}: SAM steps {r['ms_per_sam_step']:.2f} ms{ratio(r['ms_per_sam_step'])}, "
    f"skipped steps {r['ms_per_skipped_step']:.2f} ms{ratio(r['ms_per_skipped_step'])}"
    for r in results
    if r["ms_per_sam_step"] is not None
  )


class _ProgressBar:
  """A tqdm bar over all steps and a line per epoch with each optimizer's test accuracy."""

  def __init__(self, total: int, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm import tqdm

      self._bar = tqdm(total=total, unit="step", file=sys.stderr, desc="training")

  def update(self) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def show(self, epoch: int, test_accuracy: dict[str, float]) -> None:
    if self._bar is not None:
      accs = "  ".join(f"{name} {100 * acc:5.1f}" for name, acc in test_accuracy.items())
      self._bar.write(f"epoch {epoch:3d}  test acc (%)  {accs}", file=sys.stderr)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command line: train, print the table, optionally write JSON."""
  defaults = Config()
  parser = argparse.ArgumentParser(
    prog="python3 -m examples.digits",
    description="Train a small CNN on scikit-learn's digits with SGD, SAM, USAM, "
    "Unified SAM (1-1/t) and SAM-SPS (and, on request, the SAM variants); print a "
    "results table.",
  )
  parser.add_argument(
    "--optimizers",
    default=",".join(DEFAULT_OPTIMIZERS),
    help=f"comma-separated subset of {','.join(OPTIMIZERS)} "
    f"(default: {','.join(DEFAULT_OPTIMIZERS)})",
  )
  parser.add_argument("--epochs", type=int, default=defaults.epochs)
  parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
  parser.add_argument(
    "--seed",
    type=int,
    default=defaults.seed,
    help="initialisation and shuffling (the train/test split is fixed)",
  )
  parser.add_argument(
    "--lr",
    type=float,
    default=defaults.learning_rate,
    help="learning rate of SGD and of the Unified SAM family's base SGD",
  )
  parser.add_argument(
    "--rho",
    type=float,
    default=defaults.rho,
    help="SAM radius ρ of every two-pass optimizer but asam (--asam_rho)",
  )
  parser.add_argument(
    "--gamma_b", type=float, default=defaults.gamma_b, help="SAM-SPS's cap on the Polyak step size"
  )
  variant_help = {
    "sam_every": "interval and looksam: a SAM step every k steps",
    "looksam_alpha": "looksam: weight α of the reused direction",
    "gsam_alpha": "gsam: weight α of the clean gradient's orthogonal part",
    "asam_rho": "asam: radius ρ (ASAM needs about 10× SAM's)",
    "asam_eta": "asam: offset η in T = |x| + η",
  }
  for field, text in variant_help.items():
    default = getattr(defaults, field)
    parser.add_argument(
      f"--{field}", type=type(default), default=None, help=f"{text} (default: {default})"
    )
  parser.add_argument(
    "--train_examples",
    type=int,
    default=None,
    help="train on the first N examples of the training split (smoke tests)",
  )
  parser.add_argument(
    "--seeds",
    type=int,
    default=1,
    help="run seeds --seed, --seed+1, ... and print mean ± std (default: 1)",
  )
  parser.add_argument(
    "--eig_iters",
    type=int,
    default=defaults.eig_iters,
    help="power iterations for the top Hessian eigenvalue, at most",
  )
  parser.add_argument(
    "--sharpness_rho",
    type=float,
    default=None,
    help="radius of the ρ-ball sharpness (default: --rho)",
  )
  parser.add_argument(
    "--sharpness_steps",
    type=int,
    default=defaults.sharpness_steps,
    help="ascent points of the ρ-ball sharpness",
  )
  parser.add_argument(
    "--out", default=None, help="write the results (and per-epoch history) as JSON"
  )
  parser.add_argument(
    "--plot",
    default="digits.png",
    help="write the figure here (PNG; default digits.png; 'none' for no figure)",
  )
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  try:
    names = parse_optimizers(args.optimizers)
  except ValueError as e:
    parser.error(str(e))
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}.")
  if args.eig_iters < 1:
    parser.error(f"--eig_iters must be at least 1, got {args.eig_iters}.")
  if args.sharpness_steps < 1:
    parser.error(f"--sharpness_steps must be at least 1, got {args.sharpness_steps}.")
  if args.sharpness_rho is not None and not args.sharpness_rho >= 0:
    parser.error(f"--sharpness_rho must be >= 0, got {args.sharpness_rho}.")
  variant_args = {f: getattr(args, f) for f in variant_help if getattr(args, f) is not None}
  for field in variant_args:  # a variant's flag without the variant would do nothing
    users = [n for n, fields in VARIANT_FIELDS.items() if field in fields]
    if not set(users) & set(names):
      parser.error(f"--{field} applies to {' and '.join(users)}; add it to --optimizers.")
  cfg = dataclasses.replace(
    defaults,
    epochs=args.epochs,
    batch_size=args.batch_size,
    seed=args.seed,
    learning_rate=args.lr,
    rho=args.rho,
    gamma_b=args.gamma_b,
    train_examples=args.train_examples,
    eig_iters=args.eig_iters,
    sharpness_rho=args.sharpness_rho,
    sharpness_steps=args.sharpness_steps,
    **variant_args,
  )
  start = time.perf_counter()
  try:
    results = run_seeds(cfg, names, args.seeds, progress=not args.no_progress)
  except (ValueError, TypeError) as e:
    parser.error(str(e))
  wall = time.perf_counter() - start

  seeds = list(range(cfg.seed, cfg.seed + args.seeds))
  summary = summarize(results) if args.seeds > 1 else None
  print(format_table(results) if summary is None else format_summary_table(summary))
  if step_costs := format_step_costs(results if summary is None else results[: len(names)]):
    print("\n" + step_costs)
  ball_rho = cfg.rho if cfg.sharpness_rho is None else cfg.sharpness_rho
  print(
    f"\n{cfg.epochs} epoch(s) × {results[0]['steps'] // cfg.epochs} steps of batch "
    f"{cfg.batch_size}, seed{'s' if len(seeds) > 1 else ''} "
    f"{', '.join(map(str, seeds))}{' (mean ± std)' if summary else ''}, ρ = {cfg.rho}, "
    f"lr = {cfg.learning_rate}; {wall:.1f} s wall on {jax.devices()[0].platform}, "
    "compilation included."
  )
  print(
    f"λ_max: top Hessian eigenvalue ({cfg.eig_iters} power iterations at most); "
    f"ρ-sharpness: max over ‖d‖ ≤ {ball_rho} of f(x + d) - f(x) ({cfg.sharpness_steps} "
    "ascent points); both of the final parameters on the whole training set, batch norm "
    "in inference mode."
  )
  if args.plot.lower() != "none":
    print(f"Figure: {os.path.abspath(plot(results, args.plot))}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(
        {
          "config": dataclasses.asdict(cfg),
          "wall_seconds": wall,
          "platform": {
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "python": platform.python_version(),
            "machine": platform.machine(),
          },
          "seeds": seeds,
          "results": results,
          **({"summary": summary} if summary is not None else {}),
        },
        f,
        indent=2,
      )
  return results
