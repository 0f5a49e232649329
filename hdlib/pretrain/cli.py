"""`python -m hdlib pretrain PARAMS [key=value ...] [--compare P | --assess P | --sweep | --curve]`."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, load_config
from ..errors import ConfigError
from ..models.pretrained import verify
from ..parallel.threads import torch_threads
from ..paths import StudyPaths
from ..study.preparation import prepare_data
from .assess import assess_into_card
from .compare import compare_pretraining, parse_other_run
from .curve import run_since_release, write_run_curve
from .export import export_study_pretrained, update_card
from .recipe import config_with
from .run import run_pretrain
from .sweep import recipe_sweep


def add_pretrain_parser(sub) -> None:
    """The `pretrain` subcommand's arguments (on the `hdlib` command line's subparsers)."""
    pre = sub.add_parser("pretrain", help="train the autoencoder and unconditional LDM on the pool (resumable)")
    pre.add_argument("params", help="parameter file, e.g. params/pretrain_demo.yaml")
    pre.add_argument("overrides", nargs="*")
    pre.add_argument("--compare", metavar="PARAMS", help="also pre-train this recipe and compare (model card)")
    pre.add_argument("--sweep", action="store_true",
                     help="only run the recipe sweep (pretrain.recipe_sweep, short runs on the same latents)")
    pre.add_argument("--assess", metavar="PARAMS",
                     help="no training: judge the exported model (pretrain.export_dir) and this baseline recipe with "
                          "the provenance-trained judge, and add the result to the model card")
    pre.add_argument("--curve", action="store_true",
                     help="no training: redraw the committed run's curve (pretrain.committed_run/curve.png)")


def curve_into_card(run_dir: str, export_dir: str):
    """Redraw the committed run's curve; when the exported model's card names the branch it was cut from,
    put the rows judged since (and the figure) into that card. Returns the figure's path (None: no rows)."""
    card_path = Path(export_dir) / "card.json" if export_dir else None
    path = write_run_curve(run_dir, card_path)
    if path is not None and card_path is not None and card_path.exists():
        block = run_since_release(run_dir, json.loads(card_path.read_text()))
        if block:
            update_card(export_dir, "run_since_release", block, {"pretrain_run_curve.png": path})
    return path


def baseline_config(path: str, overrides=(), seed: int | None = None) -> Config:
    """The baseline recipe `path`, beside this run: the same study.* overrides (results_root,
    data_root, ...) but its own name and seed; another `seed` is another draw of the same recipe,
    in its own folder. It exports nothing."""
    ov = [o for o in overrides if o.startswith("study.") and "study.name" not in o and "study.seed" not in o]
    b = load_config(path, ov)
    if seed is not None and seed != b.study.seed:
        b = load_config(path, ov + [f"study.seed={seed}", f"study.name={b.study.name}_seed{seed}"])
    return config_with(b, "pretrain.export_dir", "")


def main(params: str, overrides=(), compare: str | None = None, sweep: bool = False,
         assess: str | None = None, curve: bool = False) -> int:
    """Pre-train (resumable); with `compare`, also pre-train that params file's recipe and
    put the before/after comparison, by both judges, into the exported model card. With `sweep`,
    only run the recipe sweep (its table goes into the card of the next export). With `assess`,
    train nothing of this recipe: judge the already exported model against that baseline recipe
    with the provenance-trained judge and add the result to its card. With `curve`, only redraw the
    committed run's curve from its metrics."""
    if sweep:
        print(recipe_sweep(params, overrides).to_string(index=False))
        return 0
    cfg = load_config(params, list(overrides))
    if curve:
        if not cfg.pretrain.committed_run:
            raise ConfigError("pretrain --curve: pretrain.committed_run is empty (the run whose curve to draw)")
        print(curve_into_card(cfg.pretrain.committed_run, cfg.pretrain.export_dir) or
              f"{cfg.pretrain.committed_run}: no judged step yet")
        return 0
    if assess:
        if not cfg.pretrain.export_dir:
            raise ConfigError("pretrain --assess: pretrain.export_dir is empty (the exported model to judge)")
        verify(cfg.pretrain.export_dir)  # before any compute
        baselines = [baseline_config(assess, overrides, s) for s in cfg.pretrain.baseline_seeds]
        with torch_threads(cfg.pretrain.threads):  # restored after: a later run in this process keeps its count
            if not StudyPaths(cfg).manifest("pool").exists():
                prepare_data(cfg)
            for b in baselines:
                run_pretrain(b)
            assess_into_card(cfg, baselines)
            return 0
    if compare:
        for x in cfg.pretrain.other_runs:  # before hours of training, not after
            parse_other_run(x)
    run_pretrain(cfg, export=compare is None)
    if compare:
        baselines = [baseline_config(compare, overrides, s) for s in cfg.pretrain.baseline_seeds]
        for b in baselines:
            run_pretrain(b)
        compare_pretraining(cfg, baselines[0])
        if cfg.pretrain.export_dir:
            export_study_pretrained(cfg, cfg.pretrain.export_dir)
            assess_into_card(cfg, baselines)
    return 0
