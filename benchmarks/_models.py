"""The benchmark models in Flax Linen: an MLP, a CIFAR ResNet-20 and a WRN-16-4.

Self-contained on purpose (the benchmarks must not depend on examples/), and
mirrored layer for layer by ``benchmarks/torch_reference.py`` so that the JAX
and PyTorch step times are measured on the same network: the parameter counts
are compared at run time.

Every model is called as ``model.apply(variables, images, train=True,
mutable=["batch_stats"])``; the MLP has no batch norm and returns an empty
``batch_stats`` collection, so one loss function serves all models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 0.9 here).
_BN = dict(momentum=0.9, epsilon=1e-5)


class MLP(nn.Module):
  """Flatten, then Dense-ReLU layers and a linear classifier."""

  hidden: tuple[int, ...] = (512, 512)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
  """ResNet v1 basic block; option-A shortcut (subsample + zero channels) as in He et al."""

  features: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, **_BN)
    y = nn.Conv(self.features, (3, 3), self.stride, padding=1, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
    y = norm()(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = x[:, :: self.stride, :: self.stride, :]
      pad = (self.features - x.shape[-1]) // 2
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad, self.features - x.shape[-1] - pad)))
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32×32 images (He et al., 2016): ResNet-20 is n = 3, 0.27M parameters."""

  blocks_per_stage: int = 3
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, **_BN)(x))
    for stage, features in enumerate((16, 32, 64)):
      for i in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and i == 0 else 1
        x = _BasicBlock(features, stride)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class _WideBlock(nn.Module):
  """Pre-activation wide block (Zagoruyko & Komodakis): BN-ReLU-conv, BN-ReLU-conv."""

  features: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, **_BN)
    out = nn.relu(norm()(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(out)
    y = nn.Conv(self.features, (3, 3), self.stride, padding=1, use_bias=False)(out)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-depth-widen for 32×32 images; WRN-16-4 has 2.75M parameters (no dropout)."""

  depth: int = 16
  widen: int = 4
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    n = (self.depth - 4) // 6
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)
    for stage, features in enumerate((16 * self.widen, 32 * self.widen, 64 * self.widen)):
      for i in range(n):
        stride = 2 if stage > 0 and i == 0 else 1
        x = _WideBlock(features, stride)(x, train)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, **_BN)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
  """Two conv-BN-ReLU layers and a linear classifier: the quick mode's CNN."""

  features: tuple[int, ...] = (8, 16)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i, features in enumerate(self.features):
      x = nn.Conv(features, (3, 3), 2 if i else 1, padding=1, use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, **_BN)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A benchmark model: its Flax module, its input shape and its default batch size."""

  name: str
  module: nn.Module
  image_shape: tuple[int, ...]  # one example, NHWC without the batch axis
  batch_size: int
  num_classes: int = 10


# `torch_reference.py` builds the same networks from these names.
MODELS: dict[str, Callable[[], ModelSpec]] = {
  "mlp": lambda: ModelSpec("mlp", MLP((512, 512)), (32, 32, 3), 128),
  "resnet20": lambda: ModelSpec("resnet20", CifarResNet(3), (32, 32, 3), 128),
  "wrn16_4": lambda: ModelSpec("wrn16_4", WideResNet(16, 4), (32, 32, 3), 64),
  # For --quick and the tests: seconds to compile and run.
  "tiny_mlp": lambda: ModelSpec("tiny_mlp", MLP((32,)), (8, 8, 1), 16),
  "tiny_cnn": lambda: ModelSpec("tiny_cnn", SmallCNN((8, 16)), (16, 16, 3), 16),
}


def make_problem(name: str, batch_size: int | None = None, seed: int = 0):
  """Initialises a model and one fixed batch.

  Returns:
    ``(spec, params, batch_stats, batch, loss_fn)`` with
    ``loss_fn(params, batch, batch_stats) -> (loss, new_batch_stats)``: the
    softmax cross-entropy of a training-mode forward pass.
  """
  if name not in MODELS:
    raise ValueError(f"`model` must be one of {sorted(MODELS)}, got {name!r}.")
  spec = MODELS[name]()
  if batch_size is not None:
    spec = dataclasses.replace(spec, batch_size=batch_size)

  def init(key):
    k_init, k_x, k_y = jax.random.split(key, 3)
    images = jax.random.normal(k_x, (spec.batch_size, *spec.image_shape), jnp.float32)
    labels = jax.random.randint(k_y, (spec.batch_size,), 0, spec.num_classes)
    return spec.module.init(k_init, images[:1], train=False), images, labels

  # Initialisation runs once: compiled without XLA's optimisations it takes 0.3 s
  # instead of 5-10 s of compilation (the random number code is slow to optimise).
  key = jax.random.key(seed)
  compiled = jax.jit(init).lower(key).compile({"xla_backend_optimization_level": 0})
  variables, images, labels = compiled(key)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  module = spec.module

  def loss_fn(params: Any, batch: dict, batch_stats: Any):
    logits, updated = module.apply(
      {"params": params, "batch_stats": batch_stats},
      batch["image"],
      train=True,
      mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, updated.get("batch_stats", {})

  return spec, params, batch_stats, {"image": images, "label": labels}, loss_fn


def param_count(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
