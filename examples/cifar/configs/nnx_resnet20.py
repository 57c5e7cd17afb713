"""The NNX path: Unified SAM on a ResNet-20 written with Flax NNX (CIFAR-10, 200 epochs).

Same architecture and recipe as a Linen ResNet-20 run; the trainer steps the NNX module
and an ``nnx.Optimizer`` with ``sam_optax.nnx.sam_step`` (see train.py).
"""

from examples.cifar.configs import default


def get_config():
  c = default.get_config()
  c.name = "nnx_resnet20"
  c.dataset = "cifar10"
  c.model = "nnx_resnet20"
  c.optimizer = "unified_sam"
  c.rho = 0.1
  c.lambd = "1-1/t"
  c.learning_rate = 0.1
  c.schedule = "cosine"
  c.num_epochs = 200
  return c
