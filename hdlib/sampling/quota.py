"""Synthetic sets with exact per-class quotas, filtered, on disk, resumable.

`fill_quota`: generate candidates in rounds until every class has its quota of accepted
  images or reached the cap; keep the first `quota` in the selection order; PNGs +
  manifest.csv; resumes after a kill at the last finished round.

Selection across rounds (`hdlib.filtering.selection_order`): the order is computed once,
after the last round, over ALL accepted candidates of a class from every round, so it never
depends on how the candidates were split into rounds (or on a kill and resume):
  closest  by distance to the class centroid, ties by candidate index (the paper's);
  random   by a key that depends only on (seed, class, candidate index) (`random_keys`);
  diverse  greedy farthest-point order (for the first `quota` picks) over the judge's
           L2-normalised features, which are stored per round in features-rNNNN.npz next
           to the PNGs (written before the round's manifest, so a resumed run finds them)
           and read back at the end. The greedy order is not prefix-stable across rounds
           (a new candidate can come first), hence the one computation over all of them.
Used by stage 04 and by `hdlib.export` (`python -m hdlib export` / `augment`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..io import atomic_path, atomic_write_csv, atomic_write_json, files_sha1
from ..parallel.progress import Progress
from .filtering import check_selection, selection_order


def _save_features(path: Path, labels, index, features) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, label=np.asarray(labels, dtype=np.int64), index=np.asarray(index, dtype=np.int64),
                 features=np.asarray(features, dtype=np.float64))


def _load_features(folder: Path, rounds) -> dict:
    """{(label, index): feature row} from the stored rounds."""
    out = {}
    for r in sorted(set(rounds)):
        with np.load(folder / f"features-r{r:04d}.npz") as z:
            for y, k, f in zip(z["label"], z["index"], z["features"]):
                out[(int(y), int(k))] = f
    return out


def fill_quota(folder: str | Path, classes: Sequence[str], quota, sample: Callable, seeds_of: Callable,
               request: dict, judge=None, cap_factor: float = 4.0, meta: dict | None = None,
               selection: str | None = None, seed: int | None = None) -> pd.DataFrame:
    """Fill a per-class `quota` of kept images in `folder` (PNGs + manifest.csv + request.json).

    sample(labels, seeds) -> uint8 images; seeds_of(class, start, n) -> the seeds of candidates
    start..start+n of a class (candidate k of a class always gets the same seed). With a
    `judge` (FeatureFilter) candidates come in rounds, each sized by the acceptance seen so
    far, until each class has its quota of accepted images or cap_factor x quota candidates;
    the first `quota` accepted images in the `selection` order are kept and `rank` is that
    order (0 = first choice; module docstring). selection / seed default to the judge's
    (`FeatureFilter.selection` / `.seed`), else "closest" / 0; "diverse" needs a judge that
    takes return_features=True. Without a judge, exactly the quota is generated and kept
    (ranked by index; selection does not apply). A shortfall is recorded (fewer `kept` than
    `quota`), never hidden. A different `request` (a non-default selection or its seed is
    part of it) starts over; the same one resumes after the last round."""
    folder, K = Path(folder), len(classes)
    quota = np.broadcast_to(np.asarray(quota, dtype=np.int64), (K,)).copy()
    selection = check_selection(selection if selection is not None else getattr(judge, "selection", "closest"))
    seed = int(seed if seed is not None else getattr(judge, "seed", 0))
    ranked = judge is not None and selection != "closest"  # closest: the request and files stay as before
    request = json.loads(json.dumps({**request, "quota": quota.tolist(), "cap_factor": cap_factor,
                                     "filtered": judge is not None,
                                     **({"selection": selection, "selection_seed": seed} if ranked else {})},
                                    default=str))
    diverse = judge is not None and selection == "diverse"
    manifest_path, request_path = folder / "manifest.csv", folder / "request.json"
    rows, complete = _resume_or_start(folder, request)
    if complete:
        return pd.DataFrame(rows)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(request_path, {"request": request, "complete": False})
    cap = np.maximum(np.ceil(quota * (cap_factor if judge is not None else 1.0)), quota).astype(np.int64)
    _fill_rounds(folder, classes, quota, cap, sample, seeds_of, judge, diverse, meta, rows)
    df = _keep_per_class(pd.DataFrame(rows), quota, judge, selection, seed, diverse, folder)
    atomic_write_csv(df, manifest_path)
    atomic_write_json(request_path, {"request": request, "complete": True, "content_key": files_sha1([manifest_path])})
    return df


def _resume_or_start(folder: Path, request: dict) -> tuple[list[dict], bool]:
    """(the rows of earlier rounds of the same request, whether it is complete); another request, or
    none, starts over (old PNGs removed so nothing stale is read)."""
    manifest_path, request_path = folder / "manifest.csv", folder / "request.json"
    if request_path.exists() and json.loads(request_path.read_text()).get("request") == request:
        rows = pd.read_csv(manifest_path).to_dict("records") if manifest_path.exists() else []
        return rows, bool(json.loads(request_path.read_text()).get("complete"))
    for old in [*folder.glob("*.png"), *folder.glob("features-r*.npz")]:
        old.unlink()
    manifest_path.unlink(missing_ok=True)
    return [], False


def _counts(rows, K: int, key=None) -> np.ndarray:
    out = np.zeros(K, dtype=np.int64)
    for r in rows:
        if key is None or r[key]:
            out[int(r["label"])] += 1
    return out


def _fill_rounds(folder, classes, quota, cap, sample, seeds_of, judge, diverse, meta, rows) -> None:
    """Rounds of candidates, each sized by the acceptance seen so far, until every class has its quota of
    accepted images or its cap of candidates; `rows` grows by one row per candidate, and the manifest is
    written after each round (a killed run resumes after it)."""
    K = len(classes)
    round_no = max([int(r["round"]) for r in rows], default=-1) + 1
    channel = Progress(f"{folder.name}: images accepted", int(quota.sum()), "images",
                       start=int(np.minimum(_counts(rows, K, "accepted"), quota).sum()))
    while True:
        made, accepted = _counts(rows, K), _counts(rows, K, "accepted")
        channel.set(int(np.minimum(accepted, quota).sum()))
        short = (accepted < quota) & (made < cap)
        if not short.any():
            return
        # ask for what is missing, scaled by the acceptance seen so far (at least half a quota)
        rate = np.where(made > 0, np.maximum(accepted / np.maximum(made, 1), 0.2), 1.0 if judge is None else 0.5)
        want = np.where(short, np.ceil((quota - accepted) / rate), 0).astype(np.int64)
        want = np.minimum(np.maximum(want, np.where(short, np.ceil(quota / 2), 0).astype(np.int64)), cap - made)
        labels = np.repeat(np.arange(K), want)
        index = np.concatenate([made[c] + np.arange(want[c]) for c in range(K)]).astype(np.int64)
        seeds = np.concatenate([np.asarray(seeds_of(c, int(made[c]), int(want[c])), dtype=np.int64)
                                for c in range(K)])
        images = sample(labels, seeds)
        verdict = judge(images, torch.as_tensor(labels)) if judge is not None and not diverse else None
        if diverse:
            verdict, feats = judge(images, torch.as_tensor(labels), return_features=True)
            _save_features(folder / f"features-r{round_no:04d}.npz", labels, index, feats)
        rows += _round_rows(folder, classes, images, labels, index, seeds, round_no, verdict, meta)
        atomic_write_csv(pd.DataFrame(rows), folder / "manifest.csv")  # a killed run resumes after this round
        round_no += 1


def _round_rows(folder, classes, images, labels, index, seeds, round_no, verdict, meta) -> list[dict]:
    """Write one round's candidates as PNGs; their manifest rows (the filter's verdict, or kept)."""
    from PIL import Image

    rows = []
    for i, (img, y, k, sd) in enumerate(zip(images, labels, index, seeds)):
        fname = f"{classes[y]}_{k:05d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / fname)
        row = {"path": str(folder / fname), "key": "", "label": int(y), "class_name": classes[y],
               "index": int(k), "seed": int(sd), "round": round_no, **(meta or {})}
        if verdict is not None:
            row.update({c: (v.item() if hasattr(v, "item") else v) for c, v in verdict.iloc[i].items()})
        else:
            row.update({"accepted": True, "reason": "kept", "distance": np.nan, "confidence": np.nan,
                        "nn_distance": np.nan, "nn_train_index": -1, "near_copy": False})
        rows.append(row)
    return rows


def _keep_per_class(df: pd.DataFrame, quota, judge, selection: str, seed: int, diverse: bool,
                    folder: Path) -> pd.DataFrame:
    """The first `quota` accepted candidates of each class in the selection order are kept; `rank` is
    that order (0 = first choice) and `decision` says what happened to every candidate."""
    df["kept"], df["rank"] = False, -1
    feats = _load_features(folder, df["round"]) if diverse and len(df) else {}
    for c in range(len(quota)):
        acc = df[(df["label"] == c) & df["accepted"]]
        if judge is None:
            order = acc.sort_values("index").index
        elif selection == "closest":
            order = acc.sort_values(["distance", "index"]).index
        else:
            f = np.stack([feats[(c, int(k))] for k in acc["index"]]) if diverse and len(acc) else None
            order = acc.index[selection_order(acc["distance"].to_numpy(), selection, index=acc["index"].to_numpy(),
                                              features=f, label=c, seed=seed, limit=int(quota[c]))]
        df.loc[order, "rank"] = np.arange(len(order))
        df.loc[order[:quota[c]], "kept"] = True
    df["decision"] = np.where(df["kept"], "kept", np.where(df["accepted"], "over_quota", df["reason"]))
    return df.sort_values(["label", "index"]).reset_index(drop=True)
