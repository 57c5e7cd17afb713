"""sam_optax: sharpness-aware minimization for JAX and Optax.

Unified SAM (Oikonomou & Loizou, ICLR 2025) and SAM-SPS (SAM with a Stochastic
Polyak step size) as composable optax transformations, driven by ``sam_step``.
"""

from sam_optax import sharpness
from sam_optax._common import find_state
from sam_optax._loss_scale import DynamicLossScaleState
from sam_optax._loss_scale import dynamic_loss_scale
from sam_optax._parallel import check_batch_divisible
from sam_optax._parallel import global_batch
from sam_optax._parallel import replicate
from sam_optax._parallel import shard_batch
from sam_optax._parallel import unreplicate
from sam_optax._perturbation import UnifiedPerturbationState
from sam_optax._perturbation import lambda_schedule
from sam_optax._perturbation import unified_perturbation
from sam_optax._polyak import PolyakStepSizeState
from sam_optax._polyak import polyak_step_size
from sam_optax._sam import SAMState
from sam_optax._sam import sam_sps
from sam_optax._sam import sharpness_aware
from sam_optax._sam import unified_sam
from sam_optax._step import sam_step
from sam_optax._variants import IntervalSAMState
from sam_optax._variants import gsam
from sam_optax._variants import gsam_rho_schedule
from sam_optax._variants import interval_sam
from sam_optax._variants import looksam

__version__ = "0.1.0"

__all__ = (
  "DynamicLossScaleState",
  "IntervalSAMState",
  "PolyakStepSizeState",
  "SAMState",
  "UnifiedPerturbationState",
  "check_batch_divisible",
  "dynamic_loss_scale",
  "find_state",
  "global_batch",
  "gsam",
  "gsam_rho_schedule",
  "interval_sam",
  "lambda_schedule",
  "looksam",
  "polyak_step_size",
  "replicate",
  "sam_sps",
  "sam_step",
  "shard_batch",
  "sharpness",
  "sharpness_aware",
  "unified_perturbation",
  "unified_sam",
  "unreplicate",
)


def __getattr__(name: str):
  # Submodules for flax (sam_optax.nnx imports it) load on first use only.
  if name in ("nnx", "linen"):
    import importlib  # pylint: disable=g-import-not-at-top

    return importlib.import_module(f"sam_optax.{name}")
  raise AttributeError(f"module 'sam_optax' has no attribute {name!r}")
