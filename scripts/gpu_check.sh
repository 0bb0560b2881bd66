#!/usr/bin/env bash
# The CUDA check of the Triton attention kernels as one prepared command (docs/kernels.md, "CUDA"): the kernels'
# tests (the CUDA ones run the real kernels), then the GPU benchmark perf/bench_sasa_gpu.py. Under 9 minutes.
#
#   bash scripts/gpu_check.sh --prepare   where PyPI is reachable: download into .whl/ the wheels that a GPU image
#                                         with CUDA torch but no MONAI lacks (monai, nibabel; pure Python)
#   bash scripts/gpu_check.sh             on the GPU machine: install .whl/ (if present) into /tmp/site, run the
#                                         tests and the benchmark; logs into $OUT (else /tmp/gpu_check_logs)
#   bash scripts/gpu_check.sh --dry-run   on a CPU machine: the same steps, the CUDA tests skipped and the benchmark's
#                                         --dry-run (tiny shapes, CPU): checks this script and the benchmark's code
#
# Exit status: the tests' (the benchmark's output is for reading).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-run}"
LOGS="${OUT:-/tmp/gpu_check_logs}"
step() { echo "[gpu_check.sh ${SECONDS}s] $*"; }

prepare() {
    local monai nibabel
    monai="$(grep -m1 '^monai==' requirements.txt)"
    nibabel="nibabel==$(python -c 'import nibabel; print(nibabel.__version__)')"
    step "downloading ${monai} ${nibabel} into .whl/ (Python 3.12, no dependencies: the GPU image has numpy)"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl "$monai" "$nibabel" || exit 1
    if [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
        echo '/.whl/' >>.git/info/exclude
    fi
    step "done: $(ls .whl | tr '\n' ' ')"
}

install_wheels() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        step "installing $(ls .whl | tr '\n' ' ')into /tmp/site"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    fi
    export PYTHONPATH="$PWD:${PYTHONPATH:-}"
}

case "$MODE" in
--prepare)
    prepare
    exit 0
    ;;
--dry-run)
    PYTHON=python
    BENCH_ARGS=(--dry-run --repeats 1 --modes eager --dtypes fp32 --budget-s 60)
    ;;
run)
    PYTHON=python3
    install_wheels
    BENCH_ARGS=(--repeats 10 --budget-s 200)
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh [--prepare | --dry-run]" >&2
    exit 2
    ;;
esac

mkdir -p "$LOGS"
export TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor" PYTHONUNBUFFERED=1
VERSIONS='import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, triton {triton_version}, {device}")'
step "$("$PYTHON" -c "$VERSIONS")"

step "1/2 tests/test_local_attention_triton.py (CUDA tests skip without a GPU, saying so)"
timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_local_attention_triton.py 2>&1 |
    tee "$LOGS/gpu_check_tests.log"
TESTS=${PIPESTATUS[0]}
step "tests exit status ${TESTS}"

step "2/2 perf/bench_sasa_gpu.py ${BENCH_ARGS[*]}"
timeout 300 "$PYTHON" perf/bench_sasa_gpu.py "${BENCH_ARGS[@]}" 2>&1 | tee "$LOGS/gpu_check_bench.log"
step "benchmark exit status ${PIPESTATUS[0]}; logs in ${LOGS}"
exit "$TESTS"
