# Two set-up commands (see README): `make demo` and `make test`. Each creates .venv when missing.
VENV ?= .venv
PYTHON ?= python3
# torch==2.13.0 resolves to the CPU wheel on machines that carry it (and no GPU), to the CUDA
# build from PyPI elsewhere. Set TORCH_SPEC to choose another build before the first `make`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.latentforge-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint env clean-demo

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c constraints.txt -c $(VENV)/torch-constraint.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lf-demo

# Two worker processes (pytest-xdist), each test file in one of them (module fixtures built once);
# session data is built once for both (tests/built_once.py). TEST_WORKERS=0 runs in this process.
# One intra-op thread per process: the tiny models' matrices gain nothing from more, and two workers
# (each test starting up to two ranks) with torch's default of a thread per core oversubscribe the
# cores many times over (measured here: a stage of the demo took 20x longer under load).
TEST_WORKERS ?= 2

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

# The inner loop: every test not marked slow or dist (the unit tests; tests/conftest.py refuses an
# integration test that carries neither marker), in a few minutes. pytest prints how many ran.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not dist" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-demo:
	rm -rf demo_out
