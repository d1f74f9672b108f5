# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   — create .venv if missing, install, run the demo
#   make test   — create .venv if missing, install, run the tests
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-model test lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/georetina demo

# Rebuilds pipeline/demo_data/demo_r18_c4.safetensors (shipped in the package): synthetic
# scenes, then georetina train.
demo-model: $(STAMP)
	$(BIN)/python -m pipeline.io.synthetic demo-output/train
	$(BIN)/georetina train jobs/train_demo.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/end_to_end.py
	$(BIN)/python bench/merge.py
	$(BIN)/python bench/tiling.py
	$(BIN)/python bench/detect.py
	$(BIN)/python bench/query.py
	$(BIN)/python bench/scale.py

clean:
	rm -rf demo-output .pytest_cache .hypothesis
