"""Runs a test module's worker on fake CPU devices, in a subprocess.

``--xla_force_host_platform_device_count`` must be set before jax starts, so the
multi-device checks run as a script (the module itself, or a worker file) whose
last line of output is one JSON object.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def environment(devices: int) -> dict:
  """The environment for a subprocess that sees ``devices`` CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flag = f"--xla_force_host_platform_device_count={devices}"
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
  return env


def run(script, devices: int, *args: str, timeout: int = 600) -> dict:
  """Runs ``python script *args`` on ``devices`` fake devices; its last line, parsed."""
  proc = subprocess.run(
    [sys.executable, str(script), *args],
    env=environment(devices),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def start(script, devices: int, stdout, stderr) -> subprocess.Popen:
  """Starts ``python script`` on ``devices`` fake devices without waiting for it."""
  return subprocess.Popen(
    [sys.executable, str(script)],
    env=environment(devices),
    cwd=ROOT,
    stdout=stdout,
    stderr=stderr,
    text=True,
  )
