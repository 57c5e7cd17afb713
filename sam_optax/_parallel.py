"""Data-parallel helpers: checked batch splitting and replication for pmap and sharded jit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec


def check_batch_divisible(batch: Any, num_shards: int, *, what: str | None = None) -> int:
  """Checks that a batch can be split into ``num_shards`` equal parts; returns its size.

  Every leaf of ``batch`` must be an array with a leading (example) axis, all
  leaves must agree on its size, and that size must be a multiple of
  ``num_shards``. Works on concrete and traced arrays (only shapes are read), so
  a step can call it before any compute.

  Args:
    batch: a pytree of arrays whose leading axis indexes the examples.
    num_shards: the number of equal parts (devices, processes or groups).
    what: how to name the parts in the error message, e.g. ``"8 devices"``.

  Returns:
    The leading-axis size shared by all leaves.

  Raises:
    ValueError: naming ``batch``, when a leaf is a scalar, the leaves disagree,
      or the size is not divisible by ``num_shards``.
  """
  valid = isinstance(num_shards, (int, np.integer)) and not isinstance(num_shards, bool)
  if not valid or num_shards < 1:
    raise ValueError(f"`num_shards` must be a positive int, got {num_shards!r}.")
  leaves, _ = jax.tree_util.tree_flatten_with_path(batch)
  if not leaves:
    raise ValueError("`batch` has no array leaves to split.")
  sizes = {}
  for path, leaf in leaves:
    shape = np.shape(leaf)
    name = "batch" + jax.tree_util.keystr(path)
    if not shape:
      raise ValueError(f"`{name}` is a scalar; every batch leaf needs a leading example axis.")
    sizes[name] = shape[0]
  if len(set(sizes.values())) > 1:
    listed = ", ".join(f"{name}: {size}" for name, size in sizes.items())
    raise ValueError(f"`batch` leaves disagree on the leading (example) axis ({listed}).")
  size = next(iter(sizes.values()))
  if size % num_shards:
    what = what or f"{num_shards} shards"
    raise ValueError(
      f"`batch` has {size} examples on its leading axis, which is not divisible by "
      f"{what}; use a batch size that is a multiple of {num_shards}."
    )
  return size


def split_leading_axis(batch: Any, num_shards: int, *, what: str | None = None) -> Any:
  """Reshapes every leaf ``[B, ...]`` to ``[num_shards, B // num_shards, ...]`` (checked)."""
  check_batch_divisible(batch, num_shards, what=what)
  return jax.tree.map(lambda x: x.reshape((num_shards, -1) + tuple(np.shape(x)[1:])), batch)


def shard_batch(batch: Any, num_devices: int | None = None) -> Any:
  """Splits a host batch for ``jax.pmap``: ``[B, ...]`` → ``[devices, B / devices, ...]``.

  Args:
    batch: a pytree of arrays whose leading axis indexes the examples.
    num_devices: the pmap axis size; defaults to ``jax.local_device_count()``.

  Returns:
    The reshaped batch (same leaf types).

  Raises:
    ValueError: when the batch size is not divisible by the device count.
  """
  n = jax.local_device_count() if num_devices is None else num_devices
  return split_leading_axis(batch, n, what=f"the {n} devices")


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
  """Places one copy of every leaf on each device, stacked on a new leading axis (for pmap).

  Args:
    tree: a pytree of arrays (parameters, optimizer state, batch-norm statistics).
    devices: the devices; defaults to ``jax.local_devices()``.

  Returns:
    The pytree with leaves of shape ``[len(devices), *leaf.shape]``.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  sharding = NamedSharding(Mesh(np.array(devices), ("replica",)), PartitionSpec("replica"))

  def put(x):
    x = jnp.asarray(x)
    copies = [jax.device_put(x[None], d) for d in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, copies)

  return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
  """The first replica of a pmap-replicated pytree (the inverse of :func:`replicate`)."""
  return jax.tree.map(lambda x: x[0], tree)


def global_batch(local_batch: Any, mesh: Mesh, axis: str = "data") -> Any:
  """This process's batch as one global ``jax.Array`` sharded along ``mesh`` axis ``axis``.

  For ``jax.jit`` data parallelism (single- or multi-process): the leading axis
  of every leaf is split over the devices of ``axis``; with several processes,
  each passes its own slice and the global batch is their concatenation in the
  mesh's device order (process order for ``jax.make_mesh``). Parameters are replicated with
  ``jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))``.

  Args:
    local_batch: this process's examples (a pytree of host arrays).
    mesh: the device mesh.
    axis: the mesh axis the examples are split over.

  Returns:
    The pytree of global arrays.

  Raises:
    ValueError: when the local batch size is not divisible by this process's
      number of devices along ``axis``.
  """
  if axis not in mesh.axis_names:
    raise ValueError(f"`axis` {axis!r} is not an axis of the mesh {mesh.axis_names}.")
  sharding = NamedSharding(mesh, PartitionSpec(axis))
  # The number of distinct slices of the example axis held by this process's devices.
  position = mesh.axis_names.index(axis)
  local_shards = len(
    {
      index[position]
      for index, device in np.ndenumerate(mesh.devices)
      if device.process_index == jax.process_index()
    }
  )
  check_batch_divisible(
    local_batch, local_shards, what=f"this process's {local_shards} devices on mesh axis {axis!r}"
  )
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )
