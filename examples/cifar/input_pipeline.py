"""CIFAR-10/100 input pipeline: archive reader, augmentation, deterministic batching.

The data are read from the archives the CIFAR authors distribute for Python,
placed by the user in ``--data_dir``; nothing is ever downloaded:

* ``cifar-10-python.tar.gz``: ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5``
  and ``test_batch``, each a pickled dict with ``b'data'`` (N x 3072 uint8, channel
  planes R, G, B of a 32x32 image) and ``b'labels'``.
* ``cifar-100-python.tar.gz``: ``cifar-100-python/train`` and ``test``, with
  ``b'data'`` and ``b'fine_labels'`` (the 100-class labels).

Determinism. Everything a training step sees is a pure function of
``(seed, step)``: the epoch is ``step // steps_per_epoch``, the epoch's order is a
permutation drawn from ``(seed, epoch)`` and the augmentation of a batch is drawn
from ``(seed, epoch, index in epoch)``. A run resumed from a checkpoint at step ``s``
therefore sees exactly the batches the uninterrupted run saw from step ``s`` on.

Partial batches. Training drops the last ``N mod batch_size`` examples of each
epoch's permutation (every step has the same shape, so one compiled step; the dropped
examples differ from epoch to epoch). Evaluation keeps them: the last batch is padded
to the full size and carries a 0/1 ``mask`` so every test image counts exactly once.

Images stay ``uint8`` on the host; normalization by the per-channel mean and
standard deviation of the training set happens on the device (``normalize``), which
keeps host work and host-to-device traffic small.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import queue
import tarfile
import threading
import zlib
from collections.abc import Iterator

import numpy as np

IMAGE_SIZE = 32
NUM_CHANNELS = 3
PAD = 4

# name -> (archive file, train members, test members, label key, number of classes)
_DATASETS = {
  "cifar10": (
    "cifar-10-python.tar.gz",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    b"labels",
    10,
  ),
  "cifar100": (
    "cifar-100-python.tar.gz",
    ("train",),
    ("test",),
    b"fine_labels",
    100,
  ),
}

DATASETS = tuple(_DATASETS)


class DatasetError(ValueError):
  """The CIFAR archive is missing, corrupt, truncated or not in the expected format."""


def archive_name(dataset: str) -> str:
  """The file name the loader expects in ``data_dir`` for ``dataset``."""
  return _spec(dataset)[0]


def archive_members(dataset: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Base names of the pickled (train, test) members inside the archive."""
  spec = _spec(dataset)
  return spec[1], spec[2]


def _spec(dataset: str):
  if dataset not in _DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
  return _DATASETS[dataset]


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # (N, 32, 32, 3) uint8, NHWC
  labels: np.ndarray  # (N,) int32

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: Split
  test: Split
  num_classes: int
  mean: np.ndarray  # (3,) float32, per-channel mean of the training images in [0, 255]
  std: np.ndarray  # (3,) float32, per-channel standard deviation in [0, 255]


# --------------------------------------------------------------------------- reading


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickler that only rebuilds numpy arrays (the CIFAR pickles hold nothing else).

  Loading an arbitrary pickle can run arbitrary code; a file in ``data_dir`` is not
  trusted that far.
  """

  _ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Protocol-2 pickles written by Python 3 encode bytes payloads through this one;
    # it only turns a str into bytes.
    ("_codecs", "encode"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
    if module.startswith("numpy.core") and hasattr(np, "_core"):
      module = "numpy._core" + module[len("numpy.core") :]  # numpy 2 spelling, no warning
    return super().find_class(module, name)


def _load_pickle(raw: bytes) -> dict:
  # The archives were written by Python 2: byte-string keys, latin-1 payloads.
  return _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()


def _missing_message(path: str, dataset: str) -> str:
  train, test = archive_members(dataset)
  return (
    f"CIFAR archive not found: {path}\n"
    f"The {dataset} loader reads the python-version archive '{archive_name(dataset)}' "
    f"(members {', '.join(train + test)}) from --data_dir and never downloads it. "
    f"Expected files in --data_dir: "
    f"{', '.join(archive_name(d) for d in DATASETS)} (one per dataset). Fetch it from "
    "the CIFAR page of the University of Toronto and place it there unchanged."
  )


def read_archive(path: str, dataset: str) -> tuple[Split, Split]:
  """Reads the train and test splits of ``dataset`` from the archive at ``path``."""
  _, train_names, test_names, label_key, num_classes = _spec(dataset)
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_message(path, dataset))
  wanted = set(train_names + test_names)
  found: dict[str, dict] = {}
  try:
    with tarfile.open(path, "r:gz") as tar:
      for member in tar:
        base = os.path.basename(member.name)
        if not member.isfile() or base not in wanted:
          continue
        if base in found:
          raise DatasetError(f"{path}: member {base!r} appears twice")
        handle = tar.extractfile(member)
        raw = handle.read()
        if len(raw) != member.size:
          raise DatasetError(f"{path}: member {base!r} is truncated")
        found[base] = _load_pickle(raw)
  except DatasetError:
    raise
  except (
    tarfile.TarError,
    EOFError,
    OSError,
    zlib.error,
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
  ) as e:
    raise DatasetError(
      f"{path} is corrupt or truncated ({type(e).__name__}: {e}). Delete it and "
      f"place a fresh copy of '{archive_name(dataset)}' in --data_dir."
    ) from e
  missing = [n for n in train_names + test_names if n not in found]
  if missing:
    raise DatasetError(
      f"{path} does not look like '{archive_name(dataset)}': members {missing} are "
      f"missing (expected {list(train_names + test_names)}). Is it the archive of "
      "another dataset, or a truncated download?"
    )
  train = _concat([_to_split(found[n], n, path, label_key, num_classes) for n in train_names])
  test = _concat([_to_split(found[n], n, path, label_key, num_classes) for n in test_names])
  return train, test


def _to_split(batch, name, path, label_key, num_classes) -> Split:
  if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise DatasetError(
      f"{path}: member {name!r} must hold a dict with keys b'data' and {label_key!r}, found {keys}"
    )
  data = np.asarray(batch[b"data"])
  labels = np.asarray(batch[label_key])
  row = IMAGE_SIZE * IMAGE_SIZE * NUM_CHANNELS
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
    raise DatasetError(
      f"{path}: member {name!r} has data of dtype {data.dtype} and shape {data.shape}, "
      f"expected uint8 (N, {row})"
    )
  if labels.shape != (data.shape[0],):
    raise DatasetError(
      f"{path}: member {name!r} has {labels.shape} labels for {data.shape[0]} images"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DatasetError(f"{path}: member {name!r} has labels outside [0, {num_classes})")
  # Rows are channel planes (R 1024, G 1024, B 1024) of a row-major 32x32 image.
  images = data.reshape(-1, NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
  return Split(np.ascontiguousarray(images), labels.astype(np.int32))


def _concat(splits: list[Split]) -> Split:
  return Split(
    np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits])
  )


def channel_stats(images: np.ndarray, chunk: int = 5000) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of uint8 NHWC images, in float64 sums."""
  total = np.zeros(NUM_CHANNELS)
  total_sq = np.zeros(NUM_CHANNELS)
  for start in range(0, len(images), chunk):
    part = images[start : start + chunk].reshape(-1, NUM_CHANNELS).astype(np.float64)
    total += part.sum(0)
    total_sq += np.square(part).sum(0)
  count = images.shape[0] * IMAGE_SIZE * IMAGE_SIZE
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def load(data_dir: str, dataset: str) -> Dataset:
  """Loads ``dataset`` ('cifar10' or 'cifar100') from ``data_dir``."""
  path = os.path.join(os.path.expanduser(data_dir), archive_name(dataset))
  train, test = read_archive(path, dataset)
  if len(train) == 0 or len(test) == 0:
    raise DatasetError(f"{path}: the train or test split is empty")
  mean, std = channel_stats(train.images)
  return Dataset(dataset, train, test, _spec(dataset)[4], mean, std)


def write_archive(path: str, dataset: str, train: Split, test: Split) -> None:
  """Writes ``train``/``test`` as a python-version CIFAR archive (same layout as the real one).

  Used to package other small image sets (``make_digits_archive.py``) for this loader.
  The training split is spread over the members the real archive has.
  """
  _, train_names, test_names, label_key, _ = _spec(dataset)
  top = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"

  def encode(split: Split) -> np.ndarray:
    return split.images.transpose(0, 3, 1, 2).reshape(len(split), -1).astype(np.uint8)

  members = []
  for names, split in ((train_names, train), (test_names, test)):
    for name, idx in zip(names, np.array_split(np.arange(len(split)), len(names))):
      payload = {
        b"batch_label": name.encode(),
        b"data": encode(Split(split.images[idx], split.labels[idx])),
        label_key: [int(v) for v in split.labels[idx]],
        b"filenames": [f"{name}_{i}.png".encode() for i in idx],
      }
      members.append((f"{top}/{name}", pickle.dumps(payload, protocol=2)))
  with tarfile.open(path, "w:gz") as tar:
    for name, raw in members:
      info = tarfile.TarInfo(name)
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))


# ---------------------------------------------------------------------- augmentation


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Pad-4 random crop and random horizontal flip of a uint8 NHWC batch.

  Padding is with zeros (black) before normalization, as torchvision's
  ``RandomCrop(32, padding=4)``; each image gets its own offsets (0..8) and flip.
  """
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  dy = rng.integers(0, 2 * PAD + 1, size=n)
  dx = rng.integers(0, 2 * PAD + 1, size=n)
  flip = rng.random(n) < 0.5
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def normalize(images, mean, std):
  """uint8 images -> float32 (x - mean) / std per channel; works on numpy and jax arrays."""
  return (images.astype("float32") - mean) / std


# -------------------------------------------------------------------------- batching


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training steps in one epoch (the last partial batch is dropped)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  steps = num_examples // batch_size
  if steps == 0:
    raise ValueError(
      f"batch_size {batch_size} is larger than the training set ({num_examples} images)"
    )
  return steps


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the training set in ``epoch``; a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch, 0]).permutation(num_examples)


class TrainBatches:
  """Training batches as a pure function of (seed, step)."""

  def __init__(self, split: Split, batch_size: int, seed: int, augment_images: bool = True):
    self.split = split
    self.batch_size = batch_size
    self.seed = seed
    self.augment_images = augment_images
    self.steps_per_epoch = steps_per_epoch(len(split), batch_size)
    self._perm_epoch = -1
    self._perm = None

  def indices(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = epoch_permutation(len(self.split), self.seed, epoch)
      self._perm_epoch = epoch
    return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = self.indices(step)
    images = self.split.images[idx]
    if self.augment_images:
      epoch, i = divmod(step, self.steps_per_epoch)
      images = augment(images, np.random.default_rng([self.seed, epoch, i + 1]))
    return {"image": images, "label": self.split.labels[idx]}

  def iterate(self, start_step: int, end_step: int, prefetch: int = 2, put=None) -> Iterator[dict]:
    """Yields batches for steps [start_step, end_step), prepared by a background thread.

    ``put`` (e.g. ``jax.device_put``) is applied in the thread so the transfer overlaps
    the previous step; ``prefetch`` batches are kept ready.
    """
    if prefetch <= 0:
      for step in range(start_step, end_step):
        batch = self(step)
        yield put(batch) if put else batch
      return
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    done = object()

    def produce():
      try:
        for step in range(start_step, end_step):
          if stop.is_set():
            return
          batch = self(step)
          item = put(batch) if put else batch
          while not stop.is_set():
            try:
              q.put(item, timeout=0.1)
              break
            except queue.Full:
              continue
        q.put(done)
      except BaseException as e:  # surface pipeline errors in the consumer
        q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="cifar-prefetch")
    thread.start()
    try:
      while True:
        item = q.get()
        if item is done:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      stop.set()
      thread.join(timeout=5)


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Test batches in order; the last one is zero-padded to ``batch_size`` with ``mask`` 0."""
  n = len(split)
  for start in range(0, n, batch_size):
    images = split.images[start : start + batch_size]
    labels = split.labels[start : start + batch_size]
    valid = len(labels)
    mask = np.ones(batch_size, np.float32)
    if valid < batch_size:
      pad = batch_size - valid
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      mask[valid:] = 0.0
    yield {"image": images, "label": labels, "mask": mask}
