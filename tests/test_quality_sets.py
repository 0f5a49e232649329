"""Stage 06's sets: a filtered set that kept no image of some class is compared on the classes every set
holds (never silently dropped), and a KID within noise of 0 is marked as such."""

import pandas as pd

from hdlib.config import load_config
from hdlib.paths import StudyPaths, synthetic_set_name
from hdlib.stages.quality import quality_sets, shared_class_sets
from hdlib.stages.report import _fid_rows


def _write_set(cfg, generator, per_class_kept, per_class_candidates=6):
    rows, i = [], 0
    for label, kept in enumerate(per_class_kept):
        for j in range(per_class_candidates):
            rows.append({"index": i, "label": label, "kept": j < kept, "rank": j if j < kept else -1})
            i += 1
    f, d = min(cfg.downstream.fractions), cfg.downstream.seeds[0]
    folder = StudyPaths(cfg).synthetic(synthetic_set_name(generator, f, d))
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)


def test_a_filtered_set_missing_a_class_is_compared_on_the_shared_classes(tmp_path):
    cfg = load_config(None, [f"study.results_root={tmp_path}", "data.classes=[A, B, C]", "quality.samples_per_class=5"])
    _write_set(cfg, "histodiffusion", [3, 0, 4])  # the filter kept no B; unfiltered: every candidate
    full, n = quality_sets(cfg)
    assert set(full) == {"histodiffusion_unfiltered"} and n == 5  # the old view: the filtered set is left out
    shared, n_shared, classes, lacking = shared_class_sets(cfg)
    assert set(shared) == {"histodiffusion", "histodiffusion_unfiltered"} and classes == [0, 2] and n_shared == 3
    assert lacking == {"histodiffusion": ["B"], "histodiffusion_unfiltered": []}
    assert all(sorted(f["label"].unique()) == [0, 2] and len(f) == 6 for f in shared.values())
    assert shared["histodiffusion"]["kept"].all()  # kept images only, best-ranked first


def test_the_chain_reads_fid_from_the_shared_classes_when_the_filtered_set_lacks_one():
    d6 = {"overall": [{"set": "histodiffusion_unfiltered", "fid": 9.0}],
          "overall_shared_classes": [{"set": "histodiffusion", "fid": 12.34}, {"set": "scratch", "fid": 20.0}],
          "shared_classes": ["A", "C"]}
    assert _fid_rows(d6) == [("| FID, HistoDiffusion's kept images vs the other sets (equal-size sets on the 2 "
                              "classes every set holds) | 12.3; from scratch 20.0 | below from scratch and the "
                              "unfiltered candidates; real validation images are the floor |")]
    d6["overall"] += [{"set": "histodiffusion", "fid": 5.0}, {"set": "real (val)", "fid": 1.5}]
    row = _fid_rows(d6)[0]  # no from-scratch set (not in the grid): said so, never "vs None"
    assert "(equal-size sets) | 5.0; from scratch not in this study's grid; unfiltered candidates 9.0; real " \
           "validation images 1.5 |" in row and "None" not in row
