#!/usr/bin/env bash
# How many genzoo trainings one lent GPU serves at once (docs/performance.md): the glide-shapes decoder stage,
# one process alone, then 8 at once, then 16 at once; with CUDA MPS when the image allows it. Run through `run`
# with carry [".whl"] after `bash benchmarks/gpu_wheels.sh`. Writes $OUT/calibrate.txt.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/plugins:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null; then MPS=on; else MPS=off; fi
nproc
train() {  # $1 run dir, $2 steps
  python3 -m genzoo.cli train glide-shapes --out "$1" --device cuda --no-progress --seed 0 \
    --set "train.stages={decoder: $2, upsampler: 0, clip: 0}" --set train.sample_every=0 \
    --set train.log_every=50 --set train.checkpoint_every=100000 >"$1.log" 2>&1
}
rate() { python3 -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + '/metrics.jsonl') if 'it_s' in l]
print(sys.argv[1], 'it/s (last 100 steps):', round(100 / (rows[-1]['time'] - rows[-3]['time']), 2))" "$1"; }
{
  echo "MPS $MPS"
  for n in 1 8 16; do
    start=$(date +%s.%N)
    for i in $(seq 1 "$n"); do train "/tmp/cal$n-$i" 300 & done
    wait
    echo "== $n at once: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s wall for 300 steps each"
    for i in 1 "$n"; do rate "/tmp/cal$n-$i" || tail -5 "/tmp/cal$n-$i.log"; done
  done
} 2>&1 | tee "$OUT/calibrate.txt"
