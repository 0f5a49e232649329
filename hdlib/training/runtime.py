"""The accelerate side of the Trainer: the accelerator it runs on, the one module that
DDP wraps (model + extra modules + loss), and the progress state checkpointed with a run."""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import nn

from ..placement import set_deterministic


class LossModule(nn.Module):
    """Model + extra modules behind one forward that returns the loss, so DDP and
    autocast see the whole computation even when the loss calls model.encode() etc."""

    def __init__(self, model: nn.Module, loss_fn: Callable, extra: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.extra = nn.ModuleDict(extra)
        self.loss_fn = loss_fn

    def forward(self, batch, sample_seeds):
        return self.loss_fn(self.model, batch, sample_seeds, **dict(self.extra.items()))


class Progress:
    """Step counter, running log-interval sums, elapsed time and the model selection so far
    (evaluation rows, best score and the best weights); checkpointed with the run."""

    def __init__(self):
        self.step = 0
        self.elapsed_s = 0.0
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64)
        self.count = 0
        self.evals: list[dict] = []
        self.best_key: list | None = None
        self.best_step = -1
        self.best_state: dict | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "elapsed_s": self.elapsed_s, "loss_sum": self.loss_sum.detach().cpu().clone(),
                "grad_norm_sum": self.grad_norm_sum.detach().cpu().clone(), "count": self.count,
                "evals": self.evals, "best_key": self.best_key, "best_step": self.best_step,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.elapsed_s, self.count = int(state["step"]), float(state["elapsed_s"]), int(state["count"])
        self.loss_sum = state["loss_sum"].to(self.loss_sum.device)
        self.grad_norm_sum = state["grad_norm_sum"].to(self.grad_norm_sum.device)
        self.evals = list(state.get("evals", []))
        self.best_key, self.best_step = state.get("best_key"), int(state.get("best_step", -1))
        self.best_state = state.get("best_state")


def trains_on_cpu(device: str) -> bool:
    """study.device says cpu, no CUDA device is there, or a CPU launch (ACCELERATE_USE_CPU) is running."""
    return (device == "cpu" or not torch.cuda.is_available()
            or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))


def cpu_bf16_is_native(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16); None where /proc/cpuinfo is absent."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def make_accelerator(mixed_precision: str, find_unused_parameters: bool, device: str = "auto"):
    """The accelerator of one run: on the CPU when `device` (study.device) says cpu, when no CUDA
    device is there, or under a CPU launch (ACCELERATE_USE_CPU); else on the process's GPU
    (`cuda:N` in a single process selects GPU N)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = trains_on_cpu(device)
    if not cpu and device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(int(device.split(":", 1)[1]))
    if not cpu:
        set_deterministic("cuda")
    if cpu and mixed_precision == "fp16":
        warnings.warn("mixed_precision='fp16' is not available on a CPU: training in fp32", stacklevel=3)
        mixed_precision = "no"
    if cpu and mixed_precision == "bf16" and cpu_bf16_is_native() is False:
        # measured on an AMD EPYC without avx512_bf16: a U-Net step 17x slower than in fp32
        warnings.warn("mixed_precision='bf16' on a CPU without native bf16 (no avx512_bf16 / amx_bf16 in "
                      "/proc/cpuinfo) is emulated and many times slower than fp32: set study.mixed_precision=no",
                      stacklevel=3)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and state.get("num_processes", 1) == 1:
        # accelerate keeps one global state per process; in a notebook a second model may
        # use another precision, which is safe to switch between single-process runs.
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)])
