# One command per habit: make serve, make test, make lint, make bench, make pictures.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEBS := dcmtk dicom3tools orthanc orthanc-dicomweb chromium postgresql

.PHONY: serve test lint bench pictures venv install install-test system-deps clean install-gpu gpu-check

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
	$(PY) bench/scale.py

# What people see, rendered as they see it (dsr2html in Chromium, dcmp2pgm, a key image), kept for the README.
pictures: $(VENV)/.installed-test system-deps
	GATEWAY_PICTURES=docs/images $(PY) -m pytest -q tests/encode/test_pictures.py tests/ui/test_journeys.py

# A GPU server (docs/gpu.md): the CUDA build of torch in place of the CPU one, and onnxruntime-gpu (the CUDA
# execution provider) in place of onnxruntime; both provide the same module, so one is removed first. Which torch
# build TORCH names is the choice of pip's configured index: run this where that index serves CUDA builds.
ORT_GPU ?= onnxruntime-gpu>=1.18

# Both GPU installs (install-gpu over the test venv, install-runtime-gpu in the CUDA image) swap in the same builds.
define SWAP_IN_GPU_BUILDS
$(PIP) uninstall -q -y torch
$(PIP) install -q '$(TORCH)'
$(PIP) uninstall -q -y onnxruntime onnxruntime-gpu
$(PIP) install -q '$(ORT_GPU)'
$(PY) -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'devices', torch.cuda.device_count(), '| onnxruntime', o.__version__, o.get_available_providers())"
endef

install-gpu: $(VENV)/.installed-test
	$(SWAP_IN_GPU_BUILDS)

# The GPU targets of issue 12 in one run: pytest -m gpu, bench/inference.py and bench/e2e.py on CUDA; the report
# goes to docs/benchmarks.md. Without CUDA it says why on one line and fails.
gpu-check: $(VENV)/.installed-test system-deps
	$(PY) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The container images (docker/, docs/deployment.md): the runtime and the PostgreSQL driver, no test or lint tools.
# torch and the project come from the same $(VENV)/.installed as every other target, so an image and CI install the
# same pins. install-runtime-gpu then swaps in the CUDA builds with install-gpu's own recipe lines
# (tests/tools/test_docker.py holds the two recipes equal).
.PHONY: install-runtime install-runtime-gpu

$(VENV)/.installed-runtime: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[postgres]'
	touch $@

install-runtime: $(VENV)/.installed-runtime

install-runtime-gpu: $(VENV)/.installed-runtime
	$(SWAP_IN_GPU_BUILDS)
