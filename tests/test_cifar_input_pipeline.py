"""Input pipeline of the CIFAR example: reading, errors, augmentation and batching on values."""

import gzip
import io
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_cifar_synthetic import make_archive  # noqa: E402

from examples.cifar import input_pipeline as ip  # noqa: E402

# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_load_reads_layout_and_stats(tmp_path, dataset):
  _, (tr_x, tr_y), (te_x, te_y) = make_archive(tmp_path, dataset, n_train=50, n_test=21)
  ds = ip.load(str(tmp_path), dataset)
  assert ds.num_classes == (10 if dataset == "cifar10" else 100)
  assert ds.train.images.shape == (50, 32, 32, 3) and ds.train.images.dtype == np.uint8
  np.testing.assert_array_equal(ds.train.images, tr_x)  # channel planes -> NHWC
  np.testing.assert_array_equal(ds.train.labels, tr_y)  # fine labels for CIFAR-100
  np.testing.assert_array_equal(ds.test.images, te_x)
  np.testing.assert_array_equal(ds.test.labels, te_y)
  flat = tr_x.reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(ds.mean, flat.mean(0), rtol=1e-6)
  np.testing.assert_allclose(ds.std, flat.std(0), rtol=1e-5)


def test_channel_plane_decoding_on_a_known_pixel(tmp_path):
  # Row layout of the real archive: 1024 red values, then 1024 green, then 1024 blue.
  row = np.zeros(3072, np.uint8)
  row[0] = 200  # R at (0, 0)
  row[1024 + 33] = 100  # G at (1, 1)
  row[2048 + 1023] = 50  # B at (31, 31)
  payload = {b"data": row[None], b"labels": [3]}
  path = tmp_path / "cifar-10-python.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
      raw = pickle.dumps(payload, protocol=2)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  train, _ = ip.read_archive(str(path), "cifar10")
  img = train.images[0]
  assert (img[0, 0, 0], img[1, 1, 1], img[31, 31, 2]) == (200, 100, 50)
  assert int(img.astype(int).sum()) == 350
  assert train.labels.tolist() == [3] * 5


def test_missing_archive_names_expected_files(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    ip.load(str(tmp_path), "cifar100")
  msg = str(e.value)
  assert "cifar-100-python.tar.gz" in msg and "cifar-10-python.tar.gz" in msg
  assert "never downloads" in msg


def test_truncated_archive_is_a_clear_error(tmp_path):
  path, _, _ = make_archive(tmp_path, "cifar10")
  raw = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(raw[: len(raw) // 2])
  with pytest.raises(ip.DatasetError, match="corrupt or truncated"):
    ip.load(str(tmp_path), "cifar10")


def test_garbage_archive_is_a_clear_error(tmp_path):
  (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"<html>not found</html>" * 10)
  with pytest.raises(ip.DatasetError, match="corrupt or truncated"):
    ip.load(str(tmp_path), "cifar10")


def test_wrong_dataset_archive_is_a_clear_error(tmp_path):
  path, _, _ = make_archive(tmp_path, "cifar10")
  os.rename(path, tmp_path / "cifar-100-python.tar.gz")
  with pytest.raises(ip.DatasetError, match=r"members \['train', 'test'\] are missing"):
    ip.load(str(tmp_path), "cifar100")


def test_bad_payloads_are_clear_errors(tmp_path):
  def write(payload):
    path = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
      for name in ("train", "test"):
        raw = payload if isinstance(payload, bytes) else pickle.dumps(payload, protocol=2)
        info = tarfile.TarInfo(f"cifar-100-python/{name}")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return str(path)

  ok = np.zeros((2, 3072), np.uint8)
  with pytest.raises(ip.DatasetError, match="fine_labels"):
    ip.read_archive(write({b"data": ok, b"labels": [0, 1]}), "cifar100")
  with pytest.raises(ip.DatasetError, match=r"expected uint8 \(N, 3072\)"):
    ip.read_archive(write({b"data": ok[:, :100], b"fine_labels": [0, 1]}), "cifar100")
  with pytest.raises(ip.DatasetError, match="outside"):
    ip.read_archive(write({b"data": ok, b"fine_labels": [0, 100]}), "cifar100")
  with pytest.raises(ip.DatasetError, match="corrupt or truncated"):
    ip.read_archive(write(b"\x80\x02not a pickle"), "cifar100")

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  with pytest.raises(ip.DatasetError, match="refusing to load"):
    ip.read_archive(write({b"data": Evil(), b"fine_labels": [0]}), "cifar100")


def test_truncated_member_inside_valid_gzip(tmp_path):
  # A tar whose last member is cut short, re-compressed as a valid gzip stream.
  path, _, _ = make_archive(tmp_path, "cifar10")
  raw = gzip.decompress(open(path, "rb").read())
  with open(path, "wb") as f:
    f.write(gzip.compress(raw[: int(len(raw) * 0.9)]))
  with pytest.raises(ip.DatasetError, match="corrupt or truncated|truncated|missing"):
    ip.load(str(tmp_path), "cifar10")


# ------------------------------------------------------------------------ augmentation


def test_augment_is_a_padded_crop_with_flip():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(64, 32, 32, 3)).astype(np.uint8)  # no zeros
  out = ip.augment(images, np.random.default_rng(7))
  # Replay the draws: offsets dy, dx in [0, 8], then the flip coin.
  r = np.random.default_rng(7)
  dy, dx, flip = r.integers(0, 9, 64), r.integers(0, 9, 64), r.random(64) < 0.5
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(64):
    want = padded[i, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
    if flip[i]:
      want = want[:, ::-1]
    np.testing.assert_array_equal(out[i], want)
  # Zero padding shows up exactly as many rows/columns as the offset moved.
  for i in range(64):
    zero_rows = int(np.all(out[i] == 0, axis=(1, 2)).sum())
    assert zero_rows == abs(int(dy[i]) - 4)
  assert 0 < flip.sum() < 64 and len(set(dy.tolist())) == 9
  assert out.dtype == np.uint8 and out.shape == images.shape


def test_normalize_per_channel():
  images = np.full((2, 32, 32, 3), 100, np.uint8)
  out = ip.normalize(
    images, np.array([100.0, 50.0, 0.0], np.float32), np.array([1.0, 10.0, 50.0], np.float32)
  )
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 5.0, 2.0])


# ---------------------------------------------------------------------------- batching


def _split(n):
  images = np.zeros((n, 32, 32, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(n) % 256  # tag each example
  return ip.Split(images, np.arange(n, dtype=np.int32))


def test_training_drops_last_partial_batch_and_reshuffles():
  batches = ip.TrainBatches(_split(70), batch_size=16, seed=3, augment_images=False)
  assert batches.steps_per_epoch == 4
  epoch0 = np.concatenate([batches(s)["label"] for s in range(4)])
  epoch1 = np.concatenate([batches(s)["label"] for s in range(4, 8)])
  assert len(epoch0) == 64 and len(set(epoch0.tolist())) == 64  # no repeats in an epoch
  np.testing.assert_array_equal(epoch0, ip.epoch_permutation(70, 3, 0)[:64])
  np.testing.assert_array_equal(epoch1, ip.epoch_permutation(70, 3, 1)[:64])
  assert not np.array_equal(epoch0, epoch1)
  assert all(batches(s)["label"].shape == (16,) for s in range(8))
  b = batches(5)  # labels and images stay paired
  np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"] % 256)


def test_batches_are_a_pure_function_of_seed_and_step():
  split = ip.Split(
    np.random.default_rng(0).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8),
    np.arange(70, dtype=np.int32),
  )
  a = ip.TrainBatches(split, 16, seed=5)
  b = ip.TrainBatches(split, 16, seed=5)
  order = [9, 2, 9, 0, 5]  # random access, out of order, repeated
  for s in order:
    np.testing.assert_array_equal(a(s)["image"], b(s)["image"])
    np.testing.assert_array_equal(a(s)["label"], b(s)["label"])
  first = a(6)["image"]
  np.testing.assert_array_equal(a(1)["image"], b(1)["image"])
  np.testing.assert_array_equal(a(6)["image"], first)
  c = ip.TrainBatches(split, 16, seed=6)
  assert not np.array_equal(c(0)["label"], a(0)["label"])
  # The threaded iterator yields exactly the same batches, starting anywhere.
  got = list(a.iterate(3, 9, prefetch=2))
  assert len(got) == 6
  for s, batch in zip(range(3, 9), got):
    np.testing.assert_array_equal(batch["image"], b(s)["image"])


def test_iterator_surfaces_errors_and_stops_early():
  batches = ip.TrainBatches(_split(32), 16, seed=0)
  it = batches.iterate(0, 100, prefetch=2)
  next(it)
  it.close()  # closing early must not hang

  def boom(batch):
    raise RuntimeError("transfer failed")

  with pytest.raises(RuntimeError, match="transfer failed"):
    list(batches.iterate(0, 3, put=boom))


def test_eval_keeps_last_partial_batch_with_mask():
  split = _split(70)
  got = list(ip.eval_batches(split, 16))
  assert len(got) == 5
  assert [int(b["mask"].sum()) for b in got] == [16, 16, 16, 16, 6]
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in got])
  np.testing.assert_array_equal(labels, np.arange(70))
  assert got[-1]["image"].shape == (16, 32, 32, 3)
  assert np.all(got[-1]["image"][6:] == 0)


def test_batch_size_errors():
  with pytest.raises(ValueError, match="larger than the training set"):
    ip.TrainBatches(_split(10), 16, seed=0)
  with pytest.raises(ValueError, match="positive"):
    ip.steps_per_epoch(10, 0)
  with pytest.raises(ValueError, match="dataset must be one of"):
    ip.archive_name("mnist")


def test_digits_archive_round_trip(tmp_path):
  from examples.cifar import make_digits_archive

  make_digits_archive.main([f"--data_dir={tmp_path}"])
  ds = ip.load(str(tmp_path), "cifar10")
  assert (len(ds.train), len(ds.test)) == (1437, 360)
  assert np.bincount(ds.test.labels, minlength=10).min() >= 35  # stratified split
  img = ds.train.images[0]
  assert img.shape == (32, 32, 3) and np.array_equal(img[..., 0], img[..., 2])
  np.testing.assert_array_equal(img[:4, :4, 0], np.full((4, 4), img[0, 0, 0]))  # 4x4 blocks
  assert set(np.unique(ds.train.images)) <= {round(v * 255 / 16) for v in range(17)}
  assert ds.train.images.max() == 255
