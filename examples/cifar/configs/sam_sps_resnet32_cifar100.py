"""SAM-SPS, ResNet-32 on CIFAR-100 (SAM-SPS paper, Tables 3-4, "SAM-SPS" column).

No learning rate: γ_t = min([f(e) - f* - <∇f(e), δ>]_+ / ‖∇f(e)‖², γ_b) with f* = 0,
γ_b = 1, weight decay 5e-4 in the update, batch 128, 200 epochs.
λ = 1 is SAM-SPS; --config.lambd=0 gives USAM-SPS. Table rows: --config.rho=0.1..0.4.
"""

from examples.cifar.configs import default


def get_config():
  c = default.get_config()
  c.name = "sam_sps_resnet32_cifar100"
  c.dataset = "cifar100"
  c.model = "resnet32"
  c.optimizer = "sam_sps"
  c.rho = 0.1
  c.lambd = "1"
  c.f_star = 0.0
  c.gamma_b = 1.0
  c.weight_decay = 5e-4
  c.schedule = "constant"  # unused by sam_sps; γ_t is the schedule
  c.num_epochs = 200
  return c
