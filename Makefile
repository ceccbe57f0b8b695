# One command per habit: make serve, make test, make lint, make bench, make pictures.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEBS := dcmtk dicom3tools orthanc orthanc-dicomweb chromium postgresql

.PHONY: serve test lint bench pictures venv install install-test system-deps clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

# torch first: the pinned release is a CPU build on a CPU-only machine (no multi-GB CUDA download); a GPU server
# gets the CUDA build of the same release. The project's own range is then already satisfied.
TORCH ?= torch==2.13.0

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install -q '$(TORCH)'
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[test,lint]'
	touch $@

venv: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/gateway serve $(ARGS)

system-deps:
	@bash scripts/install-system-deps.sh $(DEBS)

test: $(VENV)/.installed-test system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/ruff format --check gateway tests bench
	$(VENV)/bin/mypy

bench: $(VENV)/.installed-test system-deps
	$(PIP) install -q -e '.[test,bench]'
	$(PY) bench/ingest.py
	$(PY) bench/volume.py
	$(PY) bench/inference.py
	$(PY) bench/e2e.py
	$(PY) bench/memory.py
	$(PY) bench/ui.py

# What people see, rendered as they see it (dsr2html in Chromium, dcmp2pgm, a key image), kept for the README.
pictures: $(VENV)/.installed-test system-deps
	GATEWAY_PICTURES=docs/images $(PY) -m pytest -q tests/encode/test_pictures.py tests/ui/test_journeys.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
