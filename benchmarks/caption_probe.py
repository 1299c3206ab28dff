"""Issue 22's diagnosis of a caption model (docs/text.md): does it read each attribute of the caption?

    .venv/bin/python benchmarks/caption_probe.py RUN [--n 32] [--seed 0] [--paths 200]

1. The text encoder: for captions that differ from "a large red circle in the top left" in one attribute, the
   cosine of the pooled embeddings (``emb``, or ``text_emb`` for a CLIP text tower) and the relative change of the
   per-token context. An attribute the encoder does not separate cannot steer the decoder.
2. The samples: N samples each of three captions that differ only in position, and where the shapes judge finds
   them. A model that ignores the position words spreads them over all nine cells whatever the caption.
3. ``--paths N``: where the caption enters, ablated at sampling time: the first N test captions sampled as the
   recipe does, then with the pooled embedding replaced by the learned null (``drop_emb``), then with the
   per-token context replaced by it (``drop_context``); the judge's accuracy of each attribute and of all four.
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F

from genzoo import api
from genzoo.checkpoint import load_checkpoint
from genzoo.data.shapes import ATTRIBUTES, POSITIONS
from genzoo.eval.evaluate import attribute_hits
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
    parser.add_argument("--paths", type=int, default=0, help="test captions for the conditioning-path ablation")
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
    if args.paths:
        path_ablation(model, source, judge, args.paths, args.seed)


@torch.no_grad()
def path_ablation(model, source, judge, n: int, seed: int) -> None:
    """Accuracy with both conditioning paths, without the pooled embedding, and without the tokens."""
    test = source.split("test").tensors()
    captions, attrs = list(test["caption"][:n]), test["attributes"][:n]
    encoder = model.components["encoder"]
    encode = encoder.encode
    for label, key in (("both paths", None), ("pooled emb dropped", "drop_emb"), ("tokens dropped", "drop_context")):

        def ablated(condition, key=key):
            cond = encode(condition)
            if key is not None:  # the denoiser swaps in its learned null for this path alone
                cond[key] = torch.ones(len(condition["caption"]), dtype=torch.bool)
            return cond

        encoder.encode = ablated
        try:
            images = model.sample(n, {"caption": captions}, generator=torch.Generator().manual_seed(seed))
        finally:
            encoder.encode = encode
        names, hits = attribute_hits(judge.predict(images), attrs, list(ATTRIBUTES))
        row = ", ".join(f"{k} {hits[:, i].float().mean():.3f}" for i, k in enumerate(names))
        print(f"paths, {label}: {row}, all four {hits.all(1).float().mean():.3f}", flush=True)


if __name__ == "__main__":
    main()
