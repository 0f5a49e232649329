"""Figures the notebooks show and the report embeds. Each function takes tables
(DataFrames) or tensors and returns the matplotlib Figure; `save` writes it
atomically into the study's figures folder (`StudyPaths(cfg).figure(name)`).
Notebooks hold no plotting code of their own.

Series are labelled with the study's one name per generator / training set
(`hdlib.paths.GENERATORS`, `hdlib.paths.TRAINING_SETS`), and a name keeps its
colour in every figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ..io import atomic_savefig
from ..paths import GENERATORS, TRAINING_SETS, StudyPaths, percent_text

# Every series name the figures use, in a fixed order: a name gets the same colour everywhere.
SERIES_ORDER = (["real"] + list(TRAINING_SETS)[1:]
                + [g for g in GENERATORS if g not in TRAINING_SETS]
                + [f"{g}_unfiltered" for g in GENERATORS if f"{g}_unfiltered" not in TRAINING_SETS and g != "pretrained"])


def series_color(name: str):
    """The colour of a generator / training-set name (same in every figure); any
    'real ...' set (e.g. 'real (val)') shares the colour of 'real'."""
    palette = plt.get_cmap("tab10").colors
    name = "real" if str(name).startswith("real") else name
    if name in SERIES_ORDER:
        return palette[SERIES_ORDER.index(name) % len(palette)]
    return None


def _series_sorted(names) -> list[str]:
    """Known series in SERIES_ORDER first, then the others in their given order."""
    return sorted(names, key=lambda n: SERIES_ORDER.index(n) if n in SERIES_ORDER else len(SERIES_ORDER))


def save(fig, cfg, name: str) -> Path:
    """Write the figure to the study's figures/<name>.png (atomically) and return the path."""
    path = StudyPaths(cfg).figure(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path)
    return path


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).cpu().numpy()


def image_rows(rows: dict[str, torch.Tensor], n: int = 8, title: str = "", cell: float = 1.1):
    """One row of up to n uint8 images per entry of `rows` (row label on the left)."""
    fig, axes = plt.subplots(len(rows), n, figsize=(n * cell, len(rows) * cell + 0.4), squeeze=False)
    for r, (label, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(imgs):
                ax.imshow(_hwc(imgs[c]))
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def per_class_rows(images: torch.Tensor, labels: torch.Tensor, classes, n: int = 8, title: str = ""):
    rows = {cls: images[labels == k][:n] for k, cls in enumerate(classes)}
    return image_rows(rows, n=n, title=title)


def comparison_grid(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], classes, n: int = 4, title: str = ""):
    """Rows = classes, column groups = sets (e.g. real | guided | CFG | unguided)."""
    names = list(sets)
    fig, axes = plt.subplots(len(classes), n * len(names), figsize=(n * len(names) * 0.9, len(classes) * 0.9 + 0.8),
                             squeeze=False)
    for k, cls in enumerate(classes):
        for g, name in enumerate(names):
            imgs, labels = sets[name]
            sel = imgs[labels == k][:n] if labels is not None else imgs[:n]
            for c in range(n):
                ax = axes[k, g * n + c]
                ax.set_xticks([]), ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if c < len(sel):
                    ax.imshow(_hwc(sel[c]))
                if k == 0 and c == 0:
                    ax.set_title(name, fontsize=8, loc="left")
        axes[k, 0].set_ylabel(cls, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def loss_curves(logs: dict[str, pd.DataFrame], title: str = "Training loss", smooth: int = 20):
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, df in logs.items():
        if df is None or df.empty:
            continue
        ax.plot(df["step"], df["loss"].rolling(smooth, min_periods=1).mean(), label=name)
    ax.set_xlabel("step"), ax.set_ylabel(f"loss (rolling mean of {smooth} logs)"), ax.set_title(title)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _palette(names):
    """{name: colour} when every name is a known series, else None (seaborn's default)."""
    colors = {n: series_color(n) for n in names}
    return colors if all(c is not None for c in colors.values()) else None


def bar(df: pd.DataFrame, x: str, y: str, hue: str | None = None, title: str = "", ylabel: str | None = None,
        err: str | None = None, log_y: bool = False, xlabel: str = ""):
    """Bars of y per x (grouped by hue). `err`: a column of error-bar half-widths (only
    without hue). Known generator / training-set names keep their colours."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    if hue is None:
        palette = _palette(df[x].unique())
        kw = dict(hue=x, palette=palette, legend=False) if palette else {}
        sns.barplot(data=df, x=x, y=y, ax=ax, errorbar=None, **kw)
        if err is not None:
            ax.errorbar(range(len(df)), df[y], yerr=df[err], fmt="none", ecolor="black", capsize=3)
    else:
        order = _series_sorted(df[hue].unique())
        sns.barplot(data=df, x=x, y=y, hue=hue, hue_order=order, palette=_palette(order), ax=ax, errorbar=None)
        ax.legend(fontsize=8)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title), ax.set_ylabel(ylabel or y), ax.set_xlabel(xlabel)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return fig


def accuracy_vs_fraction(summary: pd.DataFrame, metric_label: str = "test accuracy", title: str = ""):
    """Mean over seeds with the 95% confidence band, one line per training set."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in _series_sorted(summary["training_set"].unique()):
        g = summary[summary["training_set"] == name]
        g = g.sort_values("fraction")
        x = g["fraction"] * 100
        color = series_color(name)
        ax.plot(x, g["mean"], marker="o", label=name, color=color)
        ax.fill_between(x, g["ci_low"], g["ci_high"], alpha=0.15, color=color)
    ax.set_xscale("log")
    ax.set_xticks(sorted(summary["fraction"].unique() * 100))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(max(0.0, summary["ci_low"].min() - 0.05), min(1.0, summary["ci_high"].max() + 0.05))
    ax.set_xlabel("labeled fraction of the training set"), ax.set_ylabel(metric_label)
    ax.set_title(title or f"{metric_label} vs label fraction (mean and 95% CI over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion(cm, classes, title: str = ""):
    import seaborn as sns

    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    sns.heatmap(norm, annot=True, fmt=".2f", cmap="Blues", xticklabels=classes, yticklabels=classes, ax=ax,
                cbar=False, annot_kws={"fontsize": 7})
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    fig.tight_layout()
    return fig


def embedding(points: np.ndarray, groups: list[str], title: str = ""):
    """2-D scatter of an embedding (e.g. t-SNE), one colour per group; 'real ...' groups
    first, then kept, then rejected ones in the legend."""
    import seaborn as sns

    order = sorted(set(groups), key=lambda g: (not g.startswith("real"), "rejected" in g, g))
    fig, ax = plt.subplots(figsize=(6.5, 5))
    sns.scatterplot(x=points[:, 0], y=points[:, 1], hue=groups, hue_order=order, s=12, ax=ax, linewidth=0, alpha=0.8)
    ax.set_xticks([]), ax.set_yticks([]), ax.set_title(title)
    ax.legend(fontsize=7, markerscale=1.5)
    fig.tight_layout()
    return fig


def latent_histograms(latents: torch.Tensor, bins: int = 80, title: str = "Scaled latents per channel"):
    """Density histogram of the values of each latent channel of (N, C, H, W) latents,
    with the standard normal density for reference."""
    lat = torch.as_tensor(latents).float()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for c in range(lat.shape[1]):
        v = lat[:, c].flatten().numpy()
        ax.hist(v, bins=bins, histtype="step", density=True, label=f"channel {c} (std {v.std():.2f})")
    grid = np.linspace(-4, 4, 200)
    ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), color="black", ls=":", label="N(0, 1)")
    ax.set_title(title), ax.set_xlabel("latent value"), ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def latent_classifier_accuracy(acc: pd.DataFrame, num_classes: int,
                               title: str = "Noise-aware latent classifier: validation accuracy on z_t by t"):
    """Accuracy by timestep bucket (columns bucket_start, bucket_end, accuracy, fraction),
    one line per label fraction, with the chance level."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for f, g in acc.groupby("fraction"):
        g = g.sort_values("bucket_start")
        ax.plot((g["bucket_start"] + g["bucket_end"]) / 2, g["accuracy"], marker="o", label=f"{percent_text(f)} labels")
    ax.axhline(1 / num_classes, color="grey", ls="--", label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("diffusion timestep t (0 = clean latent, large = almost pure noise)")
    ax.set_ylabel("validation accuracy"), ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ratio_sweep(summary: pd.DataFrame, metric_label: str = "test accuracy", title: str = ""):
    """Mean and 95% CI (columns training_set, ratio, mean, ci_low, ci_high) against the
    synthetic-to-real ratio; real-only is the grey line and band."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if summary.empty or "training_set" not in summary:  # no ratio sweep in this study
        ax.text(0.5, 0.5, "no ratio sweep in this study (downstream.ratio_sweep is empty)", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    real = summary[summary["training_set"] == "real"]
    if len(real):
        r = real.iloc[0]
        if np.isfinite(r["ci_low"]) and np.isfinite(r["ci_high"]):
            ax.axhspan(r["ci_low"], r["ci_high"], color="grey", alpha=0.2)
        ax.axhline(r["mean"], color="grey", label="real (no synthetic)")
    others = summary[summary["training_set"] != "real"]
    for name in _series_sorted(others["training_set"].unique()):
        g = others[others["training_set"] == name].sort_values("ratio")
        yerr = np.nan_to_num(np.vstack([g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]]))
        ax.errorbar(g["ratio"] * 100, g["mean"], yerr=yerr, marker="o", capsize=3, label=name,
                    color=series_color(name))
    ax.set_xlabel("synthetic images added, % of the real labeled images"), ax.set_ylabel(metric_label)
    ax.set_title(title or f"{metric_label} vs synthetic-to-real ratio (mean and 95% CI over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def guidance_selection(table: pd.DataFrame, num_classes: int, chosen: float | None = None, title: str = ""):
    """Validation agreement (circles, the choice criterion) and the reference classifier's class
    accuracy (squares, reported only) against the guidance scale, one colour per adaptation (and per
    guidance interval when several were tried; the unguided s = 0 point starts each of their lines)."""
    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    curves = list(table.sort_values("guidance_scale").groupby("adaptation", sort=False))
    intervals = list(dict.fromkeys(tuple(v) for v in table.get("guidance_interval", [])))
    if len(intervals) > 1:
        curves = [(f"{a}, " + (f"t in [{iv[0]}, {iv[1]}]" if iv else "every t"),
                   g[(g["guidance_scale"] == 0) | g["guidance_interval"].map(lambda v, iv=iv: tuple(v) == iv)])
                  for a, g in curves for iv in intervals]
    for i, (adaptation, g) in enumerate(curves):
        color = f"C{i}"
        ax.plot(g["guidance_scale"], g["validation_agreement"], marker="o", color=color,
                label=f"{adaptation}: validation agreement")
        if "reference_class_accuracy" in g:
            ax.plot(g["guidance_scale"], g["reference_class_accuracy"], marker="s", ls="--", color=color,
                    alpha=0.7, label=f"{adaptation}: reference accuracy")
    ax.axhline(1 / num_classes, color="grey", ls="--", lw=1, label="chance")
    if chosen is not None:
        ax.axvline(chosen, color="black", ls=":", lw=1, label=f"chosen s = {chosen:g}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("guidance scale s (0 = unguided)"), ax.set_ylabel("share of samples of the intended class")
    ax.set_title(title or "Choosing guidance on the validation split")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def guided_faithfulness(table: pd.DataFrame, title: str = "Kept guided images of their target class, per class"):
    """Per target class: the reference classifier's accuracy on guided samples and the share the
    guiding latent classifier gives their target class (rows of study.faithfulness.guided_faithfulness)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(table) + 1.5), 3.6))
    x = np.arange(len(table))
    ax.bar(x - 0.2, table["reference_accuracy"], width=0.4, color="tab:blue", label="reference classifier")
    ax.bar(x + 0.2, table["latent_classifier_agreement"], width=0.4, color="tab:orange",
           label="latent classifier (re-encoded, t = 0)")
    for i, r in enumerate(table.itertuples()):
        if r.reference_most_frequent_other:
            ax.text(i - 0.2, r.reference_accuracy + 0.02, f"→{r.reference_most_frequent_other}", ha="center",
                    va="bottom", fontsize=6, rotation=90)
    ax.axhline(0.8, color="grey", ls=":", lw=1, label="aim 0.80")
    ax.set_xticks(x, table["class"])
    ax.set_ylim(0, 1.15), ax.set_ylabel("share of the class's guided samples")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper right", ncol=3)
    fig.tight_layout()
    return fig


def filtering_outcomes(summary: pd.DataFrame, title: str = "Filtering outcome per class"):
    """Stacked bars per class (columns class_name and one count per outcome: kept,
    wrong_centroid, low_confidence, near_copy, over_quota): the full bar is all candidates."""
    outcomes = [c for c in ["kept", "wrong_centroid", "low_confidence", "near_copy", "over_quota"] if c in summary]
    table = summary.groupby("class_name", sort=False)[outcomes].sum()
    outcomes = [o for o in outcomes if o == "kept" or table[o].sum() > 0]  # no legend entry for unused reasons
    colors = {"kept": "tab:green", "wrong_centroid": "tab:red", "low_confidence": "tab:orange",
              "near_copy": "tab:purple", "over_quota": "tab:grey"}
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    bottom = np.zeros(len(table))
    for o in outcomes:
        ax.bar(table.index, table[o], bottom=bottom, label=o.replace("_", " "), color=colors[o])
        bottom += table[o].to_numpy()
    ax.set_ylabel("candidate images"), ax.set_title(title)
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def pretrain_curves(log: pd.DataFrame, evals: pd.DataFrame, smooth: int = 20,
                    title: str = "Pool pre-training of the unconditional denoiser"):
    """Left: training loss (log scale, rolling mean) of the denoiser (`log`: step, loss).
    Middle: FID and KID of unconditional samples against the held-out pool tiles at each
    evaluation (`evals`: step, fid, kid_mean, kid_std). Right: precision and recall."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    if log is not None and not log.empty:
        ax.plot(log["step"], log["loss"].rolling(smooth, min_periods=1).mean())
    ax.set_yscale("log")
    ax.set_xlabel("step"), ax.set_ylabel(f"loss (rolling mean of {smooth} logs)"), ax.set_title("training loss")
    ev = evals.sort_values("step")
    ax = axes[1]
    ax.plot(ev["step"], ev["fid"], marker="o", color="tab:blue", label="FID")
    ax.set_xlabel("step"), ax.set_ylabel("FID (lower is better)", color="tab:blue")
    ax.set_title("sample quality vs held-out pool")
    if "kid_mean" in ev:
        twin = ax.twinx()
        twin.errorbar(ev["step"], ev["kid_mean"], yerr=ev.get("kid_std"), marker="s", color="tab:orange",
                      capsize=3, label="KID")
        twin.set_ylabel("KID (lower is better)", color="tab:orange")
        twin.grid(False)
    ax = axes[2]
    for col, marker in (("precision", "o"), ("recall", "s")):
        if col in ev:
            ax.plot(ev["step"], ev[col], marker=marker, label=col)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step"), ax.set_ylabel("share (higher is better)"), ax.set_title("precision / recall")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def pretrain_run_curve(trunk: pd.DataFrame, branches: pd.DataFrame | None = None,
                       real_shares: dict[str, float] | None = None, shipped: tuple[int, int] | None = None,
                       tissue_classes: list[str] | None = None, title: str = "", variants: pd.DataFrame | None = None):
    """The long pre-training run as the provenance-trained judge saw it. `trunk`: one row per judged step of
    the constant-lr run (step, fid, precision, recall, mixture_tv, tissue_mixture_tv, share_<group>);
    `branches`: the cool-down branches' rows (from_step, cooldown_steps, step, same columns), each drawn
    from the trunk step it left; `shipped` (from_step, steps) marks the branch that was exported;
    `variants`: long variants of the recipe trained beside it (variant, step, same columns), dashed.
    Panels: FID; precision and recall; mixture TV; the tissue classes' shares per judged step beside the
    real held-out tiles' (`real_shares`)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.2))
    tr = trunk.sort_values("step")
    br = branches if branches is not None else pd.DataFrame()
    va = variants if variants is not None else pd.DataFrame()
    _run_series(axes[0, 0], tr, br, va, (("fid", "FID", "o"),), "FID (lower is better)", shipped)
    _run_series(axes[0, 1], tr, br, va, (("precision", "precision", "o"), ("recall", "recall", "s")),
                "share (higher is better)", shipped)
    _run_series(axes[1, 0], tr, br, va, (("mixture_tv", "mixture TV (class x style)", "o"),
                                         ("tissue_mixture_tv", "tissue-class TV", "s")), "total variation (lower is better)",
                shipped)
    if not br.empty:
        axes[0, 0].set_title("dotted: cool-down branches (lr to 0), * the shipped one", fontsize=9)
    axes[0, 1].set_ylim(0, 1.02)
    ends = br.sort_values("step").groupby(["from_step", "cooldown_steps"]).tail(1) if not br.empty else br
    _shares_by_step(axes[1, 1], tr, ends, real_shares,
                    tissue_classes or sorted(c[len("share_"):] for c in tr.columns if c.startswith("share_")))
    fig.suptitle(title or "The long pre-training run, by the provenance-trained judge", fontsize=11)
    fig.tight_layout()
    return fig


def _run_series(ax, tr: pd.DataFrame, br: pd.DataFrame, va: pd.DataFrame, series, ylabel: str, shipped) -> None:
    """One panel of the run's curve: each (column, label, marker) along the trunk, each cool-down
    branch dotted from the trunk step it left through its own rows, each long variant dashed."""
    for i, (col, label, marker) in enumerate(series):
        if col not in tr:
            continue
        color = f"C{i}"
        ax.plot(tr["step"], tr[col], marker=marker, color=color, label=f"{label}, constant lr")
        if "judge" in tr and (tr["judge"] != tr["judge"].iloc[-1]).any():  # rows of a judge since replaced
            old = tr[tr["judge"] != tr["judge"].iloc[-1]]
            ax.scatter(old["step"], old[col], marker=marker, s=60, facecolors="w", edgecolors=color, zorder=3,
                       label="scored by an earlier judge" if i == len(series) - 1 else None)
        for (start, steps), b in (br.groupby(["from_step", "cooldown_steps"]) if not br.empty else ()):
            b = b.sort_values("step")
            at = tr.loc[tr["step"] == start, col]
            ax.plot([start] * len(at) + list(b["step"]), list(at.iloc[:1]) + list(b[col]), ls=":", marker=".", color=color)
            end = b.iloc[-1]
            is_shipped = shipped is not None and (int(start), int(steps)) == tuple(shipped)
            ax.scatter([end["step"]], [end[col]], marker="*" if is_shipped else "D", s=140 if is_shipped else 40,
                       color=color, edgecolors="k", zorder=3)
            if is_shipped and i == 0:
                ax.annotate("shipped", (end["step"], end[col]), textcoords="offset points", xytext=(6, 6), fontsize=8)
        for j, (name, v) in enumerate(va.groupby("variant") if not va.empty else ()):
            v = v.sort_values("step")
            ax.plot(v["step"], v[col], ls="--", marker=marker, mfc="w", color=color, alpha=0.9 - 0.25 * j,
                    label=f"{label}, {name}")
    ax.set_xlabel("step"), ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _shares_by_step(ax, tr: pd.DataFrame, ends: pd.DataFrame, real_shares, groups: list[str]) -> None:
    """Stacked bars of the tissue classes' shares: the real tiles', each judged trunk step's, each branch's end."""
    bars = {"real": real_shares} if real_shares else {}
    bars.update({f"{int(r['step'])}": {g: r.get(f"share_{g}", np.nan) for g in groups} for _, r in tr.iterrows()})
    bars.update({f"{int(b['from_step'])}+{int(b['cooldown_steps'])}": {g: b.get(f"share_{g}", np.nan) for g in groups}
                 for _, b in ends.iterrows()})
    left = np.zeros(len(bars))
    for j, g in enumerate(groups):
        vals = np.nan_to_num(np.array([float(b.get(g, np.nan)) for b in bars.values()]))
        ax.barh(list(bars), vals, left=left, color=plt.cm.tab10(j % 10), label=g)
        left += vals
    ax.invert_yaxis()
    ax.set_xlabel("share of the judged tiles (the rest: real sources)"), ax.set_ylabel("step (from+steps: a cool-down)")
    ax.set_title("tissue classes the judge calls", fontsize=9)
    if groups:
        ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))


def mixture_bars(groups: list[str], shares: dict[str, list[float]], title: str = ""):
    """Grouped bars: the share of each group (tissue class or source) in each set; the first set is
    the reference, drawn in grey."""
    x = np.arange(len(groups))
    w = 0.8 / max(len(shares), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(groups) + 2), 3.4))
    for i, (label, vals) in enumerate(shares.items()):
        ax.bar(x + (i - (len(shares) - 1) / 2) * w, vals, w, label=label, color="0.6" if i == 0 else None)
    ax.set_xticks(x, groups, rotation=45, ha="right")
    ax.set_ylabel("share of the set")
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def primary_cell_rule(sweep: pd.DataFrame, primary: dict, title: str = "The primary cell rule (real-only results only)"):
    """Real-only test accuracy per label count (seeds as dots, mean as line), the all-labels
    classifier and the rule's threshold; the primary cell circled."""
    lpc = {float(k): v["total"] for k, v in primary["labels_per_class_by_fraction"].items()}
    d = sweep.assign(labels=sweep["fraction"].astype(float).map(lpc))
    mean = d.groupby("labels")["test.accuracy"].mean()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(d["labels"], d["test.accuracy"], s=12, alpha=0.5, color=series_color("real"), label="real-only, per seed")
    ax.plot(mean.index, mean.values, "-o", color=series_color("real"), label="real-only, mean")
    ax.axhline(primary["all_labels_accuracy"], color="k", lw=1, label="all labels")
    ax.axhline(primary["all_labels_accuracy"] - primary["gap"], color="k", ls="--", lw=1,
               label=f"all labels - {100 * primary['gap']:g} points")
    p = primary["labels_per_class"]["total"]
    ax.scatter([p], [mean.get(p, np.nan)], s=220, facecolors="none", edgecolors="C3", lw=2, label="primary cell")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(mean.index))
    ax.set_xticklabels([str(int(v)) for v in sorted(mean.index)])
    ax.set_xlabel("labels per class (training + validation)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def gain_vs_labels(table: pd.DataFrame, primary_labels: int | None = None,
                   title: str = "Gain of HistoDiffusion by labels per class (paired over seeds, 95% CI)"):
    """Mean paired test-accuracy difference (points) with its CI, per label count, one line
    per comparison (`comparison` column: e.g. vs real-only, vs the pseudo-label rival); one panel
    per test cohort when a `cohort` column names several (shared y axis)."""
    cohorts = list(dict.fromkeys(table["cohort"])) if "cohort" in table else [None]
    fig, axes = plt.subplots(1, len(cohorts), figsize=(6.5 * len(cohorts), 4), sharey=True, squeeze=False)
    for ax, cohort in zip(axes[0], cohorts):
        part = table if cohort is None else table[table["cohort"] == cohort]
        comps = list(dict.fromkeys(part["comparison"]))
        for i, comp in enumerate(comps):
            g = part[part["comparison"] == comp].sort_values("labels_per_class")
            x = g["labels_per_class"].to_numpy(float) * (1 + 0.04 * (i - (len(comps) - 1) / 2))
            y = 100 * g["mean_diff"].to_numpy()
            err = np.vstack([y - 100 * g["ci_low"].to_numpy(), 100 * g["ci_high"].to_numpy() - y])
            ax.errorbar(x, y, yerr=err, fmt="-o", capsize=3, label=comp)
        ax.axhline(0, color="k", lw=1)
        if primary_labels is not None:
            ax.axvline(primary_labels, color="C3", ls=":", lw=1.5, label="primary cell")
        ax.set_xscale("log", base=2)
        ticks = sorted(part["labels_per_class"].unique())
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(int(v)) for v in ticks])
        ax.set_xlabel("labels per class (training + validation)")
        ax.set_title(title if cohort is None else f"{cohort} test cohort", fontsize=10 if cohort else None)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("accuracy difference (points)")
    if cohorts != [None]:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def adaptation_length(summary: pd.DataFrame, title: str = "How long to adapt the denoiser to the target's unlabeled images"):
    """One point per adaptation length. Left and middle: Frechet distance to the target's unlabeled images
    (lower = closer to the target's look) of unguided samples and guided candidates, in the real-only
    classifier's features and in the reference classifier's; right: the reference classifier's accuracy
    on the kept guided images and on every candidate (higher = more faithful to the class)."""
    x = np.arange(len(summary))
    panels = [("", "Frechet distance to the target\n(real-only classifier's features)"),
              ("_reference", "Frechet distance to the target\n(reference classifier's features)")]
    panels = [p for p in panels if f"frechet_to_target_unguided{p[0]}" in summary]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.6 * (len(panels) + 1), 3.6))
    for ax, (suffix, ylabel) in zip(axes, panels):
        for col, label, marker in ((f"frechet_to_target_unguided{suffix}", "unguided samples", "o"),
                                   (f"frechet_to_target_candidates{suffix}", "guided candidates", "s")):
            ax.plot(x, summary[col], marker=marker, label=label)
        ax.set_ylabel(ylabel)
    for col, label, marker in (("kept_class_accuracy", "kept images", "o"),
                               ("candidate_class_accuracy", "every candidate", "s")):
        axes[-1].plot(x, summary[col].astype(float), marker=marker, label=label)
    axes[-1].set_ylabel("reference classifier's class accuracy")
    for ax in axes:
        ax.set_xticks(x, [f"{int(s):,}" for s in summary["adaptation_steps"]])
        ax.set_xlabel("adaptation steps (0 = not adapted)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
