"""A memory plan instead of hope: each training run's micro-batch comes from a per-device memory
budget and what one image costs, measured on the device itself.

A training step needs memory that does not grow with the batch (weights, gradients, optimizer
state, EMA) and activation memory per image. `probe_train_step` runs one forward and backward at
two micro-batch sizes (`probe_sizes`: 1 and 2 images, or 2 and 4 for a network with BatchNorm), reading the device's peak-allocation counter, and leaves weights,
buffers, gradients and random-number state as it found them; `plan_micro_batch` then takes the
largest micro-batch that divides the per-process batch and fits `HEADROOM` of the budget. The
budget is `study.max_memory_gb`, or the device's own memory when that is 0. docs/hardware.md lists
the plan of the paper-size study for 24, 40, 80 and 141 GB, from per-image figures measured on the
CPU by bench/bench_memory.py."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError

HEADROOM = 0.85            # share of the budget a step may use (the allocator fragments, kernels need workspace)
GB = 1024 ** 3
BUDGETS_GB = (24, 40, 80, 141)   # the devices docs/hardware.md plans for (A10/L4-class, A100-40, A100/H100-80, H200)


@dataclass(frozen=True)
class StepMemory:
    fixed_gb: float        # what a step needs whatever the batch (weights, grads, optimizer, EMA)
    per_image_gb: float    # activation memory per image of a micro-batch


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def probe_sizes(model: torch.nn.Module, per_process_batch: int) -> tuple[int, int] | None:
    """The two micro-batch sizes to probe, or None when the batch is too small to plan. A network with
    BatchNorm is never stepped on one image: its statistics need two, and a 1x1 feature map fails outright
    (the smoke study's ResNet on a GPU did at 1 image)."""
    smallest = 2 if has_batch_norm(model) else 1
    return (smallest, 2 * smallest) if per_process_batch >= 2 * smallest else None


def plan_micro_batch(per_process_batch: int, step: StepMemory, budget_gb: float, what: str = "training",
                     min_micro: int = 1) -> int:
    """The largest divisor (at least `min_micro`: 2 for BatchNorm) of the per-process batch whose step
    fits HEADROOM x budget; a one-line ConfigError when none does."""
    usable = HEADROOM * budget_gb - step.fixed_gb
    fits = [d for d in divisors(per_process_batch) if d >= min_micro and d * step.per_image_gb <= usable]
    if not fits:
        if min_micro > 1:
            raise ConfigError(f"{what}: a micro-batch of {min_micro} images (BatchNorm needs {min_micro}) needs "
                              f"{step.fixed_gb + min_micro * step.per_image_gb:.1f} GB but the budget is "
                              f"{budget_gb:g} GB (x {HEADROOM} usable; study.max_memory_gb); use a larger device or a "
                              "smaller model")
        raise ConfigError(f"{what}: one image needs {step.fixed_gb + step.per_image_gb:.1f} GB but the budget is "
                          f"{budget_gb:g} GB (x {HEADROOM} usable; study.max_memory_gb); use a larger device or a "
                          "smaller model")
    return max(fits)


def budget_gb(max_memory_gb: float, device: torch.device | str) -> float | None:
    """The budget of a run: study.max_memory_gb when set, else the CUDA device's memory; None (no plan)
    on the CPU without a set budget."""
    if max_memory_gb > 0:
        return float(max_memory_gb)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GB
    return None


def cuda_peak_meter(device) -> tuple[Callable[[], None], Callable[[], int]]:
    """(reset, peak bytes) of a CUDA device's allocator."""
    return (lambda: torch.cuda.reset_peak_memory_stats(device)), (lambda: torch.cuda.max_memory_allocated(device))


def probe_train_step(model: torch.nn.Module, step_fn: Callable[[int], torch.Tensor], reset_peak: Callable[[], None],
                     peak_bytes: Callable[[], int], sizes: tuple[int, int] = (1, 2)) -> StepMemory:
    """Measure one training step at two micro-batch sizes: `step_fn(n)` runs the loss on n images
    (forward, in the run's precision) and returns it; its backward is taken here. The model's
    parameters, buffers (BatchNorm statistics), gradients and the random-number state are restored."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    peaks = []
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        for n in sizes:
            model.zero_grad(set_to_none=True)
            reset_peak()
            step_fn(n).backward()
            peaks.append(peak_bytes())
    model.load_state_dict(state)
    for n, p in model.named_parameters():
        p.grad = grads[n]
    per_image = max(peaks[1] - peaks[0], 0) / (sizes[1] - sizes[0]) / GB
    fixed = max(peaks[0] / GB - sizes[0] * per_image, 0.0)
    return StepMemory(fixed_gb=fixed, per_image_gb=per_image)


def fits_in(per_image_gb: float, fixed_gb: float, budget: float) -> int:
    """How many images fit a budget (for docs/hardware.md's table)."""
    return max(0, math.floor((HEADROOM * budget - fixed_gb) / per_image_gb)) if per_image_gb > 0 else 0
