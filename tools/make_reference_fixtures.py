#!/usr/bin/env python
"""Generate float64 reference trajectories from the PyTorch reference optimizers.

DEV-ONLY. This script imports torch and the two reference packages; the runtime package
`sam_optax` never does. It writes small `.npz` files plus `manifest.json` into
`tests/fixtures/`, which the JAX test suite compares against (no torch needed there).

References:
  * unifiedsam==1.0.0  (class `unifiedsam.unifiedSAM`, driven with torch.optim.SGD)
  * sam-sps==1.0.0     (class `sam_sps.SAM_SPS`)

Install (private venv, CPU torch only):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 numpy unifiedsam==1.0.0 sam-sps==1.0.0
    # or, with the wheels already downloaded to /tmp/dl:
    # /tmp/refvenv/bin/pip install torch==2.13.0 numpy \
    #     /tmp/dl/unifiedsam-1.0.0-py3-none-any.whl /tmp/dl/sam_sps-1.0.0-py3-none-any.whl

(torch==2.13.0 resolves to the CPU wheel here; do not install a CUDA build for this.)

Run from the repository root:

    /tmp/refvenv/bin/python tools/make_reference_fixtures.py

Everything is float64 and deterministic (fixed numpy seeds, no torch randomness); rerunning
reproduces the files byte for byte on the same platform. Along the way the script asserts
that every SAM-SPS regime really occurs and that every gamma_t branch decision is robust,
and it runs a self-consistency check: an independent numpy float64 re-implementation of
both optimizers (analytic gradients) is run on every case and compared with the torch
trajectories; the errors are printed and stored per case in the manifest ("diagnostics").

SAM-SPS note: the reference computes ||g||, f(e), <grad f(e), delta> and ||grad f(e)||^2 in
float32 even for float64 parameters (see docs/contract.md §3). Each SAM-SPS file
therefore holds two trajectories: the reference as published (keys without prefix) and the
same code with its float32 casts replaced by float64 (keys prefixed `f64__`), which is what
a float64-internal port (sam_optax) should match to round-off.
"""

from __future__ import annotations

import inspect
import json
import math
import pathlib
import sys
import textwrap

import numpy as np
import sam_sps
import sam_sps.sam_sps as _sam_sps_module
import torch
import unifiedsam

torch.set_default_dtype(torch.float64)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "tests" / "fixtures"
STEPS = 20
FORMAT_VERSION = 1

# --------------------------------------------------------------------------------------
# Problems. Leaves are listed in `leaf_order`, which is also the torch parameter order.
# --------------------------------------------------------------------------------------

PROBLEM_DEFS = {
  "lsq": {
    "description": "least squares with an intercept, full batch every step",
    "leaf_order": ["w", "b"],
    "leaf_shapes": {"w": [10], "b": []},
    "data_shapes": {"A": [32, 10], "y": [32]},
    "loss": "f(w, b) = 0.5 * mean((A @ w + b - y)**2)",
    "data_generation": (
      "rng = numpy.random.default_rng(0); A = rng.standard_normal((32, 10)); "
      "w_true = rng.standard_normal(10); "
      "y = A @ w_true + 0.5 (noise-free, so min f = 0 and f_star = 0 is exact); "
      "w0 = 0.5 * rng.standard_normal(10); b0 = 0.0 (stored in the files anyway)"
    ),
  },
  "mlp": {
    "description": "2-layer tanh MLP regression, torch (out, in) weight layout, full batch",
    "leaf_order": ["W1", "b1", "W2", "b2"],
    "leaf_shapes": {"W1": [16, 8], "b1": [16], "W2": [1, 16], "b2": [1]},
    "data_shapes": {"X": [64, 8], "y": [64]},
    "loss": ("pred = (tanh(X @ W1.T + b1) @ W2.T + b2)[:, 0]; f = 0.5 * mean((pred - y)**2)"),
    "data_generation": (
      "rng = numpy.random.default_rng(1); X = rng.standard_normal((64, 8)); "
      "teacher T1 = rng.standard_normal((16, 8)) / sqrt(8), "
      "T2 = rng.standard_normal((1, 16)) / sqrt(16) * 2; "
      "y = (tanh(X @ T1.T) @ T2.T)[:, 0] (noise-free teacher); "
      "W1_0 = rng.standard_normal((16, 8)) / sqrt(8); b1_0 = 0.1 * rng.standard_normal(16); "
      "W2_0 = rng.standard_normal((1, 16)) / sqrt(16); b2_0 = zeros(1)"
    ),
  },
}


def make_problem_data(name):
  """Returns (data: dict of arrays, x0: dict of arrays), all float64."""
  if name == "lsq":
    rng = np.random.default_rng(0)
    A = rng.standard_normal((32, 10))
    w_true = rng.standard_normal(10)
    y = A @ w_true + 0.5
    x0 = {"w": 0.5 * rng.standard_normal(10), "b": np.array(0.0)}
    return {"A": A, "y": y}, x0
  if name == "mlp":
    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, 8))
    T1 = rng.standard_normal((16, 8)) / math.sqrt(8)
    T2 = rng.standard_normal((1, 16)) / math.sqrt(16) * 2
    y = (np.tanh(X @ T1.T) @ T2.T)[:, 0]
    x0 = {
      "W1": rng.standard_normal((16, 8)) / math.sqrt(8),
      "b1": 0.1 * rng.standard_normal(16),
      "W2": rng.standard_normal((1, 16)) / math.sqrt(16),
      "b2": np.zeros(1),
    }
    return {"X": X, "y": y}, x0
  raise ValueError(name)


def torch_loss_fn(name, data):
  d = {k: torch.tensor(v, dtype=torch.float64) for k, v in data.items()}
  if name == "lsq":

    def f(p):
      return 0.5 * ((d["A"] @ p["w"] + p["b"] - d["y"]) ** 2).mean()
  elif name == "mlp":

    def f(p):
      pred = (torch.tanh(d["X"] @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"])[:, 0]
      return 0.5 * ((pred - d["y"]) ** 2).mean()
  else:
    raise ValueError(name)
  return f


def make_params(name, x0):
  return {
    k: torch.nn.Parameter(torch.tensor(x0[k], dtype=torch.float64))
    for k in PROBLEM_DEFS[name]["leaf_order"]
  }


def snapshot(params):
  return {k: p.detach().clone().numpy() for k, p in params.items()}


def global_grad_norm(params):
  return math.sqrt(sum(float((p.grad.detach() ** 2).sum()) for p in params.values()))


# --------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------


def run_unified_sam(problem, data, x0, *, rho, lambd, lr, momentum, weight_decay, steps):
  f = torch_loss_fn(problem, data)
  params = make_params(problem, x0)
  opt = unifiedsam.unifiedSAM(
    list(params.values()),
    base_optimizer=torch.optim.SGD,
    rho=rho,
    lambd=lambd,
    lr=lr,
    momentum=momentum,
    weight_decay=weight_decay,
  )
  traj, loss, ploss, gnorm = [snapshot(params)], [], [], []
  for _ in range(steps):
    # Clean pass at x (the reference expects grads at x to be in p.grad on step()).
    opt.zero_grad(set_to_none=True)
    lx = f(params)
    lx.backward()
    loss.append(float(lx.detach()))
    gnorm.append(global_grad_norm(params))

    def closure():
      le = f(params)
      le.backward()
      ploss.append(float(le.detach()))
      return le

    opt.step(closure)  # first_step(zero_grad=True); closure(); second_step()
    traj.append(snapshot(params))
  if opt.number_steps != steps:
    raise AssertionError("unifiedSAM step counter mismatch")
  return {
    "traj": traj,
    "loss": np.array(loss),
    "perturbed_loss": np.array(ploss),
    "grad_norm": np.array(gnorm),
  }


def _make_sam_sps_f64():
  """SAM_SPS with its float32 casts replaced by float64 (textually identical otherwise)."""
  src = textwrap.dedent(inspect.getsource(sam_sps.SAM_SPS.step))
  n = src.count("torch.float32")
  if n != 4:
    raise AssertionError(f"expected 4 float32 casts in SAM_SPS.step, found {n}")
  src = src.replace("torch.float32", "torch.float64")
  ns = {}
  exec(compile(src, "<SAM_SPS.step float64>", "exec"), dict(vars(_sam_sps_module)), ns)
  return type("SAM_SPS_F64", (sam_sps.SAM_SPS,), {"step": ns["step"]})


SAM_SPS_F64 = _make_sam_sps_f64()


def run_sam_sps(
  problem, data, x0, *, rho, lambd, weight_decay, f_star, gamma_b, steps, cls=sam_sps.SAM_SPS
):
  f = torch_loss_fn(problem, data)
  params = make_params(problem, x0)
  opt = cls(
    list(params.values()),
    weight_decay=weight_decay,
    rho=rho,
    lambd=lambd,
    f_star=f_star,
    gamma_b=gamma_b,
  )
  traj, loss, ploss, gamma, gnorm = [snapshot(params)], [], [], [], []
  for _ in range(steps):
    calls = []

    def closure():
      lv = f(params)
      lv.backward()
      calls.append(float(lv.detach()))
      if len(calls) == 1:
        gnorm.append(global_grad_norm(params))
      return lv

    le = opt.step(closure)
    if len(calls) != 2 or float(le.detach()) != calls[1]:
      raise AssertionError("SAM_SPS closure protocol changed")
    loss.append(calls[0])
    ploss.append(calls[1])
    gamma.append(float(opt.param_groups[0]["lr"]))
    traj.append(snapshot(params))
  return {
    "traj": traj,
    "loss": np.array(loss),
    "perturbed_loss": np.array(ploss),
    "gamma": np.array(gamma),
    "grad_norm": np.array(gnorm),
  }


def step_classes(gamma, gamma_b):
  """Per step: 'c' (gamma_t == gamma_b), 'i' (0 < gamma_t < gamma_b), 'z' (gamma_t == 0)."""
  return "".join("c" if g == gamma_b else ("z" if g == 0.0 else "i") for g in gamma)


def regime_counts(gamma, gamma_b):
  cls = step_classes(gamma, gamma_b)
  return {
    "clipped": cls.count("c"),
    "interior": cls.count("i"),
    "zero": cls.count("z"),
    "per_step": cls,
  }


def check_regime(regime, c, steps, name):
  per_step = c["per_step"]
  if regime == "clipped":
    ok = c["clipped"] >= steps // 2 + 1
  elif regime == "unclipped":
    ok = c["interior"] == steps
  elif regime == "plus":  # negative numerator from the first step on: x never moves
    ok = c["zero"] == steps
  elif regime == "plus_cross":  # positive steps, then gamma_t = 0 for good
    ok = 1 <= c["zero"] < steps and per_step.endswith("z" * c["zero"])
  else:
    raise ValueError(regime)
  if not ok:
    raise AssertionError(f"{name}: regime {regime!r} not realised: {c}")


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------

LAMBDAS = [(0.0, "0"), (0.5, "0.5"), (1.0, "1"), ("1/t", "inv_t"), ("1-1/t", "one_minus_inv_t")]
UNIFIED_BASE = [  # (momentum, weight_decay, tag)
  (0.0, 0.0, "sgd"),
  (0.9, 0.0, "mom"),
  (0.9, 5e-4, "mom_wd"),
]
UNIFIED_HP = {"lsq": dict(lr=0.1, rho=0.1), "mlp": dict(lr=0.1, rho=0.05)}

# SAM-SPS: (rho, f_star, gamma_b) per problem and regime, chosen so that each regime really
# occurs (asserted for both the reference and its float64 variant) and so that every branch
# decision is robust: the per-step classification must agree between the float32-internal
# reference and the float64 variant, and the numpy re-implementation asserts a relative
# margin of at least 1e-6 between the Polyak ratio and the clip points 0 and gamma_b.
#   * "unclipped": gamma_b = 1000 is never reached. rho is small (lsq: 0.005) so that, with
#     f_star = 0 on the noise-free problem, the numerator f(e) - <grad f(e), delta>
#     ~ f(x) - rho^2 lambda_max / 2 stays clearly positive for 20 steps. Free-running Polyak
#     steps are sensitive to perturbations (gamma_t up to ~5 on mlp), so the float32
#     internals of the reference are amplified along the trajectory; mlp uses f_star = 0.01
#     (still below f on every step), which keeps that amplification to ~1e-6. The per-case
#     diagnostics in the manifest give the measured reference-vs-float64 gap.
#   * "plus": f_star above f(x0), so the numerator is clearly negative at x0 and gamma_t = 0
#     on every step (x never moves). A positive-then-zero trajectory is NOT robust on lsq
#     (either lambda) nor on mlp with lambda = 0: the SPS iterates approach the surface
#     numerator = 0 asymptotically from above, and which steps end up at gamma = 0 is decided
#     by round-off (the float32 reference and the float64 variant disagree).
#   * "plus_cross" (mlp, lambda = 1 only): with a large rho the normalized perturbation makes
#     the Polyak step overshoot, so the numerator jumps clearly below 0 after some positive
#     steps and stays there.
SPS_REGIMES = {
  "lsq": {
    "clipped": dict(rho=0.05, f_star=0.0, gamma_b=0.3, lambdas=(0.0, 1.0)),
    "unclipped": dict(rho=0.005, f_star=0.0, gamma_b=1000.0, lambdas=(0.0, 1.0)),
    "plus": dict(rho=0.05, f_star=2.0, gamma_b=1.0, lambdas=(0.0, 1.0)),
  },
  "mlp": {
    "clipped": dict(rho=0.05, f_star=0.0, gamma_b=0.5, lambdas=(0.0, 1.0)),
    "unclipped": dict(rho=0.02, f_star=0.01, gamma_b=1000.0, lambdas=(0.0, 1.0)),
    "plus": dict(rho=0.05, f_star=1.5, gamma_b=1.0, lambdas=(0.0, 1.0)),
    "plus_cross": dict(rho=0.3, f_star=0.01, gamma_b=1.0, lambdas=(1.0,)),
  },
}


def build_cases():
  cases = []
  for problem in ("lsq", "mlp"):
    for lambd, ltag in LAMBDAS:
      for mom, wd, btag in UNIFIED_BASE:
        cases.append(
          dict(
            name=f"usam_{problem}_lam_{ltag}_{btag}",
            optimizer="unified_sam",
            problem=problem,
            rho=UNIFIED_HP[problem]["rho"],
            lambd=lambd,
            lr=UNIFIED_HP[problem]["lr"],
            momentum=mom,
            weight_decay=wd,
            f_star=None,
            gamma_b=None,
            steps=STEPS,
            regime=None,
          )
        )
  for problem in ("lsq", "mlp"):
    for regime, hp in SPS_REGIMES[problem].items():
      for lambd in hp["lambdas"]:
        ltag = {0.0: "0", 1.0: "1"}[lambd]
        for wd, wtag in ((0.0, "nowd"), (5e-4, "wd")):
          cases.append(
            dict(
              name=f"sps_{problem}_{regime}_lam_{ltag}_{wtag}",
              optimizer="sam_sps",
              problem=problem,
              rho=hp["rho"],
              lambd=lambd,
              lr=None,
              momentum=None,
              weight_decay=wd,
              f_star=hp["f_star"],
              gamma_b=hp["gamma_b"],
              steps=STEPS,
              regime=regime,
            )
          )
  return cases


def traj_arrays(traj, leaf_order, prefix=""):
  return {f"{prefix}traj__{k}": np.stack([s[k] for s in traj]) for k in leaf_order}


def run_case(case, data, x0):
  p = case["problem"]
  leaf_order = PROBLEM_DEFS[p]["leaf_order"]
  arrays = dict(data)
  arrays.update({f"x0__{k}": np.asarray(x0[k]) for k in leaf_order})
  info = {}
  if case["optimizer"] == "unified_sam":
    r = run_unified_sam(
      p,
      data,
      x0,
      rho=case["rho"],
      lambd=case["lambd"],
      lr=case["lr"],
      momentum=case["momentum"],
      weight_decay=case["weight_decay"],
      steps=case["steps"],
    )
    arrays.update(traj_arrays(r["traj"], leaf_order))
    arrays.update(loss=r["loss"], perturbed_loss=r["perturbed_loss"], grad_norm=r["grad_norm"])
  else:
    kw = dict(
      rho=case["rho"],
      lambd=case["lambd"],
      weight_decay=case["weight_decay"],
      f_star=case["f_star"],
      gamma_b=case["gamma_b"],
      steps=case["steps"],
    )
    r = run_sam_sps(p, data, x0, **kw)
    r64 = run_sam_sps(p, data, x0, cls=SAM_SPS_F64, **kw)
    for tag, res in (("reference", r), ("f64", r64)):
      c = regime_counts(res["gamma"], case["gamma_b"])
      check_regime(case["regime"], c, case["steps"], f"{case['name']} ({tag})")
      info[f"regime_counts_{tag}"] = c
    if info["regime_counts_reference"] != info["regime_counts_f64"]:
      raise AssertionError(
        f"{case['name']}: gamma_t branch differs between the float32 "
        f"reference and the float64 variant: {info}"
      )
    arrays.update(traj_arrays(r["traj"], leaf_order))
    arrays.update(
      loss=r["loss"], perturbed_loss=r["perturbed_loss"], gamma=r["gamma"], grad_norm=r["grad_norm"]
    )
    arrays.update(traj_arrays(r64["traj"], leaf_order, prefix="f64__"))
    arrays.update(
      {
        "f64__loss": r64["loss"],
        "f64__perturbed_loss": r64["perturbed_loss"],
        "f64__gamma": r64["gamma"],
        "f64__grad_norm": r64["grad_norm"],
      }
    )
  for k, v in arrays.items():
    if not np.all(np.isfinite(v)):
      raise AssertionError(f"{case['name']}: non-finite values in {k}")
  final = r["loss"][-1]
  if case["regime"] != "plus" and not final < r["loss"][0]:
    raise AssertionError(f"{case['name']}: loss did not decrease ({r['loss'][0]} -> {final})")
  info["loss_first_last"] = [float(r["loss"][0]), float(r["loss"][-1])]
  return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}, info


# --------------------------------------------------------------------------------------
# Independent numpy float64 re-implementation (self-consistency check)
# --------------------------------------------------------------------------------------


def np_loss_grad(problem, data, x):
  if problem == "lsq":
    A, y = data["A"], data["y"]
    r = A @ x["w"] + x["b"] - y
    n = y.shape[0]
    return 0.5 * np.mean(r**2), {"w": A.T @ r / n, "b": np.array(r.sum() / n)}
  X, y = data["X"], data["y"]
  n = y.shape[0]
  H = np.tanh(X @ x["W1"].T + x["b1"])
  r = (H @ x["W2"].T + x["b2"])[:, 0] - y
  dpred = r / n
  dZ = (dpred[:, None] * x["W2"]) * (1 - H**2)
  g = {"W1": dZ.T @ X, "b1": dZ.sum(0), "W2": (dpred @ H)[None, :], "b2": np.array([dpred.sum()])}
  return 0.5 * np.mean(r**2), g


def np_lambda(lambd, t):
  if lambd == "1/t":
    return 1.0 / t
  if lambd == "1-1/t":
    return 1.0 - 1.0 / t
  return float(lambd)


def np_unified_sam(case, data, x0):
  """docs/contract.md §1-§2, plain numpy."""
  x = {k: np.array(v, dtype=np.float64) for k, v in x0.items()}
  buf = None
  traj = [{k: v.copy() for k, v in x.items()}]
  for t in range(1, case["steps"] + 1):
    _, g = np_loss_grad(case["problem"], data, x)
    gn = math.sqrt(sum(float(np.sum(v**2)) for v in g.values()))
    lam = np_lambda(case["lambd"], t)
    s = case["rho"] * (1 - lam + lam / (gn + 1e-12))
    e = {k: x[k] + s * g[k] for k in x}
    _, ge = np_loss_grad(case["problem"], data, e)
    d = {k: ge[k] + case["weight_decay"] * x[k] for k in x}
    if case["momentum"] != 0.0:
      buf = d if buf is None else {k: case["momentum"] * buf[k] + d[k] for k in x}
      d = buf
    x = {k: x[k] - case["lr"] * d[k] for k in x}
    traj.append({k: v.copy() for k, v in x.items()})
  return traj


def np_sam_sps(case, data, x0):
  """docs/contract.md §3 in float64, with the reference's eps placement (clamp)."""
  x = {k: np.array(v, dtype=np.float64) for k, v in x0.items()}
  traj, gammas = [{k: v.copy() for k, v in x.items()}], []
  margin = math.inf  # smallest relative distance of the Polyak ratio to a clip point
  lam, wd = case["lambd"], case["weight_decay"]
  for _ in range(case["steps"]):
    _, g = np_loss_grad(case["problem"], data, x)
    gn = max(math.sqrt(sum(float(np.sum(v**2)) for v in g.values())), 1e-12)
    s = case["rho"] * ((1 - lam) + lam / gn)
    delta = {k: s * g[k] for k in x}
    fe, ge = np_loss_grad(case["problem"], data, {k: x[k] + delta[k] for k in x})
    dot = sum(float(np.sum(ge[k] * delta[k])) for k in x)
    ge2 = max(sum(float(np.sum(v**2)) for v in ge.values()), 1e-12)
    num = fe - case["f_star"] - dot
    r = num / ge2
    margin = min(
      margin,
      abs(num) / (abs(fe) + abs(dot) + abs(case["f_star"])),
      abs(r - case["gamma_b"]) / case["gamma_b"],
    )
    gamma = 0.0 if math.isnan(r) else min(max(r, 0.0), case["gamma_b"])
    gammas.append(gamma)
    x = {k: x[k] - gamma * (ge[k] + wd * x[k]) for k in x}
    traj.append({k: v.copy() for k, v in x.items()})
  return traj, np.array(gammas), margin


def max_traj_err(traj, arrays, leaf_order, prefix=""):
  return max(
    float(np.max(np.abs(np.stack([s[k] for s in traj]) - arrays[f"{prefix}traj__{k}"])))
    for k in leaf_order
  )


# --------------------------------------------------------------------------------------

NUMERIC_NOTES = {
  "step_count": "both: t counts from 1 (unifiedSAM increments number_steps before using it); "
  "SAM_SPS has no step counter (constant rho and lambda)",
  "unified_sam_eps": "delta = rho * (1 - lam + lam / (||g|| + 1e-12)) * g: eps ADDED to the norm; "
  "||g|| = norm of the per-leaf norms, in the parameter dtype (float64 here); "
  "'1/t' is coded as rho*(1 - 1/t + 1/(t*(||g||+eps))) and '1-1/t' as "
  "rho*(1/t + (1-1/t)/(||g||+eps)) (equal to the generic formula up to 1 ulp)",
  "unified_sam_descent": "x restored bit-exactly (clone), then torch SGD with grad f(e): "
  "d = grad f(e) + wd * x; buf = clone(d) on step 1, else buf = mu*buf + d "
  "(no dampening, no nesterov); x -= lr * buf (== optax chain("
  "add_decayed_weights(wd), trace(mu), scale(-lr)))",
  "sam_sps_eps": "||g|| = sqrt(sum g^2).clamp(min=1e-12): eps is a CLAMP, not added "
  "(docs/contract.md §1 adds it; the difference reaches 3e-11 on these "
  "trajectories); denominator ||grad f(e)||^2.clamp(min=1e-12)",
  "sam_sps_float32": "reference: ||g||, the scale rho*((1-lam)+lam/||g||) (so even rho itself for "
  "lam = 0), f(e), <grad f(e), delta>, ||grad f(e)||^2, the numerator "
  "(f(e) - f_star - dot) and the ratio are float32; delta = g(float64) * "
  "scale(float32 value); interior gamma_t values are float32-representable. "
  "f64__* keys: same code in float64",
  "sam_sps_update": "gamma = max(0, min(ratio, gamma_b)) in Python (NaN ratio -> 0); "
  "x restored as (x + delta) - delta (ulp-level drift, not a clone); then "
  "x -= gamma * (grad f(e) + wd * x); wd is not in the ratio",
  "suggested_tolerances": "unified_sam traj vs JAX float64: atol 1e-12; sam_sps f64__traj: atol "
  "1e-10 (1e-12 needs the clamp eps); sam_sps reference traj: use ~10x the "
  "case's diagnostics.max_abs_diff_reference_vs_f64 (>= 1e-7)",
}


def jsonable(v):
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def main():
  OUT_DIR.mkdir(parents=True, exist_ok=True)
  problems = {p: make_problem_data(p) for p in PROBLEM_DEFS}
  cases = build_cases()
  manifest_cases = []
  checks = {}  # name -> worst value over the cases

  def record(name, value, worst=max):
    checks[name] = value if name not in checks else worst(checks[name], value)
    return value

  for case in cases:
    data, x0 = problems[case["problem"]]
    arrays, info = run_case(case, data, x0)
    fname = case["name"] + ".npz"
    np.savez_compressed(OUT_DIR / fname, **arrays)
    leaf_order = PROBLEM_DEFS[case["problem"]]["leaf_order"]
    # Self-consistency checks against the plain numpy float64 re-implementation.
    diag = {}
    if case["optimizer"] == "unified_sam":
      traj = np_unified_sam(case, data, x0)
      diag["max_abs_diff_numpy_vs_reference"] = record(
        "unified_sam: numpy vs torch reference (traj)", max_traj_err(traj, arrays, leaf_order)
      )
    else:
      traj, gam, margin = np_sam_sps(case, data, x0)
      if margin < 1e-6:
        raise AssertionError(
          f"{case['name']}: a gamma_t branch decision is not robust (relative margin {margin:.2e})"
        )
      diag["min_rel_branch_margin"] = record("sam_sps: min relative branch margin", margin, min)
      diag["max_abs_diff_numpy_vs_f64"] = record(
        "sam_sps: numpy vs f64 variant (traj)", max_traj_err(traj, arrays, leaf_order, "f64__")
      )
      record(
        "sam_sps: numpy vs f64 variant (gamma)", float(np.max(np.abs(gam - arrays["f64__gamma"])))
      )
      ref_traj = [
        {k: arrays[f"traj__{k}"][i] for k in leaf_order} for i in range(case["steps"] + 1)
      ]
      diag["max_abs_diff_reference_vs_f64"] = record(
        "sam_sps: float32-internal reference vs f64 variant (traj)",
        max_traj_err(ref_traj, arrays, leaf_order, "f64__"),
      )
      pos = arrays["f64__gamma"] > 0
      rel = 0.0
      if pos.any():
        rel = float(
          np.max(
            np.abs(arrays["gamma"][pos] - arrays["f64__gamma"][pos]) / arrays["f64__gamma"][pos]
          )
        )
      diag["max_rel_diff_gamma_reference_vs_f64"] = record(
        "sam_sps: reference vs f64 variant (gamma, relative)", rel
      )
    info["diagnostics"] = {k: float(f"{v:.2e}") for k, v in diag.items()}
    entry = {
      "name": case["name"],
      "file": fname,
      "optimizer": case["optimizer"],
      "problem": case["problem"],
      "rho": case["rho"],
      "lambd": case["lambd"],
      "lr": case["lr"],
      "momentum": case["momentum"],
      "weight_decay": case["weight_decay"],
      "f_star": case["f_star"],
      "gamma_b": case["gamma_b"],
      "steps": case["steps"],
      "regime": case["regime"],
      "keys": sorted(arrays),
    }
    entry.update(info)
    manifest_cases.append(entry)
    print(
      f"{fname:45s} loss {info['loss_first_last'][0]:.4g} -> "
      f"{info['loss_first_last'][1]:.4g}"
      + (f"  {info['regime_counts_reference']}" if "regime_counts_reference" in info else "")
    )

  manifest = {
    "format_version": FORMAT_VERSION,
    "generator": "tools/make_reference_fixtures.py",
    "references": {
      "unifiedsam": "1.0.0 (unifiedsam.unifiedSAM, base_optimizer=torch.optim.SGD)",
      "sam-sps": "1.0.0 (sam_sps.SAM_SPS)",
      "torch": torch.__version__,
      "numpy": np.__version__,
    },
    "dtype": "float64",
    "steps": STEPS,
    "eps": 1e-12,
    "npz_keys": {
      "<data>": "problem data arrays (A, y for lsq; X, y for mlp)",
      "x0__<leaf>": "initial parameters, leaf shape",
      "traj__<leaf>": "(steps+1, *leaf_shape); row 0 = x0, row t = params after t steps",
      "loss": "(steps,) clean loss f(x_t) at the start of step t+1 (row t of traj)",
      "perturbed_loss": "(steps,) f(e_t) at the perturbed point",
      "grad_norm": "(steps,) global L2 norm of grad f(x_t), computed in float64 by the generator",
      "gamma": "sam_sps only: (steps,) Polyak step size gamma_t = param_groups[0]['lr'] after the step",
      "f64__*": (
        "sam_sps only: the same keys for SAM_SPS with its four float32 casts replaced "
        "by float64 (what a float64-internal implementation should match to ~1e-12)"
      ),
    },
    "problems": PROBLEM_DEFS,
    "numerics": NUMERIC_NOTES,
    "unified_sam_call": (
      "unifiedSAM(params, base_optimizer=torch.optim.SGD, rho=rho, lambd=lambd, lr=lr, "
      "momentum=momentum, weight_decay=weight_decay); per step: zero_grad; f(x).backward(); "
      "step(closure) with closure = f(e).backward()"
    ),
    "sam_sps_call": (
      "SAM_SPS(params, weight_decay=weight_decay, rho=rho, lambd=lambd, f_star=f_star, "
      "gamma_b=gamma_b); per step: step(closure) with closure = f(.).backward()"
    ),
    "sam_sps_regimes": {
      "clipped": "gamma_t == gamma_b on more than half of the steps",
      "unclipped": "0 < gamma_t < gamma_b on every step",
      "plus": "f_star > f(x0): numerator < 0 at x0, gamma_t == 0 on every step, x never moves",
      "plus_cross": (
        "f_star > 0 (mlp, lambda = 1, large rho): gamma_t > 0 on the first steps, then "
        "gamma_t == 0 (clearly negative numerator) on the remaining steps"
      ),
      "robustness": (
        "per-step classification (clipped / interior / zero) is identical for the float32 "
        "reference and the float64 variant, and the float64 Polyak ratio is at least 1e-6 "
        "(relative) away from 0 and gamma_b on every step"
      ),
    },
    "cases": [{k: jsonable(v) for k, v in c.items()} for c in manifest_cases],
  }
  (OUT_DIR / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

  print("\nself-consistency (worst over the cases; max abs errors unless noted):")
  for k, v in checks.items():
    print(f"  {k:60s} {v:.3e}")
  if (
    checks["unified_sam: numpy vs torch reference (traj)"] > 1e-12
    or checks["sam_sps: numpy vs f64 variant (traj)"] > 1e-10
  ):
    print("SELF-CHECK FAILED", file=sys.stderr)
    return 1
  print(f"wrote {len(manifest_cases)} cases to {OUT_DIR}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
