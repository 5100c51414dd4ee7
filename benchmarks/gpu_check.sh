#!/usr/bin/env bash
# The GPU checks in one script: first verify on the device (tests/test_cuda.py), then measure, every
# figure against the reference in the same run, each result file into OUT.
#
#   bash benchmarks/gpu_check.sh OUT             on a machine with CUDA
#   bash benchmarks/gpu_check.sh --dry-run OUT   anywhere: the same phases on the CPU, cut short,
#                                                to check the script itself
#
# There it needs python3 with torch (CUDA), transformers, typer, rich, safetensors and
# huggingface_hub. What else it imports and lacks (sacremoses; for the server figure fastapi,
# uvicorn, sse-starlette, openai and their own needs) it installs from the wheels in .whl/, with
# pip's --no-index: nothing is fetched (docs/performance.md says how to download them). The real
# vocabulary and corpus come from $BIOGPT_SHARED (default ../shared; carry a copy with the checkout).
#
# Each phase runs under its own time limit (about 8 minutes in all); a phase that fails or runs out
# of time is recorded and the next one runs. OUT gets log.txt (every phase's output), timing.txt
# (what each phase took, and its exit status) and the bench's result files.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then
    dry=1
    shift
fi
out="${1:?usage: bash benchmarks/gpu_check.sh [--dry-run] OUT}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/log.txt"
timing="$out/timing.txt"
: > "$log"
printf '%-9s %8s %8s %s\n' phase seconds limit status > "$timing"
export BIOGPT_SHARED="${BIOGPT_SHARED:-$PWD/../shared}" PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
device=cuda
[ "$dry" = 1 ] && device=cpu
bench=(python3 benchmarks/bench.py --device "$device" --json --results "$out" --repeats 2)

# phase NAME LIMIT COMMAND...: run it under `timeout`, its output to the log and the terminal
phase() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    start=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    local status="failed ($rc)"
    [ "$rc" = 0 ] && status=ok
    [ "$rc" = 124 ] && status="timed out"
    awk -v n="$name" -v ns="$(( $(date +%s%N) - start ))" -v l="$limit" -v s="$status" \
        'BEGIN { printf "%-9s %8.1f %8s %s\n", n, ns / 1e9, l, s }' | tee -a "$timing"
}

# The packages this machine lacks, from .whl/ (a name: the module to import)
setup() {
    local missing=()
    for module in sacremoses fastapi uvicorn sse_starlette openai; do
        python3 -c "import $module" 2>/dev/null || missing+=("$module")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "missing: ${missing[*]}"
        if compgen -G ".whl/*.whl" > /dev/null; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/biogpt-site \
                .whl/*.whl || return 1
        else
            echo "no .whl/ folder: the phases that need them will fail"
        fi
    fi
    python3 - <<'EOF'
import torch, transformers
import biogpt_cli
print(f"torch {torch.__version__}, transformers {transformers.__version__}, biogpt-cli {biogpt_cli.__file__}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
EOF
}
export -f setup  # `timeout` runs it in a shell of its own
export PYTHONPATH="/tmp/biogpt-site:$PYTHONPATH"

if [ "$dry" = 1 ]; then  # the same phases, each cut to what shows that it starts
    phase setup 60 bash -c setup
    phase tests 60 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider
    phase bench 60 python3 benchmarks/bench.py --help
    phase serve 30 python3 -c "import benchmarks.bench as b; assert callable(b.serve_figures)"
    phase finetune 30 python3 -c "import benchmarks.train_bench as t; assert callable(t.main)"
    phase constraints 30 python3 -c "import benchmarks.bench as b; assert callable(b.constraint_figures)"
else
    phase setup 40 bash -c setup
    phase tests 100 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider
    phase bench 170 "${bench[@]}" --only gpu
    phase serve 50 "${bench[@]}" --only serve
    phase finetune 50 "${bench[@]}" --only finetune
    phase constraints 40 "${bench[@]}" --only constraints
fi
total=$(awk 'NR > 1 { s += $2 } END { printf "%.1f", s }' "$timing")
echo "total     $total s" | tee -a "$timing"
ls "$out"
