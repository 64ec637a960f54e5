#!/usr/bin/env bash
# One GPU pass: build the CUDA extension, run the GPU tests, run every kernel benchmark.
# Usage (repo root, on a CUDA machine with torch, triton and nvcc):  bash benchmarks/gpu_session.sh [OUTDIR]
# OUTDIR (default benchmarks/results) receives the JSON rows and the logs.
set -uo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"

python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$out/build.log" | tail -3
python3 -m mmkernels.cli info -v | tee "$out/info.log"
python3 -m pytest -q -m gpu python_tests 2>&1 | tee "$out/gpu_tests.log" | tail -15
# rms_norm has two kernels (csrc and Triton): time both.
python3 benchmarks/bench_rms_norm.py --out "$out" --providers mmkernels:cuda,mmkernels:triton,eager,compile,liger \
    2>&1 | tee "$out/bench_rms_norm.log" | tail -25
# decode_attention (inference, fwd only) has two kernels too (csrc split-KV and Triton): time both.
python3 benchmarks/bench_decode_attention.py --out "$out" \
    --providers mmkernels:cuda,mmkernels:triton,eager,compile,sdpa_two_pass \
    2>&1 | tee "$out/bench_decode_attention.log" | tail -45
for op in swiglu rope attention gated_attention llama_adapter_layer linear_cross_entropy mom_adapter phm_adapter \
          dynamic_expert; do
    python3 "benchmarks/bench_${op}.py" --out "$out" 2>&1 | tee "$out/bench_${op}.log" | tail -25
done
# The PaCA scripts have many providers x shapes: their target shapes only.
for op in paca paca_step; do
    python3 "benchmarks/bench_${op}.py" --quick --out "$out" 2>&1 | tee "$out/bench_${op}.log" | tail -25
done
# End to end: a LLaMA-7B-shaped training step with LLaMA-Adapter V2, ours vs transformers + PEFT (both depths,
# so the per-layer slope and a 32-layer estimate are printed).
python3 benchmarks/bench_train_step.py --out "$out" 2>&1 | tee "$out/bench_train_step.log" | tail -20
