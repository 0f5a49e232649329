"""The papermill runner: stage order, skip when inputs are unchanged, a failed stage
stops the run with its cell's error and leaves earlier outputs intact."""

import json
from pathlib import Path

import nbformat as nbf
import pytest

from hdlib.tools import runner
from hdlib.tools.runner import StageFailed, discover_stages, run_study

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"


def _nb(path: Path, body: str):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbf.v4.new_code_cell('params_file = ""\noverrides = []')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbf.v4.new_code_cell(body)]
    nbf.write(nb, path)


@pytest.fixture
def toy(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    log = tmp_path / "calls.txt"
    common = f'''
from hdlib.config import load_config
cfg = load_config(params_file, overrides)
open({str(log)!r}, "a").write("{{name}} seed=%d\\n" % cfg.study.seed)
'''
    _nb(nbs / "00_data.ipynb", common.replace("{name}", "00"))
    _nb(nbs / "01_autoencoder.ipynb", common.replace("{name}", "01") +
        'if cfg.study.seed == 13:\n    raise ValueError("boom in stage 01")\n')
    return tmp_path, nbs, log


def _run(tmp_path, nbs, *extra, **kw):
    ov = [f"study.results_root={tmp_path / 'results'}", *extra]
    return run_study(SMOKE, ov, notebooks_dir=nbs, log=lambda *_: None, **kw)


def test_discovers_numbered_notebooks_in_numeric_order(tmp_path):
    for name in ["10_late", "02_second", "01_first", "README", "x_03_not_a_stage"]:
        _nb(tmp_path / f"{name}.ipynb", "pass")
    assert [s.name for s in discover_stages(tmp_path)] == ["01_first", "02_second", "10_late"]
    with pytest.raises(Exception, match="no stage notebooks"):
        discover_stages(tmp_path / "missing")


def test_every_notebook_has_its_stage_module():
    """notebooks/NN_<name>.ipynb <-> hdlib/stages/<name>.py, one to one."""
    import importlib
    import pkgutil

    import hdlib.stages

    notebooks = {s.name.split("_", 1)[1] for s in discover_stages()}
    modules = {m.name for m in pkgutil.iter_modules(hdlib.stages.__path__)} - {"common"}
    assert notebooks == modules
    for name in modules:
        importlib.import_module(f"hdlib.stages.{name}")


def test_overrides_accepted_before_or_after_flags():
    from hdlib.__main__ import parse

    args, ov = parse(["run", "params/smoke.yaml", "--only", "00", "study.seed=2"])
    assert args.only == "00" and ov == ["study.seed=2"]
    args, ov = parse(["run", "params/smoke.yaml", "study.seed=2", "--force", "data.val_fraction=0.3"])
    assert args.force and ov == ["study.seed=2", "data.val_fraction=0.3"]
    with pytest.raises(SystemExit):
        parse(["run", "params/smoke.yaml", "--only", "00", "not-an-override"])


def test_executed_notebooks_carry_no_progress_bars_or_machine_paths(tmp_path):
    from hdlib.paths import REPO_ROOT

    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _nb(nbs / "00_data.ipynb", """
import sys
from tqdm import tqdm
from hdlib.paths import REPO_ROOT
for _ in tqdm(range(3), file=sys.stderr):
    pass
print(f"written to {REPO_ROOT}/results/smoke/x.csv")
print("a warning line", file=sys.stderr)
""")
    _run(tmp_path, nbs)
    text = (tmp_path / "results" / "smoke" / "00_data.ipynb").read_text()
    assert str(REPO_ROOT) not in text and "written to results/smoke/x.csv" in text
    assert "it/s" not in text and "100%" not in text
    assert "a warning line" in text
    assert "params/smoke.yaml" in text  # the parameter cell names the params file relative to the repository


def test_skip_unchanged_and_rerun_downstream(toy):
    tmp_path, nbs, log = toy
    assert _run(tmp_path, nbs) == {"00_data": "ran", "01_autoencoder": "ran"}
    assert _run(tmp_path, nbs) == {"00_data": "skipped", "01_autoencoder": "skipped"}
    # a change to a section only stage 01 reads re-runs 01, not 00
    assert _run(tmp_path, nbs, "autoencoder.kl_weight=0.001") == {"00_data": "skipped", "01_autoencoder": "ran"}
    # a change stage 00 reads re-runs everything after it
    assert _run(tmp_path, nbs, "autoencoder.kl_weight=0.001", "data.val_fraction=0.3") == \
        {"00_data": "ran", "01_autoencoder": "ran"}
    assert log.read_text().count("00 ") == 2 and log.read_text().count("01 ") == 3
    out = tmp_path / "results" / "smoke"
    assert (out / "00_data.ipynb").exists() and (out / "provenance.json").exists()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["params"]["data"]["val_fraction"] == 0.3 and "torch" in prov["packages"]
    assert set(prov["stage_seconds"]) == {"00_data", "01_autoencoder"}


def test_only_and_from(toy):
    tmp_path, nbs, _ = toy
    assert _run(tmp_path, nbs, only="01") == {"01_autoencoder": "ran"}
    assert _run(tmp_path, nbs, start="00_data") == {"00_data": "ran", "01_autoencoder": "ran"}
    with pytest.raises(Exception, match="no such stage"):
        _run(tmp_path, nbs, only="09")


def test_failure_stops_and_keeps_earlier_outputs(toy):
    tmp_path, nbs, _ = toy
    _run(tmp_path, nbs, "study.seed=13", only="00")
    out = tmp_path / "results" / "smoke"
    before = (out / "00_data.ipynb").read_bytes()
    with pytest.raises(StageFailed, match="stage 01_autoencoder failed: ValueError: boom in stage 01"):
        _run(tmp_path, nbs, "study.seed=13")
    assert (out / "00_data.ipynb").exists() and (out / "01_autoencoder.failed.ipynb").exists()
    assert not (out / "01_autoencoder.ipynb").exists()
    assert not (out / "stages" / "01_autoencoder.json").exists()
    # the earlier stage was unchanged, so its executed notebook was left exactly as it was
    assert (out / "00_data.ipynb").read_bytes() == before


def test_bad_params_fail_before_any_stage(toy, tmp_path):
    _, nbs, log = toy
    with pytest.raises(Exception, match="data.image_size"):
        _run(tmp_path, nbs, "data.image_size=3")
    assert not log.exists()


def test_a_code_change_stops_the_run_naming_the_stage_until_accepted_or_forced(toy, monkeypatch):
    """Inputs unchanged but the hdlib code a stage runs changed: a one-line stop that names the stage, the
    changed module and the two ways on; --accept-code records the current code, --force recomputes."""
    import hdlib.tools.runner as runner
    from hdlib.tools.runner import StageCodeChanged

    tmp_path, nbs, log = toy
    _run(tmp_path, nbs)
    real = runner.code_key

    def edited(name):  # as if hdlib/sampling/samplers.py had changed under stage 01
        k = real(name)
        if name != "01_autoencoder":
            return k
        return {"key": "changed", "modules": {**k["modules"], "hdlib.sampling.samplers": "0" * 12}}

    monkeypatch.setattr(runner, "code_key", edited)
    with pytest.raises(StageCodeChanged, match=r"stage 01_autoencoder was made by other hdlib code \(changed: "
                                               r"hdlib/sampling/samplers\.py\); --force recomputes") as err:
        _run(tmp_path, nbs)
    assert "\n" not in str(err.value)
    assert _run(tmp_path, nbs, accept_code=True) == {"00_data": "skipped", "01_autoencoder": "skipped"}
    marker = json.loads((tmp_path / "results" / "smoke" / "stages" / "01_autoencoder.json").read_text())
    assert marker["code"] == "changed" and "code_accepted" in marker
    assert _run(tmp_path, nbs) == {"00_data": "skipped", "01_autoencoder": "skipped"}  # now recorded
    assert _run(tmp_path, nbs, force=True)["01_autoencoder"] == "ran"
    assert log.read_text().count("01 ") == 2


def test_a_marker_without_recorded_code_is_not_reported_as_current(toy):
    from hdlib.tools.runner import StageCodeChanged

    tmp_path, nbs, _ = toy
    _run(tmp_path, nbs)
    marker = tmp_path / "results" / "smoke" / "stages" / "00_data.json"
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k not in ("code", "code_modules")}
    marker.write_text(json.dumps(old))  # as written before code was fingerprinted
    with pytest.raises(StageCodeChanged, match="code this results folder does not record"):
        _run(tmp_path, nbs)


def test_missing_data_names_the_first_listed_file_absent_from_this_machine(tmp_path):
    """A fresh clone has a study's committed manifests but not the demo images they list: stage 00 must run
    again to build them instead of being skipped (stage 01 then failed on a missing pool image)."""
    from hdlib.tools.runner import missing_data

    (tmp_path / "manifests").mkdir()
    here = tmp_path / "img.png"
    here.write_bytes(b"x")
    (tmp_path / "manifests" / "pool.csv").write_text(f"path,key\n{here},\n{here},tile:0,0,8\n")
    assert missing_data(tmp_path) is None
    gone = tmp_path / "gone" / "slide.png"
    (tmp_path / "manifests" / "target_test.csv").write_text(f"path,key\n{here},\n{gone},tile:0,0,8\n")
    assert missing_data(tmp_path) == str(gone)


def test_each_stage_marker_and_the_provenance_name_the_cpu_it_ran_on(toy):
    tmp_path, nbs, _ = toy
    _run(tmp_path, nbs)
    out = tmp_path / "results" / "smoke"
    here = runner.machine_description()
    assert json.loads((out / "stages" / "00_data.json").read_text())["machine"] == here
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["machine"] == here and prov["stage_machines"] == {"00_data": here, "01_autoencoder": here}


def test_the_machine_is_named_by_its_model_and_native_bf16(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx512f amx_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu\n")
    assert runner.machine_description(info).startswith("Some CPU, ")
    assert runner.machine_description(info).endswith("native bf16: amx_bf16")
    info.write_text("processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu avx2\n")
    assert runner.machine_description(info).endswith("native bf16: no")
