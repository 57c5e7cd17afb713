"""SGD baseline of Table 2: WRN-28-10 on CIFAR-10 (paper: 95.35 ± 0.06).

Same recipe as unified_sam_wrn28_10.py without the ascent (one forward/backward per step).
"""

from examples.cifar.configs import default


def get_config():
  c = default.get_config()
  c.name = "sgd_wrn28_10"
  c.dataset = "cifar10"
  c.model = "wrn28_10"
  c.optimizer = "sgd"
  c.learning_rate = 0.1
  c.schedule = "cosine"
  c.num_epochs = 200
  return c
