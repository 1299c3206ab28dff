#!/usr/bin/env bash
# The whole GPU check in one device call (docs/performance.md): `run` with carry [".whl"] and the command
# `bash benchmarks/gpu_check.sh`. Installs the carried wheels (benchmarks/gpu_wheels.sh made them: the
# image's missing pydantic, and genzoo's own wheel for its plugin entry points), runs the CUDA tests, one
# `genzoo train --log tensorboard` + `genzoo sample` + `genzoo edit` through the CLI on CUDA, then benchmarks/gpu.py; what it measures
# lands in $OUT (gpu.json, cuda_tests.log, cli.log, ddpm_cuda.png).
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# the source tree first, so that the code under test is this checkout's; /tmp/site adds the entry points
export PYTHONPATH=$PWD:$PWD/plugins:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m genzoo.cli plugins 2>&1 | head -30
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
{
  time timeout 100 python3 -m genzoo.cli train ddpm-shapes-small --set data.image_size=16 --out /tmp/ddpm --steps 400 \
    --device cuda --no-progress --log tensorboard
  ls /tmp/ddpm/tensorboard
  time timeout 40 python3 -m genzoo.cli sample /tmp/ddpm -n 64 --device cuda --out "$OUT/ddpm_cuda.png"
  python3 -c "from PIL import Image; Image.new('RGB', (16, 16), (200, 30, 30)).save('/tmp/img.png'); \
m = Image.new('L', (16, 16), 0); m.paste(255, (0, 8, 16, 16)); m.save('/tmp/mask.png')"
  time timeout 60 python3 -m genzoo.cli edit /tmp/ddpm --image /tmp/img.png --mask /tmp/mask.png --device cuda \
    -n 8 --out "$OUT/inpaint_cuda.png"
} 2>&1 | tee "$OUT/cli.log" | tail -20
# GPU_BENCH_SECONDS=0: the tests and the CLI only
if [ "${GPU_BENCH_SECONDS:-270}" != 0 ]; then
  timeout "${GPU_BENCH_SECONDS:-270}" python3 benchmarks/gpu.py --out "$OUT" "$@"
fi
