"""Arbitrary sampling: which f_i enter a step's mini-batch loss, and with what weight.

A sampler maps a PRNG key to a :class:`Batch` of indices i_j and weights w_j;
the step's loss is (1/τ) Σ_j w_j f_{i_j}(x) (see ``Problem.loss``). Every
sampler here is unbiased: E[(1/τ) Σ_j w_j ∇f_{i_j}(x)] = ∇f(x).

* :func:`full_batch`: all n indices, weight 1 (the deterministic method);
* :func:`tau_nice`: τ distinct indices drawn uniformly *without* replacement,
  weight 1 (τ = 1 is uniform single-element sampling);
* :func:`importance`: τ independent draws with P(i) = p_i ∝ L_i and weight
  w_i = 1/(n p_i), so each reweighted f_i/(n p_i) is L_avg-smooth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Batch(NamedTuple):
  """Indices (τ,) int32 and weights (τ,) of one step's mini-batch."""

  idx: jax.Array
  weight: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
  """A sampling scheme over {0, …, n-1}.

  Attributes:
    name: label used in figures.
    kind: ``"full"``, ``"tau_nice"`` or ``"importance"``.
    n: number of functions.
    tau: mini-batch size τ.
    probs: (n,) probability that one draw picks i (uniform unless importance).
    weights: (n,) weight w_i given to f_i when drawn (1/(n p_i) for importance).
    draw: key -> :class:`Batch`.
  """

  name: str
  kind: str
  n: int
  tau: int
  probs: np.ndarray
  weights: np.ndarray
  draw: Callable[[jax.Array], Batch]

  def __call__(self, key: jax.Array) -> Batch:
    return self.draw(key)


def _check_n_tau(n: int, tau: int) -> None:
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"`n` must be a positive int, got {n!r}.")
  if not isinstance(tau, (int, np.integer)) or not 1 <= tau <= n:
    raise ValueError(f"`tau` must be an int in [1, n={n}], got {tau!r}.")


def full_batch(n: int) -> Sampler:
  """Every index once with weight 1: the deterministic (full-gradient) method."""
  _check_n_tau(n, n)

  def draw(key):
    del key
    return Batch(jnp.arange(n, dtype=jnp.int32), jnp.ones(n))

  uniform = np.full(n, 1.0 / n)
  return Sampler("full batch", "full", n, n, uniform, np.ones(n), draw)


def tau_nice(n: int, tau: int = 1) -> Sampler:
  """τ distinct indices, uniformly *without* replacement (τ = 1: uniform single-element)."""
  _check_n_tau(n, tau)

  def draw(key):
    # The first τ entries of a Fisher–Yates shuffle: a uniformly random τ-subset,
    # several times cheaper in a scan than jax.random.choice(replace=False),
    # which sorts all n keys.
    swap_with = jax.random.randint(key, (tau,), jnp.arange(tau), n)

    def swap(j, perm):
      i = swap_with[j]
      return perm.at[j].set(perm[i]).at[i].set(perm[j])

    idx = jax.lax.fori_loop(0, tau, swap, jnp.arange(n, dtype=jnp.int32))[:tau]
    return Batch(idx, jnp.ones(tau))

  name = "uniform single-element" if tau == 1 else f"{tau}-nice"
  return Sampler(name, "tau_nice", n, tau, np.full(n, 1.0 / n), np.ones(n), draw)


def importance(L_i, tau: int = 1) -> Sampler:
  """τ independent draws with p_i = L_i / Σ L_j and weights 1/(n p_i) (unbiased)."""
  L_i = np.asarray(L_i, dtype=np.float64)
  if L_i.ndim != 1 or not np.all(np.isfinite(L_i)) or not np.all(L_i > 0):
    raise ValueError("`L_i` must be a 1-D array of positive finite smoothness constants.")
  n = L_i.shape[0]
  _check_n_tau(n, tau)
  probs = L_i / L_i.sum()
  weights = 1.0 / (n * probs)

  def draw(key):
    # NumPy constants become arrays at trace time, in the dtype then in force.
    idx = jax.random.choice(key, n, (tau,), replace=True, p=jnp.asarray(probs))
    return Batch(idx.astype(jnp.int32), jnp.asarray(weights)[idx])

  name = "importance (p ∝ L_i)" + ("" if tau == 1 else f", τ={tau}")
  return Sampler(name, "importance", n, tau, probs, weights, draw)
