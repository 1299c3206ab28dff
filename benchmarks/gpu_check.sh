#!/usr/bin/env bash
# The whole GPU check in one device call (docs/performance.md): `run` with carry [".whl"] and the command
# `bash benchmarks/gpu_check.sh`. Installs the carried wheels (benchmarks/gpu_wheels.sh made them), runs
# the CUDA tests, then benchmarks/gpu.py; what it measures lands in $OUT (gpu.json, cuda_tests.log).
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
python3 -c "import pydantic" 2>/dev/null ||
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
timeout "${GPU_BENCH_SECONDS:-420}" python3 benchmarks/gpu.py --out "$OUT" "$@"
