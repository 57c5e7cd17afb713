"""Base recipe shared by every CIFAR config; the paper configs override parts of it.

Every key a config may set is defined here: the trainer rejects keys it does not know
(a typo such as ``config.lamda`` is an error, not a silently ignored setting).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "default"

  # Data (the archives are read from --data_dir).
  c.dataset = "cifar10"  # "cifar10" | "cifar100"
  c.augment = True  # pad-4 random crop + horizontal flip
  c.batch_size = 128
  c.eval_batch_size = 500
  c.prefetch = 2  # batches prepared ahead by a background thread

  # Model.
  c.model = "wrn28_10"  # see models.model_names()
  c.model_width = 0  # base width override for resnet*/nnx_resnet* (0 = the paper's 16)
  c.dropout_rate = 0.0  # WideResNet only
  c.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (parameters stay float32)

  # Optimizer: "sgd" (one pass), "unified_sam" (λ-perturbation + SGD), "sam_sps" (Polyak).
  c.optimizer = "unified_sam"
  c.learning_rate = 0.1  # sgd / unified_sam
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 5e-4  # coupled L2, as torch.optim.SGD(weight_decay=...)
  c.schedule = "cosine"  # "cosine" | "step" | "constant"
  c.warmup_epochs = 0
  c.lr_boundaries = (60, 120, 160)  # epochs, for schedule="step"
  c.lr_decay = 0.2  # multiplier at each boundary, for schedule="step"
  c.rho = 0.1
  c.lambd = "1-1/t"  # "0" (USAM) .. "1" (SAM), "1/t", "1-1/t"
  c.f_star = 0.0  # sam_sps: lower bound on the batch loss
  c.gamma_b = 1.0  # sam_sps: cap on the Polyak step size
  c.label_smoothing = 0.0
  c.clip_norm = config_dict.placeholder(float)  # clip the descent gradient ∇f(e) (None: off)

  # SAM variants (docs/variants.md), all off by default; unified_sam unless noted.
  c.sam_every = 1  # interval SAM: the perturbed pass every k steps (1: every step)
  c.looksam_alpha = 0.0  # LookSAM: α of the reused direction between SAM steps (0: off)
  c.gsam_alpha = 0.0  # GSAM: α of the surrogate-gap correction (0: off; also sam_sps)
  c.gsam_rho_min = config_dict.placeholder(float)  # ρ_t follows the lr from rho down to this
  c.adaptive = False  # ASAM's scale-invariant ball (needs a ρ about 10x SAM's; also sam_sps)
  c.eta = 0.01  # ASAM's offset η in T = |x| + η
  c.asam_mask = "all"  # ASAM scales "all" parameters or only the "kernels" (ndim > 1)

  # Devices: the batch is split over the devices (sharded jit); the step is the same.
  c.num_devices = 0  # local devices to use (0: all)
  c.m_sharpness = config_dict.placeholder(int)  # examples per ascent (None: whole batch)

  # Schedule of the run.
  c.num_epochs = 200
  c.num_train_steps = -1  # stop after this many steps (-1: num_epochs); schedules keep num_epochs
  c.seed = 0

  # Sharpness diagnostics (sam_optax.sharpness) on fixed training batches, every N epochs
  # and at the end; off by default. See README.md for what one evaluation costs.
  c.sharpness_every_epochs = 0  # 0: off
  c.sharpness_batches = 1  # training batches (batch_size each, not augmented) in the loss
  c.sharpness_num_iters = 20  # power iterations for the top Hessian eigenvalue
  c.sharpness_num_samples = 0  # Hutchinson probes for the Hessian trace (0: no trace)
  c.sharpness_rho = 0.0  # radius of the worst-case ρ-ball sharpness (0: not computed)

  # Trainer.
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 2
  c.progress_bar = True
  c.plots = True
  return c
