"""Agreement with the PyTorch references (unifiedsam 1.0.0, sam-sps 1.0.0) on float64 fixtures.

The fixtures are made by tools/make_reference_fixtures.py (see tools/README.md).
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = MANIFEST["cases"]
LEAVES = {name: p["leaf_order"] for name, p in MANIFEST["problems"].items()}


def _lsq_loss(params, data):
  a, y = data
  return 0.5 * jnp.mean((a @ params["w"] + params["b"] - y) ** 2)


def _mlp_loss(params, data):
  x, y = data
  pred = (jnp.tanh(x @ params["W1"].T + params["b1"]) @ params["W2"].T + params["b2"])[:, 0]
  return 0.5 * jnp.mean((pred - y) ** 2)


LOSSES = {"lsq": _lsq_loss, "mlp": _mlp_loss}


def _load(case):
  z = np.load(FIXTURES / case["file"])
  data = (z["A"], z["y"]) if case["problem"] == "lsq" else (z["X"], z["y"])
  return z, jax.tree.map(jnp.asarray, data)


def _row(z, t, prefix=""):
  return {k: jnp.asarray(z[f"{prefix}traj__{k}"][t]) for k in LEAVES[z_problem(z)]}


def z_problem(z):
  return "lsq" if "A" in z.files else "mlp"


_HYPERPARAMS = ("rho", "lambd", "lr", "momentum", "weight_decay", "f_star", "gamma_b")


def _hyperparams(case):
  """The case's numeric hyperparameters, passed as traced values (one compile per kind)."""
  return {
    k: jnp.asarray(case[k], jnp.float64)
    for k in _HYPERPARAMS
    if case[k] is not None and not isinstance(case[k], str)
  }


def _optimizer(kind, lambd_string, hp):
  lambd = lambd_string if lambd_string is not None else hp["lambd"]
  if kind == "unified_sam":
    base = optax.chain(
      optax.add_decayed_weights(hp["weight_decay"]),
      optax.trace(decay=hp["momentum"]),
      optax.scale(-hp["lr"]),
    )
    return sam_optax.unified_sam(base, rho=hp["rho"], lambd=lambd)
  return sam_optax.sam_sps(
    rho=hp["rho"],
    lambd=lambd,
    f_star=hp["f_star"],
    gamma_b=hp["gamma_b"],
    weight_decay=hp["weight_decay"],
  )


def _static(case):
  lambd = case["lambd"] if isinstance(case["lambd"], str) else None
  return case["optimizer"], case["problem"], lambd


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run(kind, problem, lambd_string, steps, hp, x0, data):
  opt = _optimizer(kind, lambd_string, hp)
  step = sam_optax.sam_step(LOSSES[problem], opt, jit=False)

  def body(carry, _):
    params, state = carry
    params, state, metrics = step(params, state, data)
    return (params, state), (params, metrics)

  _, (traj, metrics) = jax.lax.scan(body, (x0, opt.init(x0)), length=steps)
  return traj, metrics


def _trajectory(case, x0, data):
  return _run(*_static(case), case["steps"], _hyperparams(case), x0, data)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _one_step_each(kind, problem, lambd_string, hp, xs, data):
  """One step from each row of xs with a fresh state: (x_{t+1}, γ_t) per row."""
  opt = _optimizer(kind, lambd_string, hp)
  step = sam_optax.sam_step(LOSSES[problem], opt, jit=False)

  def one(x):
    params, _, metrics = step(x, opt.init(x), data)
    return params, metrics["step_size"]

  return jax.vmap(one)(xs)


def _ids(cases):
  return [c["name"] for c in cases]


UNIFIED = [c for c in CASES if c["optimizer"] == "unified_sam"]
SPS = [c for c in CASES if c["optimizer"] == "sam_sps"]


def test_fixture_coverage():
  modes = {
    (c["problem"], str(c["lambd"]), c["momentum"] > 0, c["weight_decay"] > 0) for c in UNIFIED
  }
  for problem in ("lsq", "mlp"):
    for lambd in ("0.0", "0.5", "1.0", "1/t", "1-1/t"):
      assert (problem, lambd, False, False) in modes and (problem, lambd, True, True) in modes
  regimes = {c["regime"] for c in SPS}
  assert {"clipped", "unclipped", "plus"} <= regimes
  for c in SPS:
    counts = c["regime_counts_reference"]
    assert {
      "clipped": counts["clipped"],
      "unclipped": counts["interior"],
      "plus": counts["zero"],
    }.get(c["regime"], 1) > 0


@pytest.mark.parametrize("case", UNIFIED, ids=_ids(UNIFIED))
def test_unified_sam_free_running_trajectory(case, x64):
  z, data = _load(case)
  traj, metrics = _trajectory(case, _row(z, 0), data)
  for k in traj:
    np.testing.assert_allclose(
      np.asarray(traj[k]), z[f"traj__{k}"][1:], rtol=0, atol=1e-10, err_msg=k
    )
  np.testing.assert_allclose(np.asarray(metrics["loss"]), z["loss"], rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(
    np.asarray(metrics["perturbed_loss"]), z["perturbed_loss"], rtol=1e-10, atol=1e-12
  )
  np.testing.assert_allclose(np.asarray(metrics["grad_norm"]), z["grad_norm"], rtol=1e-10)


@pytest.mark.parametrize("case", SPS, ids=_ids(SPS))
def test_sam_sps_free_running_matches_float64_reference(case, x64):
  """Against the reference's own code with its float32 casts made float64."""
  z, data = _load(case)
  traj, metrics = _trajectory(case, _row(z, 0), data)
  for k in traj:
    np.testing.assert_allclose(
      np.asarray(traj[k]), z[f"f64__traj__{k}"][1:], rtol=0, atol=1e-10, err_msg=k
    )
  np.testing.assert_allclose(
    np.asarray(metrics["step_size"]), z["f64__gamma"], rtol=1e-8, atol=1e-12
  )
  np.testing.assert_allclose(
    np.asarray(metrics["perturbed_loss"]), z["f64__perturbed_loss"], rtol=1e-9, atol=1e-12
  )


@pytest.mark.parametrize("case", SPS, ids=_ids(SPS))
def test_sam_sps_per_step_matches_torch_reference(case, x64):
  """One step from each of the reference's iterates: γ_t and x_{t+1} agree to 1e-6.

  The reference computes norms, f(e) and the ratio in float32; we do it in float64, so a
  free-running comparison drifts (up to ~2e-6 on the MLP); per-step values agree tightly.
  """
  z, data = _load(case)
  xs = {k: jnp.asarray(z[f"traj__{k}"][:-1]) for k in LEAVES[case["problem"]]}
  nxt, gamma = _one_step_each(*_static(case), _hyperparams(case), xs, data)
  np.testing.assert_allclose(np.asarray(gamma), z["gamma"], rtol=0, atol=1e-6)
  for k in nxt:
    np.testing.assert_allclose(
      np.asarray(nxt[k]), z[f"traj__{k}"][1:], rtol=0, atol=1e-6, err_msg=k
    )
  regime = {"c": case["gamma_b"], "z": 0.0}
  for t, kind in enumerate(case["regime_counts_reference"]["per_step"]):
    if kind in regime:
      assert float(gamma[t]) == regime[kind]
