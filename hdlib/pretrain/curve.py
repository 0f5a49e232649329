"""The long run's curve as one figure, kept beside its committed checkpoint (`pretrain.committed_run`/curve.png):
the provenance-trained judge's FID, precision and recall, mixture TV and tissue-class shares at every judged
step of the constant-lr trunk, with each cool-down branch drawn from the step it left and each long variant
of the recipe (hdlib.pretrain.variant) beside it. Redrawn after every
judged chunk (`keep_committed_checkpoint`), or by hand:

    python -m hdlib pretrain params/pretrain_demo.yaml --curve

The real tiles' shares come from the card's `versions` block when it was scored by the run's judge (the same
held-out tiles); otherwise the figure has no real bar. Every point is 512 samples at DDIM 25 (the run's
`pretrain.eval_*`): the card's own figures (1,000 samples, DDIM 50) read a lower FID for the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..evaluation import plots
from ..io import atomic_savefig
from .recipe import COOLDOWN_CURVE, branch_variant

FIGURE = "curve.png"
TRUNK_CURVE = "pretrain_eval.csv"
VARIANT_CURVE = "pretrain_variants.csv"  # hdlib.pretrain.variant's rows


def real_shares_from_card(card_path: Path, judge: str) -> tuple[dict | None, list | None, tuple | None]:
    """(real shares, tissue classes, shipped branch) from a model card whose versions block was scored by
    `judge`; (None, None, shipped) when the card is missing or used another judge."""
    if not card_path.exists():
        return None, None, None
    card = json.loads(card_path.read_text())
    cool = (card.get("denoiser") or {}).get("cooldown") or {}
    shipped = (int(cool["from_step"]), int(cool["steps"])) if cool.get("from_step") is not None else None
    if (card.get("denoiser") or {}).get("variant"):
        shipped = None  # a long variant's branch: not one of the trunk's
    v = card.get("versions") or {}
    if v.get("judge") != judge:
        return None, None, shipped
    tissue = v.get("tissue_classes") or list(v["real_shares"])
    return {g: v["real_shares"][g] for g in tissue}, tissue, shipped


def write_run_curve(run_dir: str | Path, card_path: str | Path | None = None) -> Path | None:
    """Draw the committed run's curve into run_dir/curve.png (atomically); None when nothing is judged yet."""
    run_dir = Path(run_dir)
    trunk_csv = run_dir / "metrics" / TRUNK_CURVE
    if not trunk_csv.exists():
        return None
    trunk = pd.read_csv(trunk_csv)
    if trunk.empty:
        return None
    branch_csv = run_dir / "metrics" / COOLDOWN_CURVE
    branches = pd.read_csv(branch_csv) if branch_csv.exists() else None
    variant_csv = run_dir / "metrics" / VARIANT_CURVE
    variants = pd.read_csv(variant_csv) if variant_csv.exists() else None
    if branches is not None and "variant" in branches:  # a variant's branches are drawn as its own dashed lines
        of = _variants_of(branches)
        variants = with_variant_branches(variants, branches[of != ""])
        branches = branches[of == ""]
    judge = str(trunk["judge"].iloc[-1]) if "judge" in trunk else ""
    real, tissue, shipped = real_shares_from_card(Path(card_path), judge) if card_path else (None, None, None)
    last = trunk.iloc[-1]
    protocol = (f": {int(last['samples'])} samples, DDIM {int(last['ddim_steps'])} a point"
                if {"samples", "ddim_steps"} <= set(trunk.columns) else "")
    fig = plots.pretrain_run_curve(trunk, branches, real_shares=real, shipped=shipped, tissue_classes=tissue, variants=variants,
                                   title=f"The long pre-training run by the provenance-trained judge ({judge}){protocol}")
    path = run_dir / FIGURE
    atomic_savefig(fig, path)
    plots.plt.close(fig)
    return path


def with_variant_branches(variants: pd.DataFrame | None, branches: pd.DataFrame) -> pd.DataFrame | None:
    """The variants' rows plus each cool-down branch of a variant as a variant of its own ('deep_2 8000+1000'),
    starting from the variant's row at the step it left."""
    parts = [] if variants is None else [variants]
    for (name, start, steps), b in branches.groupby(["variant", "from_step", "cooldown_steps"]):
        label = f"{name} {int(start)}+{int(steps)}"
        left = variants[(variants["variant"] == name) & (variants["step"] == start)] if variants is not None else b.iloc[0:0]
        parts += [left.assign(variant=label), b.drop(columns=["from_step", "cooldown_steps"]).assign(variant=label)]
    return pd.concat(parts, ignore_index=True) if parts else None


def _variants_of(rows: pd.DataFrame) -> pd.Series:
    return rows.apply(lambda r: branch_variant(r.to_dict()), axis=1) if len(rows) else pd.Series(dtype=str)


def run_since_release(run_dir: str | Path, card: dict) -> dict | None:
    """The card's `run_since_release` block: the rows the run was judged at after the shipped version was cut
    (the trunk past its branch point, other cool-down branches' ends, every long variant's rows), beside the
    shipped branch's own row on the same scale. None when the card names no shipped branch or the run has none
    of its rows."""
    run_dir = Path(run_dir)
    cool = (card.get("denoiser") or {}).get("cooldown") or {}
    curves = {name: run_dir / "metrics" / name for name in (TRUNK_CURVE, COOLDOWN_CURVE, VARIANT_CURVE)}
    if cool.get("from_step") is None or not curves[COOLDOWN_CURVE].exists():
        return None
    start, steps = int(cool["from_step"]), int(cool["steps"])
    branches = pd.read_csv(curves[COOLDOWN_CURVE])
    of = _variants_of(branches)
    mine = ((of == ((card.get("denoiser") or {}).get("variant") or "")) & (branches["from_step"] == start)
            & (branches["cooldown_steps"] == steps))  # the shipped branch's rows
    if not (mine & (branches["step"] == start + steps)).any():
        return None
    shipped = branches[mine & (branches["step"] == start + steps)].iloc[-1]

    def same(df: pd.DataFrame) -> pd.DataFrame:  # rows on the shipped row's scale only
        return df[df["judge"] == shipped["judge"]] if "judge" in df else df.iloc[0:0]

    rows = [{"run": "trunk (constant lr)", **r} for r in same(_read(curves[TRUNK_CURVE])).to_dict("records")
            if r["step"] > start]
    ends = same(branches[~mine].assign(variant=of[~mine])).sort_values("step")
    ends = ends.groupby(["variant", "from_step", "cooldown_steps"]).tail(1)
    rows += [{"run": f"cool-down {r['variant'] + ' ' if r['variant'] else ''}{int(r['from_step'])}+{int(r['cooldown_steps'])}",
              **r} for r in ends.to_dict("records")]
    rows += [{"run": f"variant {r['variant']}", **r} for r in same(_read(curves[VARIANT_CURVE])).to_dict("records")]
    keep = ("run", "step", "fid", "precision", "recall", "mixture_tv", "tissue_mixture_tv")
    return {"judge": str(shipped["judge"]), "samples": int(shipped["samples"]), "ddim_steps": int(shipped["ddim_steps"]),
            "shipped": {k: float(shipped[k]) for k in keep[2:]},
            "rows": [{k: (int(r[k]) if k == "step" else r[k]) for k in keep} for r in rows]} if rows else None


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["judge", "step"])

