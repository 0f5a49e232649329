"""The long run's curve, drawn beside its committed checkpoint: trunk, cool-down branches (the shipped one
marked) and the tissue classes' shares beside the real tiles' when the card was scored by the same judge."""

import json

import pandas as pd
import pytest

from hdlib.config import load_config
from hdlib.errors import ConfigError
from hdlib.evaluation import plots
from hdlib.pretrain.cli import main as pretrain_main
from hdlib.pretrain.curve import real_shares_from_card, write_run_curve

SHARES = {"ADI": 0.1, "LYM": 0.3, "TUM": 0.6}


def _row(step, fid, judge="j1", **extra):
    return {"step": step, "samples": 512, "ddim_steps": 25, "fid": fid, "precision": 0.7, "recall": 0.5,
            "mixture_tv": 0.3, "tissue_mixture_tv": 0.2, "judge": judge,
            **{f"share_{k}": v / 2 for k, v in SHARES.items()}, **extra}


def _run_dir(tmp_path, card_judge="j1"):
    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    pd.DataFrame([_row(1000, 90.0, judge="unrecorded"), _row(2000, 80.0), _row(3000, 78.0)]).to_csv(
        run / "metrics" / "pretrain_eval.csv", index=False)
    pd.DataFrame([_row(2500, 76.0, from_step=2000, cooldown_steps=1000), _row(3000, 74.0, from_step=2000, cooldown_steps=1000)]
                 ).to_csv(run / "metrics" / "pretrain_cooldown.csv", index=False)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"denoiser": {"cooldown": {"from_step": 2000, "steps": 1000}},
                                "versions": {"judge": card_judge, "real_shares": {**SHARES, "he_source": 0.05},
                                             "tissue_classes": list(SHARES)}}))
    return run, card


def test_the_curve_takes_real_shares_only_from_a_card_scored_by_the_run_s_judge(tmp_path):
    _, card = _run_dir(tmp_path)
    real, tissue, shipped = real_shares_from_card(card, "j1")
    assert real == SHARES and tissue == list(SHARES) and shipped == (2000, 1000)  # the real sources left out
    assert real_shares_from_card(card, "another judge") == (None, None, (2000, 1000))
    assert real_shares_from_card(tmp_path / "missing.json", "j1") == (None, None, None)


def test_the_curve_draws_the_trunk_each_branch_and_the_mixtures(tmp_path):
    run, card = _run_dir(tmp_path)
    trunk = pd.read_csv(run / "metrics" / "pretrain_eval.csv")
    branches = pd.read_csv(run / "metrics" / "pretrain_cooldown.csv")
    fig = plots.pretrain_run_curve(trunk, branches, real_shares=SHARES, shipped=(2000, 1000), tissue_classes=list(SHARES))
    fid_ax, _, _, mix_ax = fig.axes[:4]
    assert [t.get_text() for t in mix_ax.get_yticklabels()] == ["real", "1000", "2000", "3000", "2000+1000"]
    branch = [ln for ln in fid_ax.get_lines() if ln.get_linestyle() == ":"]
    assert len(branch) == 1 and list(branch[0].get_xdata()) == [2000, 2500, 3000]  # from the trunk, through its rows
    assert list(branch[0].get_ydata()) == [80.0, 76.0, 74.0]
    assert any(a.get_text() == "shipped" for a in fid_ax.texts)
    labels = fid_ax.get_legend_handles_labels()[1]
    assert "scored by an earlier judge" in labels  # step 1000's judge is not the curve's
    plots.plt.close(fig)

    path = write_run_curve(run, card)
    assert path == run / "curve.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_no_curve_before_the_first_judged_step(tmp_path):
    assert write_run_curve(tmp_path / "nothing") is None


def test_pretrain_curve_needs_a_committed_run(tmp_path):
    with pytest.raises(ConfigError, match="committed_run"):
        pretrain_main("params/smoke.yaml", [f"study.results_root={tmp_path}", "pretrain.committed_run="], curve=True)
    assert load_config("params/pretrain_demo.yaml").pretrain.committed_run  # the shipped run has one


def test_each_long_variant_is_a_dashed_line_beside_the_trunk(tmp_path):
    trunk = pd.DataFrame([_row(1000, 90.0), _row(2000, 80.0)])
    variants = pd.DataFrame([{**_row(1000, 95.0), "variant": "deep_2"}, {**_row(2000, 70.0), "variant": "deep_2"}])
    fig = plots.pretrain_run_curve(trunk, None, variants=variants)
    dashed = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [95.0, 70.0]
    assert "FID, deep_2" in fig.axes[0].get_legend_handles_labels()[1]
    plots.plt.close(fig)


def test_the_card_gets_the_rows_judged_since_its_version_on_one_scale(tmp_path):
    from hdlib.pretrain.card import run_since_text
    from hdlib.pretrain.curve import run_since_release
    from hdlib.pretrain.verdicts import run_since_verdict

    run, card = _run_dir(tmp_path)  # shipped: the 2000+1000 branch, its row at 3000 reads 74.0
    pd.DataFrame([{**_row(2000, 99.0), "variant": "deep_2"}, {**_row(3000, 70.0), "variant": "deep_2"},
                  {**_row(4000, 60.0, judge="another"), "variant": "deep_2"}]).to_csv(
        run / "metrics" / "pretrain_variants.csv", index=False)
    block = run_since_release(run, json.loads(card.read_text()))
    assert block["shipped"]["fid"] == 74.0 and (block["samples"], block["ddim_steps"]) == (512, 25)
    assert [(r["run"], r["step"], r["fid"]) for r in block["rows"]] == [
        ("trunk (constant lr)", 3000, 78.0), ("variant deep_2", 2000, 99.0), ("variant deep_2", 3000, 70.0)]
    v = run_since_verdict(block)  # another judge's row (60.0) is on another scale: left out
    assert (v["verdict"], v["best_run"], v["best_step"], v["best_fid"]) == ("a_row_is_better", "variant deep_2", 3000, 70.0)
    text = run_since_text(block, v, {"ddim_steps": 50, "models": {"this model": {"samples": 1000}}})
    assert "| variant deep_2 | 3000 | 70.0 |" in text and "**variant deep_2 at step 3000 reads a lower FID" in text
    assert "1000 samples and DDIM 50" in text and "pretrain_run_curve.png" in text
    block["rows"] = block["rows"][:1]
    assert run_since_verdict(block)["verdict"] == "none_better"


def test_no_run_since_block_without_the_shipped_branch_s_row(tmp_path):
    from hdlib.pretrain.card import run_since_text
    from hdlib.pretrain.curve import run_since_release

    run, card = _run_dir(tmp_path)
    c = json.loads(card.read_text())
    c["denoiser"]["cooldown"] = {"from_step": 1000, "steps": 500}  # a branch the run never judged
    assert run_since_release(run, c) is None
    assert run_since_release(run, {"denoiser": {}}) is None
    assert run_since_text(None, None, None) == ""


def test_the_docs_sampler_table_and_the_run_s_state_are_read_back_from_the_committed_rows():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    metrics = root / "models" / "pretrain-run" / "metrics"
    doc = (root / "docs" / "pretrained.md").read_text()
    rows = pd.read_csv(metrics / "pretrain_sampler_steps.csv")
    for r in rows.itertuples():
        assert (f"| {int(r.ddim_steps)} | {r.fid:.1f} | {r.precision:.3f} | {r.recall:.3f} | {r.mixture_tv:.3f} | "
                f"{r.share_LYM:.1%} |") in doc
    by_steps = rows.set_index("ddim_steps")
    text = " ".join(doc.split())
    assert f"From 25 to 250 steps FID falls from {by_steps.fid[25]:.1f} to {by_steps.fid[250]:.1f}" in text
    for col in ("precision", "recall"):
        assert by_steps[col][250] > by_steps[col][25]
    assert by_steps.mixture_tv[250] < by_steps.mixture_tv[25]
    assert (rows.share_LYM < 0.5 * 0.10).all()  # "lymphocytes stay rare at every step count"
    variant = pd.read_csv(metrics / "pretrain_variants.csv").set_index("step")
    trunk = pd.read_csv(metrics / "pretrain_eval.csv").set_index("step")
    assert f"read FID {variant.fid[4000]:.1f} at step 4,000 against the trunk's {trunk.fid[4000]:.1f} and was not adopted" in text
    assert variant.fid[4000] > 0.9 * trunk.fid[4000]  # the declared rule: adopted only if more than 10% below


def test_the_250_step_rejudgement_in_the_docs_is_read_back_from_rescored_csv():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = pd.read_csv(root / "models" / "pretrain-run" / "metrics" / "rescored.csv")
    at = {row.run: row for row in r[(r.step == 4000) & (r.ddim_steps == 250)].itertuples()}
    trunk, deep = at["trunk"], at["variant deep_2"]
    text = " ".join((root / "docs" / "pretrained.md").read_text().split())
    assert f"step 4,000 of the trunk reads FID {trunk.fid:.1f} and of `deep_2` {deep.fid:.1f}" in text
    assert f"leads by {100 * (1 - deep.fid / trunk.fid):.0f}%" in text and deep.fid < 0.9 * trunk.fid


def test_the_docs_account_of_deep_2_against_v4_is_read_back_from_the_candidates_cards():
    """deep_2 at 8,000 (and its cool-down) was judged beside v4 by the declared rule and not shipped: the docs'
    figures come from the candidates' cards and rescored.csv, and the rule's verdict follows from them."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = root / "models" / "pretrain-run"
    text = " ".join((root / "docs" / "pretrained.md").read_text().split())
    r = pd.read_csv(run / "metrics" / "rescored.csv")
    d8 = r[(r.run == "variant deep_2") & (r.step == 8000) & (r.ddim_steps == 250)].iloc[-1]
    v4 = pd.read_csv(run / "metrics" / "pretrain_sampler_steps.csv").set_index("ddim_steps")
    assert f"step 8,000, where it reads FID {d8.fid:.1f} at 250 steps, below v4's {v4.fid[250]:.1f}" in text
    assert d8.fid < v4.fid[250]
    cards = {name: json.loads((run / "candidates" / name / "card.json").read_text())["versions"]["models"]
             for name in ("deep_2-8000", "deep_2-8000+1000")}
    m8, m9 = cards["deep_2-8000"], cards["deep_2-8000+1000"]
    assert (f"At step 8,000 it read FID {m8['this model']['fid']:.1f} against v4's {m8['previous']['fid']:.1f} "
            f"(recall {m8['this model']['recall']:.3f} against {m8['previous']['recall']:.3f})") in text
    assert f"its cool-down 8000+1000 (`hdlib.pretrain.cooldown --variant deep_2`) {m9['this model']['fid']:.1f}" in text
    shipped = json.loads((root / "models" / "demo-pool" / "card.json").read_text())
    for m in (m8, m9):  # the rule: more than 5% lower FID and recall at most 0.02 lower; neither met it
        # v4, judged alike (re-sampled with its seeds on this CPU: float sums differ in the 5th digit)
        assert m["previous"]["fid"] == pytest.approx(shipped["versions"]["models"]["this model"]["fid"], rel=1e-3)
        assert not (m["this model"]["fid"] < 0.95 * m["previous"]["fid"]
                    and m["this model"]["recall"] >= m["previous"]["recall"] - 0.02)


def test_what_would_reach_the_targets_is_read_back_from_the_measured_rows():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = root / "models" / "pretrain-run"
    text = " ".join((root / "docs" / "pretrained.md").read_text().split())
    v4 = pd.read_csv(run / "metrics" / "pretrain_sampler_steps.csv").set_index("ddim_steps")
    assert (f"at 250 DDIM steps v4 reads recall {v4.recall[250]:.3f}, precision {v4.precision[250]:.3f} and "
            f"mixture TV {v4.mixture_tv[250]:.3f} (targets 0.85, 0.80, 0.15") in text
    assert v4.recall[250] < 0.85 and v4.precision[250] < 0.80 and v4.mixture_tv[250] > 0.15  # "without reaching one"
    shares = list(v4.share_LYM) + [json.loads((run / "candidates" / n / "card.json").read_text())["versions"]["models"]
                                   ["this model"]["share_LYM"] for n in ("deep_2-8000", "deep_2-8000+1000")]
    assert f"stay at {min(shares):.1%}-{max(shares):.1%} of the samples (real 10%)" in text
