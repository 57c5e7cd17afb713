"""The PyTorch side of the benchmarks: the reference optimizers on the same networks.

This file imports only torch and the two reference packages
(``unifiedsam``, ``sam-sps``), so it can run in a separate virtual environment
from sam_optax's. ``benchmarks/step_time.py`` starts it as a subprocess
(``--torch-python``) and drives it in lockstep over stdin/stdout, one JSON
object per line, so that PyTorch steps are timed in the same round-robin as the
JAX variants.

Requests and answers (one line each):
  {"cmd": "setup", "model": "resnet20", "batch_size": 128, "threads": 2,
   "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "rho": 0.05}
      -> {"params": <count>, "variants": [...]}
  {"cmd": "time", "variant": "torch_sgd", "steps": 1}   -> {"seconds": <per step>}
      (an optional "threads" changes torch's thread count from then on)
  {"cmd": "conv", "batch": 128, "size": 16, "channels": 32, "layout": "NCHW",
   "dtype": "float32", "threads": 2}  -> {"fwd": s, "dx": s, "dw": s}
  {"cmd": "theory", "problem": "ridge", "a": [[...]], "b": [...], "steps": 500, ...}
      -> {"seconds": <per step>, "final_loss": <loss after the steps>}
  {"cmd": "quit"}
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# --- the networks: layer for layer the ones in benchmarks/_models.py ------------------------


class MLP(nn.Module):
  def __init__(self, in_features, hidden, num_classes=10):
    super().__init__()
    layers, width = [], in_features
    for h in hidden:
      layers += [nn.Linear(width, h), nn.ReLU()]
      width = h
    layers.append(nn.Linear(width, num_classes))
    self.net = nn.Sequential(*layers)

  def forward(self, x):
    return self.net(x.flatten(1))


class BasicBlock(nn.Module):
  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.stride, self.pad = stride, planes - in_planes

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.stride != 1 or self.pad:
      x = x[:, :, :: self.stride, :: self.stride]
      x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
    return F.relu(y + x)


class CifarResNet(nn.Module):
  def __init__(self, blocks_per_stage, num_classes=10):
    super().__init__()
    self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn = nn.BatchNorm2d(16)
    blocks, planes = [], 16
    for stage, width in enumerate((16, 32, 64)):
      for i in range(blocks_per_stage):
        blocks.append(BasicBlock(planes, width, 2 if stage > 0 and i == 0 else 1))
        planes = width
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(64, num_classes)

  def forward(self, x):
    x = self.blocks(F.relu(self.bn(self.conv(x))))
    return self.fc(x.mean((2, 3)))


class WideBlock(nn.Module):
  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.shortcut = None
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = x if self.shortcut is None else self.shortcut(out)
    y = F.relu(self.bn2(self.conv1(out)))
    return self.conv2(y) + shortcut


class WideResNet(nn.Module):
  def __init__(self, depth, widen, num_classes=10):
    super().__init__()
    n = (depth - 4) // 6
    self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    blocks, planes = [], 16
    for stage, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
      for i in range(n):
        blocks.append(WideBlock(planes, width, 2 if stage > 0 and i == 0 else 1))
        planes = width
    self.blocks = nn.Sequential(*blocks)
    self.bn = nn.BatchNorm2d(planes)
    self.fc = nn.Linear(planes, num_classes)

  def forward(self, x):
    x = F.relu(self.bn(self.blocks(self.conv(x))))
    return self.fc(x.mean((2, 3)))


class SmallCNN(nn.Module):
  def __init__(self, features, num_classes=10):
    super().__init__()
    layers, planes = [], 3
    for i, width in enumerate(features):
      layers += [
        nn.Conv2d(planes, width, 3, 2 if i else 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
      ]
      planes = width
    self.features = nn.Sequential(*layers)
    self.fc = nn.Linear(planes, num_classes)

  def forward(self, x):
    return self.fc(self.features(x).mean((2, 3)))


# name -> (constructor, image shape NCHW without batch); names as in _models.MODELS.
MODELS = {
  "mlp": (lambda: MLP(32 * 32 * 3, (512, 512)), (3, 32, 32)),
  "resnet20": (lambda: CifarResNet(3), (3, 32, 32)),
  "wrn16_4": (lambda: WideResNet(16, 4), (3, 32, 32)),
  "tiny_mlp": (lambda: MLP(8 * 8 * 1, (32,)), (1, 8, 8)),
  "tiny_cnn": (lambda: SmallCNN((8, 16)), (3, 16, 16)),
}


# --- the step variants ----------------------------------------------------------------------


def _variants(model, x, y, hp):
  """name -> a function doing one full optimizer step, as each reference documents it."""
  from sam_sps import SAM_SPS
  from unifiedsam import unifiedSAM

  def loss():
    return F.cross_entropy(model(x), y)

  sgd_args = dict(lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
  sgd = torch.optim.SGD(model.parameters(), **sgd_args)

  def sgd_step():
    sgd.zero_grad()
    loss().backward()
    sgd.step()

  def unified(lambd):
    opt = unifiedSAM(model.parameters(), torch.optim.SGD, rho=hp["rho"], lambd=lambd, **sgd_args)

    def step():  # the two passes as in the reference's README ("manual control")
      opt.zero_grad()
      loss().backward()
      opt.first_step(zero_grad=True)
      loss().backward()
      opt.second_step(zero_grad=True)

    return step

  sps = SAM_SPS(model.parameters(), weight_decay=hp["weight_decay"], rho=hp["rho"], lambd=1.0)

  def closure():
    value = loss()
    value.backward()
    return value

  return {
    "torch_sgd": sgd_step,
    "torch_unifiedsam_l1": unified(1.0),
    "torch_unifiedsam_1-1/t": unified("1-1/t"),
    "torch_sam_sps": lambda: sps.step(closure),
  }


def _theory_time(request):
  """Seconds per step of the reference's per-step Python loop on a full-batch problem.

  The problem (``a``, ``b``, ``l2``) and the hyperparameters come with the
  request, so both sides solve exactly the same float32 problem.
  """
  from sam_sps import SAM_SPS
  from unifiedsam import unifiedSAM

  a = torch.tensor(request["a"], dtype=torch.float32)
  b = torch.tensor(request["b"], dtype=torch.float32)
  l2, rho = request["l2"], request["rho"]
  w = torch.zeros(a.shape[1], requires_grad=True)

  def loss():
    r = a @ w
    if request["problem"] == "ridge":
      value = 0.5 * torch.mean((r - b) ** 2)
    else:
      value = torch.mean(F.softplus(-b * r))
    return value + 0.5 * l2 * torch.sum(w * w)

  if request["variant"] == "sam_sps":
    opt = SAM_SPS(
      [w], weight_decay=0.0, rho=rho, lambd=request["lambd"], gamma_b=request["gamma_b"]
    )

    def closure():
      value = loss()
      value.backward()
      return value

    step = lambda: opt.step(closure)
  else:
    opt = unifiedSAM([w], torch.optim.SGD, rho=rho, lambd=request["lambd"], lr=request["lr"])

    def step():
      opt.zero_grad()
      loss().backward()
      opt.first_step(zero_grad=True)
      loss().backward()
      opt.second_step(zero_grad=True)

  # No warm-up here: every request starts from w = 0 so that the final loss can be
  # compared with the JAX run; the caller discards its first request.
  steps = int(request["steps"])
  start = time.perf_counter()
  for _ in range(steps):
    step()
  seconds = (time.perf_counter() - start) / steps
  return {"seconds": seconds, "final_loss": float(loss().detach())}


def _conv_time(request):
  """Seconds of one 3×3 convolution's forward, input-gradient and weight-gradient."""
  torch.set_num_threads(int(request["threads"]))
  b, h, c = request["batch"], request["size"], request["channels"]
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[request["dtype"]]
  fmt = torch.channels_last if request["layout"] == "NHWC" else torch.contiguous_format
  x = torch.randn(b, c, h, h, dtype=dtype).to(memory_format=fmt)
  w = torch.randn(c, c, 3, 3, dtype=dtype).to(memory_format=fmt)
  dy = torch.randn(b, c, h, h, dtype=dtype).to(memory_format=fmt)
  backward = torch.ops.aten.convolution_backward
  args = (dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
  parts = {
    "fwd": lambda: F.conv2d(x, w, padding=1),
    "dx": lambda: backward(*args, [True, False, False]),
    "dw": lambda: backward(*args, [False, True, False]),
  }
  answer = {}
  with torch.no_grad():
    for name, fn in parts.items():
      fn()  # warm-up
      start = time.perf_counter()
      fn()
      answer[name] = time.perf_counter() - start
  return answer


def serve(stdin=sys.stdin, stdout=sys.stdout):
  torch.manual_seed(0)
  variants = {}
  for line in stdin:
    request = json.loads(line)
    cmd = request["cmd"]
    if cmd == "quit":
      break
    if cmd == "setup":
      torch.set_num_threads(int(request["threads"]))
      build, shape = MODELS[request["model"]]
      model = build().train()
      x = torch.randn(request["batch_size"], *shape)
      y = torch.randint(0, 10, (request["batch_size"],))
      variants = _variants(model, x, y, request)
      for fn in variants.values():  # warm-up outside the timed region
        fn()
        fn()
      answer = {
        "params": sum(p.numel() for p in model.parameters()),
        "variants": list(variants),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
      }
    elif cmd == "time":
      if "threads" in request:
        torch.set_num_threads(int(request["threads"]))
      fn, steps = variants[request["variant"]], int(request.get("steps", 1))
      start = time.perf_counter()
      for _ in range(steps):
        fn()
      answer = {"seconds": (time.perf_counter() - start) / steps}
    elif cmd == "conv":
      answer = _conv_time(request)
    elif cmd == "theory":
      torch.set_num_threads(int(request["threads"]))
      answer = _theory_time(request)
    else:
      answer = {"error": f"unknown command {cmd!r}"}
    stdout.write(json.dumps(answer) + "\n")
    stdout.flush()


if __name__ == "__main__":
  serve()
