#!/usr/bin/env bash
# One command for a lent GPU machine (torch and triton preinstalled, no network), bounded by a
# total time budget (BUDGET seconds, default 420: one device call is at most 10 minutes and a
# session's device time 15, start included, so a rerun must still fit). Phases in order of
# priority, each capped by its own limit and by the time left, so that a run cut short still
# returns the most useful part:
#   1. install the checkout without touching the machine's torch/triton (the compiled CPU
#      executor is not built: nothing here measures it; its tests skip);
#   2. the gpu-marked tests (CUDA graphs, no host sync in step(), native kernel parity);
#   3. the rest of the test suite natively on the GPU (kernels compiled, not interpreted),
#      side by side in XDIST processes (pytest-xdist) when it is installed: correctness first,
#      and its processes compile most kernel variants at once into Triton's cache, which the
#      benchmarks below then read instead of compiling one by one (~0.8 s a variant on one
#      core: bench/compile_check.py compiles 380 in ~2.5 min on 2);
#   4. the benchmark on the four shape sets (fastsched, torch fused, both as CUDA graphs, the
#      stream copy of the same run; CONTENDERS= (empty) for all of them, and no torch.compile
#      unless COMPILE=1);
#   5. the configurations below fp32 (master weights, stochastic rounding, bf16 / 8-bit states)
#      at their own byte counts, beside torch / torchao / bitsandbytes where importable (lowp/);
#   6. the update kernels' launch configurations compared, on llama-1b, fp32 and bf16: as
#      shipped (the pipelined update where _RUN_LAUNCH has the variant, the per-variant (SPLIT,
#      warps) tables elsewhere; launch-new/), FASTSCHED_UPDATE_RUNS=0 (one program per block
#      everywhere, at the tables; launch-block/) and FASTSCHED_UPDATE_WARPS=4 (every update
#      program at 4 warps in one piece, Triton's default and the first configuration;
#      launch-old/);
#   7. host and device time per step on LoRA and 2,000 small tensors, eager and CUDA graph,
#      fastsched beside torch fused (`fastsched profile`, host-*.log).
# Usage: OUT=/some/dir bash bench/gpu_check.sh   (default out: bench/results/gpu-<date>)
# PACK=file.tar.gz packs everything written into one archive at the end (a device call returns
# at most 8 files). PHASES="2 3 ..." runs only those phases (the install always runs).
set -uo pipefail
start=$(date +%s)
budget=${BUDGET:-420}
out="${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
phases=" ${PHASES:-2 3 4 5 6 7} "

# seconds a phase may take: its own cap, or what is left of the budget less 20 s for packing
cap() {
  local left=$(( budget - ($(date +%s) - start) - 20 ))
  (( left < $1 )) && echo "$left" || echo "$1"
}
want() {  # want N CAP: phase N is asked for and at least 15 s are left for it
  [[ "$phases" == *" $1 "* ]] || return 1
  local c; c=$(cap "$2")
  if (( c < 15 )); then echo "== phase $1: skipped, budget spent"; return 1; fi
  echo "== phase $1 ($(( $(date +%s) - start )) s in, up to $c s)"
}

FASTSCHED_NO_EXT_BUILD=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 \
  | tail -2
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null
} 2>&1 | tee "$out/gpu-device.txt"
xdist=(); per_test=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n "${XDIST:-12}")
# one hung test (a CUDA graph, a process group) must not take the phase with it
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)

if want 2 120; then
  timeout "$(cap 120)" python3 -m pytest tests -m gpu -q -rfE --tb=short -p no:cacheprovider \
    "${per_test[@]}" 2>&1 | tee "$out/gpu-tests-marked.log" | tail -25
fi
if want 3 110; then
  timeout "$(cap 110)" python3 -m pytest tests -q -rfE --tb=short -p no:cacheprovider \
    -m "not gpu" "${xdist[@]}" "${per_test[@]}" 2>&1 | tee "$out/gpu-tests-all.log" | tail -30
fi
compile=(--no-compile); [ -n "${COMPILE:-}" ] && compile=()
cont=(--contenders "${CONTENDERS-fastsched,fastsched-graph,fastsched-plain,torch-fused,torch-fused-graph,stream}")
[ -z "${cont[1]}" ] && cont=()
if want 4 130; then
  c=$(cap 130)
  timeout "$c" fastsched bench --out "$out" --quick "${compile[@]}" --no-progress \
    "${cont[@]}" --time-limit $(( c - 25 )) 2>&1 | tee "$out/gpu-bench.log" | tail -60
fi
if want 5 90; then
  c=$(cap 90)
  timeout "$c" fastsched bench --out "$out/lowp" --lowp --quick --no-compile --no-plot \
    --no-progress --time-limit $(( c - 20 )) 2>&1 | tee "$out/lowp.log" | tail -40
fi
# same shapes, contenders and time limit for both; the stream contender is the copy ceiling
# measured in the same run (compare GB/s and the fraction of copy)
for cfg in new block old; do
  want 6 40 || break
  c=$(cap 40); warps=""; runs=1
  [ "$cfg" = old ] && warps=4
  [ "$cfg" = block ] && runs=0
  FASTSCHED_UPDATE_WARPS="$warps" FASTSCHED_UPDATE_RUNS="$runs" timeout "$c" \
    fastsched bench --out "$out/launch-$cfg" \
    --sets llama-1b --dtypes fp32,bf16 --configs adamw,adamw-clip,sgd,allora \
    --contenders fastsched,fastsched-plain,stream --no-compile --no-plot --no-progress --quick \
    --time-limit $(( c - 15 )) 2>&1 | tee "$out/launch-$cfg.log" | tail -14
done
for set in lora-7b many-small; do
  for c in fastsched fastsched-graph torch-fused torch-fused-graph; do
    want 7 25 || break 2
    timeout "$(cap 25)" fastsched profile --set "$set" --contender "$c" --steps 10 --top 3 \
      --no-save 2>&1 | tee "$out/host-$set-$c.log" \
      | grep -E "host time|device time|launches|GB/s" | head -5
  done
done
echo "== done in $(( $(date +%s) - start )) s"
if [ -n "${PACK:-}" ]; then
  tar czf "$PACK" -C "$out" . && ls -l "$PACK"
fi
