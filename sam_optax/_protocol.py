"""The protocol between `sam_step` and the transformations it drives (private).

`sam_step` knows no optimizer by type. It talks to them in two directions:

- down, through one extra keyword argument of ``update``, ``sam_context`` (a
  :class:`StepContext`): the clean gradient it computed, whether the ascent is
  local, and whether the pass selection is fixed on the host. Each component
  reads what concerns it and raises its own error for what it cannot do;
- up, through methods of the state classes, found by a walk over the state
  pytree: ``sam_metrics()`` (the metrics a component reports) and
  ``sam_loss_scale()`` (the loss scale both passes use).

A new variant therefore touches one module: its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _common


class StepContext(NamedTuple):
  """What :func:`sam_step` tells the transformations (the ``sam_context`` extra argument).

  Attributes:
    clean_grads: the gradient the step computed at x. A two-pass optimizer
      checks that the gradient it receives is this very pytree (leaf by leaf,
      by identity), so a transform or wrapper that changed it on the way
      (``optax.chain(clip, sam)``, ``optax.MultiSteps(sam)``) is refused instead
      of shaping only the ascent.
    local_axes: the axes the ascent is local over (``ascent="local"``:
      m-sharpness), or ``()`` when every replica perturbs with the same
      gradient. Components whose result would differ per replica refuse it.
    perturb: None to let each component select its passes inside the compiled
      step (``lax.cond``); True/False when the step fixed, on the host, whether
      this step evaluates the perturbed pass (two compiled programs).
    host_selectors: when not None, a list to which a component that selects its
      passes appends ``(its_state, fn)`` while being traced, ``fn(state) -> bool``
      telling from a concrete state whether the next step is a perturbed one; the
      step may then compile one program per kind and choose on the host.
  """

  clean_grads: Any
  local_axes: tuple[str, ...] = ()
  perturb: bool | None = None
  host_selectors: list | None = None


def nodes(tree: Any) -> Iterator[Any]:
  """Every node of a pytree, outermost first (pre-order), NamedTuples included."""
  children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
  yield tree
  if treedef.num_leaves == 1 and treedef.num_nodes == 1:
    return  # a leaf
  for child in children:
    yield from nodes(child)


def node_path(tree: Any, target: Any) -> tuple[int, ...] | None:
  """The child indices leading from ``tree`` to the node that *is* ``target``, or None."""
  if tree is target:
    return ()
  children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
  if treedef.num_nodes == 1:
    return None
  for i, child in enumerate(children):
    path = node_path(child, target)
    if path is not None:
      return (i, *path)
  return None


def node_at(tree: Any, path: tuple[int, ...]) -> Any:
  """The node at ``path`` (from :func:`node_path`) of a tree of the same structure."""
  for i in path:
    tree = jax.tree_util.tree_flatten(tree, is_leaf=lambda x, t=tree: x is not t)[0][i]
  return tree


def _implementers(tree: Any, method: str) -> Iterator[Any]:
  for node in nodes(tree):
    if callable(getattr(type(node), method, None)):
      yield node


def collect_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """The metrics every state in ``opt_state`` reports; the outermost wins a shared key."""
  metrics: dict[str, jax.Array] = {}
  for node in _implementers(opt_state, "sam_metrics"):
    for key, value in node.sam_metrics().items():
      metrics.setdefault(key, value)
  return metrics


def loss_scale(opt_state: Any) -> jax.Array | None:
  """The loss scale a state in ``opt_state`` asks both passes to use, or None."""
  for node in _implementers(opt_state, "sam_loss_scale"):
    return node.sam_loss_scale()
  return None


def pass_selector(opt_state: Any) -> Any:
  """The first state that can select the passes on the host (``sam_next_perturb``), or None."""
  for node in _implementers(opt_state, "sam_next_perturb"):
    return node
  return None


def is_two_pass(node: Any) -> bool:
  """Whether a state node belongs to a two-pass (SAM) optimizer."""
  return bool(getattr(type(node), "sam_two_pass", False))


def wraps_in_apply_if_finite(opt_state: Any) -> bool:
  """Whether ``optax.apply_if_finite`` holds a two-pass optimizer in ``opt_state``.

  It checks the clean gradient only; :func:`sam_step` then also skips a step
  whose perturbed pass is not finite, so the wrapper means what it says.
  """
  return any(
    isinstance(node, optax.ApplyIfFiniteState) and any(map(is_two_pass, nodes(node)))
    for node in nodes(opt_state)
  )


def check_wrappers(opt_state: Any) -> None:
  """Refuses the optax wrappers that cannot hold a SAM optimizer, before any compute."""
  for node in nodes(opt_state):
    if isinstance(node, optax.MultiStepsState) and any(map(is_two_pass, nodes(node))):
      raise ValueError(
        "optax.MultiSteps around a SAM optimizer would perturb with the accumulated "
        "gradient but descend with the last micro-batch's ∇f(e) alone. For exact "
        "gradient accumulation use sam_step(..., microbatches=k); for the cheaper "
        "algorithm in which each micro-batch is perturbed by its own gradient, put "
        "MultiSteps inside the base optimizer: unified_sam(optax.MultiSteps(base, k), ...)."
      )
    if isinstance(node, (optax.MaskedState, optax.PartitionState)) and any(
      callable(getattr(type(n), "sam_loss_scale", None)) for n in nodes(node)
    ):
      raise ValueError(
        "dynamic_loss_scale inside optax.masked / optax.multi_transform: the leaves outside "
        "it would receive the loss-scaled gradient. Wrap it around instead: "
        "dynamic_loss_scale(optax.masked(...)) or dynamic_loss_scale(optax.multi_transform(...))."
      )
    if isinstance(node, optax.LookaheadState):
      raise ValueError(
        "sam_step cannot drive optax.lookahead: its update takes LookaheadParams and "
        "the gradient of the fast parameters only, and passes no extra arguments to "
        "the optimizer it wraps. Use lookahead in your own loop (one-pass optimizers only)."
      )


def check_local_ascent(context: StepContext | None, name: str, why: str) -> None:
  """Raises for a component that cannot run with a per-replica (local) ascent."""
  if context is not None and context.local_axes:
    raise ValueError(
      f"`ascent='local'` (m-sharpness) is not supported with {name}: {why}, so the "
      "replicas would take different steps. Use ascent='sync'."
    )


def check_clean_gradient(updates: Any, context: StepContext | None) -> None:
  """Refuses a gradient that is not the one the step computed (see :class:`StepContext`)."""
  if context is None:
    return
  is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  try:
    same = jax.tree.map(
      lambda u, c: is_masked(u) or u is c, updates, context.clean_grads, is_leaf=is_masked
    )
  except (ValueError, TypeError):
    same = [False]
  if not all(jax.tree.leaves(same)):
    raise ValueError(
      "A SAM optimizer received a gradient other than the clean gradient sam_step "
      "computed: a transform or wrapper outside it changed the gradient (e.g. "
      "optax.chain(clip_or_decay, sam) or optax.MultiSteps(sam)), which would shape "
      "only the ascent. Put descent transforms (clipping, weight decay, masks, "
      "MultiSteps) inside the base optimizer: unified_sam(optax.chain(T, base), ...); "
      "put ascent transforms before the perturbation: "
      "sharpness_aware(optax.chain(T, unified_perturbation(...)), base); transforms of "
      "the final update go after: optax.chain(sam, T). For exact gradient "
      "accumulation use sam_step(..., microbatches=k)."
    )


def is_floating(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def mean_floating(tree: Any, axes: tuple[str, ...]) -> Any:
  """pmean of the floating-point leaves over ``axes`` (integer counters are kept)."""
  if not axes:
    return tree
  return jax.tree.map(lambda x: jax.lax.pmean(x, axes) if is_floating(x) else x, tree)


def _fast_or_exact(summed: list[jax.Array], exact: Any, operands: tuple) -> jax.Array:
  """True when Σ x² over ``summed`` is finite, else whether ``exact`` is 0 at every entry.

  A finite sum of squares has no inf or NaN term, it is the very reduction the
  global norms compute (XLA merges the two), and a plain sum is several times
  faster than reducing ``isfinite`` on XLA:CPU, which materialises a boolean
  array. It can only be wrong in one direction: a sum of finite squares that
  overflows, or that XLA's algebraic rewrites turn into NaN ((a·c)² becomes a²·c²,
  inf·0 for a = 2^127, c = 0, as in a loss-scaled zero gradient). The exact test
  settles those steps, in a ``lax.cond`` that runs only then: ``exact`` maps the
  entries of the trees in ``operands`` to 0 (fine) or 1 (not), counted slice by
  slice (``_common.sliced_sum``) so that the branch reserves no parameter-sized buffer.
  """
  total = _common.tree_sum_of_squares(summed, _common.accumulation_dtype(summed))

  def count_bad(trees):
    return _common.sliced_sum(exact, trees, jnp.float32) == 0

  # True as a function of `total`: under shard_map both branches then vary over the
  # same axes as the data (a constant True would not, and lax.cond refuses that).
  ok = jnp.isfinite(total)
  return _common.cond(ok, lambda _: ok, count_bad, operands)


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point leaf of ``tree`` is finite (True for no such leaf)."""
  leaves = [x for x in jax.tree.leaves(tree) if is_floating(x)]
  if not leaves:
    return jnp.array(True)
  return _fast_or_exact(leaves, lambda x: jnp.where(jnp.isfinite(x), 0, 1), (leaves,))


def nan_unless_finite(value: jax.Array, grads: Any) -> jax.Array:
  """``value`` (in at least float32), or NaN when ``grads`` is not all finite.

  How a pass's non-finite gradient is reported: through its loss, which the
  states keep as f(e) and the ``finite`` metric reads, even where the descent
  maps the gradient to a finite update (SAM-SPS takes γ_t = 0 then).
  """
  value = jnp.asarray(value)
  value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
  return jnp.where(all_finite(grads), value, jnp.nan)


def stays_finite(old: Any, new: Any) -> jax.Array:
  """Whether no floating-point entry that is finite in ``old`` is non-finite in ``new``.

  A state may hold non-finite values on purpose (an ``inf`` sentinel before the
  first step, a loss that is ``nan`` until measured); those do not count, only a
  finite value that a step turned non-finite does.
  """
  pairs = [(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)) if is_floating(b)]
  if not pairs:
    return jnp.array(True)

  old_leaves, new_leaves = [a for a, _ in pairs], [b for _, b in pairs]

  def turned_bad(a, b):
    return jnp.where(jnp.isfinite(b) | ~jnp.isfinite(a), 0, 1)

  # An all-finite new state passes, whatever the old one held.
  return _fast_or_exact(new_leaves, turned_bad, (old_leaves, new_leaves))
