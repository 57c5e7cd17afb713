"""Unified SAM, WRN-28-10 on CIFAR-10 (Oikonomou & Loizou, ICLR 2025, Table 2).

One cell of the table: ρ = 0.3, λ_t = 1 - 1/t (the paper's strongest default, 95.99 ± 0.06).
Other cells: --config.rho=0.1..0.4 --config.lambd=0|0.5|1|1/t|1-1/t, or run grid.py.
SGD momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, learning rate 0.1.
The seed README does not state the schedule; we use cosine decay (see README.md).
"""

from examples.cifar.configs import default


def get_config():
  c = default.get_config()
  c.name = "unified_sam_wrn28_10"
  c.dataset = "cifar10"
  c.model = "wrn28_10"
  c.optimizer = "unified_sam"
  c.rho = 0.3
  c.lambd = "1-1/t"
  c.learning_rate = 0.1
  c.schedule = "cosine"
  c.num_epochs = 200
  return c
