# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
# One tracking store for everything launched from here (mlflow run, ui, models serve): the
# absolute path, since a relative SQLite path resolves per process. The venv's activate script
# exports the same (see $(STAMP)).
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns/mlflow.db

.PHONY: demo test install ui clean-cache

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --quiet -e '.[test,postgres]'
	grep -q MLFLOW_TRACKING_URI $(BIN)/activate || \
	  printf '\n# scenesweep: the project tracking store\nexport MLFLOW_TRACKING_URI="sqlite:///$(CURDIR)/mlruns/mlflow.db"\nexport MLFLOW_DISABLE_TELEMETRY=true\n' >> $(BIN)/activate
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (digits, random VGG16 weights, 32 px images).
demo: $(STAMP)
	$(BIN)/mlflow run . -e sweep_svm --env-manager local --experiment-name svm

# One pytest worker per core (pytest-xdist); each test file runs whole on one worker, the slowest
# files first (tests/conftest.py): the files' module fixtures (a PostgreSQL cluster, an MLflow
# server, the demo runs) start once.
# The free disk is printed first: the tests write about 13 GB in all (each passed test's folders
# are removed as it ends), and a full disk fails every test at its set-up.
test: $(STAMP) browser postgres
	@echo "free for the tests' temporary files: $$(df -h --output=avail "$$($(BIN)/python -c 'import tempfile; print(tempfile.gettempdir())')" | tail -1)"
	$(BIN)/python -m pytest -q -n auto --dist loadfile --tb=short

# Debian's Chromium for tests/test_browser.py (Playwright drives it; it never downloads a browser).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
.PHONY: browser
browser:
	@test -x /usr/bin/chromium || { echo "installing Debian's chromium for tests/test_browser.py"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Debian's PostgreSQL for scenesweep services and tests/test_services.py (the tests start their
# own cluster on free ports; a cluster the package's scripts may start on 5432 is never used).
.PHONY: postgres services
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "installing Debian's postgresql for scenesweep services" >&2; \
	  $(SUDO) apt-get update -qq >&2 && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2; }

# PostgreSQL and an MLflow server for workers on several machines (docs/services.md), in
# services/ (DIR=... for another folder, HOST=0.0.0.0 to serve other machines). It prints the
# exports for the workers: eval "$$(make -s services)", or eval "$$(.venv/bin/scenesweep services start)"
# again later (it only prints them when the services run). Stop: .venv/bin/scenesweep services stop.
services: $(STAMP) postgres
	@$(BIN)/scenesweep services start $(if $(DIR),--dir $(DIR)) $(if $(HOST),--host $(HOST))

# The MLflow UI on the project's store, on 127.0.0.1 (PORT=5000 by default); Ctrl-C stops it.
# optuna-dashboard: $(BIN)/scenesweep dashboard [--port 8080].
ui: $(STAMP)
	$(BIN)/scenesweep ui $(if $(PORT),--port $(PORT))

clean-cache:
	rm -rf .cache

# The whole reference study on the real 15-Scene (224 px, ImageNet weights), every
# experiments/*.yaml one after the other, then the report (reports/latest/report.md). The
# feature cache (.cache) makes the convolutions run once per pooling type.
# Usage: make study DATA=path/to/15-Scene
.PHONY: study
study: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make study DATA=path/to/15-Scene" >&2; exit 2; }
	for file in experiments/*.yaml; do $(BIN)/scenesweep run "$$file" --data "$(DATA)" || exit 1; done
	$(BIN)/scenesweep report
