"""`sam_step`: the jit-compiled training step for two-pass (SAM) and one-pass optimizers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _common
from sam_optax import _parallel
from sam_optax import _protocol

_ASCENT_MODES = ("sync", "local")
# The vmapped axis of `groups=m` (m-sharpness without pmap).
_GROUP_AXIS = "sam_optax_groups"


def _split_loss(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(
        f"`loss_fn` with has_aux=True must return a pair (loss, aux); got {type(out).__name__}."
      )
    loss, aux = out
  else:
    loss, aux = out, None
  shape = getattr(loss, "shape", None)
  if shape is None or tuple(shape) != ():
    hint = " (did you mean has_aux=True?)" if isinstance(out, (tuple, list)) else ""
    raise TypeError(
      f"`loss_fn` must return a scalar loss{hint}; got {type(loss).__name__} with shape {shape}."
    )
  if not jnp.issubdtype(loss.dtype, jnp.floating):
    raise TypeError(f"`loss_fn` must return a floating-point loss, got dtype {loss.dtype}.")
  return loss, aux


def sam_step(
  loss_fn: Callable[..., Any],
  optimizer: optax.GradientTransformation,
  *,
  has_aux: bool = False,
  axis_name: str | None = None,
  ascent: str = "sync",
  groups: int | None = None,
  microbatches: int | None = None,
  skip_nonfinite: bool = False,
  jit: bool = True,
  donate: bool = True,
  host_dispatch: bool | None = None,
) -> Callable[..., Any]:
  """Builds the jit-compiled training step of a loss function and an optimizer.

  The returned pure function ``step(params, opt_state, batch, *args)`` runs

  1. the clean pass ``loss, g = value_and_grad(loss_fn)(params, batch, *args)``;
  2. ``optimizer.update(g, opt_state, params, value_and_grad_fn=..., sam_context=...)``.
     A two-pass (SAM) optimizer computes the ascent ``δ`` and ``e = params + δ``,
     calls ``value_and_grad_fn(e)`` -- the perturbed pass, with the same batch and
     the same ``*args`` (so the same dropout key) -- and descends from ∇f(e) at
     ``params``. A one-pass optax optimizer (``optax.sgd``, ``optax.adamw``, ...)
     ignores both extra arguments: the step is then a plain one-pass step with
     the same call and metrics, so SGD and SAM are A/B-tested by swapping the
     optimizer;

  and returns ``(params, opt_state, metrics)``, or ``(params, opt_state, metrics,
  aux)`` when ``has_aux=True``, where ``aux`` (e.g. new batch-norm statistics)
  comes from the clean pass; the perturbed pass's aux is discarded.

  ``metrics`` holds arrays: ``loss`` f(x), ``grad_norm`` ‖g‖, ``finite`` (False
  when the loss or the gradient of either pass was not finite; see "Non-finite
  steps"), and what the optimizer's states report: ``perturbed_loss`` f(e) and
  ``sharpness`` f(e) - f(x) for two-pass optimizers, ``lambda`` λ_t and ``rho``
  ρ_t (:func:`unified_perturbation`), ``step_size`` γ_t (SAM-SPS),
  ``loss_scale`` and ``skipped`` (:func:`dynamic_loss_scale`).

  The step knows no optimizer by type: the optimizer's components read the
  ``sam_context`` extra argument (the clean gradient, whether the ascent is
  local) and raise their own errors, and report metrics through their states.
  Wrapping a SAM optimizer in a transform that changes the gradient before it
  (``optax.chain(clip, sam)``, ``optax.MultiSteps(sam)``) raises a ValueError
  that says where the transform goes (the README's "Composing with optax").

  Non-finite steps. ``finite`` is False when f(x), ∇f(x), f(e) or ∇f(e) is not
  finite (a non-finite ∇f(e) is reported as f(e) = NaN). By default the values
  then propagate, as in any optax loop. ``skip_nonfinite=True`` guards the
  parameters and the state instead: a step whose update is not finite, or that
  turns a finite entry of the optimizer state non-finite (an ``inf`` the state
  holds on purpose, such as a sentinel before the first step, does not count),
  is skipped whole -- parameters and state, counters included, unchanged, on
  every replica alike -- and ``finite`` is False. A non-finite ∇f(x) makes δ, e
  and so the update non-finite; a non-finite ∇f(e) that the descent maps to a
  finite update (SAM-SPS takes γ_t = 0: x does not move) is applied and reported.
  The guard costs a check and a select over the parameters and the state
  (several percent of a memory-bound step on XLA:CPU; the README has the
  figures). ``optax.apply_if_finite(opt)`` around a two-pass optimizer turns the
  guard on, so that a non-finite perturbed pass is skipped too; the wrapper
  itself skips and counts a non-finite clean gradient.

  Gradient accumulation. ``microbatches=k`` splits the batch's leading axis
  into k equal micro-batches and runs each pass as a ``lax.scan`` over them:
  the ascent uses the mean clean gradient, every micro-batch's perturbed
  gradient is taken at the same e, and the descent uses their mean, so the step
  equals the one-shot step on the whole batch to round-off (for a loss that is
  a mean over examples; ``has_aux`` leaves are averaged over the micro-batches)
  while holding the activations of one micro-batch at a time. ``*args`` (e.g. a
  dropout key) are shared by all micro-batches.

  Data parallelism. Under ``jax.jit`` with the batch sharded over a mesh axis
  and the parameters replicated, the plain step (no ``axis_name``) already
  computes the single-device step on the global batch. Inside ``jax.pmap`` or
  ``jax.shard_map``, pass the mapped ``axis_name``: the perturbed gradient, the
  metrics and the floating-point leaves of ``aux`` (batch-norm statistics) are
  averaged over it, so every replica ends the step with bit-identical
  parameters, optimizer state and aux. ``loss_fn`` must be a mean over the
  examples (as usual) for the average of the replicas' gradients to be the
  global batch's gradient; aux should hold statistics, not per-example outputs
  (integer and boolean leaves are returned as computed, not averaged).

  ``ascent="sync"`` (default) also averages the clean gradient before the
  ascent: the step equals one device on the global batch. ``ascent="local"`` is
  m-sharpness (Foret et al., 2021): every replica perturbs with the gradient of
  its own shard, e_k = x + δ(g_k), and the descent uses the average of the
  ∇f_k(e_k); it saves one all-reduce of the gradient per step and is the
  original SAM code's default (m = per-device batch). ``groups=m`` gets the same
  on one device (or under sharded ``jit``, with an ``Auto`` mesh axis): it
  splits the batch's leading axis into m equal groups, each perturbed with its
  own gradient. In local mode the ascent's state (e.g. ``grad_norm``) holds the
  average over replicas/groups, so replicas stay identical; components whose
  result would differ per replica (SAM-SPS, :func:`dynamic_loss_scale`,
  :func:`gsam`, :func:`interval_sam`, :func:`looksam`, one-pass optimizers)
  raise a ValueError.

  Args:
    loss_fn: ``loss_fn(params, batch, *args)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    optimizer: any optax transformation: a two-pass optimizer
      (:func:`unified_sam`, :func:`sam_sps`, :func:`sharpness_aware`, the
      variants, possibly wrapped in ``inject_hyperparams``, ``apply_if_finite``,
      :func:`dynamic_loss_scale`, ``masked``, ``multi_transform``), or a one-pass one.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis_name: the ``pmap``/``shard_map`` axis to average over, or None. The
      step raises a ValueError at trace time when no enclosing transform binds it.
    ascent: ``"sync"`` averages the ascent gradient over all data axes (global
      batch semantics); ``"local"`` perturbs each replica (and each group) with
      its own gradient (m-sharpness). ``"local"`` needs ``axis_name`` or ``groups``.
    groups: with ``ascent="local"``, split each replica's batch into this many
      equal groups along the leading axis of every batch leaf; ``*args`` are
      shared by all groups. The batch size must be divisible by ``groups``.
    microbatches: split each pass over this many equal micro-batches (exact
      gradient accumulation); the batch (per group) must be divisible by it.
    skip_nonfinite: skip a step whose update is not finite or that turns a finite
      state entry non-finite (see "Non-finite steps"); off by default.
    jit: compile the step with ``jax.jit``. With False the step is traced by the
      caller's own transform (``jax.jit``, ``pmap``, ``nnx.jit``) or runs op by op;
      run op by op, its branches (the overflow fallbacks, the finiteness checks,
      interval SAM's choice of pass) are picked in Python from concrete values, so
      eager calls compile nothing after the first ones.
    donate: donate ``params`` and ``opt_state`` to the compiled step (their old
      buffers are reused; do not use them after the call). Every error is
      raised while tracing, before anything is computed or donated.
    host_dispatch: for optimizers that evaluate the perturbed pass on some steps
      only (:func:`interval_sam`, :func:`looksam`): compile one program per kind
      of step and choose on the host from the step counter in ``opt_state``
      (True), or choose inside one program with ``lax.cond`` (False). None
      (default) is True on CPU, where XLA runs convolution gradients much
      slower inside a ``cond`` branch, and False elsewhere. Needs ``jit=True``;
      both give the same trajectory.

  Returns:
    The step function.

  Example (pmap, with :func:`replicate` and :func:`shard_batch`)::

    step = jax.pmap(sam_optax.sam_step(loss_fn, opt, axis_name="batch"),
                    axis_name="batch", donate_argnums=(0, 1))
    params, state = sam_optax.replicate((params, opt.init(params)))
    params, state, metrics = step(params, state, sam_optax.shard_batch(batch))
  """
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {loss_fn!r}.")
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise TypeError(f"`optimizer` must be an optax GradientTransformation, got {optimizer!r}.")
  if ascent not in _ASCENT_MODES:
    raise ValueError(f"`ascent` must be one of {_ASCENT_MODES}, got {ascent!r}.")
  if axis_name is not None and not isinstance(axis_name, str):
    raise ValueError(f"`axis_name` must be a string or None, got {axis_name!r}.")
  for name, value in (("groups", groups), ("microbatches", microbatches)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
      raise ValueError(f"`{name}` must be a positive int or None, got {value!r}.")
  if groups is not None and ascent != "local":
    raise ValueError(
      "`groups` splits the batch for m-sharpness and needs ascent='local'; "
      "with ascent='sync' the step is the same as without groups."
    )
  if ascent == "local" and axis_name is None and groups is None:
    raise ValueError(
      "`ascent='local'` (m-sharpness) needs an `axis_name` (pmap/shard_map) "
      "or `groups=m` (split the batch into m groups)."
    )
  optimizer = optax.with_extra_args_support(optimizer)

  data_axes = tuple(a for a in (axis_name, _GROUP_AXIS if groups else None) if a)
  local_axes = data_axes if ascent == "local" else ()
  ascent_axes = () if local_axes else data_axes

  def mean(tree, axes):
    return jax.lax.pmean(tree, axes) if axes else tree

  def body(params, opt_state, batch, *args, perturb=None, discovered=None):
    loss_scale = _protocol.loss_scale(opt_state)
    # Under shard_map(check_vma=True), autodiff sums the gradient of a replicated
    # input over the axis; differentiate at a copy marked as varying instead, so
    # each device gets its own gradient (as under pmap) and the means below apply.
    vary = axis_name is not None and any(
      axis_name in _varying_axes(x) for x in jax.tree.leaves(batch)
    )
    as_varying = (lambda p: _mark_varying(p, axis_name)) if vary else (lambda p: p)

    def scaled_loss(p, b):
      loss, aux = _split_loss(loss_fn(p, b, *args), has_aux)
      if loss_scale is None:
        return loss, (loss, aux)
      # In at least float32: a float64 loss keeps float64 (the scale is a power of two).
      return loss.astype(jnp.promote_types(loss.dtype, jnp.float32)) * loss_scale, (loss, aux)

    value_and_grad = _over_microbatches(jax.value_and_grad(scaled_loss, has_aux=True), microbatches)

    (_, (loss, aux)), grads = value_and_grad(as_varying(params), batch)
    grads = mean(grads, ascent_axes)
    passes = []  # trace-time record of the perturbed passes the optimizer asked for

    def value_and_grad_fn(e):
      passes.append(True)
      # The perturbed pass; its aux (e.g. batch statistics) is dropped. A masked SAM
      # (optax.masked, multi_transform) passes only its leaves: the others stay at x.
      (value, _), g = value_and_grad(as_varying(_fill_masked(e, params)), batch)
      value, g = mean((value, g), data_axes)
      g = _mask_like(g, e)
      # A non-finite ∇f(e) shows in f(e), so the `finite` metric covers both passes.
      return _protocol.nan_unless_finite(value, g).astype(value.dtype), g

    selectors = [] if discovered is not None else None
    context = _protocol.StepContext(
      clean_grads=grads, local_axes=local_axes, perturb=perturb, host_selectors=selectors
    )
    updates, new_opt_state = optimizer.update(
      grads,
      opt_state,
      params,
      value_and_grad_fn=value_and_grad_fn,
      sam_context=context,
    )
    for node, select in selectors or ():
      path = _protocol.node_path(opt_state, node)
      discovered.append(None if path is None else (path, select))
    if local_axes and not passes:
      raise ValueError(
        "`ascent='local'` (m-sharpness) needs a two-pass (SAM) optimizer; a one-pass "
        "optimizer would apply each replica's own gradient and the replicas would "
        "diverge. Use ascent='sync'."
      )
    new_params = optax.apply_updates(params, updates)
    metrics = _metrics(loss, grads, new_opt_state, loss_scale)
    if skip_nonfinite or _protocol.wraps_in_apply_if_finite(opt_state):
      # Never apply a non-finite update or turn a finite state entry non-finite: the
      # whole step is skipped (counters included), on every replica alike. Selecting
      # after the update keeps finite steps bit for bit.
      ok = _protocol.all_finite(updates) & _protocol.stays_finite(opt_state, new_opt_state)
      ok = _all(ok, data_axes)
      new_params = _select(ok, new_params, params)
      new_opt_state = _select(ok, new_opt_state, opt_state)
      metrics["finite"] = metrics["finite"] & ok
    metrics["finite"] = _all(metrics["finite"], data_axes)
    metrics = _protocol.mean_floating(metrics, data_axes)
    if has_aux:
      return new_params, new_opt_state, metrics, _protocol.mean_floating(aux, data_axes)
    return new_params, new_opt_state, metrics

  def step(params, opt_state, batch, *args, perturb=None, discovered=None):
    # All checks run at trace time, before any compute.
    if axis_name is not None:
      _check_axis_bound(axis_name)
    _protocol.check_wrappers(opt_state)
    if has_aux and (groups or microbatches):
      _check_aux_floating(
        jax.eval_shape(lambda: loss_fn(params, batch, *args))[1],
        "groups" if groups else "microbatches",
      )
    if microbatches:
      per_group = groups or 1
      _parallel.check_batch_divisible(
        batch,
        per_group * microbatches,
        what=f"{per_group * microbatches} parts (groups × microbatches)",
      )
    run = functools.partial(body, perturb=perturb, discovered=discovered)
    if groups is None:
      return run(params, opt_state, batch, *args)
    _check_groups_splittable(batch)
    grouped = _parallel.split_leading_axis(batch, groups, what=f"groups={groups}")
    in_axes = (None, None, 0) + (None,) * len(args)
    return jax.vmap(run, in_axes=in_axes, out_axes=None, axis_name=_GROUP_AXIS)(
      params, opt_state, grouped, *args
    )

  if not jit:
    return step
  donate_argnums = (0, 1) if donate else ()
  if host_dispatch is None:
    use_host = jax.default_backend() == "cpu"
  else:
    use_host = bool(host_dispatch)
  if not use_host:
    return jax.jit(step, donate_argnums=donate_argnums)

  # The single program records, while it is traced, the components that could select
  # their passes on the host; when there is exactly one, the later steps run one
  # program per kind of step, chosen from the state's counter.
  found: list = []

  def recording_step(*call_args):
    found.clear()
    return step(*call_args, discovered=found)

  compiled = jax.jit(recording_step, donate_argnums=donate_argnums)
  by_kind = {
    kind: jax.jit(functools.partial(step, perturb=kind), donate_argnums=donate_argnums)
    for kind in (True, False)
  }

  @functools.wraps(step)
  def dispatch(params, opt_state, batch, *args):
    plan = found[0] if len(found) == 1 else None
    if plan is None or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(opt_state)):
      # The first call, an optimizer without pass selection, or a trace by an
      # enclosing transform (pmap, jit): the single program selects with lax.cond.
      return compiled(params, opt_state, batch, *args)
    path, select = plan
    return by_kind[bool(select(_protocol.node_at(opt_state, path)))](
      params, opt_state, batch, *args
    )

  # AOT and shape queries see the single-program (lax.cond) form.
  dispatch.lower = compiled.lower
  dispatch.eval_shape = compiled.eval_shape
  dispatch._cache_size = lambda: (
    compiled._cache_size()
    + sum(  # noqa: SLF001
      f._cache_size() for f in by_kind.values()
    )
  )
  return dispatch


def _all(flag: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """Logical and of a boolean over the data axes (the same answer on every replica)."""
  return jax.lax.pmin(flag.astype(jnp.int32), axes).astype(bool) if axes else flag


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _over_microbatches(value_and_grad: Callable[..., Any], k: int | None) -> Callable[..., Any]:
  """``value_and_grad(p, batch)`` as the mean over k equal micro-batches (a ``lax.scan``).

  Sums are accumulated in at least float32 and cast back to each leaf's dtype.
  """
  if not k or k == 1:
    return value_and_grad

  def mean_value_and_grad(p, batch):
    # Micro-batch i holds examples i, i + k, i + 2k, ...: the split keeps the leading
    # axis's sharding over a mesh (the mean is the same for any split into equal parts).
    _parallel.check_batch_divisible(batch, k, what=f"microbatches={k}")
    parts = jax.tree.map(
      lambda x: jnp.moveaxis(x.reshape((-1, k) + tuple(x.shape[1:])), 1, 0), batch
    )
    shapes = jax.eval_shape(value_and_grad, p, jax.tree.map(lambda x: x[0], parts))
    acc_dtype = lambda s: jnp.promote_types(s.dtype, jnp.float32)  # noqa: E731
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, acc_dtype(s)), shapes)

    def add(total, part):
      out = value_and_grad(p, part)
      return jax.tree.map(lambda t, o: t + o.astype(t.dtype), total, out), None

    total, _ = jax.lax.scan(add, zeros, parts)
    return jax.tree.map(lambda t, s: (t / k).astype(s.dtype), total, shapes)

  return mean_value_and_grad


def _fill_masked(p: Any, params: Any) -> Any:
  """``p`` with the ``optax.MaskedNode`` leaves of a masked SAM filled from x (not perturbed)."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  if not any(is_masked(x) for x in jax.tree.leaves(p, is_leaf=is_masked)):
    return p
  return jax.tree.map(lambda e, x: x if is_masked(e) else e, p, params, is_leaf=is_masked)


def _mask_like(grads: Any, e: Any) -> Any:
  """The gradient with ``optax.MaskedNode`` where the masked SAM's point ``e`` has them."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  if not any(is_masked(x) for x in jax.tree.leaves(e, is_leaf=is_masked)):
    return grads
  return jax.tree.map(lambda m, g: m if is_masked(m) else g, e, grads, is_leaf=is_masked)


def _check_aux_floating(aux: Any, option: str) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(aux):
    if not _protocol.is_floating(leaf):
      raise TypeError(
        f"sam_step({option}=...) averages `aux` over the {option}, so its leaves must be "
        f"floating point; aux{jax.tree_util.keystr(path)} has dtype {leaf.dtype}. "
        "Return counts as floats (e.g. a mean)."
      )


def _varying_axes(x: Any) -> frozenset:
  """The manual axes `x` varies over in shard_map's type system (empty elsewhere)."""
  aval = jax.typeof(x) if hasattr(jax, "typeof") else None
  axis_type = getattr(aval, "manual_axis_type", None)
  if axis_type is not None:
    return axis_type.varying
  return frozenset(getattr(aval, "vma", ()))


def _mark_varying(tree: Any, axis_name: str) -> Any:
  pcast = getattr(jax.lax, "pcast", None)

  def mark(x):
    if axis_name in _varying_axes(x):
      return x
    return pcast(x, axis_name, to="varying") if pcast else jax.lax.pvary(x, axis_name)

  return jax.tree.map(mark, tree)


def _check_groups_splittable(batch: Any) -> None:
  # jax's vmap cannot batch a collective over an axis sharded in Explicit mode
  # (the default of jax.make_mesh since jax 0.7); fail clearly instead of deep inside.
  typeof = getattr(jax, "typeof", None)
  for leaf in jax.tree.leaves(batch) if typeof is not None else ():
    spec = getattr(getattr(typeof(leaf), "sharding", None), "spec", None)
    if spec and spec[0] is not None:
      raise ValueError(
        f"sam_step(groups=...) cannot split a batch whose leading axis is sharded over "
        f"an Explicit mesh axis ({spec[0]!r}). Use a mesh with AxisType.Auto "
        "(jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,))), or "
        "jax.shard_map over the mesh with sam_step(axis_name=..., ascent='local')."
      )


def _check_axis_bound(axis_name: str) -> None:
  try:
    jax.lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
      f"sam_step(axis_name={axis_name!r}): no enclosing jax.pmap, shard_map or vmap "
      f"binds the axis {axis_name!r}. Run the step inside "
      f"jax.pmap(step, axis_name={axis_name!r}) (the names must match), or use "
      "axis_name=None under jax.jit with a sharded batch (global-batch semantics)."
    ) from None


def _metrics(
  loss: jax.Array, grads: Any, opt_state: Any, loss_scale: jax.Array | None
) -> dict[str, jax.Array]:
  """The step's own metrics, then what the optimizer's states report (``sam_metrics``)."""
  dtype = _common.accumulation_dtype(grads)
  loss = loss.astype(dtype)
  reported = _protocol.collect_metrics(opt_state)
  finite = jnp.isfinite(loss) & _protocol.all_finite(grads)
  metrics = {"loss": loss}
  if "perturbed_loss" in reported:
    perturbed_loss = reported["perturbed_loss"].astype(dtype)
    finite = finite & jnp.isfinite(perturbed_loss)
    metrics.update(perturbed_loss=perturbed_loss, sharpness=perturbed_loss - loss)
  # ‖g‖ of the clean gradient the step computed, whatever the optimizer does with it (an
  # ascent clip, a masked subset); XLA merges it with the perturbation's own reduction.
  grad_norm = _common.tree_norm(grads, dtype)
  metrics["grad_norm"] = grad_norm if loss_scale is None else grad_norm / loss_scale
  metrics.update({k: v for k, v in reported.items() if k not in metrics})
  metrics["finite"] = finite
  return metrics
