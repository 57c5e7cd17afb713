"""The problem, the optimizers and the hand-written references of tests/test_composition.py.

Shared with the fake-device worker (tests/_composition_devices.py). The references are written
from the formulas of docs/contract.md §1-3 and §7 in float64 NumPy, with the analytic gradient
of the least-squares loss; they use neither sam_optax nor optax.
"""

import jax.numpy as jnp
import numpy as np
import optax

import sam_optax

# The problem: least squares on a 2-leaf pytree, two batches of 8 examples.
DIM, N, STEPS = 3, 8, 2
_RNG = np.random.default_rng(11)
X0 = {"w": np.array([0.5, -0.3, 0.8]), "b": np.array(0.2)}
BATCHES = [
  {"x": _RNG.normal(size=(N, DIM)), "y": _RNG.normal(size=(N,)) + 1.0} for _ in range(STEPS)
]
NAN_BATCH = {"x": BATCHES[0]["x"], "y": np.where(np.arange(N) == 0, np.nan, BATCHES[0]["y"])}

# Hyperparameters.
LR, MU, LR2 = 0.1, 0.9, 0.05  # base SGD with momentum; the other partition's plain SGD
RHO, RHO2 = 0.1, 0.25  # ρ, and the value tree_set writes before step 2
ASCENT_CLIP = 0.5  # sharpness_aware's ascent: clip_by_global_norm before the perturbation
UPDATE_CLIP = 0.05  # chain(sam, clip_by_global_norm(UPDATE_CLIP)): the final update
GAMMA_B, WD = 1.0, 1e-2  # sam_sps
EVERY, LOOK_ALPHA, GSAM_ALPHA = 2, 0.7, 0.3
SF_LR, SF_B1 = 0.1, 0.9  # schedule-free
LOSS_SCALE = 2.0**10
MASK = {"w": True, "b": False}
LABELS = {"w": "sam", "b": "other"}
EPS = 1e-12


def loss_fn(p, batch):
  x, y = (batch[k].astype(p["w"].dtype) for k in ("x", "y"))
  return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def aux_loss_fn(p, batch):
  x, y = (batch[k].astype(p["w"].dtype) for k in ("x", "y"))
  pred = x @ p["w"] + p["b"]
  loss = jnp.mean((pred - y) ** 2)
  return loss, {"pred_mean": jnp.mean(pred), "y_mean": jnp.mean(y)}


# --- hand-written references (float64 NumPy) ---------------------------------------------


def tmap(f, *trees):
  return {k: f(*(t[k] for t in trees)) for k in trees[0]}


def tnorm(t):
  return float(np.sqrt(sum(np.sum(np.square(v)) for v in t.values())))


def tdot(a, b):
  return float(sum(np.sum(a[k] * b[k]) for k in a))


def lossgrad(p, batch):
  """f(p) and ∇f(p) of the least-squares loss, by hand."""
  x, y = batch["x"], batch["y"]
  r = x @ p["w"] + p["b"] - y
  return float(np.mean(r**2)), {"w": 2.0 * x.T @ r / len(y), "b": np.array(2.0 * np.mean(r))}


class Sgd:
  """optax.sgd(lr, momentum): m ← g + μ m (m₀ = 0), u = -lr m."""

  def __init__(self, lr, mu=0.0):
    self.lr, self.mu, self.m = lr, mu, None

  def update(self, g, x, vg=None, **_):
    self.m = g if self.m is None else tmap(lambda m, gi: gi + self.mu * m, self.m, g)
    return tmap(lambda m: -self.lr * m, self.m)


class MultiSteps:
  """optax.MultiSteps(base, k): the mean of k gradients every k-th call, zeros between."""

  def __init__(self, base, k):
    self.base, self.k, self.acc = base, k, []

  def update(self, g, x, vg=None, **_):
    self.acc.append(g)
    if len(self.acc) < self.k:
      return tmap(np.zeros_like, g)
    mean = tmap(lambda *gs: sum(gs) / len(gs), *self.acc)
    self.acc = []
    return self.base.update(mean, x)


class Partition:
  """optax.multi_transform / optax.masked for a one-pass base: each label's part by its own."""

  def __init__(self, bases, labels):
    self.bases, self.labels = bases, labels  # label None: passes the gradient through

  def update(self, g, x, vg=None, **_):
    out = {}
    for label, base in self.bases.items():
      keys = [k for k in g if self.labels[k] == label]
      sub = base.update({k: g[k] for k in keys}, {k: x[k] for k in keys})
      out.update(sub)
    out.update({k: g[k] for k in g if self.labels[k] is None})
    return {k: out[k] for k in g}


def masked(base, mask):
  return Partition({"on": base}, {k: "on" if m else None for k, m in mask.items()})


class ScheduleFree:
  """optax.contrib.schedule_free(base, lr, b1) (Defazio et al.) around any reference `base`."""

  def __init__(self, base, lr, b1):
    self.base, self.lr, self.b1 = base, lr, b1
    self.z, self.weight_sum, self.max_lr = None, 0.0, 0.0

  def update(self, g, y, vg=None, **kw):
    if self.z is None:
      self.z = dict(y)
    self.max_lr = max(self.max_lr, self.lr)
    weight = self.max_lr**2
    self.weight_sum += weight
    ck = weight / self.weight_sum
    u = self.base.update(g, y, vg, **kw)
    z = tmap(lambda zi, ui: zi + ui, self.z, u)
    prev_x = tmap(lambda yi, zi: (yi - (1 - self.b1) * zi) / self.b1, y, self.z)
    x = tmap(lambda xi, zi: (1 - ck) * xi + ck * zi, prev_x, z)
    new_y = tmap(lambda xi, zi: self.b1 * xi + (1 - self.b1) * zi, x, z)
    self.z = z
    return tmap(lambda a, b: a - b, new_y, y)


class Polyak:
  """SAM-SPS's descent (§3): γ = clip((f(e) - f* - <∇f(e), δ>) / ‖∇f(e)‖², 0, γ_b)."""

  def __init__(self, f_star=0.0, gamma_b=GAMMA_B, wd=WD):
    self.f_star, self.gamma_b, self.wd, self.gamma = f_star, gamma_b, wd, None

  def update(self, ge, x, vg=None, value=None, delta=None):
    ratio = (value - self.f_star - tdot(ge, delta)) / max(tnorm(ge) ** 2, EPS)
    self.gamma = 0.0 if np.isnan(ratio) else min(max(ratio, 0.0), self.gamma_b)
    return tmap(lambda gi, xi: -self.gamma * (gi + self.wd * xi), ge, x)


LAMBDAS = {
  "0": lambda t: 0.0,
  "0.5": lambda t: 0.5,
  "1": lambda t: 1.0,
  "1/t": lambda t: 1.0 / t,
  "1-1/t": lambda t: 1.0 - 1.0 / t,
}


class Unified:
  """The λ-perturbation (§1) and a descent at x (§2); `clip` clips the ascent's gradient."""

  def __init__(self, base, rho=RHO, lam="1", clip=None):
    self.base, self.rho, self.lam, self.clip, self.t = base, rho, LAMBDAS[lam], clip, 0
    self.metrics = {}

  def update(self, g, x, vg, **_):
    self.t += 1
    lam = self.lam(self.t)
    ga = g
    if self.clip is not None and tnorm(g) > self.clip:
      ga = tmap(lambda gi: gi * self.clip / tnorm(g), g)
    coef = self.rho * (1 - lam + lam / (tnorm(ga) + EPS))
    delta = tmap(lambda gi: coef * gi, ga)
    fe, ge = vg(tmap(lambda xi, d: xi + d, x, delta))
    self.metrics = {
      "grad_norm": tnorm(ga),
      "rho": self.rho,
      "lambda": lam,
      "perturbed_loss": fe,
    }
    return self.base.update(ge, x, value=fe, delta=delta)


class Interval:
  """interval_sam (alpha None) and looksam: SAM on steps 1, 1 + k, ...; between, the descent
  gets g (interval) or g + α‖g‖/‖g_v‖ g_v (LookSAM, g_v the last ∇f(e)'s part ⊥ g)."""

  def __init__(self, inner, every=EVERY, alpha=None):
    self.inner, self.every, self.alpha = inner, every, alpha
    self.count, self.gv, self.last_fe = 0, None, 0.0

  def update(self, g, x, vg, **_):
    sam = self.count % self.every == 0
    self.count += 1

    def sam_pass(e):
      fe, ge = vg(e)
      self.last_fe = fe
      if self.alpha is not None:
        c = tdot(ge, g) / tnorm(g) ** 2
        self.gv = tmap(lambda a, b: a - c * b, ge, g)
      return fe, ge

    def reuse(e):
      if self.alpha is None:
        return self.last_fe, g
      c = self.alpha * tnorm(g) / tnorm(self.gv)
      return self.last_fe, tmap(lambda a, b: a + c * b, g, self.gv)

    return self.inner.update(g, x, sam_pass if sam else reuse)


class Gsam:
  """GSAM: the descent gets ∇f(e) - α g_⊥, g_⊥ = g - <g, ∇f(e)>/‖∇f(e)‖² ∇f(e)."""

  def __init__(self, inner, alpha=GSAM_ALPHA):
    self.inner, self.alpha = inner, alpha

  def update(self, g, x, vg, **_):
    def corrected(e):
      fe, ge = vg(e)
      c = tdot(g, ge) / tnorm(ge) ** 2
      return fe, tmap(lambda a, b: a - self.alpha * (b - c * a), ge, g)

    return self.inner.update(g, x, corrected)


class After:
  """chain(sam, clip_by_global_norm(c)): the final update clipped."""

  def __init__(self, inner, clip=UPDATE_CLIP):
    self.inner, self.clip = inner, clip

  def update(self, g, x, vg, **_):
    u = self.inner.update(g, x, vg)
    n = tnorm(u)
    return u if n < self.clip else tmap(lambda ui: ui * self.clip / n, u)


class Around:
  """masked(sam, mask) / multi_transform({sam, other}): SAM on the subset (δ and its norm over
  the subset, the other leaves at x in the perturbed pass); the others by `other`, or passed
  through (optax.masked) when `other` is None."""

  def __init__(self, inner, mask=MASK, other=None):
    self.inner, self.mask, self.other = inner, mask, other

  def update(self, g, x, vg, **_):
    on = [k for k in g if self.mask[k]]
    off = [k for k in g if not self.mask[k]]

    def vg_sub(e):
      fe, ge = vg({**x, **e})
      return fe, {k: ge[k] for k in on}

    u = self.inner.update({k: g[k] for k in on}, {k: x[k] for k in on}, vg_sub)
    g_off, x_off = {k: g[k] for k in off}, {k: x[k] for k in off}
    u.update(self.other.update(g_off, x_off) if self.other is not None else g_off)
    return {k: u[k] for k in g}


def ref_run(ref, batches=BATCHES, x0=X0, before_step=None):
  """Runs a reference; returns the parameters and the clean (loss, ‖g‖) after each step."""
  x, out = dict(x0), []
  for i, batch in enumerate(batches):
    if before_step is not None:
      before_step(i, ref)
    loss, g = lossgrad(x, batch)
    u = ref.update(g, x, lambda e, b=batch: lossgrad(e, b))
    x = tmap(lambda xi, ui: xi + ui, x, u)
    out.append((dict(x), loss, tnorm(g)))
  return out


# --- the optimizers: rows (public optimizers) and bases ----------------------------------

ROWS = [
  "unified_sam(lambd=0)",
  "unified_sam(lambd=0.5)",
  "unified_sam(lambd=1)",
  "unified_sam(lambd='1/t')",
  "unified_sam(lambd='1-1/t')",
  "sam_sps",
  "sharpness_aware",
  "interval_sam",
  "looksam",
  "gsam",
  "dynamic_loss_scale",
]
NO_BASE = {"sam_sps"}  # its descent is the Polyak step: no base optimizer to put things in
DLS_LAMBDA = "0.5"


def _lam(row):
  name = row.split("lambd=")[1].rstrip(")").strip("'")
  return name, {"0": 0.0, "0.5": 0.5, "1": 1.0}.get(name, name)


BASES = {
  "sgd": (lambda: optax.sgd(LR, momentum=MU), lambda: Sgd(LR, MU)),
  "multisteps": (
    lambda: optax.MultiSteps(  # accumulate in the parameters' dtype (optax's default: float32)
      optax.sgd(LR, momentum=MU), EVERY, accumulator_dtype=None
    ).gradient_transformation(),
    lambda: MultiSteps(Sgd(LR, MU), EVERY),
  ),
  "masked": (
    lambda: optax.masked(optax.sgd(LR, momentum=MU), MASK),
    lambda: masked(Sgd(LR, MU), MASK),
  ),
  "multi_transform": (
    lambda: optax.multi_transform(
      {"sam": optax.sgd(LR, momentum=MU), "other": optax.sgd(LR2)}, LABELS
    ),
    lambda: Partition({"sam": Sgd(LR, MU), "other": Sgd(LR2)}, LABELS),
  ),
  "schedule_free_sgd": (
    lambda: optax.contrib.schedule_free_sgd(LR, b1=SF_B1),
    lambda: ScheduleFree(Sgd(LR), LR, SF_B1),
  ),
}


def make_opt(row, base="sgd", inject=False):
  """The sam_optax optimizer of a row; `inject` builds it with optax.inject_hyperparams."""
  tx = BASES[base][0]()
  inj = optax.inject_hyperparams if inject else (lambda f, **_: f)
  unified = inj(sam_optax.unified_sam)
  if row.startswith("unified_sam"):
    return unified(tx, rho=RHO, lambd=_lam(row)[1])
  if row == "sam_sps":
    return inj(sam_optax.sam_sps)(rho=RHO, lambd=1.0, f_star=0.0, gamma_b=GAMMA_B, weight_decay=WD)
  if row == "sharpness_aware":
    pert = inj(sam_optax.unified_perturbation)(rho=RHO, lambd=1.0)
    return sam_optax.sharpness_aware(optax.chain(optax.clip_by_global_norm(ASCENT_CLIP), pert), tx)
  if row == "interval_sam":
    return inj(sam_optax.interval_sam)(unified(tx, rho=RHO, lambd=1.0), every=EVERY)
  if row == "looksam":
    return inj(sam_optax.looksam)(unified(tx, rho=RHO, lambd=1.0), every=EVERY, alpha=LOOK_ALPHA)
  if row == "gsam":
    return inj(sam_optax.gsam)(unified(tx, rho=RHO, lambd=1.0), alpha=GSAM_ALPHA)
  if row == "dynamic_loss_scale":
    return inj(sam_optax.dynamic_loss_scale)(
      unified(tx, rho=RHO, lambd=float(DLS_LAMBDA)), init_scale=LOSS_SCALE
    )
  raise KeyError(row)


def make_ref(row, base="sgd"):
  """The hand-written reference of a row."""
  if row == "sam_sps":
    return Unified(Polyak(), lam="1")
  tx = BASES[base][1]()
  if row.startswith("unified_sam"):
    return Unified(tx, lam=_lam(row)[0])
  if row == "sharpness_aware":
    return Unified(tx, clip=ASCENT_CLIP)
  if row == "interval_sam":
    return Interval(Unified(tx))
  if row == "looksam":
    return Interval(Unified(tx), alpha=LOOK_ALPHA)
  if row == "gsam":
    return Gsam(Unified(tx))
  if row == "dynamic_loss_scale":  # exact vs the unscaled optimizer: nothing overflows here
    return Unified(tx, lam=DLS_LAMBDA)
  raise KeyError(row)


def rho_refs(ref):
  """The `Unified` objects inside a reference (to change ρ as tree_set does)."""
  while not isinstance(ref, Unified):
    ref = ref.inner
  return ref


def to_dtype(tree, dtype):
  return {k: jnp.asarray(v, dtype) for k, v in tree.items()}


def batch_as(batch, dtype=jnp.float32):
  return {k: jnp.asarray(v, dtype) for k, v in batch.items()}
