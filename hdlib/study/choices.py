"""The choices a stage recorded (stage 03: the primary cell; stage 04: guidance scale and
adaptation), read back by later stages and tools from its metrics file; nothing is
written into the config."""

from __future__ import annotations

from ..config import Config
from .context import read_metrics
from .generation import Generation


def guidance_choice(cfg: Config) -> dict:
    """{"guidance_scale", "guidance_interval", "adaptation"} as stage 04 chose them (the params'
    values before it ran)."""
    d4 = read_metrics(cfg, "04_synthesis", missing_ok=True)
    return {"guidance_scale": float(d4.get("guidance_scale", cfg.sampling.guidance_scale)),
            "guidance_interval": list(d4.get("guidance_interval", cfg.sampling.guidance_interval)),
            "adaptation": d4.get("adaptation", cfg.diffusion.grid_adaptation)}


def chosen_generation(cfg: Config) -> Generation:
    """Generation with stage 04's recorded choices applied."""
    c = guidance_choice(cfg)
    return Generation(cfg, adaptation=c["adaptation"], guidance_scale=c["guidance_scale"],
                      guidance_interval=c["guidance_interval"])


def primary_fraction(cfg: Config) -> float | None:
    """The label fraction of the primary cell stage 03 fixed (None before it ran)."""
    cell = read_metrics(cfg, "03_guidance", missing_ok=True).get("primary_cell")
    return None if cell is None else float(cell["fraction"])
