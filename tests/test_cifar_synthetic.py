"""Synthetic CIFAR archives for the example's tests, written independently of the loader.

``make_archive`` builds a small ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
with the real archives' layout (top folder, member names, Python-2 style pickles with
byte-string keys, N x 3072 uint8 channel-plane rows), so the loader is tested against
the format rather than against its own writer. Images are class-dependent (a colour per
class plus noise), so a tiny model can learn them.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import tarfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.cifar import input_pipeline  # noqa: E402

LAYOUT = {
  "cifar10": (
    "cifar-10-python.tar.gz",
    "cifar-10-batches-py",
    [f"data_batch_{i}" for i in range(1, 6)],
    ["test_batch"],
    b"labels",
    10,
  ),
  "cifar100": (
    "cifar-100-python.tar.gz",
    "cifar-100-python",
    ["train"],
    ["test"],
    b"fine_labels",
    100,
  ),
}


def synthetic_images(n: int, num_classes: int, seed: int):
  """(images NHWC uint8, labels int) with a class colour plus noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=n)
  palette = np.random.default_rng(1234).integers(30, 226, size=(num_classes, 3))
  noise = rng.integers(-30, 31, size=(n, 32, 32, 3))
  images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
  return images, labels


def make_archive(data_dir, dataset="cifar10", n_train=80, n_test=40, seed=0, extra_members=()):
  """Writes a synthetic archive into ``data_dir``; returns (path, train, test) arrays."""
  fname, top, train_names, test_names, label_key, num_classes = LAYOUT[dataset]
  train = synthetic_images(n_train, num_classes, seed)
  test = synthetic_images(n_test, num_classes, seed + 1)
  path = os.path.join(str(data_dir), fname)
  with tarfile.open(path, "w:gz") as tar:
    dirinfo = tarfile.TarInfo(top)
    dirinfo.type = tarfile.DIRTYPE
    tar.addfile(dirinfo)
    for names, (images, labels) in ((train_names, train), (test_names, test)):
      for name, idx in zip(names, np.array_split(np.arange(len(labels)), len(names))):
        rows = images[idx].transpose(0, 3, 1, 2).reshape(len(idx), 3072)
        payload = {
          b"batch_label": name.encode(),
          b"data": rows,
          label_key: [int(v) for v in labels[idx]],
          b"filenames": [b"x.png"] * len(idx),
        }
        if dataset == "cifar100":
          payload[b"coarse_labels"] = [int(v) // 5 for v in labels[idx]]
        raw = pickle.dumps(payload, protocol=2)
        info = tarfile.TarInfo(f"{top}/{name}")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    for name, raw in extra_members:
      info = tarfile.TarInfo(f"{top}/{name}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  return path, train, test


def test_helper_matches_loader_writer_layout(tmp_path):
  # The loader's own writer (used by make_digits_archive.py) and this independent helper
  # produce archives with the same member names, and both read back to the same arrays.
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  path_a, train, test = make_archive(tmp_path / "a", "cifar10", n_train=23, n_test=7)
  split = input_pipeline.Split
  path_b = os.path.join(tmp_path / "b", "cifar-10-python.tar.gz")
  input_pipeline.write_archive(
    path_b,
    "cifar10",
    split(train[0], train[1].astype(np.int32)),
    split(test[0], test[1].astype(np.int32)),
  )
  with tarfile.open(path_a) as ta, tarfile.open(path_b) as tb:
    files_a = sorted(m.name for m in ta if m.isfile())
    files_b = sorted(m.name for m in tb if m.isfile())
  assert (
    files_a
    == files_b
    == sorted(
      [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
      + ["cifar-10-batches-py/test_batch"]
    )
  )
  tr_a, te_a = input_pipeline.read_archive(path_a, "cifar10")
  tr_b, te_b = input_pipeline.read_archive(path_b, "cifar10")
  np.testing.assert_array_equal(tr_a.images, train[0])
  np.testing.assert_array_equal(tr_a.images, tr_b.images)
  np.testing.assert_array_equal(te_a.labels, te_b.labels)
  np.testing.assert_array_equal(te_a.labels, test[1])
