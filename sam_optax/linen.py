"""`sam_optax.linen.sam_step`: the two-pass SAM step over a Flax `TrainState`.

Nothing here imports flax: a ``flax.training.train_state.TrainState`` (or any
object with ``params``, ``opt_state``, ``tx``, ``step`` and ``replace``) is all it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

import sam_optax

__all__ = ("sam_step",)


def sam_step(
  loss_fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  jit: bool = True,
  donate: bool = True,
  **kwargs: Any,
) -> Callable[..., Any]:
  """Builds the two-pass SAM step ``train_step(state, batch, *args) -> (state, metrics)``.

  The step runs :func:`sam_optax.sam_step` with ``state.tx`` on ``state.params``
  and ``state.opt_state`` and returns ``state.replace(step=state.step + 1,
  params=..., opt_state=...)``, so a ``TrainState`` needs no hand-written
  ``replace``. If ``state`` has a ``batch_stats`` field (a ``TrainState``
  subclass), the loss is called as ``loss_fn(params, batch, batch_stats, *args)``
  and returns ``(loss, new_batch_stats)``; the new statistics come from the clean
  pass (the perturbed pass's are discarded) and go into ``state.batch_stats``.
  Without it, ``loss_fn(params, batch, *args)`` returns the loss. Both passes get
  the same ``*args`` (pass the dropout key there).

  Args:
    loss_fn: the loss, as above; with ``has_aux=True`` it returns ``(loss, aux)``,
      or ``(loss, (new_batch_stats, aux))`` with batch statistics.
    has_aux: whether ``loss_fn`` returns an ``aux`` besides the batch statistics;
      the step then returns ``(state, metrics, aux)``.
    jit: compile the step with ``jax.jit``.
    donate: donate the old ``state`` to the compiled step: do not use it, nor the
      arrays it was created from (e.g. the ``variables`` of ``model.init``), afterwards.
    **kwargs: passed on to :func:`sam_optax.sam_step` (``axis_name``,
      ``ascent``, ``groups``, ...).

  Returns:
    ``train_step(state, batch, *args)`` returning ``(state, metrics)``, or
    ``(state, metrics, aux)`` with ``has_aux=True``.

  Example::

    >>> import jax.numpy as jnp, optax, sam_optax, sam_optax.linen
    >>> from flax.training import train_state
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch @ params["w"] - 1.0) ** 2)
    >>> state = train_state.TrainState.create(
    ...     apply_fn=None, params={"w": jnp.zeros(3)},
    ...     tx=sam_optax.unified_sam(optax.sgd(0.1), rho=0.05))
    >>> train_step = sam_optax.linen.sam_step(loss_fn)
    >>> state, metrics = train_step(state, jnp.ones((4, 3)))
    >>> int(state.step), float(metrics["loss"])
    (1, 1.0)
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {loss_fn!r}.")
  # Validate the options now (sam_step checks them at construction), not at the first call.
  sam_optax.sam_step(loss_fn, optax.identity(), jit=False, **kwargs)

  def step(state, batch, *args):
    for field in ("params", "opt_state", "tx", "step", "replace"):
      if not hasattr(state, field):
        raise TypeError(
          "`state` must be a flax TrainState (params, opt_state, tx, step, replace); "
          f"{type(state).__name__} has no {field!r}."
        )
    stats = getattr(state, "batch_stats", None)
    sam = sam_optax.sam_step(
      loss_fn, state.tx, has_aux=has_aux or stats is not None, jit=False, **kwargs
    )
    if stats is None:
      out = sam(state.params, state.opt_state, batch, *args)
    else:
      out = sam(state.params, state.opt_state, batch, stats, *args)
    params, opt_state, metrics = out[:3]
    new = dict(step=state.step + 1, params=params, opt_state=opt_state)
    aux = out[3] if len(out) == 4 else None
    if stats is not None:
      if has_aux:
        if not (isinstance(aux, (tuple, list)) and len(aux) == 2):
          raise TypeError(
            "`loss_fn` with batch_stats and has_aux=True must return "
            "(loss, (new_batch_stats, aux))."
          )
        new["batch_stats"], aux = aux
      else:
        new["batch_stats"] = aux
    state = state.replace(**new)
    return (state, metrics, aux) if has_aux else (state, metrics)

  if jit:
    step = jax.jit(step, donate_argnums=0 if donate else ())
  return step
