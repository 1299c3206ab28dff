"""Issue 22's diagnosis of a caption model (docs/text.md): does it read each attribute of the caption?

    .venv/bin/python benchmarks/caption_probe.py RUN [--n 32] [--seed 0]

1. The text encoder: for captions that differ from "a large red circle in the top left" in one attribute, the
   cosine of the pooled embeddings (``emb``, or ``text_emb`` for a CLIP text tower) and the relative change of the
   per-token context. An attribute the encoder does not separate cannot steer the decoder.
2. The samples: N samples each of three captions that differ only in position, and where the shapes judge finds
   them. A model that ignores the position words spreads them over all nine cells whatever the caption.
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F

from genzoo import api
from genzoo.checkpoint import load_checkpoint
from genzoo.data.shapes import POSITIONS
from genzoo.eval.judges import load_judge

BASE = "a large red circle in the top left"
CHANGED = {
    "position": "a large red circle in the bottom right",
    "colour": "a large blue circle in the top left",
    "shape": "a large red square in the top left",
    "size": "a small red circle in the top left",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = api.load_model(args.run)
    encoder = model.components["encoder"]
    with torch.no_grad():
        base = encoder.encode({"caption": [BASE]})
        pooled = "emb" if "emb" in base else "text_emb"
        for what, caption in CHANGED.items():
            other = encoder.encode({"caption": [caption]})
            cos = F.cosine_similarity(base[pooled], other[pooled]).item()
            rel = ((base["context"] - other["context"]).norm() / base["context"].norm()).item()
            print(f"encoder, {what:8s} changed: pooled cosine {cos:.4f}, context relative change {rel:.3f}")
    source = api.build_data(load_checkpoint(args.run).recipe)
    judge = load_judge(source.spec.name, source.cfg.model_dump(), device=torch.device("cpu"))
    g = torch.Generator().manual_seed(args.seed)
    for caption in (BASE, CHANGED["position"], "a large red circle in the centre"):
        where = judge.predict(model.sample(args.n, {"caption": [caption] * args.n}, generator=g))["position"]
        found = collections.Counter(POSITIONS[i] for i in where.tolist())
        print(f"samples of {caption!r}: " + ", ".join(f"{p} {c}" for p, c in found.most_common()))


if __name__ == "__main__":
    main()
