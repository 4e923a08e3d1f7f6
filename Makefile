# `make demo` runs the package's main job (SFT warm start, then sentence-level GRPO on the toy task, offline on the
# CPU, printing held-out accuracy before and after, and the output-level baseline beside it), `make test` the test
# suite; both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

DEMO ?= runs/demo

.PHONY: demo demo-loss test bench lint clean

# The C++ extension (csrc/, backend="native") is built by setup.py against the installed torch, hence
# --no-build-isolation and the build tools installed first; SGRPO_BUILD_NATIVE=1: a failed build is an error here.
$(VENV)/.installed: pyproject.toml setup.py tests/peer-requirements.txt $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # the CPU build; an unpinned torch would pull a CUDA build
	$(BIN)/pip install -q 'setuptools>=77' wheel ninja
	SGRPO_BUILD_NATIVE=$${SGRPO_BUILD_NATIVE:-1} $(BIN)/pip install -q --no-build-isolation -e '.[dev,train,trl]'
	$(BIN)/pip install -q --no-deps -r tests/peer-requirements.txt   # verl, megatron-core: their own code in the tests, without their pins
	$(BIN)/pip install -q ray==2.60.0
	touch $@

# The same 30 steps at the output level (one reward per answer, GSPO's ratio) from the same checkpoint, then both
# side by side: table on the terminal, plot path printed.
DEMO_GRPO := --task arith-small --model $(DEMO)/sft --steps 30 --prompts 16 --group-size 8 --lr 1e-4

demo: $(VENV)/.installed
	$(BIN)/sgrpo sft --task arith-small --drop-answer-line 0.6 --steps 500 --output-dir $(DEMO)/sft
	$(BIN)/sgrpo train $(DEMO_GRPO) --level sentence --output-dir $(DEMO)/grpo
	$(BIN)/sgrpo train $(DEMO_GRPO) --level output --output-dir $(DEMO)/output
	$(BIN)/python examples/compare_levels.py --task arith-small --out $(DEMO) \
		--runs sentence=$(DEMO)/grpo output=$(DEMO)/output

demo-loss: $(VENV)/.installed
	$(BIN)/python examples/demo_loss.py

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.bench_loss --preset quick
	$(BIN)/python -m benchmarks.bench_fused_linear --preset quick
	$(BIN)/python -m benchmarks.bench_rewards --preset quick

lint: $(VENV)/.installed
	$(BIN)/ruff check sgrpo_kernels tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache sgrpo_kernels/*.so
