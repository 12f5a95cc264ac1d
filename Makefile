# The README's commands.  `make serve` and `make test` work on a fresh machine: they create the
# virtual environment, install (torch first: torch==2.13.0, which is PyPI's CUDA 13 build on Linux x86_64
# and the CPU build where the index offers 2.13.0+cpu), and do the rest.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
OPEN_CLIP_VERSION ?= 3.3.0
FAMILY ?= sd
# What Triton runs: python-onnx (onnxruntime, the CPU default) or python-torch (the diffusers modules).
TARGET ?= python-onnx
MODEL_ID ?= models/tiny-$(FAMILY)
MODEL_REPOSITORY ?= model_repository/tiny-$(FAMILY)$(if $(filter-out python-onnx,$(TARGET)),-$(TARGET))
PORT ?= 8000

.PHONY: install serve tiny export test test-gpu check-image lint bench clean

# Installs once per change of pyproject.toml.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[export,triton,dev]'
	# Only its BPE vocabulary is used; its dependencies would pull torchvision and a CUDA torch.
	# Last, so no later install reports its missing dependencies.
	$(BIN)/pip install --quiet --no-deps open_clip_torch==$(OPEN_CLIP_VERSION)
	touch $@

# The bundled tiny model (built in code, no download) and its Triton repository.
tiny: install
	$(BIN)/t2i-tiny --family $(FAMILY) --out models/tiny-$(FAMILY)

export: install
	$(if $(filter models/tiny-%,$(MODEL_ID)),$(MAKE) --no-print-directory tiny,)
	$(BIN)/t2i-export $(MODEL_ID) --target $(TARGET) --out $(MODEL_REPOSITORY)

# The embedded default: the bundled Triton on CPU serving the tiny model, the service on $(PORT).
serve: export
	MODEL_ID=$(MODEL_ID) MODEL_REPOSITORY=$(MODEL_REPOSITORY) PORT=$(PORT) $(BIN)/t2i-serve

# GPU tests are left out here; `make test-gpu` runs them on a GPU host. The 25 slowest tests are listed
# at the end (what each costs).
test: install
	$(BIN)/python -m pytest -q -m "not gpu" --durations=25

# The Docker image is one CUDA major: resolves the Dockerfile's pip lines on PyPI for the image's Python
# and platform (downloads metadata only) and fails on a CUDA library of another major. Not in `make test`
# (it needs the index).
check-image: install
	$(BIN)/python -m export.toolchain.image_check

# Runs on a GPU host from a checkout (`make install`, then `$(BIN)/pip install '.[tensorrt]'`), not in the
# image (it has no tests/ and no pytest). Engines for both tiny families, fp16 parity with diffusers, a
# refitted LoRA variant, an out-of-memory variant load then 200.
# Without a GPU or TensorRT each test is skipped with the reason.
test-gpu: install
	$(BIN)/python -m pytest -q -m gpu -rs

lint: install
	$(BIN)/ruff check server export tests bench
	$(BIN)/ruff format --check server export tests bench
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile


# bench/RESULTS.md records each figure with the command that produced it.
bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) models state model_repository/tiny-*
