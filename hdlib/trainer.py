"""The generic training loop behind every trainable model of the study, on accelerate.

The same code runs on 1 CPU, 1 GPU or N processes (`torchrun`, `accelerate
launch`). Data order and per-sample randomness depend only on (seed, step):

* the global batch of step s is a slice of the stream formed by concatenating
  per-epoch permutations (epoch e's permutation is seeded by (seed, e));
* every sample of the global batch gets an int64 *sample seed* from
  (seed, s, position); the task's `loss_fn` draws noise/timesteps from it.

So a resumed run needs no data-loader state and reproduces the uninterrupted
loss curve (bit-identical on the CPU), and a 2-process run sees exactly the
samples and noise of a 1-process run with the same global batch.

Layout of `out_dir`::

    train_config.json            the TrainConfig of the latest call
    log.csv                      step, loss, lr, grad_norm, images_per_s, elapsed_s
    checkpoints/step-00000123/   accelerate save_state + meta.json + COMPLETE
    final/model/  final/ema/     weights (save_pretrained or model.safetensors)
    final/result.json  final/COMPLETE
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, DataError, HDLibError
from .io import atomic_write_json, atomic_write_text

LOG_FIELDS = ("step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s")
# Settings that do not change the trajectory: they may differ between a run and its resume.
_NON_TRAJECTORY_FIELDS = ("out_dir", "progress", "log_every", "checkpointing_steps", "checkpoints_total_limit",
                          "micro_batch_size")
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
    grad_clip: float | None = 1.0
    ema_decay: float | None = None        # EMA of the weights, used for sampling
    mixed_precision: str = "no"           # "no" | "bf16" | "fp16" (fp16 falls back to "no" on a CPU)
    checkpointing_steps: int = 500        # save every N steps (and at max_steps)
    checkpoints_total_limit: int = 2      # keep the last N complete checkpoints
    log_every: int = 10
    seed: int = 0
    progress: bool = True

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
        return d


@dataclass
class TrainResult:
    step: int                  # final step
    last_loss: float           # loss of the last log row (mean over its steps and processes)
    final_dir: str             # out_dir/final
    weights_dir: str           # the weights to use: final/ema when there is an EMA, else final/model
    wall_s: float              # wall time of this call's training loop (0 when nothing was left to do)
    images_per_s: float        # training throughput of this call
    resumed_from_step: int = 0 # 0 for a fresh run


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

class TensorBatchSource:
    """In-memory dataset of equally long tensors; `source[idx]` indexes them all with a LongTensor."""

    def __init__(self, *tensors: torch.Tensor):
        if not tensors:
            raise DataError("TensorBatchSource: no tensors given")
        n = len(tensors[0])
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise DataError(f"TensorBatchSource: argument {i} is a {type(t).__name__}, not a torch.Tensor")
            if len(t) != n:
                raise DataError(f"TensorBatchSource: tensor {i} has {len(t)} rows, tensor 0 has {n}")
        if n == 0:
            raise DataError("TensorBatchSource: the tensors are empty")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, idx: torch.Tensor) -> tuple:
        return tuple(t[idx] for t in self.tensors)


class BatchPlan:
    """Global batch indices and per-sample seeds of every step, from (seed, step) only."""

    _PERM, _SAMPLE = 0, 1  # stream ids, so permutations and sample seeds never share a seed

    def __init__(self, seed: int, dataset_len: int, global_batch_size: int):
        if dataset_len < 1:
            raise DataError("training dataset is empty")
        self.seed, self.n, self.batch = int(seed), int(dataset_len), int(global_batch_size)
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # only the current epoch (and the next) are ever needed
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._PERM, epoch]))
            self._perms[epoch] = rng.permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = step * self.batch + np.arange(self.batch, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(self.batch, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._permutation(int(e))[offsets[sel]]
        return torch.from_numpy(out)

    def sample_seeds(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._SAMPLE, step]))
        return torch.from_numpy(rng.integers(0, 2**63 - 1, size=self.batch, dtype=np.int64))

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices(step), self.sample_seeds(step)


class GroupPlan:
    """Batches made of fixed-size parts, one per group of dataset rows (e.g. real images,
    then synthetic ones), so a group's exposure does not depend on the other groups.

    groups: [(row indices into the dataset, labels of those rows, items per batch)].
    balanced=True: within a group every class gets an equal share of each batch (the
    remainder rotates over the classes step by step) and each class's images are cycled
    through seeded per-class epoch permutations, so every image of a class is seen
    equally often. balanced=False: a group's rows are cycled through seeded epoch
    permutations. Everything depends only on (seed, step)."""

    _PERM, _SAMPLE = 0, 1

    def __init__(self, seed: int, groups, balanced: bool = True):
        self.seed, self.balanced = int(seed), bool(balanced)
        self.groups = []
        for g, (rows, labels, per_batch) in enumerate(groups):
            rows = torch.as_tensor(rows, dtype=torch.long)
            labels = torch.as_tensor(labels, dtype=torch.long)
            if int(per_batch) < 0 or len(rows) != len(labels):
                raise DataError(f"GroupPlan: group {g}: bad rows/labels/per_batch")
            if int(per_batch) == 0:
                continue
            if len(rows) == 0:
                raise DataError(f"GroupPlan: group {g} has no rows but {per_batch} items per batch")
            if balanced:
                classes = sorted(set(labels.tolist()))
                streams = [rows[labels == c].numpy() for c in classes]
            else:
                streams = [rows.numpy()]
            self.groups.append({"id": g, "per_batch": int(per_batch), "streams": streams, "cum": {}})
        self.batch = sum(g["per_batch"] for g in self.groups)
        if self.batch < 1:
            raise DataError("GroupPlan: empty batches")

    def _counts(self, g: dict, step: int) -> np.ndarray:
        K = len(g["streams"])
        base, extra = divmod(g["per_batch"], K)
        counts = np.full(K, base, dtype=np.int64)
        counts[(np.arange(K) - step * extra) % K < extra] += 1  # the remainder rotates over the classes
        return counts

    def _position(self, g: dict, step: int) -> np.ndarray:
        """Items of each stream drawn before `step` (cached: steps are asked in order)."""
        cum = g["cum"]
        if step not in cum:
            start = max([s for s in cum if s < step], default=0)
            pos = cum.get(start, np.zeros(len(g["streams"]), dtype=np.int64)).copy()
            for t in range(start, step):
                pos += self._counts(g, t)
            if len(cum) > 256:  # a streaming loader asks a few steps ahead of training
                cum.pop(min(cum))
            cum[step] = pos
        return cum[step]

    def _perm(self, g: int, stream: int, epoch: int, n: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._PERM, g, stream, epoch]))
        return rng.permutation(n)

    def indices(self, step: int) -> torch.Tensor:
        out = []
        for g in self.groups:
            pos, counts = self._position(g, step), self._counts(g, step)
            g["cum"][step + 1] = pos + counts  # the next step starts where this one ends
            for k, stream in enumerate(g["streams"]):
                p = pos[k] + np.arange(counts[k])
                epochs, offsets = np.divmod(p, len(stream))
                for e in np.unique(epochs):
                    sel = offsets[epochs == e]
                    out.append(stream[self._perm(g["id"], k, int(e), len(stream))[sel]])
        return torch.from_numpy(np.concatenate(out).astype(np.int64))

    def sample_seeds(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._SAMPLE, step]))
        return torch.from_numpy(rng.integers(0, 2**63 - 1, size=self.batch, dtype=np.int64))

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices(step), self.sample_seeds(step)


# ---------------------------------------------------------------------------
# saving / loading weights
# ---------------------------------------------------------------------------

def save_weights(module: nn.Module, directory: str | Path) -> None:
    """`save_pretrained` where the module has one (diffusers models), else model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(str(directory), safe_serialization=True)
    else:
        from safetensors.torch import save_model

        save_model(module, str(directory / "model.safetensors"))


def load_weights(module: nn.Module, directory: str | Path) -> nn.Module:
    """Load weights written by `save_weights` into `module` (strict)."""
    from safetensors.torch import load_file, load_model

    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        load_model(module, str(directory / "model.safetensors"), strict=True)
        return module
    files = sorted(directory.glob("*.safetensors"))
    if len(files) != 1:
        raise HDLibError(f"{directory}: expected one *.safetensors weights file, found {len(files)}")
    try:
        module.load_state_dict(load_file(str(files[0])), strict=True)
    except RuntimeError as e:
        raise HDLibError(f"{files[0]}: weights do not fit {type(module).__name__} "
                         f"({str(e).splitlines()[0]})") from None
    return module


def load_final(model_factory_or_model, out_dir: str | Path, ema: bool = True, module: str = "model") -> nn.Module:
    """The trained weights of a finished run in `out_dir`, loaded into the given model
    (or one made by calling the factory). ema=True gives the EMA weights where the run
    kept an EMA (the weights to sample with), else the raw weights. `module` names an
    extra module of the run instead of the model."""
    final = Path(out_dir) / "final"
    if not (final / "COMPLETE").exists():
        raise HDLibError(f"{final}: no finished training run here (train it first)")
    model = model_factory_or_model if isinstance(model_factory_or_model, nn.Module) else model_factory_or_model()
    if module == "model":
        sub = final / "ema" if ema and (final / "ema").is_dir() else final / "model"
    else:
        sub = final / module
        if not sub.is_dir():
            raise HDLibError(f"{final}: the run has no module named {module!r}")
    return load_weights(model, sub)


# ---------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------

class _LossModule(nn.Module):
    """Model + extra modules behind one forward that returns the loss, so DDP and
    autocast see the whole computation even when the loss calls model.encode() etc."""

    def __init__(self, model: nn.Module, loss_fn: Callable, extra: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.extra = nn.ModuleDict(extra)
        self.loss_fn = loss_fn

    def forward(self, batch, sample_seeds):
        return self.loss_fn(self.model, batch, sample_seeds, **dict(self.extra.items()))


class _Progress:
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


def _make_accelerator(mixed_precision: str, find_unused_parameters: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu and mixed_precision == "fp16":
        warnings.warn("mixed_precision='fp16' is not available on a CPU: training in fp32", stacklevel=3)
        mixed_precision = "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and state.get("num_processes", 1) == 1:
        # accelerate keeps one global state per process; in a notebook a second model may
        # use another precision, which is safe to switch between single-process runs.
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)])


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """LR multiplier of step s (0-based): linear warm-up (s+1)/W, then constant or cosine to 0 at max_steps."""
    warm, total, cosine = config.warmup_steps, config.max_steps, config.lr_schedule == "cosine"

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cosine:
            done = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * done))
        return 1.0

    return factor


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class Trainer:
    """Train `model` by minimising `loss_fn(model, batch, sample_seeds, **extra_modules)`.

    dataset: `len()` and `dataset[LongTensor idx] -> batch` (a tensor, tuple or dict of
    tensors), e.g. TensorBatchSource or a LatentSource; or a streaming source with
    `batches(index_lists)` (hdlib.datasets.StreamingSource: items decoded by DataLoader
    workers). Under several processes each rank reads only its slice of the global batch.
    loss_fn returns the scalar mean loss over its micro-batch, drawing any randomness
    from the per-sample int64 seeds. extra_modules: {name: module} trained jointly with
    the model (trainable parameters join the optimizer; frozen ones just follow the
    device), checkpointed, and saved to final/<name>/; they are passed to loss_fn by name.

    plan: which dataset rows and per-sample seeds make the global batch of each step
    (default `BatchPlan`: seeded epoch permutations); any object with `__call__(step)`
    -> (indices, seeds) and `batch` (e.g. `GroupPlan`: class-balanced real + synthetic parts).
    evaluate: model selection. Every `eval_every` steps and at the end, rank 0 calls
    `evaluate(model)` (EMA weights where there is an EMA) -> dict of numbers, appended to
    eval.csv; the weights whose `select(metrics)` (a tuple, larger is better) is best so far
    are kept with the run and exported to final/best/ (`load_final(..., which="best")`).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, dataset, config: TrainConfig,
                 extra_modules: dict[str, nn.Module] | None = None, find_unused_parameters: bool = False,
                 plan=None, evaluate: Callable[[nn.Module], dict] | None = None, eval_every: int = 0,
                 select: Callable[[dict], tuple] | None = None):
        config.validate()
        extra = dict(extra_modules or {})
        for name, mod in extra.items():
            if not name.isidentifier() or name in ("model", "ema"):
                raise ConfigError(f"extra_modules: bad name {name!r} (an identifier other than 'model'/'ema')")
            if not isinstance(mod, nn.Module):
                raise ConfigError(f"extra_modules[{name!r}] is a {type(mod).__name__}, not an nn.Module")
        try:
            n = len(dataset)
        except TypeError:
            raise DataError(f"dataset {type(dataset).__name__} has no len()") from None
        if n < 1:
            raise DataError("training dataset is empty")
        self.config = c = config
        self.dataset = dataset
        self.out_dir = Path(c.out_dir)
        self.checkpoint_root = self.out_dir / "checkpoints"
        self.final_dir = self.out_dir / "final"

        self.accelerator = acc = _make_accelerator(c.mixed_precision, find_unused_parameters)
        world = acc.num_processes
        if c.global_batch_size % world:
            raise ConfigError(f"global_batch_size {c.global_batch_size} is not divisible by the "
                              f"{world} processes")
        self.per_process_batch = c.global_batch_size // world
        self.micro_batch_size = c.micro_batch_size or self.per_process_batch
        if c.global_batch_size % (world * self.micro_batch_size):
            raise ConfigError(f"global_batch_size {c.global_batch_size} is not divisible by {world} process(es) "
                              f"x micro_batch_size {self.micro_batch_size}")
        self.accumulation_steps = self.per_process_batch // self.micro_batch_size
        self.plan = plan if plan is not None else BatchPlan(c.seed, n, c.global_batch_size)
        if int(self.plan.batch) != c.global_batch_size:
            raise ConfigError(f"plan batch {self.plan.batch} differs from global_batch_size {c.global_batch_size}")
        if evaluate is not None and (select is None or eval_every < 1):
            raise ConfigError("evaluate needs select and eval_every >= 1")
        self.evaluate, self.eval_every, self.select = evaluate, int(eval_every), select
        self._stream = None

        self._unwrapped = _LossModule(model, loss_fn, extra)
        trainable = [p for p in self._unwrapped.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("the model (and extra_modules) have no trainable parameters")
        optimizer = torch.optim.AdamW(trainable, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
        # Not passed through accelerator.prepare: its wrapper steps once per process.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(c))
        self.ema = None
        if c.ema_decay:
            from diffusers.training_utils import EMAModel  # imported only when needed: slow to import

            self.ema = EMAModel(model.parameters(), decay=c.ema_decay, foreach=True)
        self.progress_state = _Progress()
        self.loss_module, self.optimizer = acc.prepare(self._unwrapped, optimizer)
        acc.register_for_checkpointing(self.lr_scheduler, self.progress_state)
        if self.ema is not None:
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        self._seed_global_rngs()

    # -- public state -------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The model being trained (unwrapped: the module passed in)."""
        return self._unwrapped.model

    @property
    def extra_modules(self) -> dict[str, nn.Module]:
        return dict(self._unwrapped.extra.items())

    @property
    def step(self) -> int:
        return self.progress_state.step

    def _seed_global_rngs(self):
        # Only model-internal randomness (dropout) uses the global RNGs; seeding them per
        # process makes it reproducible, and checkpoints restore them on resume.
        import random

        rank = self.accelerator.process_index
        random.seed(self.config.seed * 1000 + rank)
        np.random.seed((self.config.seed * 1000 + rank) % 2**32)
        torch.manual_seed(self.config.seed * 1000 + rank)

    # -- checkpoints ----------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first (ones without COMPLETE are ignored)."""
        if not self.checkpoint_root.is_dir():
            return []
        found = [p for p in self.checkpoint_root.glob("step-*") if p.is_dir() and (p / "COMPLETE").exists()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest_checkpoint(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step atomically (all processes must call it)."""
        acc, step = self.accelerator, self.step
        final = self.checkpoint_root / _step_dir_name(step)
        tmp = self.checkpoint_root / f"tmp-{_step_dir_name(step)}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every process writes its own RNG state
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {"step": step, "world_size": acc.num_processes, "config": self.config.to_dict()}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            (tmp / "COMPLETE").write_text(f"{step}\n")
            if final.exists():  # a re-save of the same step: move the old one out of the way first
                old = self.checkpoint_root / f"old-{_step_dir_name(step)}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            for stale in self.complete_checkpoints()[:-self.config.checkpoints_total_limit]:
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path | None = None) -> int:
        """Restore model, optimizer, scheduler, EMA, RNG states and step from `path`
        (default: the latest complete checkpoint); returns the step (0 if there is none)."""
        path = Path(path) if path is not None else self.latest_checkpoint()
        if path is None:
            return 0
        if not (path / "COMPLETE").exists():
            raise HDLibError(f"{path}: incomplete checkpoint (no COMPLETE marker)")
        meta = json.loads((path / "meta.json").read_text())
        saved = TrainConfig(**{**meta["config"], "betas": tuple(meta["config"]["betas"])})
        ours, theirs = self.config.trajectory_key(), saved.trajectory_key()
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if diff:
            raise ConfigError(f"{path}: checkpoint was made with other settings ({', '.join(diff)}); "
                              f"use another out_dir or delete {self.out_dir}")
        if meta["step"] > self.config.max_steps:
            raise ConfigError(f"{path}: checkpoint step {meta['step']} is beyond max_steps {self.config.max_steps}")
        self.accelerator.load_state(str(path))
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        return self.step

    # -- log --------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.csv"

    def _reset_log(self, keep_until_step: int) -> None:
        """Keep the rows up to the resumed step (a killed run may have logged further, or half a line)."""
        kept = []
        if keep_until_step > 0 and self.log_path.exists():
            for row in csv.reader(io.StringIO(self.log_path.read_text())):
                if len(row) == len(LOG_FIELDS) and row[0].isdigit() and int(row[0]) <= keep_until_step:
                    kept.append(row)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(LOG_FIELDS)
        w.writerows(kept)
        atomic_write_text(self.log_path, buf.getvalue())

    # -- final ------------------------------------------------------------------------
    def _final_is_done(self) -> bool:
        marker = self.final_dir / "COMPLETE"
        if not marker.exists():
            return False
        done = json.loads(marker.read_text())
        return done.get("trajectory") == self.config.trajectory_key() and done.get("step") == self.config.max_steps

    def _read_result(self) -> TrainResult:
        return TrainResult(**json.loads((self.final_dir / "result.json").read_text()))

    def _evaluate_and_select(self) -> None:
        """Score the current weights (EMA where kept); keep them if they are the best so far.
        Every process runs it (same numbers on each), so no process waits for another."""
        prog, model = self.progress_state, self.model
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = {k: float(v) for k, v in self.evaluate(model).items()}
            key = [float(v) for v in self.select(metrics)]
            improved = prog.best_key is None or key > prog.best_key
            if improved:
                prog.best_key, prog.best_step = key, prog.step
                prog.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            prog.evals.append({"step": prog.step, **metrics, "improved": bool(improved)})
        finally:
            model.train(was_training)
            if self.ema is not None:
                self.ema.restore(model.parameters())
        if self.accelerator.is_main_process:
            buf = io.StringIO()
            fields = list(dict.fromkeys(k for row in prog.evals for k in row))
            w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
            w.writeheader()
            w.writerows(prog.evals)
            atomic_write_text(self.out_dir / "eval.csv", buf.getvalue())

    def _export_final(self, result: TrainResult) -> None:
        acc = self.accelerator
        if not acc.is_main_process:
            return
        tmp = self.out_dir / "final-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.model
        save_weights(model, tmp / "model")
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
            save_weights(model, tmp / "ema")
            self.ema.restore(model.parameters())
        for name, mod in self.extra_modules.items():
            save_weights(mod, tmp / name)
        if self.progress_state.best_state is not None:
            current = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(self.progress_state.best_state)
            save_weights(model, tmp / "best")
            model.load_state_dict(current)
            (tmp / "best" / "selection.json").write_text(json.dumps(
                {"step": self.progress_state.best_step, "key": self.progress_state.best_key}))
        (tmp / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
        (tmp / "COMPLETE").write_text(json.dumps({"step": self.step, "trajectory": self.config.trajectory_key(),
                                                  "ema": self.ema is not None}))
        if self.final_dir.exists():
            old = self.out_dir / "final-old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, self.final_dir)

    # -- training ---------------------------------------------------------------------
    def _batch(self, idx: torch.Tensor):
        from accelerate.utils import send_to_device

        if self._stream is not None:  # a per-item dataset: the loader already fetched these rows
            return send_to_device(next(self._stream), self.accelerator.device)
        return send_to_device(self.dataset[idx], self.accelerator.device)

    def _index_lists(self, start: int):
        """This process's micro-batch row lists of every step from `start`, for a streaming
        source's DataLoader (so its workers fetch ahead while the model trains)."""
        lo = self.accelerator.process_index * self.per_process_batch
        for step in range(start, self.config.max_steps):
            idx = self.plan.indices(step)[lo:lo + self.per_process_batch]
            for m in range(self.accumulation_steps):
                yield idx[m * self.micro_batch_size:(m + 1) * self.micro_batch_size].tolist()

    def _train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the global batch of `step`; returns (loss, grad_norm) as
        device tensors (loss averaged over processes)."""
        acc, c = self.accelerator, self.config
        idx, seeds = self.plan(step)
        lo = acc.process_index * self.per_process_batch
        idx, seeds = idx[lo:lo + self.per_process_batch], seeds[lo:lo + self.per_process_batch]
        total = torch.zeros((), device=acc.device)
        for m in range(self.accumulation_steps):
            sl = slice(m * self.micro_batch_size, (m + 1) * self.micro_batch_size)
            last = m == self.accumulation_steps - 1
            # gradients are all-reduced only on the last micro-batch
            with (acc.no_sync(self.loss_module) if not last else _null()):
                loss = self.loss_module(self._batch(idx[sl]), seeds[sl])
                if loss.ndim != 0:
                    raise HDLibError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}, expected a scalar")
                acc.backward(loss / self.accumulation_steps)
            total += loss.detach().float() / self.accumulation_steps
        # the norm is measured even without clipping (max_norm=inf leaves the gradients unchanged)
        grad_norm = acc.clip_grad_norm_(self.optimizer_params, c.grad_clip if c.grad_clip else float("inf"))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        return acc.reduce(total, reduction="mean"), torch.as_tensor(grad_norm, device=acc.device).detach().float()

    @property
    def optimizer_params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def train(self) -> TrainResult:
        """Train to max_steps, resuming from the latest complete checkpoint in out_dir/checkpoints;
        returns at once if out_dir/final already holds this run."""
        from tqdm.auto import tqdm

        acc, c = self.accelerator, self.config
        if self._final_is_done():
            return self._read_result()
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out_dir / "train_config.json", c.to_dict())
        start = self.load_checkpoint()
        if acc.is_main_process:
            self._reset_log(start)
            for stale in self.checkpoint_root.glob("tmp-*") if self.checkpoint_root.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed save
        acc.wait_for_everyone()

        self._stream = iter(self.dataset.batches(self._index_lists(start))) if hasattr(self.dataset, "batches") \
            else None
        prog = self.progress_state
        prog.loss_sum = prog.loss_sum.to(acc.device)
        prog.grad_norm_sum = prog.grad_norm_sum.to(acc.device)
        t_start = time.perf_counter()
        elapsed_before = prog.elapsed_s
        t_interval, images_interval = t_start, 0
        last_loss = float("nan")
        bar = tqdm(total=c.max_steps, initial=start, desc=self.out_dir.name, dynamic_ncols=True,
                   disable=not (c.progress and acc.is_main_process))
        self.loss_module.train()
        log_file = open(self.log_path, "a", newline="") if acc.is_main_process else None
        try:
            for step in range(start, c.max_steps):
                lr = self.lr_scheduler.get_last_lr()[0]  # the lr this step uses
                loss, grad_norm = self._train_step(step)
                prog.step = step + 1
                prog.loss_sum += loss.double()
                prog.grad_norm_sum += grad_norm.double()
                prog.count += 1
                images_interval += c.global_batch_size
                prog.elapsed_s = elapsed_before + time.perf_counter() - t_start
                if prog.step % c.log_every == 0 or prog.step == c.max_steps:
                    last_loss = (prog.loss_sum / prog.count).item()
                    mean_gn = (prog.grad_norm_sum / prog.count).item()
                    if not math.isfinite(last_loss):
                        raise HDLibError(f"{self.out_dir}: training diverged, loss is {last_loss} at step {prog.step}")
                    now = time.perf_counter()
                    ips = images_interval / max(now - t_interval, 1e-9)
                    t_interval, images_interval = now, 0
                    prog.loss_sum.zero_()
                    prog.grad_norm_sum.zero_()
                    prog.count = 0
                    if log_file is not None:
                        csv.writer(log_file, lineterminator="\n").writerow(
                            [prog.step, repr(last_loss), repr(float(lr)), repr(mean_gn), f"{ips:.2f}",
                             f"{prog.elapsed_s:.3f}"])
                        log_file.flush()
                    bar.set_postfix(loss=f"{last_loss:.4g}", img_s=f"{ips:.0f}")
                bar.update(1)
                if self.evaluate is not None and (prog.step % self.eval_every == 0 or prog.step == c.max_steps):
                    self._evaluate_and_select()
                if prog.step % c.checkpointing_steps == 0 or prog.step == c.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        wall = time.perf_counter() - t_start
        if math.isnan(last_loss) and self.log_path.exists():  # nothing left to train: report the last logged loss
            rows = list(csv.DictReader(io.StringIO(self.log_path.read_text())))
            last_loss = float(rows[-1]["loss"]) if rows else float("nan")
        weights = self.final_dir / ("ema" if self.ema is not None else "model")
        result = TrainResult(step=self.step, last_loss=last_loss, final_dir=str(self.final_dir),
                             weights_dir=str(weights), wall_s=wall,
                             images_per_s=(self.step - start) * c.global_batch_size / max(wall, 1e-9),
                             resumed_from_step=start)
        acc.wait_for_everyone()
        self._export_final(result)
        acc.wait_for_everyone()
        return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
