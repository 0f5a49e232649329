"""Pre-train once on the unlabeled pool and ship the result in diffusers format.

    python -m hdlib pretrain params/pretrain_demo.yaml [key=value ...]      (make pretrain)

Builds the pool (stage 00's code), trains the autoencoder, encodes the pool (stage 01's code),
then trains the unconditional latent denoiser in chunks of `pretrain.eval_every` steps, judging
samples of the EMA weights after each chunk; everything resumes. With `pretrain.export_dir` set,
the model is exported in diffusers format with card.json, MODEL_CARD.md and MANIFEST.sha256.

One idea per module:

    judges     the untrained ResNet-18 judge, FID/KID/precision/recall, the provenance-trained judge,
               an autoencoder's ceiling
    samples    the samples every judge judges, the held-out reference, the final model's quality
    recipe     what makes a run (a folder holds one), copies of a frozen config with one setting changed
    run        the pre-training run, the autoencoder tracked while it trains
    resume     the run's committed checkpoint and curves (it outlives a machine)
    curve      the committed run's curve, drawn
    export     the diffusers folder with its card; rewriting an exported card
    compare    against the in-study pre-training and other runs, by the untrained judge
    sweep      the recipe sweep
    assess     the exported model and the in-study recipe over seeds, by the provenance-trained judge
    verdicts   the card's verdicts, computed from its numbers (stored in card.json)
    card       MODEL_CARD.md rendered from card.json through templates of tables
    cli        `main`, the command line
"""

from .assess import assess_into_card, assess_with_pool_judge
from .card import model_card_text
from .cli import add_pretrain_parser, main
from .compare import compare_pretraining, parse_other_run
from .export import (
                     export_study_pretrained,
                     previous_version_of,
                     refresh_card,
                     update_card,
)
from .judges import (
                     RandomResNetJudge,
                     autoencoder_ceiling,
                     judge_sensitivity,
                     matched_size_fid,
                     pool_judge,
                     pool_quality,
)
from .recipe import RUN_KEY, check_run_recipe, config_with, run_recipe_key
from .run import run_pretrain, train_autoencoder_tracked
from .samples import final_quality, holdout_images, sample_images
from .sweep import parse_recipe_variant, recipe_sweep
from .verdicts import card_verdicts

__all__ = ["RUN_KEY", "RandomResNetJudge", "add_pretrain_parser", "assess_into_card", "assess_with_pool_judge", "autoencoder_ceiling",
           "card_verdicts", "check_run_recipe", "compare_pretraining", "config_with", "export_study_pretrained",
           "final_quality", "holdout_images", "judge_sensitivity", "main", "matched_size_fid", "model_card_text",
           "parse_other_run", "parse_recipe_variant", "pool_judge", "pool_quality", "previous_version_of",
           "recipe_sweep", "refresh_card", "run_pretrain", "run_recipe_key", "sample_images",
           "train_autoencoder_tracked", "update_card"]
