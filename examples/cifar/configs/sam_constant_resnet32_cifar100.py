"""Constant-step-size baseline of the SAM-SPS tables ("Constant SAM (tuned)").

SAM (λ = 1; --config.lambd=0 for USAM) + SGD at a constant learning rate, ResNet-32,
CIFAR-100. The paper tunes the learning rate per ρ; the seed does not give the tuned
values, so sweep --config.learning_rate (grid.py --table=sam_sps --constant_lrs=...).
"""

from examples.cifar.configs import default


def get_config():
  c = default.get_config()
  c.name = "sam_constant_resnet32_cifar100"
  c.dataset = "cifar100"
  c.model = "resnet32"
  c.optimizer = "unified_sam"
  c.rho = 0.1
  c.lambd = "1"
  c.learning_rate = 0.05
  c.schedule = "constant"
  c.num_epochs = 200
  return c
