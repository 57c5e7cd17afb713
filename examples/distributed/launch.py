"""Starts N processes of ``examples.distributed.train`` on this host and supervises them.

  python -m examples.distributed.launch --num-processes 2 -- --steps 20 --out /tmp/run.npz

Arguments after ``--`` go to every process. The launcher picks a free port on
127.0.0.1 for the coordinator, prefixes nothing (each process labels its own
lines), and returns 0 only if every process does. When one process fails, the
others normally stop by themselves within the heartbeat timeout (JAX's
coordination service notices the missing task); any still running after
``--grace`` seconds are killed. ``--timeout`` bounds the whole run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--timeout", type=float, default=600, help="seconds for the whole run")
  parser.add_argument(
    "--grace", type=float, default=30, help="seconds the others get to stop after one process fails"
  )
  parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's flags")
  args = parser.parse_args(argv)
  if args.num_processes < 1:
    parser.error("--num-processes must be >= 1")
  train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

  coordinator = f"127.0.0.1:{args.port or free_port()}"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "examples.distributed.train",
        "--coordinator",
        coordinator,
        "--num-processes",
        str(args.num_processes),
        "--process-id",
        str(i),
        *train_args,
      ],
      cwd=ROOT,
      env=env,
    )
    for i in range(args.num_processes)
  ]
  deadline = time.monotonic() + args.timeout
  failed_at = None
  try:
    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
        failed_at = now
      if now > deadline or (failed_at is not None and now > failed_at + args.grace):
        print(
          f"launch: stopping {sum(p.poll() is None for p in procs)} process(es) still "
          f"running ({'timeout' if now > deadline else 'after a failure'})",
          file=sys.stderr,
        )
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  codes = [p.returncode for p in procs]
  if any(codes):
    print(f"launch: exit codes {codes}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
