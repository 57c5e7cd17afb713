"""Cosine-annealing baseline of the SAM-SPS tables: SAM (λ = 1) + SGD, ResNet-32, CIFAR-100.

--config.lambd=0 gives the "USAM + Cosine Annealing" column. Peak learning rate 0.1,
momentum 0.9, weight decay 5e-4, batch 128, 200 epochs (the issue's recipe; the seed
README does not list the baselines' learning rates).
"""

from examples.cifar.configs import default


def get_config():
  c = default.get_config()
  c.name = "sam_cosine_resnet32_cifar100"
  c.dataset = "cifar100"
  c.model = "resnet32"
  c.optimizer = "unified_sam"
  c.rho = 0.1
  c.lambd = "1"
  c.learning_rate = 0.1
  c.schedule = "cosine"
  c.num_epochs = 200
  return c
