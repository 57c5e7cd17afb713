"""A CPU-sized run: Unified SAM (ρ = 0.1, λ_t = 1 - 1/t) on WRN-16-4, CIFAR-10, 2 epochs.

For checking a setup end to end on a laptop; not a paper setting. Expect minutes per
epoch on a few CPU cores.
"""

from examples.cifar.configs import default


def get_config():
  c = default.get_config()
  c.name = "cpu_wrn16_4"
  c.dataset = "cifar10"
  c.model = "wrn16_4"
  c.optimizer = "unified_sam"
  c.rho = 0.1
  c.lambd = "1-1/t"
  c.learning_rate = 0.1
  c.schedule = "cosine"
  c.num_epochs = 2
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  return c
