"""Smoke test: a ResNet-8 of width 8 for a handful of steps (seconds on a CPU)."""

from examples.cifar.configs import default


def get_config():
  c = default.get_config()
  c.name = "smoke"
  c.dataset = "cifar10"
  c.model = "resnet8"
  c.model_width = 8
  c.optimizer = "unified_sam"
  c.rho = 0.1
  c.lambd = "1-1/t"
  c.batch_size = 16
  c.eval_batch_size = 32
  c.num_epochs = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  c.progress_bar = False
  return c
