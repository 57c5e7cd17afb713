"""The figures: each function runs one experiment, saves a PNG and returns table rows.

Run them all with ``python -m examples.theory`` (see ``__main__.py``). Every
function must be called with float64 enabled (``with jax.enable_x64(True)``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sam_optax  # noqa: E402
from examples.theory import adaptive  # noqa: E402
from examples.theory import problems  # noqa: E402
from examples.theory import runner  # noqa: E402
from examples.theory import samplers  # noqa: E402
from examples.theory import theory  # noqa: E402

LAMBDA_MODES = (0.0, 0.5, 1.0, "1/t", "1-1/t")
COLORS = plt.get_cmap("tab10").colors


@dataclasses.dataclass
class Row:
  """One line of the rates table."""

  figure: str
  setting: str
  measured: str
  predicted: str
  note: str = ""


def _label(lambd) -> str:
  names = {0.0: "USAM", 1.0: "SAM"}
  return f"λ = {lambd}" + (f" ({names[lambd]})" if lambd in names else "")


def _save(fig, out_dir: Path, name: str) -> None:
  fig.tight_layout()
  fig.savefig(out_dir / name, dpi=110)
  plt.close(fig)


def _setup_axis(ax, title, xlabel="iteration t", ylabel="(f(x_t) - f*) / (f(x_0) - f*)"):
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="major", alpha=0.3)


def _floor(trace: runner.Trace, k: int = 10) -> float:
  """The last k recorded mean gaps, averaged: where a run has settled."""
  return float(trace.mean_gap[-k:].mean())


def _fmt(value: float, digits: int = 3) -> str:
  """A measured number for the table; '—' when there is none."""
  return "—" if not np.isfinite(value) else f"{value:.{digits}e}"


def _fmt_gap(value: float) -> str:
  # f - f* below 1e-14 is float64 round-off of f(x) - f* (or of ½eᵀHe).
  return "round-off" if value < 1e-14 else f"{value:.2e}"


def _window_slope(trace: runner.Trace) -> float:
  """Slope of log E[f - f*] over its linear phase: between 0.3 and 30× its floor."""
  rel_floor = max(_floor(trace) / trace.mean_gap[0], 1e-26)
  try:
    return runner.fitted_slope(trace.t, trace.mean_gap, lo=30 * rel_floor, hi=0.3)
  except ValueError:  # settles within a few records: no linear phase to fit
    return float("nan")


# --------------------------------------------------------------------------- #
# Unified SAM (Oikonomou & Loizou, ICLR 2025)
# --------------------------------------------------------------------------- #


def unified_sam_lambda_modes(out_dir: Path) -> list[Row]:
  """Thm 3.2, full batch: every λ mode with the theorem's constant (ρ, γ)."""
  p = problems.ridge_regression()
  sampler = samplers.full_batch(p.n)
  noise = theory.noise_constants(p, sampler)
  rho, gamma = theory.unified_sam_step_sizes(p.mu, noise, 0.0)
  bound = theory.unified_sam_rate_bound(p.L, p.mu, noise, gamma, rho, 0.0)
  steps = 20_000
  fig, ax = plt.subplots(figsize=(7.5, 5))
  rows = []
  for i, lambd in enumerate(LAMBDA_MODES):
    tr = runner.run(
      p, sam_optax.unified_sam(optax.sgd(gamma), rho, lambd), sampler, steps=steps, record_every=20
    )
    ax.plot(
      tr.t,
      tr.relative_gap,
      color=COLORS[i],
      label=_label(lambd),
      ls="-" if isinstance(lambd, float) else "-.",
    )
    if lambd == 0.0:
      exact = theory.usam_quadratic_slope(p.hessian_eigenvalues, gamma, rho)
      late = runner.fitted_slope(tr.t, tr.mean_gap, lo=1e-26, hi=1e-12)
      rows.append(
        Row(
          "unified_sam_lambda_modes",
          "full batch, λ = 0: slope of log(f - f*)",
          f"{late:.3e}",
          f"exact {exact:.3e}; bound {bound.slope:.3e}",
          f"measured/bound = {late / bound.slope:.2f}",
        )
      )
    elif isinstance(lambd, float):
      pred = theory.sam_two_cycle_floor(p.L, gamma, rho, lambd)
      ax.axhline(pred / tr.mean_gap[0], color=COLORS[i], ls=":", lw=1)
      rows.append(
        Row(
          "unified_sam_lambda_modes",
          f"full batch, λ = {lambd}: floor f - f*",
          f"{_floor(tr):.6e}",
          f"2-cycle {pred:.6e}",
        )
      )
    else:
      lam_T = 1.0 / steps if lambd == "1/t" else 1.0 - 1.0 / steps
      pred = theory.sam_two_cycle_floor(p.L, gamma, rho, lam_T)
      if lambd == "1/t":  # the floor follows λ_t = 1/t down, ∝ 1/t²
        t = tr.t[1:]
        ax.plot(
          t,
          theory.sam_two_cycle_floor(p.L, gamma, rho, 1.0 / t) / tr.mean_gap[0],
          color=COLORS[i],
          ls=":",
          lw=1,
        )
      rows.append(
        Row(
          "unified_sam_lambda_modes",
          f"full batch, λ_t = {lambd}: f - f* at t = T",
          f"{tr.mean_gap[-1]:.3e}",
          f"2-cycle at λ_T: {pred:.3e}",
        )
      )
  ax.plot(tr.t, bound.curve(tr.t, 1.0), "k--", lw=1, label="derived bound q^t (λ = 0)")
  ax.set_ylim(1e-30, 3)
  _setup_axis(
    ax,
    f"Unified SAM, full batch, {p.name}\nρ = {rho:.3g}, γ = {gamma:.3g} "
    "(Thm 3.2 at λ = 0; dotted: predicted 2-cycle floors)",
  )
  ax.legend(fontsize=8)
  _save(fig, out_dir, "unified_sam_lambda_modes.png")
  return rows


def _sampler_set(p: problems.Problem):
  return [
    samplers.tau_nice(p.n, 1),
    samplers.tau_nice(p.n, 10),
    samplers.importance(p.L_i),
    samplers.full_batch(p.n),
  ]


def _sampling_panel(ax, p, lambd, epochs, trials, figure, rows):
  for i, sampler in enumerate(_sampler_set(p)):
    noise = theory.noise_constants(p, sampler)
    rho, gamma = theory.unified_sam_step_sizes(p.mu, noise, lambd)
    bound = theory.unified_sam_rate_bound(p.L, p.mu, noise, gamma, rho, lambd)
    steps = epochs * p.n // sampler.tau
    tr = runner.run(
      p,
      sam_optax.unified_sam(optax.sgd(gamma), rho, lambd),
      sampler,
      steps=steps,
      record_every=steps // 200,
      trials=1 if sampler.kind == "full" else trials,
    )
    epoch = tr.t * sampler.tau / p.n
    ax.plot(epoch, tr.relative_gap, color=COLORS[i], label=f"{sampler.name} (γ = {gamma:.2g})")
    ax.plot(
      epoch, bound.curve(tr.t, tr.mean_gap[0]) / tr.mean_gap[0], color=COLORS[i], ls="--", lw=1
    )
    slope = _window_slope(tr)
    rows.append(
      Row(
        figure,
        f"{p.name.split('(')[0]}, λ = {lambd}, {sampler.name}: slope / floor",
        f"{_fmt(slope)} / {_fmt_gap(_floor(tr))}",
        f"bound {bound.slope:.3e} / N = {bound.N:.2e}",
        f"measured/bound = {slope / bound.slope:.2f}"
        if np.isfinite(slope)
        else "settles within a few records: no linear phase to fit",
      )
    )


def unified_sam_sampling(out_dir: Path) -> list[Row]:
  """Thm 3.2 under arbitrary sampling: uniform, τ-nice, importance, full batch."""
  p = problems.ridge_regression(reg=0.03)
  fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
  rows: list[Row] = []
  for ax, lambd in zip(axes, (0.0, 1.0)):
    _sampling_panel(ax, p, lambd, epochs=3000, trials=4, figure="unified_sam_sampling", rows=rows)
    _setup_axis(
      ax,
      f"Unified SAM, {_label(lambd)}, {p.name}\n"
      "Thm 3.2 (ρ, γ) for each sampling; dashed: derived bound q^t Δ0 + N",
      xlabel="epochs (t·τ/n)",
    )
    ax.set_ylim(1e-9, 3)
    ax.legend(fontsize=8)
  _save(fig, out_dir, "unified_sam_sampling.png")
  return rows


def unified_sam_decreasing(out_dir: Path) -> list[Row]:
  """Thm 3.5: ρ_t, γ_t = O(1/t) reach x* at O(1/t); constant steps stall at a neighbourhood."""
  p = problems.ridge_regression(reg=0.03)
  sampler = samplers.tau_nice(p.n, 1)
  lambd = 0.5
  noise = theory.noise_constants(p, sampler)
  rho, gamma = theory.unified_sam_step_sizes(p.mu, noise, lambd)
  rho_t, gamma_t = theory.decreasing_schedules(rho, gamma, p.mu)
  steps, every = 1_000_000, 5_000
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  rows = []
  for i, (name, opt) in enumerate(
    [
      ("constant ρ, γ", sam_optax.unified_sam(optax.sgd(gamma), rho, lambd)),
      ("decreasing ρ_t, γ_t", sam_optax.unified_sam(optax.sgd(gamma_t), rho_t, lambd)),
    ]
  ):
    tr = runner.run(p, opt, sampler, steps=steps, record_every=every, trials=4)
    axes[0].plot(tr.t[1:], tr.relative_gap[1:], color=COLORS[i], label=name)
    axes[1].plot(tr.t[1:], tr.t[1:] * tr.mean_gap[1:], color=COLORS[i], label=name)
    te = [tr.t[k] * tr.mean_gap[k] for k in (len(tr.t) // 4, len(tr.t) // 2, -1)]
    rows.append(
      Row(
        "unified_sam_decreasing",
        f"uniform single-element, λ = {lambd}, {name}: t·E[f - f*] at t = T/4, T/2, T",
        " → ".join(f"{v:.3g}" for v in te),
        "bounded (O(1/t))" if "decreasing" in name else "grows ∝ t (neighbourhood)",
      )
    )
  axes[0].set_xscale("log")
  _setup_axis(
    axes[0],
    f"Unified SAM, {_label(lambd)}, uniform single-element, {p.name}\n"
    "ρ_t = min(ρ, 1/(2t+1)), γ_t = min(γ, (2t+1)/((t+1)²μ))",
  )
  axes[1].set_xscale("log")
  _setup_axis(axes[1], "t · E[f(x_t) - f*]: bounded ⇔ O(1/t)", ylabel="t · (f(x_t) - f*)")
  for ax in axes:
    ax.legend(fontsize=8)
  _save(fig, out_dir, "unified_sam_decreasing.png")
  return rows


def unified_sam_logistic(out_dir: Path) -> list[Row]:
  """Thm 3.2 on a non-quadratic PL problem: regularized logistic regression."""
  p = problems.logistic_regression()
  full = samplers.full_batch(p.n)
  noise = theory.noise_constants(p, full)
  rho, gamma = theory.unified_sam_step_sizes(p.mu, noise, 0.0)
  bound = theory.unified_sam_rate_bound(p.L, p.mu, noise, gamma, rho, 0.0)
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  rows = []
  for i, lambd in enumerate(LAMBDA_MODES):
    tr = runner.run(
      p, sam_optax.unified_sam(optax.sgd(gamma), rho, lambd), full, steps=400, record_every=1
    )
    axes[0].plot(tr.t, tr.relative_gap, color=COLORS[i], label=_label(lambd))
    if lambd == 0.0:
      local = theory.usam_quadratic_slope(p.hessian_eigenvalues, gamma, rho)
      late = runner.fitted_slope(tr.t, tr.mean_gap, lo=1e-13, hi=1e-6)
      rows.append(
        Row(
          "unified_sam_logistic",
          "full batch, λ = 0: slope of log(f - f*)",
          f"{late:.3e}",
          f"∇²f(x*) linearization {local:.3e}; bound {bound.slope:.3e}",
          f"measured/bound = {late / bound.slope:.2f} (μ = reg is global, "
          "curvature at x* is larger)",
        )
      )
  axes[0].plot(tr.t, bound.curve(tr.t, 1.0), "k--", lw=1, label="derived bound q^t (λ = 0)")
  axes[0].set_ylim(1e-16, 3)
  _setup_axis(
    axes[0], f"Unified SAM, full batch, {p.name}\nρ = {rho:.3g}, γ = {gamma:.3g} (Thm 3.2 at λ = 0)"
  )
  axes[0].legend(fontsize=8)
  _sampling_panel(axes[1], p, 0.0, epochs=500, trials=4, figure="unified_sam_logistic", rows=rows)
  _setup_axis(
    axes[1],
    "Unified SAM, λ = 0, Thm 3.2 (ρ, γ) per sampling; dashed: derived bound",
    xlabel="epochs (t·τ/n)",
  )
  axes[1].set_ylim(1e-6, 3)
  axes[1].legend(fontsize=8)
  _save(fig, out_dir, "unified_sam_logistic.png")
  return rows


# --------------------------------------------------------------------------- #
# SAM-SPS (Oikonomou & Loizou, 2025)
# --------------------------------------------------------------------------- #


def usam_sps(rho, gamma_b, f_star=0.0):
  """USAM-SPS (λ = 0) as in the SAM-SPS experiments: no weight decay (it is in the loss).

  eps = 1e-30: the default 1e-12 floor on ‖∇f(e)‖² would bind near
  f - f* ≈ 5e-10 on the full-batch problem (‖∇f‖² ≈ 2μ(f - f*), μ = 1e-3).
  """
  return sam_optax.sam_sps(
    rho=rho, lambd=0.0, f_star=f_star, gamma_b=gamma_b, weight_decay=0.0, eps=1e-30
  )


def _gamma_panel(ax, traces_and_constants):
  """γ_t: the recorded Polyak step, a constant, or a schedule of the 0-based count."""
  for i, (name, tr, gamma) in enumerate(traces_and_constants):
    if tr.step_size is not None:
      ax.plot(tr.t[1:], tr.step_size.mean(axis=0), color=COLORS[i], label=name)
    elif callable(gamma):
      ax.plot(
        tr.t[1:],
        np.asarray(gamma(tr.t[1:] - 1)),
        color=COLORS[i],
        ls="--",
        lw=1,
        label=f"{name} (schedule)",
      )
    elif gamma is not None:
      ax.axhline(gamma, color=COLORS[i], ls="--", lw=1, label=f"{name} (constant)")
  ax.set_yscale("log")
  ax.set_xlabel("iteration t")
  ax.set_ylabel("step size γ_t")
  ax.set_title(
    "step sizes: the Polyak scheduler's γ_t (mean over trials) vs constant γ", fontsize=10
  )
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)


def sam_sps_theory_deterministic(out_dir: Path) -> list[Row]:
  """Full batch, interpolated: USAM-SPS against the theory's constant USAM step sizes."""
  p = problems.ridge_regression()
  full = samplers.full_batch(p.n)
  L = p.L
  rho_o, gamma_o = theory.unified_sam_step_sizes(p.mu, theory.noise_constants(p, full), 0.0)
  methods = [  # (name, optimizer, constant γ, constant ρ)
    (
      "Andriushchenko et al.",
      sam_optax.unified_sam(optax.sgd(1 / (2 * L)), 1 / (2 * L), 0.0),
      1 / (2 * L),
      1 / (2 * L),
    ),
    (
      "Khanh et al.",
      sam_optax.unified_sam(optax.sgd(2 / (9 * L)), 1 / (2 * L), 0.0),
      2 / (9 * L),
      1 / (2 * L),
    ),
    ("Oikonomou et al.", sam_optax.unified_sam(optax.sgd(gamma_o), rho_o, 0.0), gamma_o, rho_o),
    ("USAM-SPS (ours)", usam_sps(1 / (2 * L), gamma_b=1e4), None, None),
  ]
  steps = 10_000
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  rows, gamma_info = [], []
  for i, (name, opt, gamma, rho) in enumerate(methods):
    tr = runner.run(p, opt, full, steps=steps, record_every=10)
    axes[0].plot(tr.t, np.maximum(tr.relative_gap, 1e-32), color=COLORS[i], label=name)
    gamma_info.append((name, tr, gamma))
    reached = tr.t[np.argmax(tr.mean_gap <= 1e-10)] if (tr.mean_gap <= 1e-10).any() else None
    if gamma is None:
      predicted = "—"
      note = (
        f"γ_t in [{tr.step_size_min.min():.3g}, {tr.step_size_max.max():.3g}] "
        "(γ_b = 1e4 never reached)"
      )
    else:
      predicted = (
        f"exact slope {theory.usam_quadratic_slope(p.hessian_eigenvalues, gamma, rho):.3e}"
      )
      note = f"late slope {runner.fitted_slope(tr.t, tr.mean_gap, lo=1e-26, hi=1e-12):.3e}"
    rows.append(
      Row(
        "sam_sps_theory_det",
        f"full batch, λ = 0, {name}: first t with f - f* ≤ 1e-10",
        str(reached),
        predicted,
        note,
      )
    )
  _setup_axis(axes[0], f"USAM (λ = 0), full batch, {p.name}, f* = 0")
  axes[0].set_ylim(1e-32, 3)
  axes[0].legend(fontsize=8)
  _gamma_panel(axes[1], gamma_info)
  _save(fig, out_dir, "sam_sps_theory_det.png")
  return rows


def sam_sps_theory_stochastic(out_dir: Path) -> list[Row]:
  """Mini-batch, regularized: USAM-SPS_max against stochastic USAM step-size rules."""
  p = problems.ridge_regression(reg=0.1 / 100, interpolated=False)
  sampler = samplers.tau_nice(p.n, 10)
  rho_o, gamma_o = theory.unified_sam_step_sizes(p.mu, theory.noise_constants(p, sampler), 0.0)
  rho_a, gamma_a = theory.andriushchenko_decreasing(p.mu, p.L_max)
  methods = [
    (
      "Andriushchenko et al. (decreasing)",
      sam_optax.unified_sam(optax.sgd(gamma_a), rho_a, 0.0),
      gamma_a,
    ),
    ("Oikonomou et al.", sam_optax.unified_sam(optax.sgd(gamma_o), rho_o, 0.0), gamma_o),
    ("USAM-SPS_max (ours), γ_b = 1", usam_sps(1 / (2 * p.L_max), gamma_b=1.0), None),
    ("USAM-SPS_max (ours), γ_b = 0.2", usam_sps(1 / (2 * p.L_max), gamma_b=0.2), None),
  ]
  steps = 10_000
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  rows, gamma_info = [], []
  for i, (name, opt, const) in enumerate(methods):
    tr = runner.run(p, opt, sampler, steps=steps, record_every=50, trials=5)
    axes[0].plot(tr.t, tr.relative_gap, color=COLORS[i], label=name)
    gamma_info.append((name, tr, const))
    note = ""
    if tr.step_size is not None:
      note = f"γ_t in [{tr.step_size_min.min():.3g}, {tr.step_size_max.max():.3g}]"
    rows.append(
      Row(
        "sam_sps_theory_stoch",
        f"10-nice, λ = 0, {name}: E[f - f*]/(f0 - f*) at T",
        f"{tr.relative_gap[-1]:.3e}",
        "—",
        note,
      )
    )
  _setup_axis(
    axes[0],
    f"USAM (λ = 0), 10-nice mini-batches, {p.name}\nf* exact; SPS uses the lower bound f_S* = 0",
  )
  axes[0].legend(fontsize=8)
  _gamma_panel(axes[1], gamma_info)
  _save(fig, out_dir, "sam_sps_theory_stoch.png")
  return rows


def _adaptive_methods(deterministic: bool):
  if deterministic:
    return [
      ("AdaSAM", adaptive.adasam(1e-2, 0.01)),
      ("LightSAM-I (AdaGrad-Norm)", adaptive.lightsam("I", 5.0, 0.1)),
      ("LightSAM-II (AdaGrad)", adaptive.lightsam("II", 0.5, 0.01)),
      ("LightSAM-III (Adam)", adaptive.lightsam("III", 0.01, 0.01)),
      ("SA-SAM", adaptive.sa_sam(0.1)),
      ("USAM-SPS (ours)", usam_sps(0.1, gamma_b=1e4)),
    ]
  return [
    ("AdaSAM", adaptive.adasam(1e-2, 0.01)),
    ("LightSAM-I (AdaGrad-Norm)", adaptive.lightsam("I", 5.0, 0.01)),
    ("LightSAM-II (AdaGrad)", adaptive.lightsam("II", 0.5, 0.1)),
    ("LightSAM-III (Adam)", adaptive.lightsam("III", 0.01, 0.001)),
    ("SA-SAM", adaptive.sa_sam(0.1)),
    ("USAM-SPS_max (ours), γ_b = 1", usam_sps(0.01, gamma_b=1.0)),
  ]


def _adaptive(out_dir, name, p, sampler, steps, every, trials, deterministic):
  fig, ax = plt.subplots(figsize=(7.5, 5))
  rows = []
  for i, (label, opt) in enumerate(_adaptive_methods(deterministic)):
    tr = runner.run(p, opt, sampler, steps=steps, record_every=every, trials=trials)
    ax.plot(tr.t, np.maximum(tr.relative_gap, 1e-32), color=COLORS[i], label=label)
    rows.append(
      Row(
        name,
        f"{sampler.name}, {label}: E[f - f*]/(f0 - f*) at T = {steps}",
        f"{tr.relative_gap[-1]:.3e}",
        "—",
      )
    )
  _setup_axis(
    ax,
    f"adaptive SAM methods, {sampler.name}, {p.name}\n"
    "(hyperparameters of the SAM-SPS reference experiments)",
  )
  ax.legend(fontsize=8)
  _save(fig, out_dir, f"{name}.png")
  return rows


def sam_sps_adaptive_deterministic(out_dir: Path) -> list[Row]:
  p = problems.ridge_regression()
  return _adaptive(
    out_dir, "sam_sps_adaptive_det", p, samplers.full_batch(p.n), 10_000, 10, 1, True
  )


def sam_sps_adaptive_stochastic(out_dir: Path) -> list[Row]:
  p = problems.ridge_regression(reg=0.1 / 100, interpolated=False)
  return _adaptive(
    out_dir, "sam_sps_adaptive_stoch", p, samplers.tau_nice(p.n, 10), 50_000, 250, 3, False
  )


ALL = (
  unified_sam_lambda_modes,
  unified_sam_sampling,
  unified_sam_decreasing,
  unified_sam_logistic,
  sam_sps_theory_deterministic,
  sam_sps_theory_stochastic,
  sam_sps_adaptive_deterministic,
  sam_sps_adaptive_stochastic,
)
