#!/usr/bin/env bash
# One GPU pass sized for a short device lease: build the CUDA extension, run the GPU tests, then the
# benchmarks in the order of the targets they measure. Each stage runs under a time cap taken from a total
# budget; a stage that no longer fits is skipped and said so. After every stage everything written so far
# (logs and JSON rows) is bundled into OUTDIR/gpu_session.tar.gz, so a pass cut off mid-way still returns
# what it finished, in one file.
#
# Usage (repo root, on a CUDA machine with torch, triton and nvcc):
#   bash benchmarks/gpu_session.sh OUTDIR [BUDGET_S] [STAGE ...]
# BUDGET_S: seconds for the whole pass (default 540). STAGE: run only these stages (default: all, in order):
#   build tests gated_attention attention_bwd_tiles llama_adapter_layer decode_attention paca train_step qpaca_memory mom_adapter
#   phm_adapter dynamic_expert attention rms_norm linear_cross_entropy swiglu swiglu_scale_bias
#   scale_bias rope paca_step
# Back on the development machine:  bash benchmarks/gpu_session.sh --collect OUTDIR/gpu_session.tar.gz
# appends the bundle's JSON rows to benchmarks/results/ and puts its logs in benchmarks/results/logs/.
set -uo pipefail

if [[ "${1:-}" == "--collect" ]]; then
    bundle="${2:?--collect: expected the path of a gpu_session.tar.gz}"
    tmp="$(mktemp -d)"
    tar xzf "$bundle" -C "$tmp" || exit 1
    mkdir -p benchmarks/results/logs
    for rows in "$tmp"/results/*.jsonl; do
        [[ -e "$rows" ]] || continue
        cat "$rows" >> "benchmarks/results/$(basename "$rows")"
        echo "appended $(wc -l < "$rows") rows to benchmarks/results/$(basename "$rows")"
    done
    cp "$tmp"/*.log benchmarks/results/logs/ 2>/dev/null
    rm -rf "$tmp"
    exit 0
fi

out="${1:?usage: gpu_session.sh OUTDIR [BUDGET_S] [STAGE ...]}"
budget="${2:-540}"
shift $(( $# >= 2 ? 2 : 1 ))
wanted=" $* "
work="$(mktemp -d)"
mkdir -p "$out" "$work/results"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
started=$SECONDS

bundle() {
    tar czf "$out/gpu_session.tar.gz.part" -C "$work" . && mv "$out/gpu_session.tar.gz.part" "$out/gpu_session.tar.gz"
    cp "$work/session.log" "$out/session.log"
}

# stage NAME CAP_S COMMAND...: run COMMAND under min(CAP_S, budget left), its output in NAME.log.
stage() {
    local name=$1 cap=$2
    shift 2
    if [[ "$wanted" != "  " && "$wanted" != *" $name "* ]]; then
        return
    fi
    local left=$(( budget - (SECONDS - started) ))
    if (( left < 15 )); then
        echo "$name: skipped, ${left}s of the budget left" | tee -a "$work/session.log"
        return
    fi
    (( cap > left )) && cap=$left
    local t0=$SECONDS
    timeout -k 10 "$cap" "$@" > "$work/$name.log" 2>&1
    local rc=$?
    local verdict="rc=$rc"
    (( rc == 124 || rc == 137 )) && verdict="cut off at its cap"
    echo "$name: $verdict, $(( SECONDS - t0 ))s of ${cap}s" | tee -a "$work/session.log"
    tail -n 25 "$work/$name.log"
    bundle
}

# bench NAME CAP_S ARGS...: one benchmark script, rows into the bundle's results folder.
bench() {
    local name=$1 cap=$2
    shift 2
    stage "$name" "$cap" python3 "benchmarks/bench_${name}.py" --out "$work/results" "$@"
}

{
    echo "gpu_session: budget ${budget}s, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
} | tee "$work/session.log"

# Hopper only: one architecture halves the compile.
stage build 180 env MMK_BUILD_CUDA=1 MMK_CUDA_ARCH="-gencode=arch=compute_90,code=sm_90" \
    python3 setup.py -q build_ext --inplace
stage tests 200 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider python_tests
# Issue targets first: the prompt segment nearly free, the adapted layer vs PEFT, decoding with the prompt.
# No torch.compile providers in this pass (each compile costs tens of seconds), except where a target names it.
bench gated_attention 45 --quick --modes fwd+bwd --providers mmkernels,attention_no_prompt,sdpa_no_prompt,eager
# The attention backward's tiles were chosen by register use (no spills on sm_90), not by time: time the
# earlier tiles and the tutorial-like ones at the same shape (the rows' providers name the tiles).
stage attention_bwd_tiles 60 bash -c 'for tiles in 64,64,8,3/64,64,8,3 32,128,8,3/128,32,8,3; do
    MMK_ATTN_BWD_TILES=$tiles python3 benchmarks/bench_gated_attention.py --out "$0" --quick --modes fwd+bwd \
        --providers mmkernels,attention_no_prompt || exit 1; done' "$work/results"
bench llama_adapter_layer 45 --quick --modes fwd+bwd --providers mmkernels,peft
bench decode_attention 45 --quick --modes fwd --providers mmkernels:cuda,mmkernels:triton,sdpa_two_pass
bench paca 60 --quick --modes fwd+bwd \
    --providers mmkernels_paca_r16,mmkernels_paca_r8,mmkernels_qpaca_nf4,mmkernels_lora_r8,peft_lora_r8,peft_lora_r16,frozen
bench train_step 120 --quick
bench qpaca_memory 100 --steps 3
bench mom_adapter 45 --quick --modes fwd,bwd --providers mmkernels,eager
bench phm_adapter 45 --quick --modes fwd,bwd --providers mmkernels,eager,kron_materialize
bench dynamic_expert 45 --quick --modes fwd,bwd --providers mmkernels,eager
bench attention 45 --quick --modes fwd+bwd --providers mmkernels,sdpa,eager
bench rms_norm 60 --quick --modes fwd+bwd --providers mmkernels:cuda,mmkernels:triton,eager,compile
bench linear_cross_entropy 60 --quick --modes fwd+bwd --providers mmkernels,eager
bench swiglu 30 --quick --modes fwd+bwd --providers mmkernels,eager
bench swiglu_scale_bias 30 --quick --modes fwd+bwd --providers mmkernels,unfused,eager
bench scale_bias 30 --quick --modes fwd+bwd --providers mmkernels,unfused
bench rope 30 --quick --modes fwd+bwd --providers mmkernels,eager
bench paca_step 60 --quick
echo "gpu_session: done in $(( SECONDS - started ))s" | tee -a "$work/session.log"
bundle
