# `make demo` runs the package's main job (SFT warm start, then sentence-level GRPO on the toy task, offline on the
# CPU, printing held-out accuracy before and after, and the output-level baseline beside it), `make test` the test
# suite; both build .venv on first use (the demo with what it needs, the tests add their peers).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

DEMO ?= runs/demo

.PHONY: demo demo-loss test bench lint clean

# The C++ extension (csrc/, backend="native") is built by setup.py against the installed torch, hence
# --no-build-isolation and the build tools installed first. It needs a C++ compiler ($$CXX, else c++): with one, a
# failed build is an error here (SGRPO_BUILD_NATIVE=1); without one the package installs as pure Python and
# backend="native" says how to build it. SGRPO_BUILD_NATIVE=0|1 in the environment overrides the choice.
NATIVE := $(if $(shell command -v $${CXX:-c++} 2>/dev/null),1,0)

# What `make demo` needs: torch, this package and its `train` extra.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # the CPU build; an unpinned torch would pull a CUDA build
	$(BIN)/pip install -q 'setuptools>=77' wheel ninja
	@[ "$(NATIVE)" = 1 ] || echo "no C++ compiler (c++ or \$$CXX) found: installing without the native backend"
	SGRPO_BUILD_NATIVE=$${SGRPO_BUILD_NATIVE:-$(NATIVE)} $(BIN)/pip install -q --no-build-isolation -e '.[train]'
	touch $@

# What the tests, the benchmarks and lint add: the `dev` and `trl` extras of the installed package (named, not
# the source folder, so that pip installs the extras without building the package again).
$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q 'sgrpo-kernels[dev,trl]'
	touch $@

# The peers whose own code the tests run: ray with its dependencies, then verl and megatron-core without theirs
# (verl's pins, transformers<5.11 among them, would downgrade what TRL uses). In this order no install reports
# verl's pins: pip checks the dependencies of what depends on the packages it installs only when it resolves.
$(VENV)/.peers: $(VENV)/.dev tests/peer-requirements.txt
	$(BIN)/pip install -q ray==2.60.0
	$(BIN)/pip install -q --no-deps -r tests/peer-requirements.txt
	touch $@

# The same 30 steps at the output level (one reward per answer, GSPO's ratio) from the same checkpoint, then both
# side by side: table on the terminal, plot path printed.
DEMO_GRPO := --task arith-small --model $(DEMO)/sft --steps 30 --prompts 16 --group-size 8 --lr 1e-4

demo: $(VENV)/.installed
	$(BIN)/sgrpo sft --task arith-small --drop-answer-line 0.6 --steps 500 --output-dir $(DEMO)/sft
	$(BIN)/sgrpo train $(DEMO_GRPO) --level sentence --output-dir $(DEMO)/grpo
	$(BIN)/sgrpo train $(DEMO_GRPO) --level output --output-dir $(DEMO)/output
	$(BIN)/python experiments/credit_assignment/compare_levels.py --task arith-small --out $(DEMO) \
		--runs sentence=$(DEMO)/grpo output=$(DEMO)/output

demo-loss: $(VENV)/.installed
	$(BIN)/python examples/demo_loss.py

test: $(VENV)/.peers
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n auto

bench: $(VENV)/.dev
	$(BIN)/python -m benchmarks.bench_loss --preset quick
	$(BIN)/python -m benchmarks.bench_fused_linear --preset quick
	$(BIN)/python -m benchmarks.bench_rewards --preset quick
	$(BIN)/python -m benchmarks.bench_trainers --preset quick

lint: $(VENV)/.dev
	$(BIN)/ruff check sgrpo_kernels sgrpo_kernels_cli tests examples benchmarks experiments tools

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache sgrpo_kernels/*.so
