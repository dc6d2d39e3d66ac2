# The two quickstart commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CIFAR-10 copy we have on this machine stands in for the official download when present.
SHARED_CIFAR := $(abspath ../shared/data/cifar10-jpeg.zip)
ifneq ($(wildcard $(SHARED_CIFAR)),)
export IMGFLOW_CIFAR10 ?= $(SHARED_CIFAR)
endif

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel: a bare `torch` requirement would resolve to a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
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
