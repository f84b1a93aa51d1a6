#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA device (run from the repository root):
# the CUDA tests, the multi-tensor kernels against the memory's bandwidth, the full benchmark.
#
#     bash benchmarks/cuda_check.sh OUTDIR     # logs and RESULTS-cuda.md land in OUTDIR
#
# modtensor is used from this checkout (PYTHONPATH), with the machine's own torch and Triton.
set -uo pipefail
out=${1:?usage: bash benchmarks/cuda_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== CUDA tests"
python3 -m pytest -q -p no:warnings tests/test_multitensor.py tests/test_grad_and_devices.py 2>&1 \
    | tee "$out/tests.log" | tail -20
echo "== kernels against the bandwidth"
python3 benchmarks/multitensor.py --models resnet50,gpt2,mlp1g --ops sum,mean,norm,std,amax --profile 2>&1 | tee "$out/multitensor.log"
echo "== benchmark"
python3 benchmarks/bench.py --device cuda --big --min-time 0.15 --mem-jobs 16 --out "$out/RESULTS-cuda.md" 2>&1 \
    | tee "$out/bench.log" | tail -5
