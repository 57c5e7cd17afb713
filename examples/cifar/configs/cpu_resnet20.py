"""A CPU-sized run: Unified SAM (ρ = 0.1, λ_t = 1 - 1/t) on ResNet-20, 10 epochs.

Not a paper setting: the recipe of the papers (SGD momentum 0.9, weight decay 5e-4,
batch 128, cosine from 0.1) on a small model and a short schedule, for checking that
an optimizer learns on a machine without a GPU. README.md's measured numbers use it on
scikit-learn's digits (make_digits_archive.py) with --config.augment=False.
"""

from examples.cifar.configs import default


def get_config():
  c = default.get_config()
  c.name = "cpu_resnet20"
  c.dataset = "cifar10"
  c.model = "resnet20"
  c.optimizer = "unified_sam"
  c.rho = 0.1
  c.lambd = "1-1/t"
  c.learning_rate = 0.1
  c.schedule = "cosine"
  c.num_epochs = 10
  c.log_every_steps = 5
  c.checkpoint_every_steps = 100
  return c
