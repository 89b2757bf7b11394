# Every target sets up what it needs: a venv in .venv with the pinned CPU torch.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Install torch first and by exact version so a CPU machine keeps the CPU build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/mergekit-evolver demo

bench: $(STAMP)
	$(BIN)/python benchmarks/offspring_throughput.py

clean:
	rm -rf $(VENV) .testbed
