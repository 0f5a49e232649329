"""Run a study: execute notebooks/NN_*.ipynb in order with papermill into
results/<study>/, skipping stages whose inputs are unchanged.

A stage's fingerprint hashes the config keys its module declares it reads (hdlib.tools.stage_inputs),
its notebook and the fingerprint of the stage before it, so changing `downstream.*` re-runs only
the stages that read it and everything after them. A stage whose inputs are unchanged but whose
hdlib code changed stops the run with a one-line message (--force recomputes, --accept-code keeps).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import papermill as pm
from jupyter_client.manager import AsyncKernelManager
from traitlets import default

from ..config import Config, load_config, resolve_device
from ..config_reads import ENV as RECORD_READS_ENV
from ..errors import HDLibError
from ..io import atomic_write_json
from ..models.pretrained import (
    check_compatible,
    check_init_vae,
    check_objective,
    file_hashes,
    folder_sha256,
    verify,
)
from ..parallel.progress import ENV as PROGRESS_ENV
from ..parallel.progress import ProgressView
from ..paths import REPO_ROOT
from ..study.context import QUIET_ENV
from .stage_inputs import changed_modules, code_key, config_values, declared_reads


class StageFailed(HDLibError):
    pass


class IPCKernelManager(AsyncKernelManager):
    """The stage kernel talks to papermill over local IPC sockets in a private temporary
    folder, not TCP (so ipykernel has no unencrypted-TCP warning to print)."""

    @default("transport")
    def _default_transport(self):
        return "ipc"

    @default("ip")
    def _default_ip(self):
        return tempfile.mkdtemp(prefix="hdlib-kernel-") + "/kernel"


@dataclass
class Stage:
    name: str
    notebook: Path


def discover_stages(notebooks_dir: Path | None = None) -> list[Stage]:
    nb_dir = Path(notebooks_dir or REPO_ROOT / "notebooks")
    stages = [Stage(p.stem, p) for p in sorted(nb_dir.glob("[0-9][0-9]_*.ipynb"))]
    if not stages:
        raise HDLibError(f"{nb_dir}: no stage notebooks (NN_*.ipynb) found")
    return stages


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def stage_fingerprints(cfg: Config, stages: list[Stage]) -> dict[str, str]:
    """Per stage: its declared config keys' values (hdlib.tools.stage_inputs), its notebook, the fingerprint of
    the stage before it, and for stage 01 the weights it starts from."""
    prev = ""
    out = {}
    for st in stages:
        blob = json.dumps({
            "config": config_values(cfg, declared_reads(st.name)["config"]),
            "notebook": _sha1(st.notebook.read_bytes()),
            # a different pre-trained model (same path, new weights) changes everything downstream
            "pretrained": _pretrained_key(cfg) if st.name == "01_autoencoder" else "",
            "previous": prev,
        }, sort_keys=True, default=str)
        prev = out[st.name] = _sha1(blob.encode())[:16]
    return out


class StageCodeChanged(HDLibError):
    pass


def code_verdict(st: Stage, done: dict, code: dict, out_dir: Path, accept_code: bool) -> str:
    """'same', or 'accepted' (the marker now records this code), or a one-line StageCodeChanged naming
    the stage, what changed and the two ways on."""
    if done.get("code") == code["key"]:
        return "same"
    if accept_code:
        return "accepted"
    changed = changed_modules(done.get("code_modules"), code["modules"]) if done.get("code_modules") else []
    what = (f"other hdlib code (changed: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})" if changed
            else "code this results folder does not record")
    raise StageCodeChanged(f"{out_dir}: stage {st.name} was made by {what}; --force recomputes it and every stage "
                           "after it, --accept-code keeps the results as they are and records the current code")


def _pretrained_key(cfg: Config) -> str:
    """The content of the weights stage 01 starts from: the pre-trained model, or the vae that
    autoencoder.init_from fine-tunes (same path, new weights: a new fingerprint)."""

    if cfg.pretrained.path:
        return folder_sha256(cfg.pretrained.path)
    if cfg.autoencoder.init_from:
        vae = {k: v for k, v in file_hashes(cfg.autoencoder.init_from).items() if k.startswith("vae/")}
        return "init_from:" + _sha1(json.dumps(vae, sort_keys=True).encode())
    return ""


def _notebook_path_param(params_file: str | Path) -> str:
    """The params path as the notebook will see it: relative to the repository root when it
    lies inside it, so executed notebooks carry no machine-specific absolute path."""
    p = Path(params_file).resolve()
    try:
        return str(p.relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


def scrub_notebook(path: Path) -> None:
    """Keep an executed notebook readable and portable: drop progress-bar fragments from
    stderr streams (bars belong in the terminal) and write paths inside the repository
    relative to it."""
    nb = nbformat.read(str(path), as_version=4)
    root = str(REPO_ROOT) + os.sep
    bar = re.compile(r"\r|\d+%\|[^|]*\|")

    def rel(text: str) -> str:
        return text.replace(root, "").replace(str(Path.home()) + os.sep, "~" + os.sep)

    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                if out.get("name") == "stderr":
                    lines = [ln for ln in out["text"].split("\n") if ln.strip() and not bar.search(ln)]
                    if not lines:
                        continue
                    out["text"] = rel("\n".join(lines) + "\n")
                else:
                    out["text"] = rel(out["text"])
            elif out.get("output_type") in ("execute_result", "display_data", "error"):
                data = out.get("data", {})
                for mime in ("text/plain", "text/markdown", "text/html"):
                    if isinstance(data.get(mime), str):
                        data[mime] = rel(data[mime])
                if out.get("output_type") == "error":
                    out["traceback"] = [rel(t) for t in out.get("traceback", [])]
            kept.append(out)
        cell["outputs"] = kept
    meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):  # papermill records the machine's absolute paths here
        if meta.get(key):
            meta[key] = Path(meta[key]).name
    nbformat.write(nb, str(path))


def _select(stages: list[Stage], only: str | None, start: str | None) -> list[Stage]:
    names = [s.name for s in stages]

    def find(key: str, flag: str) -> int:
        hits = [i for i, n in enumerate(names) if n == key or n.startswith(key) or n.split("_", 1)[1] == key]
        if not hits:
            raise HDLibError(f"{flag} {key}: no such stage (stages: {', '.join(names)})")
        return hits[0]

    if only:
        return [stages[find(only, "--only")]]
    if start:
        return stages[find(start, "--from"):]
    return stages


def machine_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU a stage ran on, as a replicate is named: the model name, the cores and the native-bf16 flags
    (bf16 autocast rounds differently where it is native: another CPU is another draw)."""
    fields = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in fields.get("flags", "").split()]
    return f"{name}, {os.cpu_count()} cores, native bf16: {' '.join(native) or 'no'}"


def provenance(cfg: Config) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""

    from importlib.metadata import PackageNotFoundError, version

    pkgs = {}
    for name in ("torch", "torchvision", "diffusers", "timm", "accelerate", "torchmetrics", "papermill",
                 "scikit-learn", "numpy", "pandas", "matplotlib", "seaborn"):
        try:
            pkgs[name] = version(name)
        except PackageNotFoundError:
            pkgs[name] = None
    manifests = {}
    man_dir = cfg.results_dir / "manifests"
    if man_dir.is_dir():
        manifests = {p.name: _sha1(p.read_bytes()) for p in sorted(man_dir.glob("*.csv"))}
    return {
        "params": cfg.to_dict(),
        "git_commit": git("rev-parse", "HEAD"),
        # the code's state: the study folders are tracked too and are being written right now
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": machine_description(),
        "packages": pkgs,
        "data_manifests_sha1": manifests,
    }


def _failing_cell_error(exc: Exception) -> str:
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    return f"{ename}: {evalue}".strip()


def _check_before_compute(cfg) -> None:
    """What can fail before any stage runs: the device, the pre-trained model or the initial autoencoder."""
    resolve_device(cfg.study.device)  # a GPU study on a machine without a usable GPU fails here, not in stage 01
    if cfg.pretrained.path:  # a wrong or mismatched pre-trained model fails here, not mid-study
        verify(cfg.pretrained.path, cfg.pretrained.sha256)
        check_compatible(cfg.pretrained.path, cfg.data.image_size)
        if set(cfg.diffusion.adaptations) - {"none"}:  # it will be fine-tuned: with its own objective
            check_objective(cfg.pretrained.path, cfg.diffusion)
    elif cfg.autoencoder.init_from:
        check_init_vae(cfg.autoencoder.init_from, cfg.data.image_size)


DATA_STAGE = "00_data"


def missing_data(out_dir: Path) -> str | None:
    """The first file a results folder's manifests list that is not on this machine, or None. A fresh clone
    holds a study's committed manifests but not the demo images they name (data/ is built, not committed)."""
    import csv

    for manifest in sorted((Path(out_dir) / "manifests").glob("*.csv")):
        with open(manifest, newline="") as fh:
            for path in dict.fromkeys(row["path"] for row in csv.DictReader(fh) if row.get("path")):
                if not (REPO_ROOT / path).exists() and not Path(path).exists():
                    return path
    return None


def _manifests_sha1(out_dir: Path) -> dict:
    return {p.name: _sha1(p.read_bytes()) for p in sorted((out_dir / "manifests").glob("*.csv"))}


def _skip_if_current(st, marker: Path, done: dict, fingerprint: str, code: dict, out_dir: Path, accept_code: bool,
                     log, head: str) -> bool:
    """True when the stage's inputs are unchanged and its notebook exists (its code is checked and, with
    `accept_code`, recorded); a changed code key stops the run (code_verdict)."""
    if done.get("fingerprint") != fingerprint or not (out_dir / f"{st.name}.ipynb").exists():
        return False
    if code_verdict(st, done, code, out_dir, accept_code) == "accepted":
        atomic_write_json(marker, {**done, "code": code["key"], "code_modules": code["modules"],
                                   "code_accepted": time.strftime("%Y-%m-%dT%H:%M:%S")})
        log(f"{head}: unchanged, skipped (current code recorded)")
    else:
        log(f"{head}: unchanged, skipped")
    return True


def _execute_stage(st, params_file, overrides, out_dir: Path, head: str, record_reads, on_progress) -> None:
    """Runs one stage's notebook into out_dir with a live progress line; a failing cell leaves
    <stage>.failed.ipynb and raises StageFailed naming it."""
    tmp, marker = out_dir / f".{st.name}.running.ipynb", out_dir / "stages" / f"{st.name}.json"
    os.environ[QUIET_ENV] = "1"  # the kernel inherits it: no progress bars inside the notebook
    if record_reads is not None:
        Path(record_reads).mkdir(parents=True, exist_ok=True)
        (Path(record_reads) / f"{st.name}.txt").unlink(missing_ok=True)
        os.environ[RECORD_READS_ENV] = str(Path(record_reads) / f"{st.name}.txt")
    channel = Path(tempfile.mkdtemp(prefix="hdlib-progress-")) / "events.jsonl"
    os.environ[PROGRESS_ENV] = str(channel)
    try:
        with ProgressView(channel, head,
                          on_event=(lambda e, name=st.name: on_progress(name, e)) if on_progress else None):
            pm.execute_notebook(
                str(st.notebook), str(tmp),
                parameters={"params_file": _notebook_path_param(params_file), "overrides": list(overrides)},
                cwd=str(REPO_ROOT), kernel_name="python3", progress_bar=False, log_output=False,
                kernel_manager_class=IPCKernelManager,
            )
        scrub_notebook(tmp)
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's error
        failed = out_dir / f"{st.name}.failed.ipynb"
        if tmp.exists():
            os.replace(tmp, failed)
        marker.unlink(missing_ok=True)
        raise StageFailed(f"stage {st.name} failed: {_failing_cell_error(exc)} (see {failed})") from None
    finally:
        os.environ.pop(RECORD_READS_ENV, None)
        os.environ.pop(PROGRESS_ENV, None)
        shutil.rmtree(channel.parent, ignore_errors=True)
    os.replace(tmp, out_dir / f"{st.name}.ipynb")
    (out_dir / f"{st.name}.failed.ipynb").unlink(missing_ok=True)


def run_study(params_file: str | Path, overrides: list[str] = (), only: str | None = None,
              start: str | None = None, force: bool = False, notebooks_dir: Path | None = None,
              log=print, accept_code: bool = False, record_reads: Path | None = None,
              on_progress=None) -> dict:
    """Execute the study's stages; returns {stage: "ran" | "skipped"}. A stage whose inputs are unchanged
    but whose code changed stops the run with a one-line StageCodeChanged (`accept_code` records the
    current code instead). `record_reads`: a folder for each stage's recorded config reads
    (<stage>.txt; hdlib.config_reads). While a stage runs, its kernel's progress (hdlib.parallel.progress) is a
    live line on stderr, and each event also goes to `on_progress(stage, event)` when given."""
    cfg = load_config(params_file, list(overrides))  # validates before any compute
    _check_before_compute(cfg)
    stages = discover_stages(notebooks_dir)
    prints = stage_fingerprints(cfg, stages)
    selected = _select(stages, only, start)
    out_dir = cfg.results_dir
    (out_dir / "stages").mkdir(parents=True, exist_ok=True)
    timings_path, memory_path = out_dir / "stages" / "timings.json", out_dir / "stages" / "peak_memory_mb.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    memory = json.loads(memory_path.read_text()) if memory_path.exists() else {}
    status = {}
    commit = provenance(cfg)["git_commit"]
    log(f"study {cfg.study.name}: {len(selected)} stage(s) -> {out_dir}")
    forced = force or bool(only) or bool(start)
    for i, st in enumerate(selected, 1):
        marker, head = out_dir / "stages" / f"{st.name}.json", f"[{i}/{len(selected)}] {st.name}"
        done = json.loads(marker.read_text()) if marker.exists() else {}
        code = code_key(st.name)
        rebuild = not forced and st.name == DATA_STAGE and missing_data(out_dir)
        if rebuild:  # its results are current, its images absent: build them again (deterministic)
            log(f"{head}: unchanged, but {rebuild} (listed in its manifests) is not on this machine: running it")
            before = _manifests_sha1(out_dir)
        elif not forced and _skip_if_current(st, marker, done, prints[st.name], code, out_dir, accept_code, log, head):
            status[st.name] = "skipped"
            continue
        log(f"{head}: running ...")
        t0 = time.time()
        _execute_stage(st, params_file, overrides, out_dir, head, record_reads, on_progress)
        elapsed = time.time() - t0
        timings[st.name] = round(elapsed, 1)
        # Peak resident memory of any finished child (the kernel and its grid workers), so far.
        memory[st.name] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        atomic_write_json(marker, {"fingerprint": prints[st.name], "seconds": round(elapsed, 1),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "git_commit": commit,
                                   "machine": machine_description(),
                                   "code": code["key"], "code_modules": code["modules"]})
        atomic_write_json(timings_path, timings)
        atomic_write_json(memory_path, memory)
        log(f"{head}: done in {elapsed:.0f} s")
        status[st.name] = "ran"
        # a stage that ran may change what every later stage reads; data rebuilt into the same manifests does not
        forced = forced or not (rebuild and _manifests_sha1(out_dir) == before)
    markers = {st.name: json.loads((out_dir / "stages" / f"{st.name}.json").read_text())
               for st in stages if (out_dir / "stages" / f"{st.name}.json").exists()}
    atomic_write_json(out_dir / "provenance.json", {**provenance(cfg), "stage_seconds": timings,
                                                      "peak_memory_mb": memory,
                                                      # which commit ran each stage (absent: written before this was recorded)
                                                      "stage_commits": {k: v.get("git_commit") for k, v in markers.items()},
                                                      # which CPU ran each stage (absent: run before this was recorded)
                                                      "stage_machines": {k: v.get("machine") for k, v in markers.items()}})
    return status
