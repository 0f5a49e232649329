"""The one launcher for multi-process training and sampling.

`launch(["-m", "hdlib", "train", ...], num_processes=4)` runs the command in N
processes under torch.distributed.run; entry points are unchanged under `accelerate launch`
or `torchrun`. Why not `accelerate launch` itself: on GPUs its multi-GPU launcher is this same
torch.distributed.run with accelerate's environment, and on CPUs (accelerate 1.15, `--cpu` with
several processes) it goes through `mpirun`, which these machines lack; torch.distributed.run
starts gloo processes on a CPU and NCCL ones on GPUs alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from ..errors import ConfigError, HDLibError


def launch(script_args: Sequence[str], num_processes: int, backend: str | None = None, env: dict | None = None,
           check: bool = True, timeout: float | None = None, **popen_kwargs) -> subprocess.CompletedProcess:
    """Run a training entry point in `num_processes` processes under torch.distributed.run.

    script_args: what follows `python` for one process, e.g. ["-m", "hdlib", "train", "autoencoder", ...]
    or ["train_script.py", "--arg", ...]. Extra keyword arguments (cwd=...) go to subprocess.run. backend: "gloo" runs CPU processes (sets
    ACCELERATE_USE_CPU=1), "nccl" one process per GPU; default: nccl when CUDA is there.
    """
    cmd, child_env = _command(script_args, num_processes, backend, env)
    proc = subprocess.run(cmd, env=child_env, timeout=timeout, **popen_kwargs)
    if check and proc.returncode != 0:
        raise HDLibError(f"launch: {' '.join(script_args)} failed in {num_processes} processes "
                         f"(exit {proc.returncode})")
    return proc


def launch_background(script_args: Sequence[str], num_processes: int, backend: str | None = None,
                      env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
    """`launch` without waiting: the process group keeps running (e.g. a sampling server that holds its
    models across rounds) until the caller stops it."""
    cmd, child_env = _command(script_args, num_processes, backend, env)
    return subprocess.Popen(cmd, env=child_env, **popen_kwargs)


def _command(script_args, num_processes: int, backend: str | None, env: dict | None) -> tuple[list[str], dict]:
    import torch

    if num_processes < 1:
        raise ConfigError(f"launch: num_processes must be >= 1, got {num_processes}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"launch: backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < num_processes:
        raise ConfigError(f"launch: {num_processes} nccl processes need as many GPUs, "
                          f"found {torch.cuda.device_count()}")
    args = list(script_args)
    if not args:
        raise ConfigError("launch: empty script_args")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(num_processes), *args]
    child_env = dict(os.environ)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    if backend == "gloo":
        child_env["ACCELERATE_USE_CPU"] = "1"
    child_env.update(env or {})
    return cmd, child_env
