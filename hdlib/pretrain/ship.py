"""Ship the long pre-training run as the demo model (pretrain.export_dir, e.g. models/demo-pool): export the
run or one of its long variants (pretrain.long_variants), or a cool-down branch of either, in diffusers format with its card, then judge it beside the version it
replaces with the same judge, holdout and sample seeds (hdlib.pretrain.versions) and add that, with a figure of
samples per tissue class, to the card.

    python -m hdlib.pretrain.ship params/pretrain_demo.yaml [--cooldown 4000+1000] [--variant deep_2]
        [--previous DIR] [key=value ...]

--previous: the version being replaced, as a diffusers folder (`make pretrain-ship` takes v3 out of git history).
Needs the run's study folder as `make pretrain` (and `python -m hdlib.pretrain.cooldown`) left it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import Config, load_config
from ..errors import ConfigError
from ..evaluation import plots
from ..models.pretrained import folder_sha256, verify
from ..parallel.threads import torch_threads
from ..paths import StudyPaths
from .export import export_study_pretrained, update_card
from .recipe import branch_name, variant_name
from .samples import exported_model_samples
from .scoring import ProvenanceScorer
from .variant import variant_config
from .versions import PER_CLASS_FIGURE, judge_versions, per_class_figure


def parse_cooldown(text: str | None) -> tuple[int, int] | None:
    """'4000+1000' -> (4000, 1000): the branch from step 4000 cooled down over 1000 steps."""
    if not text:
        return None
    try:
        start, steps = (int(x) for x in text.split("+"))
    except ValueError:
        raise ConfigError(f"--cooldown {text!r}: expected FROM_STEP+STEPS, e.g. 4000+1000") from None
    return start, steps


def check_inputs(cfg: Config, cooldown: tuple[int, int] | None, previous: str | None,
                 variant: str | None = None) -> None:
    """One line before any compute: an export folder, the branch or variant trained, the previous version whole."""
    if not cfg.pretrain.export_dir:
        raise ConfigError("pretrain.export_dir is empty: nowhere to ship the model")
    if cooldown and not (StudyPaths(cfg).model(branch_name(*cooldown, variant)) / "final" / "COMPLETE").exists():
        raise ConfigError(f"--cooldown {cooldown[0]}+{cooldown[1]}: that branch has not finished "
                          f"(python -m hdlib.pretrain.cooldown ... --from-step {cooldown[0]} --steps {cooldown[1]}"
                          f"{' --variant ' + variant if variant else ''})")
    if variant and not cooldown and not (StudyPaths(cfg).model(variant_name(variant)) / "final" / "COMPLETE").exists():
        raise ConfigError(f"--variant {variant}: it has not been trained in {StudyPaths(cfg).root} "
                          f"(make pretrain-variant VARIANT={variant} STEPS=N)")
    if previous:
        if not (Path(previous) / "unet").is_dir():
            raise ConfigError(f"--previous {previous}: not an exported model folder (no unet/)")
        verify(previous)


def ship(cfg: Config, cooldown: tuple[int, int] | None = None, previous: str | None = None,
         variant: str | None = None) -> Path:
    """`cfg`: the run's config, or with --variant the variant's (hdlib.pretrain.variant.variant_config)."""
    check_inputs(cfg, cooldown, previous, variant)
    p, paths = cfg.pretrain, StudyPaths(cfg)
    with torch_threads(p.threads):  # restored after: a later run in this process keeps its count
        scorer = ProvenanceScorer(cfg)
        out = export_study_pretrained(cfg, p.export_dir, judge=scorer.random_judge, real_feats=scorer.random_real,
                                      cooldown=cooldown, variant=variant)
        mine = torch.load(paths.cache / "final_samples.pt")  # the card's seeds, sampled by the export
        samples = {"this model": mine}
        if previous:
            samples = {"previous": exported_model_samples(cfg, previous, len(mine), p.final_inference_steps)} | samples
        versions = judge_versions(cfg, scorer, samples, p.final_inference_steps)
        versions["previous_sha256"] = folder_sha256(previous) if previous else None
        fig = per_class_figure(scorer, mine, "this model")
        update_card(out, "versions", versions, {f"{PER_CLASS_FIGURE}.png": plots.save(fig, cfg, PER_CLASS_FIGURE)})
        return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hdlib.pretrain.ship", description=__doc__.split("\n\n")[0])
    ap.add_argument("params")
    ap.add_argument("--cooldown", help="FROM_STEP+STEPS: ship that cool-down branch of the run")
    ap.add_argument("--variant", help="a variant of pretrain.long_variants: ship it instead of the run")
    ap.add_argument("--previous", help="the version being replaced (a diffusers folder), judged alike")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    cfg = variant_config(a.params, a.overrides, a.variant)[1] if a.variant else load_config(a.params, a.overrides)
    out = ship(cfg, parse_cooldown(a.cooldown), a.previous, a.variant)
    print(f"[pretrain] shipped {out} (pin: pretrained.sha256 {folder_sha256(out)})")


if __name__ == "__main__":
    main()
