"""Stage 07: REPORT.md for a study, and the README's results block, assembled only
from what the stages wrote (metrics/*.json, tables/*.csv, figures/*.png): no
number is typed in here."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import jinja2
import pandas as pd

from ..config import Config
from ..io import atomic_write_text
from ..models.pretrained import folder_sha256
from ..paths import REPO_ROOT, StudyPaths, percent_text
from ..study.context import read_metrics
from ..study.decisions import primary_fraction
from ..study.splits import first_draw, smallest_fraction

# What this stage reads (hdlib.tools.stage_inputs): config keys whose values key its results (settings that
# only say how it runs are hdlib.tools.stage_inputs.HOW_IT_RUNS), and the files earlier stages wrote. The
# fingerprint is made from it; the smoke study fails on a config read outside it.
READS = {
    "config": ["study.seed", "data.classes", "data.target", "downstream", "filtering",
               "latent_classifier.backbone", "latent_classifier.pseudo_label_threshold",
               "latent_classifier.train", "sampling.eta", "sampling.method", "sampling.num_inference_steps",
               "sampling.select_on_validation", "pretrained.path", "pretrained.sha256", "study.mixed_precision"],
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


VERDICTS = {  # stage 05's computed verdict (stages.downstream.headline_verdict) -> its sentence
    "beats_both": ("HistoDiffusion beats both real-only and the pseudo-label rival: both paired 95% CIs lie above "
                   "zero and both Holm-corrected p are below 0.05."),
    "beats_real_only": ("HistoDiffusion beats real-only (paired 95% CI above zero, Holm-corrected p below 0.05) but "
                        "not the pseudo-label rival, which uses the same unlabeled images without generation."),
    "worse_than_real_only": ("HistoDiffusion is worse than real-only here: the paired 95% CI lies below zero and the "
                             "Holm-corrected p is below 0.05."),
    "not_significant_after_holm": ("This run shows no reliable difference between HistoDiffusion and real-only: the "
                                   "paired 95% CI excludes zero, but corrected for the pre-declared comparisons "
                                   "(Holm) p is not below 0.05."),
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


COMPARISON_NAMES = [("vs_real", "HistoDiffusion - real-only"), ("vs_rival", "HistoDiffusion - the pseudo-label rival"),
                    ("combined_vs_rival", "HistoDiffusion + pseudo-labels - the rival")]


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
    lines += _fid_rows(d6)
    if d4.get("near_copy_rate_at_primary"):
        lines.append("| near-copy rate among candidates | " + ", ".join(
            f"{g} {v:.1%}" for g, v in d4["near_copy_rate_at_primary"].items()) + " | low for HistoDiffusion |")
    for key, name in COMPARISON_NAMES:
        if d5.get(key):
            lines.append(f"| accuracy, {name} (paired) | {_points(d5[key])} | CI above 0 |")
    if d5.get("verdict"):
        lines += ["", VERDICTS[d5["verdict"]]]
        if d5["verdict"] != "beats_both":
            lines += ["", broken_links(d4, d5, acc_rows=hd if len(acc) else None)]
    return "\n".join(lines) + "\n"


# the sets the filtered HistoDiffusion set's FID is read against (quality set name, what the chain calls it)
FID_REFERENCES = (("scratch", "from scratch"), ("histodiffusion_unfiltered", "unfiltered candidates"),
                  ("real (val)", "real validation images"))


def _fid_rows(d6: dict) -> list[str]:
    """The chain's FID row: on every class where the filtered set has them all, else on the classes every
    set holds (the filter kept no image of the others)."""
    q = {r["set"]: r for r in d6.get("overall", [])}
    shared = {r["set"]: r for r in d6.get("overall_shared_classes", [])}
    for table, where in ((q, "equal-size sets"),
                         (shared, f"equal-size sets on the {len(d6.get('shared_classes', []))} classes every set holds")):
        if "histodiffusion" in table and "fid" in table["histodiffusion"]:
            scratch = table.get("scratch", {}).get("fid")
            others = [f"{name} {table[s]['fid']:.1f}" for s, name in FID_REFERENCES if "fid" in table.get(s, {})]
            return [f"| FID, HistoDiffusion's kept images vs the other sets ({where}) | "
                    f"{table['histodiffusion']['fid']:.1f}; " + "; ".join(
                        (["from scratch not in this study's grid"] if scratch is None else []) + others)
                    + " | below from scratch and the unfiltered candidates; real validation images are the floor |"]
    return []



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
        broken.append(f"the primary cell detects only differences of {mdd:.1f} points at 80% power (aim 1.5)"
                      + power_cost_text(d5.get("power")))
    if not broken:
        return "Every measured link meets its aim: the missing gain is not explained by one broken link."
    return "Where the chain breaks: " + "; ".join(broken) + "."


def power_cost_text(power: dict | None) -> str:
    """What the power targets would cost, from stage 05's `power` block (the measured trade-off)."""
    if not power:
        return ""
    parts = [f"MDD {t['mdd_points']:g} needs {t['seeds']} seeds, about {t['primary_cell_grid_s'] / 60:.0f} min of "
             f"primary-cell grid" for t in power["targets"] if t["seeds"] is not None]
    return (f" with {power['n_seeds']} seeds ({'; '.join(parts)}, at this run's {power['primary_cell_mean_s']:.0f} s per "
            f"cell, {power['arms_at_primary']} arms, {power['workers']} at a time; the study's stages have "
            f"{power['stage_budget_s'] / 60:.0f} min)") if parts else ""


def pretrained_section(path: str, pinned: str = "") -> str:
    """Which pre-trained model was used, with its card's key figures; when the folder now holds another model
    than the study's pin (`pinned`, the study's pretrained.sha256), that is said and its card is not quoted."""

    folder = REPO_ROOT / path if not Path(path).is_absolute() else Path(path)
    now = folder_sha256(folder)
    if pinned and pinned != now:
        return (f"## Pre-trained model\n\nAutoencoder and unconditional denoiser loaded from `{path}`, the model pinned "
                f"`{pinned[:16]}…`. The folder now holds another version (`{now[:16]}…`), so its card's figures are "
                "not this study's and are not quoted here.\n")
    text = f"## Pre-trained model\n\nAutoencoder and unconditional denoiser loaded from `{path}` (sha256 of its model " \
           f"files `{now[:16]}…`)."
    if (folder / "card.json").exists():
        text += _card_figures(json.loads((folder / "card.json").read_text()))
    return text + "\n"


def _card_figures(c: dict) -> str:
    q, d = c["quality_final"], c["denoiser"]
    text = (f" From its card: {sum(c['data']['pool_sources'].values())} unlabeled pool tiles; denoiser "
            f"{d['parameters'] / 1e6:.1f} M parameters, {d['steps']} steps in {d['wall_s'] / 3600:.1f} h "
            f"({c['hardware']}); FID to {q['holdout_tiles']} held-out pool tiles {q['fid']:.2f} "
            f"(untrained-ResNet features), precision {q['precision']:.2f}, recall {q['recall']:.2f}.")
    pj, v = c.get("pool_judge"), c.get("versions")
    if pj:  # the judge trained on the pool's provenance: it sees tissue classes the untrained one misses
        s, b = pj["models"]["shipped"], pj["in_study_over_seeds"]["fid"]
        text += (f" By the provenance-trained judge: FID {s['fid']:.1f}, against {b['mean']:.1f} ± {b['sd']:.1f} "
                 f"for the old in-study pre-training over {len(b['values'])} seeds; its autoencoder keeps "
                 f"{s['autoencoder_ceiling']['tissue_kept']:.0%} of held-out tiles' tissue class.")
    if v and "previous" in v["models"]:  # both versions by one judge, the same holdout and seeds
        a, b = v["models"]["this model"], v["models"]["previous"]
        text += (f" By the provenance-trained judge (`{v['judge']}`), beside the version it replaced on the same "
                 f"{a['samples']} seeds: FID {a['fid']:.1f} vs {b['fid']:.1f}, recall {a['recall']:.2f} vs "
                 f"{b['recall']:.2f}, tissue-mix total variation {a['tissue_mixture_tv']:.2f} vs "
                 f"{b['tissue_mixture_tv']:.2f}.")
    return text


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _downstream_tables(cfg: Config, d5: dict, per: dict) -> dict:
    tables = {"accuracy": _md(accuracy_table(d5.get("accuracy", []), per)),
              "accuracy_vs_real": _md(comparison_table(d5.get("accuracy_vs_real", [])), ".4f"),
              # balanced accuracy equals accuracy on this class-balanced test set: only macro-F1 adds information
              "macro_f1": _md(accuracy_table(d5.get("macro_f1", []), per))}
    if d5.get("gain_vs_labels"):
        tables["gain_vs_labels"] = _md(pd.DataFrame(d5["gain_vs_labels"])[
            ["comparison", "labels_per_class", "mean_diff", "ci_low", "ci_high", "t_pvalue", "holm_pvalue", "n"]], ".4f")
    if d5.get("shifted_cohort"):
        tables["shifted_accuracy"] = _md(accuracy_table(d5["shifted_cohort"]["accuracy"], per))
    if d5.get("ratio_sweep"):
        tables["ratio_sweep"] = _md(pd.DataFrame(d5["ratio_sweep"])[
            ["training_set", "ratio", "mean", "std", "ci_low", "ci_high", "n"]])
    return tables


def _synthesis_tables(cfg: Config, d4: dict, f0: float) -> dict:
    tables = {}
    if d4.get("sampler_comparison"):
        tables["sampler_comparison"] = _md(pd.DataFrame(d4["sampler_comparison"]))
    if d4.get("selection_table"):
        tables["selection"] = _md(pd.DataFrame(d4["selection_table"]))
    if d4.get("accounting"):
        acc = pd.DataFrame(d4["accounting"])
        tot = acc.groupby(["generator", "fraction"])[["requested", "achieved", "candidates", "shortfall",
                                                      "near_copies"]].sum().reset_index()
        tot["fraction"] = tot["fraction"].map(percent_text)  # a '.0f' table format printed every fraction as 0
        tables["accounting"] = _md(tot, ".0f")
        first = acc[(acc["fraction"] == f0) & (acc["draw"] == first_draw(cfg))]
        wide = first.pivot_table(index="class", columns="generator", values=["requested", "achieved"], aggfunc="sum")
        wide.columns = [f"{g} {k}" for k, g in wide.columns]
        tables["accounting_per_class"] = _md(wide.reset_index(), ".0f")
    return tables


def _core_tables(d0: dict, d1: dict, d2: dict, d6: dict) -> dict:
    tables = {}
    if d6.get("overall"):
        tables["quality"] = _md(pd.DataFrame(d6["overall"]), ".4f")
    if d6.get("overall_shared_classes"):
        tables["quality_shared"] = _md(pd.DataFrame(d6["overall_shared_classes"]), ".4f")
    if d1:
        tables["reconstruction"] = _md(pd.DataFrame(d1.get("reconstruction", [])))
    if d2.get("realism_frechet"):
        tables["realism"] = _md(pd.DataFrame(d2["realism_frechet"]).reset_index(names="model"))
    if d0:
        tables["data"] = _md(pd.DataFrame(d0["counts"]).reset_index(names="class"), ".0f")
    return tables


def _timings_table(cfg: Config) -> str:
    """Stage seconds and peak memory so far, without this stage (an entry for it would be the previous run's)."""
    timings = _read_json(StudyPaths(cfg).stages / "timings.json")
    memory = _read_json(StudyPaths(cfg).stages / "peak_memory_mb.json")
    timings = {k: v for k, v in timings.items() if k != "07_report"}
    if not timings:
        return ""
    t = pd.DataFrame({"stage": list(timings), "seconds": list(timings.values()),
                      "peak memory so far (MB)": [memory.get(k, float("nan")) for k in timings]})
    t.loc[len(t)] = ["total before this report", t["seconds"].sum(), max(memory.values(), default=float("nan"))]
    return _md(t, ".0f")


_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("hdlib.stages", "templates"), trim_blocks=True,
                                lstrip_blocks=True, undefined=jinja2.StrictUndefined, autoescape=False)
_TEMPLATES.filters.update(pct=percent_text, pct0=lambda v: f"{v:.0%}")


def _render(template: str, **context) -> str:
    """A template of templates/, with runs of blank lines (left by sections that are absent) made one."""
    text = _TEMPLATES.get_template(template).render(nan=float("nan"), **context)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def report_context(cfg: Config) -> dict:
    """Everything templates/report.md.j2 shows, read from the stage metrics."""
    d0, d1, d2 = _read(cfg, "00_data"), _read(cfg, "01_autoencoder"), _read(cfg, "02_diffusion")
    d4, d5, d6 = _read(cfg, "04_synthesis"), _read(cfg, "05_downstream"), _read(cfg, "06_quality")
    ds, per = cfg.downstream, labels_per_class(cfg)
    f0 = smallest_fraction(cfg)  # stage 06 and the per-class accounting describe the smallest label count
    pre = d1.get("pretrained")
    return {
        "cfg": cfg, "ds": ds, "d0": d0, "d1": d1, "d4": d4, "d5": d5, "d6": d6, "per": per, "f0": f0,
        "headline": headline(cfg), "chain": chain_section(cfg), "pretrained": pretrained_section(pre, cfg.pretrained.sha256) if pre else "",
        "fig": lambda name, caption: _fig(cfg, name, caption),
        "budget": d5.get("labels_per_class") or {}, "lc_pl": cfg.latent_classifier.pseudo_label_threshold,
        "fractions_text": ", ".join(f"{percent_text(f)} ({per.get(format(f, 'g'), '?')}/class)" for f in ds.fractions),
        "ablation": [s for s in ds.training_sets if s in ("scratch", "classifier_free")],
        "sampler_name": SAMPLER_NAMES[cfg.sampling.method],
        "validation_agreement": (d4.get("selection") or {}).get("validation_agreement", float("nan")),
        "shifted": d5.get("shifted_cohort"), "shifted_n": sum((d0.get("counts") or {}).get("test_shifted", {}).values()),
        "comparisons": COMPARISON_NAMES, "points": _points,
        "tables": defaultdict(str, {**_downstream_tables(cfg, d5, per), **_synthesis_tables(cfg, d4, f0),
                                 **_core_tables(d0, d1, d2, d6), "timings": _timings_table(cfg)})}  # absent: ""


def build_report(cfg: Config) -> Path:
    """REPORT.md and the README's results block of this study, written atomically."""
    path = StudyPaths(cfg).report
    atomic_write_text(path, _render("report.md.j2", **report_context(cfg)))
    atomic_write_text(StudyPaths(cfg).readme_block, readme_block(cfg))
    return path


def readme_block(cfg: Config) -> str:
    """The README's results section, from the same metrics REPORT.md uses."""
    rel = Path("results") / cfg.study.name
    d5 = _read(cfg, "05_downstream")
    figures = [(name, caption) for name, caption in [
        ("downstream_gain_vs_labels", "gain of HistoDiffusion by labels per class"),
        ("downstream_accuracy_vs_fraction", "accuracy vs label fraction"),
        ("synthesis_comparison_grid", "real vs generated samples per class")] if StudyPaths(cfg).figure(name).exists()]
    return _render("readme_block.md.j2", rel=rel, headline=headline(cfg), d1=_read(cfg, "01_autoencoder"),
                   accuracy=_md(accuracy_table(d5["accuracy"], labels_per_class(cfg))) if d5.get("accuracy") else "",
                   figures=figures, pretrained=cfg.pretrained, precision=cfg.study.mixed_precision)
