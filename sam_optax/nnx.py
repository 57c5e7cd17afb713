"""`sam_optax.nnx.sam_step`: the two-pass SAM step for a Flax NNX module and `nnx.Optimizer`.

Importing this module imports flax; ``import sam_optax`` alone does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

try:
  from flax import nnx
except ImportError as e:  # flax is an optional dependency of sam_optax
  raise ImportError('sam_optax.nnx needs flax: pip install "sam-optax[flax]".') from e

import sam_optax
from sam_optax import _step

__all__ = ("sam_step",)


def sam_step(
  loss_fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  axis_name: str | None = None,
  ascent: str = "sync",
  groups: int | None = None,
  jit: bool = True,
  donate: bool = False,
  **kwargs: Any,
) -> Callable[..., Any]:
  """Builds the two-pass SAM step that updates an NNX module and its `nnx.Optimizer` in place.

  ``metrics = train_step(model, optimizer, batch, *args)`` splits ``model``
  into the variables the optimizer trains (``optimizer.wrt``, usually
  ``nnx.Param``) and the rest (batch statistics, RNG streams, ...), runs
  :func:`sam_optax.sam_step` on them with ``optimizer.tx``, and writes the
  results back into ``model`` and ``optimizer``. As in :func:`sam_optax.sam_step`:

  - both passes see the same ``batch``, the same ``*args`` and the same state
    of the model's RNG streams, so ``nnx.Dropout`` draws the same mask twice;
  - everything except the trained variables that ``loss_fn`` changes (batch
    statistics, RNG counters, sown values) comes from the clean pass; the
    perturbed pass's changes are discarded, so after the step the model's
    non-trained state is what one forward pass in train mode leaves behind;
  - ``metrics`` are :func:`sam_optax.sam_step`'s (``loss``, ``perturbed_loss``,
    ``sharpness``, ``grad_norm``, ``lambda``, ``rho``, ``step_size``, ...);
    ``optimizer.step`` advances by one.

  The step is compiled once with ``nnx.jit``. It does not donate by
  default, because NNX objects share arrays: ``nnx.clone(model)``, arrays taken
  out with ``nnx.as_pure`` or ``variable[...]`` all refer to the model's buffers,
  and a donated buffer is deleted for every holder. ``donate=True`` reuses the
  old buffers (less peak memory): the ``model`` and ``optimizer`` you pass (and
  ``nnx.state(...)`` views of them, which hold the same variables) get the new
  arrays, but any other holder of the old ones, a clone included, is invalidated.

  Data parallelism. Place the model's and optimizer's state replicated and the
  batch sharded (``jax.sharding.NamedSharding``) and call the step as usual:
  it computes the single-device step on the global batch. ``groups``
  and ``ascent="local"`` give m-sharpness as in :func:`sam_optax.sam_step`;
  ``axis_name`` is for a step built with ``jit=False`` and run inside
  ``nnx.shard_map``/``nnx.pmap`` (give ``nnx.BatchNorm`` the same ``axis_name``
  for global-batch statistics).

  Args:
    loss_fn: ``loss_fn(model, batch, *args)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``. It receives a fresh module with the
      (possibly perturbed) parameters; call it in train mode. ``*args`` are
      arrays or pytrees of arrays (keep RNG streams in the model, not in args).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the step then returns
      ``(metrics, aux)`` with the clean pass's ``aux``.
    axis_name: as in :func:`sam_optax.sam_step` (needs ``jit=False`` and an
      enclosing ``shard_map``/``pmap``).
    ascent: ``"sync"`` or ``"local"``, as in :func:`sam_optax.sam_step`.
    groups: m-sharpness groups, as in :func:`sam_optax.sam_step`.
    jit: compile the step; ``False`` returns the plain function, to call inside
      your own ``nnx.jit``/``nnx.shard_map``.
    donate: donate the model's and optimizer's old arrays to the compiled step
      (only when nothing else, e.g. an ``nnx.clone``, shares them).
    **kwargs: passed on to :func:`sam_optax.sam_step`.

  Returns:
    ``train_step(model, optimizer, batch, *args)``, returning ``metrics`` (a dict
    of arrays), or ``(metrics, aux)`` with ``has_aux=True``.

  Example::

    >>> import jax, jax.numpy as jnp, optax, sam_optax, sam_optax.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, sam_optax.unified_sam(optax.sgd(0.1), rho=0.05), wrt=nnx.Param)
    >>> def loss_fn(model, batch):
    ...   x, y = batch
    ...   return jnp.mean((model(x)[:, 0] - y) ** 2)
    >>> train_step = sam_optax.nnx.sam_step(loss_fn)
    >>> metrics = train_step(model, optimizer, (jnp.ones((4, 3)), jnp.zeros(4)))
    >>> int(optimizer.step), "perturbed_loss" in metrics
    (1, True)
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {loss_fn!r}.")
  sam_options = dict(axis_name=axis_name, ascent=ascent, groups=groups, **kwargs)
  # Validate the options now (sam_step checks them at construction), not at the first call.
  sam_optax.sam_step(loss_fn, optax.identity(), jit=False, **sam_options)
  # sam_step averages aux over groups and micro-batches, which needs floating leaves.
  splits_batch = groups is not None or (kwargs.get("microbatches") or 1) > 1

  def update_in_place(model, optimizer, batch, *args):
    """The step on live (or traced) NNX objects: reads them, then writes the results back."""
    wrt = optimizer.wrt
    graphdef, params, rest = nnx.split(model, wrt, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    if not jax.tree.leaves(params):
      raise ValueError(
        f"`model` ({type(model).__name__}) has no variables matching the optimizer's "
        f"wrt={wrt!r} (e.g. no nnx.Param): there is nothing to train."
      )
    opt_state = nnx.as_pure(optimizer.opt_state)
    floating = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.inexact)

    def functional_loss(p, batch, r, *args, floating_only=splits_batch):
      m = nnx.merge(graphdef, p, r)
      loss, aux = _split_loss(loss_fn(m, batch, *args), has_aux)
      new_rest = nnx.as_pure(nnx.split(m, wrt, ...)[2])
      if floating_only:
        # Averaged over the groups/micro-batches by sam_step; the rest (RNG
        # counters, keys) is recomputed below, on the whole batch.
        new_rest = jax.tree.map(lambda x: x if floating(x) else None, new_rest)
      return loss, (aux, new_rest)

    sam = sam_optax.sam_step(functional_loss, optimizer.tx, has_aux=True, jit=False, **sam_options)
    new_params, new_opt_state, metrics, (aux, new_rest) = sam(params, opt_state, batch, rest, *args)
    if splits_batch:
      # One more clean pass on the whole batch, of which only the non-floating
      # state is used: XLA removes the compute that state does not depend on
      # (for RNG counters, all of it).
      _, (_, full_rest) = functional_loss(params, batch, rest, *args, floating_only=False)
      new_rest = jax.tree.map(
        lambda a, b: b if a is None else a, new_rest, full_rest, is_leaf=lambda x: x is None
      )
    nnx.update(model, new_params, new_rest)
    nnx.update(optimizer.opt_state, nnx.state(new_opt_state))
    optimizer.step[...] += 1
    return (metrics, aux) if has_aux else metrics

  def check(model, optimizer):
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(
        "`optimizer` must be an nnx.Optimizer(model, tx, wrt=nnx.Param) whose tx is a "
        f"sam_optax (or optax) optimizer; got {type(optimizer).__name__}."
      )
    if not isinstance(model, nnx.Module):
      raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")

  def step(model, optimizer, batch, *args):
    check(model, optimizer)
    return update_in_place(model, optimizer, batch, *args)

  if not jit:
    return step
  # nnx.jit rather than jax.jit over nnx.split/merge/update: its graph traversal
  # is cached, ~2x less host time per step on a small model (tests/test_nnx.py bench).
  compiled = nnx.jit(update_in_place)
  donating = nnx.jit(update_in_place, donate_argnums=(0, 1)) if donate else None

  def compiled_step(model, optimizer, batch, *args):
    check(model, optimizer)
    if donate:
      leaves = jax.tree.leaves(nnx.as_pure(nnx.state((model, optimizer))))
      # A buffer held by two variables cannot be donated twice: skip donation then.
      if len({id(x) for x in leaves}) == len(leaves):
        return donating(model, optimizer, batch, *args)
    return compiled(model, optimizer, batch, *args)

  return compiled_step


_split_loss = _step._split_loss  # one check of what loss_fn returns, shared with sam_step
