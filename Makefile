# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test install ui clean-cache

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (digits, random VGG16 weights, 32 px images).
demo: $(STAMP)
	$(BIN)/mlflow run . -e sweep_svm --env-manager local

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-cache:
	rm -rf .cache
