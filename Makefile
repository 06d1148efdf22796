# make demo: set everything up, then run cnnmod's study end to end on Fashion-MNIST (quick preset).
# make test: set everything up, then run the test suite.
# Each target alone does all the set-up on a fresh Debian machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch; pinned through constraints.txt so no dependency pulls a CUDA build.
TORCH  ?= torch==2.13.0
DEMO   ?= runs/demo
export CNNMOD_DATA ?= $(HOME)/.cache/cnnmod/data

.PHONY: demo test data lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

data: $(STAMP)
	@bash scripts/ensure-fashion-mnist.sh $(BIN)/cnnmod

# The study's quick preset: train, decompose, reuse, replace, measure energy, write runs/demo/report.html.
# A second run resumes from what the first finished.
demo: $(STAMP) data
	$(BIN)/cnnmod reproduce --preset quick --out $(DEMO)

test: $(STAMP) data
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
