#!/usr/bin/env bash
# One command for a lent GPU machine (torch and triton preinstalled, no network). In order of
# priority, so that a run cut short still returns the most useful part:
#   1. install the checkout without touching the machine's torch/triton;
#   2. the gpu-marked tests (CUDA graphs, no host sync in step(), native kernel parity), then
#      host and device time per step on LoRA and 2,000 small tensors, eager and CUDA graph,
#      fastsched beside torch fused (`fastsched profile`, under $out/host);
#   3. the update kernels' launch configurations compared: the per-variant (SPLIT, warps) of
#      kernels/optim.py against FASTSCHED_UPDATE_WARPS=4 (every update program at 4 warps in one
#      piece, Triton's default and the configuration before), fastsched against the stream copy on
#      llama-1b, fp32 and bf16, AdamW / clipped AdamW+stats / SGD / ALLoRA (under $out/launch-*);
#   4. the configurations below fp32 (master weights, stochastic rounding, bf16 / 8-bit states)
#      on the four shape sets at their own byte counts, beside torch / torchao / bitsandbytes
#      where importable (under $out/lowp; GB/s and % of copy, target >= 90%);
#   5. the full benchmark, bounded by --time-limit (JSON/Markdown/PNG under $out);
#   6. the whole test suite natively on the GPU (kernels compiled, not interpreted).
# Usage: OUT=/some/dir bash bench/gpu_check.sh   (default out: bench/results)
# Budget: about 1 + 2.5 + 2 + 2 x 1.2 + 1.5 + 2.5 + 1.5 minutes (device time is 15 min a
# session, start included); set HOST_LIMIT (per profile run) / CMP_LIMIT / LOWP_LIMIT /
# BENCH_LIMIT / TEST_LIMIT (seconds) to change.
set -uo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/gpu-device.txt"
timeout 150 python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 \
  | tee "$out/gpu-tests-marked.log" | tail -15
# host and GPU time per step on the sets where the host can be the bottleneck (LoRA, 2,000 small
# tensors): fastsched and torch's fused AdamW, eager and replayed as a CUDA graph (`fastsched
# profile`: host time of the call, device time per step, launches, syncs; under $out/host)
for set in lora-7b many-small; do
  for c in fastsched fastsched-graph torch-fused torch-fused-graph; do
    timeout "${HOST_LIMIT:-30}" fastsched profile --set "$set" --contender "$c" --steps 10 \
      --top 3 --out "$out/host" 2>&1 | tee "$out/host-$set-$c.log" \
      | grep -E "host time|device time|launches|GB/s" | head -5
  done
done
# launch configurations: same shapes, contenders and time limit for both; the stream contender
# is the copy ceiling measured in the same run (compare GB/s and the fraction of copy)
for cfg in new old; do
  warps=""; [ "$cfg" = old ] && warps=4
  FASTSCHED_UPDATE_WARPS="$warps" timeout $(( ${CMP_LIMIT:-60} + 30 )) fastsched bench \
    --out "$out/launch-$cfg" --sets llama-1b --dtypes fp32,bf16 \
    --configs adamw,adamw-clip,sgd,allora --contenders fastsched,fastsched-plain,stream --no-compile \
    --no-plot --quick --time-limit "${CMP_LIMIT:-60}" 2>&1 | tee "$out/launch-$cfg.log" | tail -14
done
timeout $(( ${LOWP_LIMIT:-75} + 30 )) fastsched bench --out "$out/lowp" --lowp --quick \
  --no-compile --no-plot --time-limit "${LOWP_LIMIT:-75}" 2>&1 | tee "$out/lowp.log" | tail -30
# --quick (fewer timed steps, smaller compile budget: ~2.5 min by estimate) so that every shape
# set fits; FULL=1 for the full step counts
quick=(--quick); [ -n "${FULL:-}" ] && quick=()
timeout $(( ${BENCH_LIMIT:-120} + 45 )) fastsched bench --out "$out" "${quick[@]}" \
  --time-limit "${BENCH_LIMIT:-120}" 2>&1 | tee "$out/gpu-bench.log" | tail -40
timeout "${TEST_LIMIT:-90}" python3 -m pytest tests -q -x -p no:cacheprovider -m "not gpu" \
  2>&1 | tee "$out/gpu-tests-all.log" | tail -8
