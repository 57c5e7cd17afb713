"""Trains a CIFAR model with SGD, Unified SAM or SAM-SPS.

    python -m examples.cifar.main --config=examples/cifar/configs/unified_sam_wrn28_10.py \
        --data_dir=~/data --workdir=runs/usam_wrn28_10 [--config.rho=0.2] [--resume]

Any config key can be overridden on the command line as --config.<key>=<value>.
"""

import difflib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from examples.cifar import train
from examples.cifar.configs import default

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
  "config", None, "Path to a config file in examples/cifar/configs/.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where metrics, plots, checkpoints and the report go.")
flags.DEFINE_string(
  "data_dir", None, "Folder with cifar-10-python.tar.gz / cifar-100-python.tar.gz."
)
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.mark_flags_as_required(["config", "workdir", "data_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    train.train_and_evaluate(
      FLAGS.config, FLAGS.workdir, data_dir=FLAGS.data_dir, resume=FLAGS.resume
    )
  except train.TrainingInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
  # ConfigError, CheckpointMismatchError, DatasetError and sam_optax's errors are ValueErrors.
  except (ValueError, FileExistsError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def check_overrides(argv) -> None:
  """Rejects --config.<key>=... for keys no config has, before absl parses the flags."""
  known = list(default.get_config().keys())
  for arg in argv[1:]:
    if arg.startswith("--config."):
      key = arg[len("--config.") :].split("=", 1)[0].split(".", 1)[0]
      if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(
          f"error: unknown config key {key!r}{hint}; known keys: {', '.join(sorted(known))}",
          file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
  check_overrides(sys.argv)
  app.run(main)
