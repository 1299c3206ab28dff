#!/usr/bin/env bash
# Issue 22 on a lent GPU in one device call (docs/text.md): the caption-following ablations and two seeds of each
# text-to-image recipe, every run a process of its own sharing the GPU (CUDA MPS when the image allows it), then
# `genzoo eval` of each on the test captions and the held-out pairs. Step counts are the recipes' own (`steps` below),
# which train in 47.5-53 minutes on 2 CPU cores, inside issue 22's 60; SCALE multiplies them all (SCALE=0.002
# DEVICE=cpu is a dry run of the script here).
# Device call: `run` with carry [".whl"] (benchmarks/gpu_wheels.sh) and `bash benchmarks/gpu_text.sh`.
set -uo pipefail
OUT=${OUT:-runs/gpu-text}
SCALE=${SCALE:-1}
DEVICE=${DEVICE:-cuda}
SAMPLES=${SAMPLES:-200}
mkdir -p "$OUT"
if [ -d .whl ] && [ "$DEVICE" != cpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:$PWD/plugins:/tmp/site
  GZ="python3 -m genzoo.cli"
  nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS on" || echo "MPS off"
else
  GZ="${GZ:-.venv/bin/genzoo}"
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

steps() {  # RECIPE: its own train.stages (registry.yaml, read through `genzoo info`) as YAML, each times SCALE (>= 1)
  $GZ info "$1" --resolved | python3 -c "
import json, sys
stages = json.load(sys.stdin)['train']['stages']
print('{' + ', '.join(f'{k}: {max(1, round(v * float(sys.argv[1])))}' for k, v in stages.items()) + '}')
" "$SCALE"
}

train() {  # NAME RECIPE [--set ...]: trains into $OUT/NAME
  local name=$1 recipe=$2; shift 2
  $GZ train "$recipe" --out "$OUT/$name" --device "$DEVICE" --no-progress --set "train.stages=$(steps "$recipe")" \
    --set train.sample_every=0 "$@" >"$OUT/$name.train.log" 2>&1 || echo "train $name failed: $(tail -1 "$OUT/$name.train.log")"
}

evaluate() {  # NAME TAG [eval args]: $OUT/NAME.TAG.json
  local name=$1 tag=$2; shift 2
  $GZ eval "$OUT/$name" --device "$DEVICE" --samples "$SAMPLES" --json "$@" >"$OUT/$name.$tag.json" 2>"$OUT/$name.$tag.err" \
    || echo "eval $name $tag failed: $(tail -1 "$OUT/$name.$tag.err")"
}

T0=$(date +%s)
# ---- training: one change at a time against glide-s0 / dalle2-s0
train glide-s0 glide-shapes --seed 0 &
train glide-s1 glide-shapes --seed 1 &
train glide-drop10 glide-shapes --seed 0 --set decoder.cond_drop=0.1 &
train glide-attn16 glide-shapes --seed 0 --set "decoder.denoiser.attention_resolutions=[16, 8, 4]" &
train glide-attn16-s1 glide-shapes --seed 1 --set "decoder.denoiser.attention_resolutions=[16, 8, 4]" &
# the recipe has 6 text layers since 12-01: the arm is the 3 it had before
train glide-text3 glide-shapes --seed 0 --set encoder.first.layers=3 &
train glide-text3-s1 glide-shapes --seed 1 --set encoder.first.layers=3 &
# no training-time 'no pooled path' arm: the text-pair encoder always gives a pooled emb, and a U-Net without
# emb_dim_in is refused; the pooled path is ablated at sampling time instead (benchmarks/caption_probe.py --paths)
train glide-text256 glide-shapes --seed 0 --set encoder.first.width=256 --set encoder.first.layers=4 \
  --set clip.text_tower.width=256 --set decoder.denoiser.context_dim=256 --set decoder.denoiser.emb_dim_in=320 &
# glide-shapes reads GLIDE's own text transformer and the CLIP's frozen text tower together (text-pair, docs/text.md):
# each alone
train glide-own glide-shapes --seed 0 --set "encoder={type: text-transformer, context: 32, width: 128, layers: 3, heads: 4}" \
  --set decoder.denoiser.emb_dim_in=128 &
train glide-cliptext glide-shapes --seed 0 --set "encoder={type: clip-text, pooled_as_emb: true}" \
  --set decoder.denoiser.emb_dim_in=64 &
train dalle2-s0 dalle2-shapes --seed 0 &
train dalle2-s1 dalle2-shapes --seed 1 &
train dalle2-embdrop0 dalle2-shapes --seed 0 --set decoder.emb_drop=0.0 &
train dalle2-embdrop3 dalle2-shapes --seed 0 --set decoder.emb_drop=0.3 &
train dalle2-ar-s0 dalle2-ar-shapes --seed 0 &
train dalle-s0 dalle-shapes --seed 0 &
train dalle-s1 dalle-shapes --seed 1 &
wait
echo "training: $(( $(date +%s) - T0 )) s"
# ---- evaluation: every run on both splits; the samplers and guidances on glide-s0
for name in glide-s0 glide-s1 glide-drop10 glide-attn16 glide-attn16-s1 glide-text3 glide-text3-s1 \
  glide-text256 glide-own glide-cliptext dalle2-s0 dalle2-s1 dalle2-embdrop0 dalle2-embdrop3 dalle2-ar-s0 dalle-s0 dalle-s1; do
  evaluate "$name" test --metrics attribute-accuracy,fd &
  evaluate "$name" heldout --metrics attribute-accuracy,fd --split heldout &
done
evaluate glide-s0 ddim --metrics attribute-accuracy,fd --sampler ddim --steps 50 &
evaluate glide-s0 cfg1 --metrics attribute-accuracy,fd --scale 1 &
evaluate glide-s0 cfg5 --metrics attribute-accuracy,fd --scale 5 &
evaluate glide-s0 clip3 --metrics attribute-accuracy,fd --guidance clip --scale 3 &
evaluate dalle2-s0 variations --metrics variations,embedding-prior &
evaluate dalle2-s1 variations --metrics variations,embedding-prior &
wait
echo "total: $(( $(date +%s) - T0 )) s"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
keys = ["shape_accuracy", "colour_accuracy", "size_accuracy", "position_accuracy", "caption_accuracy", "fd",
        "variation_all"]
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    d = d.get("figures", d)
    print(f.stem.ljust(28), " ".join(f"{k.split('_')[0][:6]}={d[k]:.3f}" for k in keys if k in d))
PY
