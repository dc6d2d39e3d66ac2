# The two quickstart commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CIFAR-10 copy we have on this machine stands in for the official download when present.
SHARED_CIFAR := $(abspath ../shared/data/cifar10-jpeg.zip)
ifneq ($(wildcard $(SHARED_CIFAR)),)
export IMGFLOW_CIFAR10 ?= $(SHARED_CIFAR)
endif

# Which PyTorch build `make setup` installs: TORCH=cpu (the default: the CPU wheel, pinned) or
# TORCH=cuda (the CUDA build from PyTorch's own index; TORCH_CUDA picks the CUDA version of the
# wheel, which must be one PyTorch publishes for this torch and that the GPU's driver supports).
# The CUDA variant is not tested on the project's machines (no GPU there). Given on the command
# line, TORCH also replaces the build of an existing .venv; left out, `make test` keeps whichever
# build .venv has.
TORCH ?= cpu
TORCH_VERSION := 2.13.0
TORCH_CUDA ?= cu126
TORCH_INDEX_cpu ?=
TORCH_INDEX_cuda ?= https://download.pytorch.org/whl/$(TORCH_CUDA)
ifeq ($(filter $(TORCH),cpu cuda),)
$(error TORCH must be cpu or cuda, got '$(TORCH)')
endif
TORCH_INSTALL = torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_$(TORCH)),--index-url $(TORCH_INDEX_$(TORCH)))

.PHONY: setup run test bench clean

setup: $(VENV)/.installed
ifeq ($(origin TORCH),command line)
	@if ! $(BIN)/python -c "import sys, torch; sys.exit(bool(torch.version.cuda) != ('$(TORCH)' == 'cuda'))"; then \
		echo "replacing $$($(BIN)/python -c 'import torch; print(torch.__version__)') by the $(TORCH) build"; \
		$(BIN)/pip uninstall --quiet --yes torch && $(BIN)/pip install --quiet $(TORCH_INSTALL); fi
	$(BIN)/imgflow --version
endif

# torch first, pinned: a bare `torch` requirement would resolve to whatever build PyPI has (a
# multi-GB CUDA one on Linux).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_INSTALL)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The main job: the whole universal workflow on CIFAR-10 in a 15-minute budget.
run: setup
	$(BIN)/imgflow workflow cifar10 --budget-minutes 15 --out runs/workflow

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs
