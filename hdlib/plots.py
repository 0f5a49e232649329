"""Figures the notebooks show and the report embeds. Each function returns the
matplotlib Figure; `save` writes it atomically into the study's figures folder."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from .io import atomic_savefig


def save(fig, cfg, name: str) -> Path:
    from .study import figures_dir

    path = figures_dir(cfg) / f"{name}.png"
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


def bar(df: pd.DataFrame, x: str, y: str, hue: str | None = None, title: str = "", ylabel: str | None = None,
        err: str | None = None):
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    sns.barplot(data=df, x=x, y=y, hue=hue, ax=ax, errorbar=None)
    if err is not None and hue is None:
        ax.errorbar(range(len(df)), df[y], yerr=df[err], fmt="none", ecolor="black", capsize=3)
    ax.set_title(title), ax.set_ylabel(ylabel or y), ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=20)
    if hue:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_vs_fraction(summary: pd.DataFrame, metric_label: str = "test accuracy", title: str = ""):
    """Mean over seeds with the 95% confidence band, one line per training set."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    order = ["real", "unfiltered", "histodiffusion", "scratch", "cfg"]
    names = sorted(summary["training_set"].unique(), key=lambda n: order.index(n) if n in order else len(order))
    for name in names:
        g = summary[summary["training_set"] == name]
        g = g.sort_values("fraction")
        x = g["fraction"] * 100
        ax.plot(x, g["mean"], marker="o", label=name)
        ax.fill_between(x, g["ci_low"], g["ci_high"], alpha=0.15)
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
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 5))
    sns.scatterplot(x=points[:, 0], y=points[:, 1], hue=groups, s=12, ax=ax, linewidth=0, alpha=0.8)
    ax.set_xticks([]), ax.set_yticks([]), ax.set_title(title)
    ax.legend(fontsize=7, markerscale=1.5)
    fig.tight_layout()
    return fig
