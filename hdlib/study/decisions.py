"""The study's decisions: each is written once, by the stage that makes it, into
results/<study>/decisions/<name>.json, and read only through here. A missing decision is an error that
names the stage that records it, never a fall-back to the params file.

    primary_cell   stage 03, from real-only results before any generation: the headline's label count
    guidance       stage 04, on the labeled validation images: guidance scale and interval, adaptation,
                   and the sampler (method, steps) every generation, export and augment uses
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..config import Config
from ..errors import HDLibError
from ..io import atomic_write_json
from ..paths import StudyPaths
from .generation import Generation

WRITERS = {"primary_cell": "03_guidance", "guidance": "04_synthesis"}


def _path(cfg: Config, name: str):
    if name not in WRITERS:
        raise HDLibError(f"unknown decision {name!r} (decisions: {', '.join(WRITERS)})")
    return StudyPaths(cfg).root / "decisions" / f"{name}.json"


def record(cfg: Config, name: str, value: dict) -> None:
    """Written by the stage that makes the decision (WRITERS), atomically."""
    atomic_write_json(_path(cfg, name), value)


def read(cfg: Config, name: str) -> dict:
    path = _path(cfg, name)
    if not path.exists():
        raise HDLibError(f"{path}: missing; stage {WRITERS[name]} records this decision (python -m hdlib run ... "
                         f"--from {WRITERS[name][:2]})")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Guidance:
    scale: float
    interval: list            # [t_low, t_high], or [] for every step
    adaptation: str
    method: str               # the sampler
    steps: int
    chosen_on: str            # "validation", or "params" when sampling.select_on_validation is off


def primary_cell(cfg: Config) -> dict:
    return read(cfg, "primary_cell")


def primary_fraction(cfg: Config) -> float:
    """The label fraction of the primary cell stage 03 fixed."""
    return float(primary_cell(cfg)["fraction"])


def guidance(cfg: Config) -> Guidance:
    g = read(cfg, "guidance")
    return Guidance(scale=float(g["guidance_scale"]), interval=list(g["guidance_interval"]), adaptation=g["adaptation"],
                    method=g["sampler"]["method"], steps=int(g["sampler"]["num_inference_steps"]),
                    chosen_on=g["chosen_on"])


def chosen_generation(cfg: Config) -> Generation:
    """Generation with stage 04's recorded decision applied."""
    g = guidance(cfg)
    return Generation(cfg, adaptation=g.adaptation, guidance_scale=g.scale, guidance_interval=g.interval,
                      sampler=(g.method, g.steps))
