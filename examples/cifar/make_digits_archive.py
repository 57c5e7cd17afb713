"""Packs scikit-learn's handwritten digits as a ``cifar-10-python.tar.gz`` for offline runs.

The digits (1,797 8x8 grey images, 10 classes) ship inside scikit-learn, so this gives
a small real image-classification task on machines without the CIFAR archives: each
image is upscaled to 32x32 (4x4 blocks), scaled to 0..255 and copied to 3 channels, and
a stratified 80/20 split is written in the CIFAR-10 python format. Numbers measured on
it are *not* CIFAR numbers; they only show that the trainer and the optimizers learn.

    python -m examples.cifar.make_digits_archive --data_dir=/tmp/digits
    python -m examples.cifar.main --config=examples/cifar/configs/smoke.py \
        --data_dir=/tmp/digits --workdir=runs/digits_smoke
"""

import argparse
import os

import numpy as np

from examples.cifar import input_pipeline


def digits_splits(test_fraction: float = 0.2, seed: int = 0):
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = np.kron(digits.images, np.ones((4, 4)))  # 8x8 -> 32x32
  images = np.round(images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
    images, labels, test_size=test_fraction, random_state=seed, stratify=labels
  )
  return input_pipeline.Split(x_tr, y_tr), input_pipeline.Split(x_te, y_te)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data_dir", required=True)
  args = p.parse_args(argv)
  os.makedirs(args.data_dir, exist_ok=True)
  train, test = digits_splits()
  path = os.path.join(args.data_dir, input_pipeline.archive_name("cifar10"))
  input_pipeline.write_archive(path, "cifar10", train, test)
  print(f"wrote {path}: {len(train)} train / {len(test)} test images")


if __name__ == "__main__":
  main()
