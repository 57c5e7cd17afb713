"""CIFAR models: WideResNet, CIFAR ResNet-20/32/56, PreAct-ResNet-18 (Linen), and an NNX ResNet.

All Linen models take ``train`` (batch norm uses batch statistics and updates
``batch_stats`` when True), compute in ``dtype`` (e.g. ``jnp.bfloat16``) and keep
parameters in ``param_dtype`` (float32). Logits are returned in float32 so the loss is
computed in full precision whatever the compute dtype.

The architectures follow the PyTorch code the papers build on:

* WideResNet-d-k (Zagoruyko & Komodakis, 2016): pre-activation blocks, widths
  16k/32k/64k, a 1x1 projection on the (activated) input when the width changes.
  WRN-28-10 has 36.5M parameters, WRN-16-4 2.7M.
* ResNet-20/32/56 (He et al., 2016, CIFAR variant): 3 stages of (d-2)/6 basic blocks,
  widths 16/32/64, parameter-free "option A" shortcuts (subsample and zero-pad
  channels). 0.27M / 0.46M / 0.85M parameters.
* PreAct-ResNet-18 (He et al., 2016b): 4 stages of 2 pre-activation blocks, widths
  64..512, 1x1 projections, a final BN-ReLU; 11.2M parameters.

``create_model(name, num_classes, dtype)`` returns a :class:`Model` adapter with pure
``init``/``apply`` functions over plain dicts, so the trainer treats Linen and NNX
models alike.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

# torch's kaiming_normal_(mode="fan_out") for WRN/PreAct, (mode="fan_in") for the CIFAR ResNet.
_conv_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_conv_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# torch BatchNorm2d defaults: momentum 0.1 on the new value (= 0.9 on the old), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class _Linen(nn.Module):
  """Shared fields and layer factories: number of classes and dtypes."""

  num_classes: int = 10
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def conv(self, features, kernel, strides=1, init=_conv_fan_out, name=None):
    pad = kernel // 2
    return nn.Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=[(pad, pad), (pad, pad)],
      use_bias=False,
      kernel_init=init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )

  def bn(self, train, name=None):
    return nn.BatchNorm(
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )

  def head(self, x):
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes,
      kernel_init=_dense_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="head",
    )(x)
    return x.astype(jnp.float32)


class _WideBlock(_Linen):
  features: int = 16
  strides: int = 1
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train):
    o = nn.relu(self.bn(train, name="bn1")(x))
    # Zagoruyko's code: when the width changes, the projection sees the activated input.
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = self.conv(self.features, 1, self.strides, name="proj")(o)
    else:
      shortcut = x
    y = self.conv(self.features, 3, self.strides, name="conv1")(o)
    y = nn.relu(self.bn(train, name="bn2")(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = self.conv(self.features, 3, 1, name="conv2")(y)
    return y + shortcut


class WideResNet(_Linen):
  """WRN-depth-widen (CIFAR); depth = 6n + 4."""

  depth: int = 28
  widen_factor: int = 10
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = True):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
    n = (self.depth - 4) // 6
    x = self.conv(16, 3, name="stem")(x.astype(self.dtype))
    for stage, (width, stride) in enumerate(zip((16, 32, 64), (1, 2, 2))):
      for i in range(n):
        x = _WideBlock(
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          features=width * self.widen_factor,
          strides=stride if i == 0 else 1,
          dropout_rate=self.dropout_rate,
          name=f"stage{stage + 1}_block{i + 1}",
        )(x, train)
    x = nn.relu(self.bn(train, name="bn_final")(x))
    return self.head(x)


class _BasicBlock(_Linen):
  features: int = 16
  strides: int = 1

  @nn.compact
  def __call__(self, x, train):
    y = self.conv(self.features, 3, self.strides, init=_conv_fan_in, name="conv1")(x)
    y = nn.relu(self.bn(train, name="bn1")(y))
    y = self.conv(self.features, 3, 1, init=_conv_fan_in, name="conv2")(y)
    y = self.bn(train, name="bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      # Option A: subsample, then zero-pad the new channels on both sides.
      shortcut = x[:, :: self.strides, :: self.strides, :]
      extra = self.features - x.shape[-1]
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(y + shortcut)


class CifarResNet(_Linen):
  """ResNet-depth for CIFAR (He et al. 2016, Section 4.2); depth = 6n + 2."""

  depth: int = 20
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = True):
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
    n = (self.depth - 2) // 6
    x = self.conv(self.width, 3, init=_conv_fan_in, name="stem")(x.astype(self.dtype))
    x = nn.relu(self.bn(train, name="bn_stem")(x))
    for stage, stride in enumerate((1, 2, 2)):
      for i in range(n):
        x = _BasicBlock(
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          features=self.width * 2**stage,
          strides=stride if i == 0 else 1,
          name=f"stage{stage + 1}_block{i + 1}",
        )(x, train)
    return self.head(x)


class _PreActBlock(_Linen):
  features: int = 64
  strides: int = 1

  @nn.compact
  def __call__(self, x, train):
    o = nn.relu(self.bn(train, name="bn1")(x))
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = self.conv(self.features, 1, self.strides, name="proj")(o)
    else:
      shortcut = x
    y = self.conv(self.features, 3, self.strides, name="conv1")(o)
    y = self.conv(self.features, 3, 1, name="conv2")(nn.relu(self.bn(train, name="bn2")(y)))
    return y + shortcut


class PreActResNet18(_Linen):
  """Pre-activation ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = self.conv(64, 3, name="stem")(x.astype(self.dtype))
    for stage, (width, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
      for i in range(2):
        x = _PreActBlock(
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          features=width,
          strides=stride if i == 0 else 1,
          name=f"stage{stage + 1}_block{i + 1}",
        )(x, train)
    x = nn.relu(self.bn(train, name="bn_final")(x))
    return self.head(x)


# ------------------------------------------------------------------------------- NNX


class NNXBasicBlock(nnx.Module):
  def __init__(self, cin, cout, strides, *, dtype, rngs: nnx.Rngs):
    conv = functools.partial(
      nnx.Conv,
      kernel_size=(3, 3),
      padding=1,
      use_bias=False,
      kernel_init=_conv_fan_in,
      dtype=dtype,
      rngs=rngs,
    )
    bn = functools.partial(
      nnx.BatchNorm, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs
    )
    self.conv1 = conv(cin, cout, strides=strides)
    self.bn1 = bn(cout)
    self.conv2 = conv(cout, cout)
    self.bn2 = bn(cout)
    self.strides = strides
    self.pad = cout - cin

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x
    if self.strides != 1 or self.pad:
      shortcut = x[:, :: self.strides, :: self.strides, :]
      shortcut = jnp.pad(shortcut, ((0, 0),) * 3 + ((self.pad // 2, self.pad - self.pad // 2),))
    return nnx.relu(y + shortcut)


class NNXResNet(nnx.Module):
  """The CIFAR ResNet (option-A shortcuts) written with Flax NNX; ResNet-8 by default.

  Batch norm follows NNX's convention: ``model.train()`` uses batch statistics and
  updates the running averages in place, ``model.eval()`` uses the running averages.
  """

  def __init__(
    self,
    depth: int = 8,
    width: int = 16,
    num_classes: int = 10,
    *,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if (depth - 2) % 6:
      raise ValueError(f"NNX ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    self.dtype = dtype
    self.stem = nnx.Conv(
      3, width, (3, 3), padding=1, use_bias=False, kernel_init=_conv_fan_in, dtype=dtype, rngs=rngs
    )
    self.bn_stem = nnx.BatchNorm(
      width, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs
    )
    blocks = []
    cin = width
    for stage, stride in enumerate((1, 2, 2)):
      for i in range(n):
        cout = width * 2**stage
        blocks.append(NNXBasicBlock(cin, cout, stride if i == 0 else 1, dtype=dtype, rngs=rngs))
        cin = cout
    self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
    self.head = nnx.Linear(cin, num_classes, kernel_init=_dense_init, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn_stem(self.stem(x.astype(self.dtype))))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


# ------------------------------------------------------------------- model adapter


@dataclasses.dataclass(frozen=True)
class Model:
  """Pure functions over plain dicts, the same for Linen and NNX models.

  init(rng, images) -> (params, batch_stats)
  apply(params, batch_stats, images, train, rng) -> (logits, new_batch_stats)
  """

  name: str
  init: Callable
  apply: Callable
  kind: str  # "linen" or "nnx"


def _linen_adapter(name, module: nn.Module) -> Model:
  def init(rng, images):
    variables = module.init({"params": rng, "dropout": rng}, images, train=False)
    return variables["params"], variables.get("batch_stats", {})

  def apply(params, batch_stats, images, train, rng=None):
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
      logits, updates = module.apply(
        variables,
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": rng} if rng is not None else {},
      )
      return logits, updates["batch_stats"]
    return module.apply(variables, images, train=False), batch_stats

  return Model(name, init, apply, "linen")


def _nnx_adapter(name, make: Callable[[nnx.Rngs], nnx.Module]) -> Model:
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))

  def init(rng, images):
    del images
    model = make(nnx.Rngs(params=rng))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)

  def apply(params, batch_stats, images, train, rng=None):
    del rng  # this model has no dropout
    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    _, p_state, b_state = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    nnx.replace_by_pure_dict(p_state, params)
    nnx.replace_by_pure_dict(b_state, batch_stats)
    model = nnx.merge(graphdef, p_state, b_state)
    model.train() if train else model.eval()
    logits = model(images)
    return logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  return Model(name, init, apply, "nnx")


def model_names() -> str:
  return (
    "wrn{depth}_{k} (e.g. wrn28_10, wrn16_4), resnet{depth} (e.g. resnet20, resnet32, "
    "resnet56, resnet8), preact_resnet18, nnx_resnet{depth} (e.g. nnx_resnet8)"
  )


def create_model(
  name: str, num_classes: int, dtype=jnp.float32, dropout_rate: float = 0.0, width: int = 0
) -> Model:
  """Builds the model called ``name``; ``width`` overrides the base width (0 = default)."""
  dtype = jnp.dtype(dtype)
  if m := re.fullmatch(r"wrn(\d+)_(\d+)", name):
    module = WideResNet(
      num_classes=num_classes,
      dtype=dtype,
      depth=int(m[1]),
      widen_factor=int(m[2]),
      dropout_rate=dropout_rate,
    )
    if width:
      raise ValueError("model_width is not used by WideResNet; change the widen factor")
    return _linen_adapter(name, module)
  if m := re.fullmatch(r"resnet(\d+)", name):
    return _linen_adapter(
      name, CifarResNet(num_classes=num_classes, dtype=dtype, depth=int(m[1]), width=width or 16)
    )
  if name == "preact_resnet18":
    return _linen_adapter(name, PreActResNet18(num_classes=num_classes, dtype=dtype))
  if m := re.fullmatch(r"nnx_resnet(\d+)", name):
    make = functools.partial(NNXResNet, int(m[1]), width or 16, num_classes, dtype=dtype)
    return _nnx_adapter(name, lambda rngs: make(rngs=rngs))
  raise ValueError(f"unknown model {name!r}; known: {model_names()}")


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
