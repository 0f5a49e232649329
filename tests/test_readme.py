"""README.md is a short front door whose links resolve and whose results block is the generated one.

These tests check structure only (size, links, the generated block, the two commands); they never pin
README prose."""

import re
from pathlib import Path

import pytest

from hdlib.tools.readme import README_END, README_START, results_block

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
MAX_README_BYTES = 8192

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target)
HTML_SRC = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    return [README] + sorted((REPO_ROOT / "docs").glob("*.md"))


def relative_targets(text: str) -> list[str]:
    """Every relative link or image target outside code, without its #anchor or ?query."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    out = []
    for target in LINK.findall(text) + HTML_SRC.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")):
            continue  # http:, https:, mailto:, ... or an anchor in the same file
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path:
            out.append(path)
    return out


def test_relative_targets_parser():
    text = ("[a](docs/x.md#sec) ![b](img/y.png \"title\") [c](https://e.org) [d](#top) <img src=\"z.png\">\n"
            "`[e](in/span.md)`\n```\n[f](in/fence.md)\n```\n")
    assert relative_targets(text) == ["docs/x.md", "img/y.png", "z.png"]


def test_readme_is_at_most_8_kib():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move material to docs/ (limit {MAX_README_BYTES})"


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_point_to_existing_files(md):
    missing = [t for t in relative_targets(md.read_text()) if not (md.parent / t).exists()]
    assert not missing, f"{md.relative_to(REPO_ROOT)} links to missing paths: {missing}"


def test_readme_results_block_is_the_generated_one():
    study = REPO_ROOT / "results" / "default"
    if not (study / "README_block.md").exists():
        pytest.skip("results/default/README_block.md has not been produced (run the default study's stage 07)")
    text = README.read_text()
    assert text.count(README_START) == 1 and text.count(README_END) == 1, "README needs exactly one results block"
    block = text[text.index(README_START):text.index(README_END) + len(README_END)]
    assert block == results_block(study), "README results are stale: run `python -m hdlib readme params/default.yaml`"


def test_readme_has_results_markers():
    text = README.read_text()
    assert README_START in text and README_END in text
    assert text.index(README_START) < text.index(README_END)


def test_readme_names_the_two_commands():
    text = README.read_text()
    for command in ("make study", "make test"):
        assert command in text, f"README.md does not mention `{command}`"


def test_the_readmes_numbers_outside_the_generated_block_are_read_back_from_what_they_describe():
    """Claims typed into the README's prose must say what the committed runs measured: the ablation study's
    label counts and seeds, and the shipped model's pool size."""
    import json

    text = README.read_text()
    ablations = REPO_ROOT / "results" / "ablations" / "metrics" / "05_downstream.json"
    m = re.search(r"Ablations \(`params/ablations\.yaml`; (\d+) and (\d+) labels/class, (\d+) seeds\)", text)
    assert m, "the README's ablations line changed its form: update this test with it"
    if ablations.exists():
        d5 = json.loads(ablations.read_text())
        assert sorted(v["total"] for v in d5["labels_per_class"].values()) == [int(m[1]), int(m[2])]
        assert {r["n"] for r in d5["accuracy"]} == {int(m[3])}
    pool = re.search(r"pre-trained on a ([\d,]+)-tile demo pool", text)
    card = json.loads((REPO_ROOT / "models" / "demo-pool" / "card.json").read_text())
    assert pool and int(pool[1].replace(",", "")) == sum(card["data"]["pool_sources"].values())


def test_the_ablation_folders_the_readme_says_are_on_v4_were_made_with_the_shipped_pin():
    """'on v4 of the model' in the README's ablations line: every ablation folder it links was run with the
    pin of models/demo-pool that params/default.yaml ships (they were once left on v3 while the line said so)."""
    import json

    import yaml

    text = README.read_text()
    if "3 seeds), on v4 of the model" not in text:
        pytest.skip("the README makes no model-version claim for the ablations")
    pin = yaml.safe_load((REPO_ROOT / "params" / "default.yaml").read_text())["pretrained"]["sha256"]
    for name in ("ablations", "ablations_random", "ablations_diverse"):
        made = json.loads((REPO_ROOT / "results" / name / "config.json").read_text())["pretrained"]
        assert made["path"] == "models/demo-pool" and made["sha256"] == pin, name


def test_the_limitations_numbers_are_read_back_from_what_they_describe():
    """docs/limitations.md's figures come from the committed default study and the shipped model's card (its
    '0% lymphocyte tiles' and 'MDD 3.1' once outlived the runs that measured them)."""
    import json

    text = (REPO_ROOT / "docs" / "limitations.md").read_text()
    card = json.loads((REPO_ROOT / "models" / "demo-pool" / "card.json").read_text())
    text = " ".join(text.split())  # lines wrap anywhere
    lym = re.search(r"draws too few lymphocyte tiles\*\*: (\d+)% of its samples against (\d+)% of real tiles", text)
    assert lym, "the lymphocyte line changed its form: update this test with it"
    v = card["versions"]
    assert (int(lym[1]), int(lym[2])) == (round(100 * v["models"]["this model"]["share_LYM"]),
                                          round(100 * v["real_shares"]["LYM"]))
    power = json.loads((REPO_ROOT / "results" / "default" / "metrics" / "05_downstream.json").read_text())["power"]
    mdd = re.search(r"detect \(80% power\) only differences of about ([\d.]+) points", text)
    seeds = re.search(r"1\.5 points would need about (\d+) seeds", text)
    assert mdd and seeds, "the power line changed its form: update this test with it"
    assert float(mdd[1]) == round(power["mdd_points"], 1) and power["n_seeds"] == 10
    assert int(seeds[1]) == next(t["seeds"] for t in power["targets"] if t["mdd_points"] == 1.5)


def test_the_readme_says_which_adaptation_objective_the_ablation_folders_were_made_with():
    """The ablation folders say 'adapted with its former objective' exactly while their recorded objective
    differs from params/ablations.yaml's (v4's own since the adaptation was found to train v4 with another)."""
    import json

    import yaml

    said = "adapted with its former" in README.read_text()
    params = yaml.safe_load((REPO_ROOT / "params" / "ablations.yaml").read_text())["diffusion"]
    for name in ("ablations", "ablations_random", "ablations_diverse"):
        made = json.loads((REPO_ROOT / "results" / name / "config.json").read_text())["diffusion"]
        former = (made["loss"], made["timestep_sampling"]) != (params["loss"], params["timestep_sampling"])
        assert former == said, name


def test_the_filter_choices_the_limitations_say_were_compared_kept_what_they_say():
    """'The filter's choices are compared at 2 and 8 labels per class ... at 2 ... diverse kept the same ones
    as closest in every draw, so only random differs there': read back from the three folders' grid cells.
    Every other input of a HistoDiffusion cell is the same across them and cells are deterministic, so equal
    test scores in a draw mean equal kept images, and a different score means a different set (at 2 labels
    per class all three once kept the same images while the docs said they were compared)."""
    import json

    text = " ".join((REPO_ROOT / "docs" / "limitations.md").read_text().split())
    said = re.search(r"filter's choices are compared at (\d+) and (\d+) labels per class, with 3 seeds; at (\d+) "
                     r"the filter keeps (\d+)-(\d+) images a draw, and diverse kept the same ones as closest in every "
                     r"draw, so only random differs there", text)
    assert said, "the filter-choice line changed its form: update this test with it"
    small, large = int(said[1]), int(said[2])
    assert int(said[3]) == small
    kept_range = (int(said[4]), int(said[5]))
    report = (REPO_ROOT / "results" / "ablations" / "REPORT.md").read_text()  # "1.25% labels (2/class)"
    labels_at = {float(pct) / 100: int(n) for pct, n in re.findall(r"([\d.]+)% labels \((\d+)/class\)", report)}

    def scores(name: str) -> dict:  # (labels per class, draw) -> test result of the HistoDiffusion cell
        cells = [json.loads(p.read_text())
                 for p in (REPO_ROOT / "results" / name / "grid").glob("*ratio=1.0*training_set=histodiffusion.json")]
        return {(labels_at[c["cell"]["fraction"]], c["cell"]["seed"]):
                json.dumps({**c["result"]["test"], "n_kept": c["result"]["n_synthetic"]}, sort_keys=True) for c in cells}

    closest, random, diverse = (scores(n) for n in ("ablations", "ablations_random", "ablations_diverse"))
    kept = [json.loads(result)["n_kept"] for (labels, _), result in closest.items() if labels == small]
    assert (min(kept), max(kept)) == kept_range, kept
    assert set(closest) == set(random) == set(diverse) and len(closest) == 6, sorted(closest)
    differs = {name: {labels: any(other[k] != closest[k] for k in closest if k[0] == labels) for labels in (small, large)}
               for name, other in (("random", random), ("diverse", diverse))}
    assert differs == {"random": {small: True, large: True}, "diverse": {small: False, large: True}}, differs


def test_the_replicates_the_limitations_compare_are_read_back_from_their_runs():
    """'HistoDiffusion - real-only X points (95% CI [lo, hi], Holm p P, N seeds)' for the committed run, and each
    other run ('X ([lo, hi], Holm p P; its folder is in git at C)') at the commit the line names (read from
    git history; skipped without it)."""
    import json
    import subprocess

    text = " ".join((REPO_ROOT / "docs" / "limitations.md").read_text().split())
    now = re.search(r"HistoDiffusion - real-only ([-+][\d.]+) points \(95% CI \[([-\d.]+), ([-\d.]+)\], Holm p ([\d.]+), "
                    r"(\d+) seeds\)", text)
    others = re.findall(r"([-+][\d.]+) \(\[([-\d.]+), ([-\d.]+)\], Holm p ([\d.]+); its folder is in git at "
                        r"([0-9a-f]{7})\)", text)
    assert now and len(others) == 3, "the replicate line changed its form: update this test with it"

    def said(m, vs_real: dict) -> None:
        assert float(m[1]) == round(100 * vs_real["mean_diff"], 1)
        assert (float(m[2]), float(m[3])) == (round(100 * vs_real["ci_low"], 1), round(100 * vs_real["ci_high"], 1))
        assert float(m[4]) == float(f"{vs_real['p_holm']:.{len(m[4].split('.')[1])}f}")

    committed = json.loads((REPO_ROOT / "results" / "default" / "metrics" / "05_downstream.json").read_text())
    said(now, committed["vs_real"])
    assert int(now[5]) == committed["vs_real"]["n"]
    for other in others:
        m = ("",) + other  # the same groups as `now`, the commit last
        shown = subprocess.run(["git", "show", f"{m[5]}:results/default/metrics/05_downstream.json"], cwd=REPO_ROOT,
                               capture_output=True, text=True)
        if shown.returncode != 0:
            pytest.skip(f"git history without {m[5]} (a shallow clone?)")
        said(m, json.loads(shown.stdout)["vs_real"])


def test_the_ablations_two_replicates_in_the_limitations_are_read_back_from_their_runs():
    """'HistoDiffusion - real-only moved from A points ([lo, hi]; its folder is in git at C) to B ([lo, hi], Holm p P,
    N seeds)': B from the committed results/ablations, A from the folder at commit C (skipped without history)."""
    import json
    import subprocess

    text = " ".join((REPO_ROOT / "docs" / "limitations.md").read_text().split())
    m = re.search(r"real-only moved from ([-+][\d.]+) points \(\[([-\d.]+), ([-\d.]+)\]; its folder is in git at "
                  r"([0-9a-f]{7})\) to ([-+][\d.]+) \(\[([-\d.]+), ([-\d.]+)\], Holm p ([\d.]+), (\d+) seeds\)", text)
    assert m, "the ablations' replicate line changed its form: update this test with it"

    def said(mean, lo, hi, vs_real: dict) -> None:
        assert (float(mean), float(lo), float(hi)) == tuple(round(100 * vs_real[k], 1)
                                                             for k in ("mean_diff", "ci_low", "ci_high"))

    now = json.loads((REPO_ROOT / "results" / "ablations" / "metrics" / "05_downstream.json").read_text())["vs_real"]
    said(m[5], m[6], m[7], now)
    assert float(m[8]) == round(now["p_holm"], 3) and int(m[9]) == now["n"]
    rival = re.search(r"The rival leads HistoDiffusion there by ([\d.]+) points \(\[([-\d.]+), ([-\d.]+)\], Holm p "
                      r"([\d.]+)\)", text)
    assert rival, "the ablations' rival line changed its form: update this test with it"
    vs_rival = json.loads((REPO_ROOT / "results" / "ablations" / "metrics" / "05_downstream.json").read_text())["vs_rival"]
    assert vs_rival["mean_diff"] < 0 and float(rival[1]) == round(-100 * vs_rival["mean_diff"], 1)
    assert (float(rival[2]), float(rival[3])) == (round(-100 * vs_rival["ci_high"], 1), round(-100 * vs_rival["ci_low"], 1))
    assert float(rival[4]) == round(vs_rival["p_holm"], 3)
    shown = subprocess.run(["git", "show", f"{m[4]}:results/ablations/metrics/05_downstream.json"], cwd=REPO_ROOT,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip(f"git history without {m[4]} (a shallow clone?)")
    said(m[1], m[2], m[3], json.loads(shown.stdout)["vs_real"])


def test_the_default_studys_stage_times_in_the_docs_are_its_timings():
    """docs/stages.md's table of the default study's stage seconds, their total and its peak RSS are read back
    from results/default/stages (they once quoted a run the folder no longer held)."""
    import json

    text = (REPO_ROOT / "docs" / "stages.md").read_text()
    stages = REPO_ROOT / "results" / "default" / "stages"
    timings = json.loads((stages / "timings.json").read_text())
    peak = max(json.loads((stages / "peak_memory_mb.json").read_text()).values())
    header = re.search(r"\| stage \|((?: \d\d \|)+)\n\|[-|]+\|\n\| seconds \|((?: [\d,]+ \|)+)", text)
    total = re.search(r"([\d,]+) s for stages 00-(\d\d)", text)
    rss = re.search(r"Peak RSS ([\d,]+) MB", text)
    assert header and total and rss, "the timing table changed its form: update this test with it"
    said = dict(zip(header[1].split("|")[:-1], header[2].split("|")[:-1]))
    by_number = {k[:2]: v for k, v in timings.items()}
    def whole(x: float) -> int:  # half up, as the docs round (982.5 s is 983)
        return int(x + 0.5)

    for number, seconds in said.items():
        assert int(seconds.strip().replace(",", "")) == whole(by_number[number.strip()]), number
    covered = [v for k, v in by_number.items() if k <= total[2]]
    assert int(total[1].replace(",", "")) == whole(sum(covered))
    assert int(rss[1].replace(",", "")) == whole(peak)
