"""The Trainer's settings (`TrainConfig`, None = off), its learning-rate schedule and
the `TrainResult` it returns.

A YAML `TrainingConfig` (hdlib.config; 0 = off) becomes a TrainConfig in one place only,
`TrainConfig.from_settings`.

Which fields a resume must match is decided here (`trajectory_key`): the rest (output
folder, logging, checkpoint cadence, micro-batching) may change between a run and its resume.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import TrainingConfig
from ..errors import ConfigError

# Settings that do not change the trajectory: they may differ between a run and its resume.
_NON_TRAJECTORY_FIELDS = ("out_dir", "progress", "log_every", "checkpointing_steps", "checkpoints_total_limit",
                          "micro_batch_size", "device", "max_memory_gb", "precision_may_change", "replace_stale")
_LR_SCHEDULES = ("constant", "cosine")
_PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    out_dir: str                          # checkpoints/, log.csv, final/ go here
    max_steps: int
    global_batch_size: int                # independent of the number of processes
    micro_batch_size: int | None = None   # per-process batch per forward; accumulation = global / (world * micro)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0                 # linear warm-up, then `lr_schedule`
    lr_schedule: str = "constant"         # "constant" | "cosine" (decay to 0 at max_steps)
    # a cool-down branch of a constant-lr run (warmup-stable-decay): from step cooldown_start the lr falls
    # linearly to 0 over cooldown_steps; the run's checkpoints up to cooldown_start are its trunk (0 = off)
    cooldown_start: int = 0
    cooldown_steps: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float | None = None        # EMA of the weights, used for sampling
    mixed_precision: str = "no"           # "no" | "bf16" | "fp16" (fp16 falls back to "no" on a CPU)
    checkpointing_steps: int = 500        # save every N steps (and at max_steps)
    checkpoints_total_limit: int = 2      # keep the last N complete checkpoints
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    device: str = "auto"                  # study.device: "cpu" keeps training on the CPU even beside a GPU
    max_memory_gb: float = 0.0            # study.max_memory_gb: the micro-batch plan's budget on a GPU (0 = its memory)
    # a long run that moves between machines (pre-training): its resume may change mixed_precision (a CPU
    # without native bf16 runs fp32 instead); each change is logged in out_dir/precision_changes.csv
    precision_may_change: bool = False
    # what decides the weights besides these settings (a study task's objective, images and starting weights;
    # hdlib.study.task_keys); "" = none given (the key of a run made before task keys existed)
    task_key: str = ""
    # a folder whose checkpoints or final weights were made with other settings or inputs is a stale cache:
    # train anew (a study's models) instead of stopping with an error (a long run's precious checkpoints)
    replace_stale: bool = False

    @classmethod
    def from_settings(cls, settings: TrainingConfig, *, out_dir, seed: int, mixed_precision: str = "no",
                      progress: bool = False, device: str = "auto", max_memory_gb: float = 0.0,
                      **overrides) -> TrainConfig:
        """The Trainer's settings from a YAML `TrainingConfig`: the one place where its
        `batch_size` becomes `global_batch_size` and its 0 = off (micro_batch_size, grad_clip,
        ema_decay) becomes None = off. `overrides` replace any other TrainConfig field
        (e.g. a classifier's step count, batch with its synthetic share, lr_schedule)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"TrainConfig.from_settings: unknown field(s) {', '.join(unknown)}")
        values = {
            "out_dir": str(out_dir),
            "max_steps": settings.max_steps,
            "global_batch_size": settings.batch_size,
            "micro_batch_size": settings.micro_batch_size or None,
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "warmup_steps": settings.warmup_steps,
            "grad_clip": settings.grad_clip or None,
            "ema_decay": settings.ema_decay or None,
            "mixed_precision": mixed_precision,
            "checkpointing_steps": settings.checkpointing_steps,
            "seed": seed,
            "progress": progress,
            "device": device,
            "max_memory_gb": max_memory_gb,
        }
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
        """Raise ConfigError (one line, naming the field) on a bad value."""
        def need(ok, field, what):
            if not ok:
                raise ConfigError(f"TrainConfig.{field} = {getattr(self, field)!r}: {what}")

        need(isinstance(self.max_steps, int) and self.max_steps >= 1, "max_steps", "must be an int >= 1")
        need(isinstance(self.global_batch_size, int) and self.global_batch_size >= 1, "global_batch_size",
             "must be an int >= 1")
        need(self.micro_batch_size is None or (isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 1),
             "micro_batch_size", "must be None or an int >= 1")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a finite number > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(len(tuple(self.betas)) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", "must be an int >= 0")
        need(self.lr_schedule in _LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(_LR_SCHEDULES)}")
        need(isinstance(self.cooldown_steps, int) and self.cooldown_steps >= 0, "cooldown_steps", "must be an int >= 0")
        need(isinstance(self.cooldown_start, int) and (not self.cooldown_steps or self.cooldown_start >= self.warmup_steps),
             "cooldown_start", "must be an int >= warmup_steps")
        need(not self.cooldown_steps or self.lr_schedule == "constant", "lr_schedule",
             "a cool-down (cooldown_steps) branches a constant-lr run")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be None or > 0")
        need(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "must be None or in (0, 1)")
        need(self.mixed_precision in _PRECISIONS, "mixed_precision", f"must be one of {', '.join(_PRECISIONS)}")
        need(isinstance(self.checkpointing_steps, int) and self.checkpointing_steps >= 1, "checkpointing_steps",
             "must be an int >= 1")
        need(isinstance(self.checkpoints_total_limit, int) and self.checkpoints_total_limit >= 1,
             "checkpoints_total_limit", "must be an int >= 1")
        need(isinstance(self.log_every, int) and self.log_every >= 1, "log_every", "must be an int >= 1")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "must be an int >= 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d

    def trajectory_key(self) -> dict:
        """The settings that determine the weights at every step (a resume must match them).
        max_steps only matters through a cosine schedule, so a constant-lr run can be extended."""
        d = self.to_dict()
        for k in _NON_TRAJECTORY_FIELDS:
            d.pop(k)
        if self.lr_schedule == "constant":
            d.pop("max_steps")
        if not self.cooldown_steps:  # off: the key of a run made before cool-downs existed
            d.pop("cooldown_start"), d.pop("cooldown_steps")
        if not self.task_key:
            d.pop("task_key")
        return d

    def continues(self, saved: TrainConfig, step: int, ignore: tuple = ()) -> list[str]:
        """The trajectory settings in which a checkpoint at `step` made with `saved` differs from this run
        (empty: this run may resume from it). A cool-down branch continues its trunk's checkpoints up to
        its cooldown_start: the lr was the same until there."""
        ours, theirs = self.trajectory_key(), saved.trajectory_key()
        if self.cooldown_steps and not saved.cooldown_steps and step <= self.cooldown_start:
            ours.pop("cooldown_start"), ours.pop("cooldown_steps")
        for k in ignore:
            ours.pop(k, None), theirs.pop(k, None)
        return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


@dataclass
class TrainResult:
    step: int                  # final step
    last_loss: float           # loss of the last log row (mean over its steps and processes)
    final_dir: str             # out_dir/final
    weights_dir: str           # the weights to use: final/ema when there is an EMA, else final/model
    wall_s: float              # wall time of this call's training loop (0 when nothing was left to do)
    images_per_s: float        # training throughput of this call
    resumed_from_step: int = 0 # 0 for a fresh run


def lr_scheduler(optimizer, config: TrainConfig):
    """diffusers' schedule of the run: linear warm-up from 0 over warmup_steps, then constant, or cosine to 0
    at max_steps (a LambdaLR: its state is what checkpoints restore). A cool-down multiplies the constant
    schedule by a linear decay to 0 from cooldown_start over cooldown_steps (diffusers has no such one)."""
    from diffusers.optimization import get_scheduler  # imported only when needed: slow to import
    from torch.optim.lr_scheduler import LambdaLR

    name = "cosine" if config.lr_schedule == "cosine" else "constant_with_warmup"
    base = get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps)
    if not config.cooldown_steps:
        return base
    warm, start, length = base.lr_lambdas[0], config.cooldown_start, config.cooldown_steps
    return LambdaLR(optimizer, lambda s: warm(s) * min(1.0, max(0.0, 1.0 - (s - start) / length)))
