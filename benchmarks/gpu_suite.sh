#!/usr/bin/env bash
# One lease, one command (see GPU.md of the project): the GPU test suite, then every benchmark at its GPU
# preset, then a summary of each target with its measured ratio. Everything lands in $OUT (default
# benchmarks/out/gpu). Usage: benchmarks/gpu_suite.sh [all|tests|bench|options]; "options" (not in "all") measures
# what each loss option costs on the fused paths (benchmarks/options.py), in a call of its own.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
PART=${1:-all}
mkdir -p "$OUT"

# Peers and extras travel as wheels in .whl/ (the device machine has no package index).
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -n 3
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
unset TRITON_INTERPRET

# The C++ extension (backend="native", CPU tensors) is built in place as `make test` does; where it cannot be
# (no compiler, an old setuptools), its tests skip instead of failing.
if ! SGRPO_BUILD_NATIVE=1 MAX_JOBS=8 python3 setup.py -q build_ext --inplace > /tmp/native_build.log 2>&1; then
    echo "native extension not built:"; tail -n 5 /tmp/native_build.log
    export SGRPO_BUILD_NATIVE=0
fi

python3 - "$OUT/environment.json" <<'PY'
import json, sys, torch, triton
from benchmarks import harness
device = torch.device("cuda")
info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "copy_bandwidth_gbps": harness.copy_bandwidth_gbps(device, 2048),
        "bf16_matmul_tflops": harness.matmul_tflops(device)}
try:
    import liger_kernel
    info["liger_kernel"] = getattr(liger_kernel, "__version__", "installed")
except ImportError:
    info["liger_kernel"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
PY

if [[ "$PART" == all || "$PART" == tests ]]; then
    timeout 420 python3 -m pytest -q -p no:cacheprovider -x --durations=5 > "$OUT/tests.txt" 2>&1
    echo "pytest exit code $?" >> "$OUT/tests.txt"
    tail -n 15 "$OUT/tests.txt"
fi
if [[ "$PART" == all || "$PART" == bench ]]; then
    for bench in bench_loss bench_fused_linear; do
        python3 -m "benchmarks.$bench" --preset gpu --out "$OUT" 2>&1 | grep -v "^bench_" | tail -n 20
    done
    python3 -m benchmarks.bench_rewards --preset gpu --out "$OUT" 2>&1 | tail -n 30
    python3 -m benchmarks.bench_long --preset gpu --out "$OUT" 2>&1 | tail -n 8    # packed 32k/128k answers, skew
    timeout 120 python3 -m benchmarks.bench_trainers --preset gpu --out "$OUT" 2>&1 | tail -n 40   # TRL vs drop-in train()
fi
if [[ "$PART" == options ]]; then
    for bench in bench_loss bench_fused_linear; do
        python3 -m "benchmarks.$bench" --preset gpu-options --out "$OUT" 2>&1 | grep -v "^bench_" | tail -n 20
    done
    exit 0
fi
python3 -m benchmarks.gpu_summary "$OUT" | tee "$OUT/summary.md"
