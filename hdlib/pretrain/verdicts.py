"""The model card's verdicts, computed from the card's own numbers and stored in card.json under
`verdicts`: for each judgement a code (`verdict`) and the numbers it was computed from. The card's
template (`card.py`) only says them; nothing here writes prose."""

from __future__ import annotations

from .judges import tissue_group

# How far apart two FIDs must be, in units of the larger spread over sample draws (or seeds), for a
# model to count as clearly better.
CLEAR_GAP = 2.0


def card_verdicts(card: dict) -> dict:
    """{name: verdict} for every judgement the card's numbers support."""
    out = {}
    c = card.get("comparison_with_in_study_pretraining")
    if c:
        out["comparison"] = comparison_verdict(c)
        if c.get("matched_size"):
            out["comparison_at_equal_sizes"] = matched_size_verdict(c["matched_size"])
    pj = card.get("pool_judge")
    if pj:
        out["pool_judge"] = pool_judge_verdict(pj)
        out["pool_judge_per_run"] = per_run_gaps(pj)
        first = (c or {}).get("in_study", {}).get("fid")
        if first is not None:
            out["untrained_judge_draws"] = {"first_draw": first,
                                            "reruns": pj["in_study_over_seeds"]["random_judge_fid"]["values"],
                                            "shipped": pj["models"]["shipped"]["random_judge_fid"]}
        out["mixture_shortfall"] = mixture_shortfall(pj)
        out["autoencoder_ceiling"] = ceiling_verdict(pj)
    if card.get("recipe_sweep"):
        out["recipe_sweep"] = sweep_verdict(card["recipe_sweep"])
    prev = card.get("previous_version") or {}
    if prev.get("recipe_sweep") and not card.get("recipe_sweep"):
        out["previous_recipe_sweep"] = sweep_verdict(prev["recipe_sweep"])
    v = card.get("versions")
    if v:
        out["targets"] = target_rows(v)
    if (card.get("run_since_release") or {}).get("rows"):
        out["run_since_release"] = run_since_verdict(card["run_since_release"])
    return out


def run_since_verdict(rs: dict) -> dict:
    """Does any row the long run was judged at after this version read a lower FID than this version on that scale?"""
    best = min(rs["rows"], key=lambda r: r["fid"])
    return {"verdict": "a_row_is_better" if best["fid"] < rs["shipped"]["fid"] else "none_better",
            "shipped_fid": rs["shipped"]["fid"], "best_run": best["run"], "best_step": best["step"], "best_fid": best["fid"],
            "rows": len(rs["rows"])}


# The shipped model's targets (issue: "a generator worth guiding"), by the provenance-trained judge with the card's
# holdout and sample counts: (measure, key in a versions row, "max" or "min", target)
TARGETS = (("FID", "fid", "max", 60.0), ("recall", "recall", "min", 0.85), ("precision", "precision", "min", 0.80),
           ("mixture TV", "mixture_tv", "max", 0.15))
CLASS_SHARE_TARGET = 0.5  # every tissue class drawn at least half as often as it is real


def target_rows(v: dict) -> list[dict]:
    """One row per target: this model's value, the previous version's (the same judge and seeds), met or not;
    the last row is the least-drawn tissue class against half its real share."""
    now, before = v["models"]["this model"], v["models"].get("previous", {})
    rows = [{"measure": name, "target": f"{'<=' if kind == 'max' else '>='} {t:g}", "value": now[key],
             "previous": before.get(key), "met": bool(now[key] <= t if kind == "max" else now[key] >= t)}
            for name, key, kind, t in TARGETS]
    tissue = v.get("tissue_classes") or list(v["real_shares"])  # tissue classes, not the real sources
    ratio = {g: now[f"share_{g}"] / r for g, r in v["real_shares"].items() if r > 0 and g in tissue}
    worst = min(ratio, key=ratio.get)
    rows.append({"measure": f"least-drawn tissue class ({worst}), share / real share", "target": f">= {CLASS_SHARE_TARGET:g}",
                 "value": ratio[worst], "previous": (before[f"share_{worst}"] / v["real_shares"][worst]) if before else None,
                 "met": bool(ratio[worst] >= CLASS_SHARE_TARGET)})
    return rows


def comparison_verdict(c: dict) -> dict:
    """The untrained judge on the shared holdout: is the shipped model's FID lower than the in-study one's?"""
    a, b = c["shipped"]["fid"], c["in_study"]["fid"]
    return {"verdict": "shipped_lower" if a < b else "shipped_not_lower", "shipped_fid": a, "in_study_fid": b,
            "fid_ratio": a / b}


def matched_size_verdict(m: dict) -> dict:
    """The same at equal sample sizes: which model is closer to the real tiles, and by how many spreads."""
    sm, im = m["shipped"], m["in_study"]
    gap, spread = sm["mean"] - im["mean"], max(sm["sd"], im["sd"], 1e-9)
    return {"verdict": "in_study_closer" if gap > 0 else "shipped_closer", "samples": sm["n"],
            "draws": len(sm["draws"]), "shipped_mean": sm["mean"], "in_study_mean": im["mean"], "gap": abs(gap),
            "larger_spread": spread, "gap_over_spread": abs(gap) / spread}


def _in_study_runs(pj: dict) -> dict:
    return {k.removeprefix("in_study_seed"): m for k, m in pj["models"].items() if k.startswith("in_study")}


def pool_judge_verdict(pj: dict) -> dict:
    """The provenance-trained judge: is the shipped model's FID clearly below every in-study run's (at
    equal sample sizes, by CLEAR_GAP times the largest spread over draws or seeds), below their mean
    only, or not below it?"""
    s, sd = pj["models"]["shipped"], pj["in_study_over_seeds"]
    runs = _in_study_runs(pj)
    spread = max([s["matched_size"]["sd"]] + [m["matched_size"]["sd"] for m in runs.values()]
                 + [sd["matched_size_fid"]["sd"]])
    gap = min(m["matched_size"]["mean"] for m in runs.values()) - s["matched_size"]["mean"]
    ratio = gap / max(spread, 1e-9)
    code = ("clearly_below_every_run" if gap > 0 and ratio >= CLEAR_GAP else
            "below_mean_within_noise" if s["fid"] < sd["fid"]["mean"] else "not_below")
    return {"verdict": code, "shipped_fid": s["fid"], "in_study_fid_mean": sd["fid"]["mean"],
            "in_study_fid_sd": sd["fid"]["sd"], "seeds": len(sd["fid"]["values"]), "closest_run_gap": gap,
            "largest_spread": spread, "gap_over_spread": ratio}


def per_run_gaps(pj: dict) -> list[dict]:
    """Each in-study run alone against the shipped model, with only the sampling noise of the two:
    its FID at equal sizes minus the shipped model's (positive: that run is further from the real
    tiles), and that gap over the larger spread of the two over sample draws."""
    s = pj["models"]["shipped"]["matched_size"]
    out = []
    for seed, m in _in_study_runs(pj).items():
        gap, spread = m["matched_size"]["mean"] - s["mean"], max(m["matched_size"]["sd"], s["sd"], 1e-9)
        out.append({"seed": seed, "gap": gap, "larger_spread": spread, "gap_over_spread": gap / spread})
    return out


def grouped_mixture(classes: list[str], mix: list[float]) -> dict:
    """A mixture over provenance classes summed per tissue class (stain styles together) or real source."""
    groups = sorted({tissue_group(c) for c in classes})
    return {g: sum(m for c, m in zip(classes, mix) if tissue_group(c) == g) for g in groups}


def mixture_shortfall(pj: dict, n: int = 3) -> list[dict]:
    """The n tissue classes (or sources) the shipped model's samples fall shortest of the real mix in."""
    classes = pj["judge"]["classes"]
    real = grouped_mixture(classes, pj["real_mixture"])
    mine = grouped_mixture(classes, pj["models"]["shipped"]["mixture"])
    return [{"group": g, "samples": mine[g], "real": real[g]} for g in sorted(real, key=lambda g: mine[g] - real[g])[:n]]


def ceiling_verdict(pj: dict, n: int = 3) -> dict:
    """The shipped autoencoder's ceiling: does the untrained judge miss what it loses (its reconstructions
    within 1.5x the real split-half FID by the untrained judge, beyond 2x by the trained one)? The n
    tissue classes it keeps least of, and the ceiling as a share of the samples' FID."""
    ae, half, rand_half = pj["models"]["shipped"]["autoencoder_ceiling"], pj["split_half"]["fid"], \
        pj["split_half_random_judge"]
    blind = ae["random_judge_fid"] <= 1.5 * rand_half and ae["fid"] > 2 * half
    kept = ae["tissue_kept_per_group"]
    return {"verdict": "untrained_judge_misses_it" if blind else "no_blind_spot_shown", "fid": ae["fid"],
            "random_judge_fid": ae["random_judge_fid"], "split_half_fid": half,
            "split_half_random_judge_fid": rand_half, "kept_least": {g: kept[g] for g in sorted(kept, key=kept.get)[:n]},
            "share_of_sample_fid": ae["fid"] / max(pj["models"]["shipped"]["fid"], 1e-9)}


def sweep_verdict(rows: list[dict]) -> dict:
    """Which variant of the recipe sweep ranked first by FID (EMA weights), against the configured recipe."""
    r0 = rows[0]
    best = min((r for r in rows if r.get("weights", "ema") == "ema"), key=lambda r: r["fid"])
    return {"verdict": "configured_first" if best["variant"] == r0["variant"] else "variant_first",
            "best_variant": best["variant"], "best_fid": best["fid"], "configured_variant": r0["variant"],
            "configured_fid": r0["fid"]}
