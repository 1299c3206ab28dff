"""Inpainting on shapes, judged (docs/editing.md): each of the first N test images loses the lower half of a box half
the image's side centred on its object (its upper half and everything else are kept; `--whole`: the whole box), is
inpainted once with its own caption (a text model) or unconditionally, and the shapes judge names the four attributes
of the result with the known pixels pasted back (what `genzoo edit` returns).

    python benchmarks/inpaint.py RUN [RUN ...] [--n 100] [--resample 1,5] [--no-caption] [--whole]
        [--out results.json]

A run is any diffusion model: GLIDE's inpainting model (`glide-inpaint-shapes`, the mask as input channels) or a
plain one (training-free RePaint). Rows: the originals, the hole left black, then each run at each resample count,
with the sampler's own x_0 error on the known pixels (before the paste) and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genzoo import api
from genzoo.checkpoint import load_checkpoint
from genzoo.data.shapes import ATTRIBUTES
from genzoo.eval.evaluate import attribute_hits
from genzoo.eval.judges import load_judge


def object_hole(attrs: torch.Tensor, side: int, whole: bool = False) -> torch.Tensor:
    """(N, 1, side, side) masks, 1 on the lower half of a box half the side wide centred on each object, or on the
    whole box (the shapes grid puts objects at 0.22, 0.5 and 0.78 of the side; attribute 3 is the grid cell)."""
    grid = torch.tensor([0.22, 0.5, 0.78]) * side
    cx, cy = grid[attrs[:, 3] % 3].view(-1, 1, 1), grid[attrs[:, 3] // 3].view(-1, 1, 1)
    ys, xs = torch.arange(side).view(1, side, 1) + 0.5, torch.arange(side).view(1, 1, side) + 0.5
    top = cy - side / 4 if whole else cy
    return ((ys >= top) & (ys < cy + side / 4) & ((xs - cx).abs() < side / 4)).float().unsqueeze(1)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--n", type=int, default=100, help="test images")
    p.add_argument("--resample", default="1", help="RePaint resample counts, comma-separated (1: replacement only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-caption", action="store_true", help="text models too inpaint without the caption")
    p.add_argument("--whole", action="store_true", help="hide the whole box around the object, not its lower half")
    p.add_argument("--out", help="also write the rows as JSON")
    args = p.parse_args()
    source = api.build_data(load_checkpoint(args.runs[0]).recipe)
    test = source.split("test").tensors()
    x, attrs, captions = test["image"][: args.n], test["attributes"][: args.n], test["caption"][: args.n]
    mask = object_hole(attrs, x.shape[-1], args.whole)
    known = 1 - mask
    judge = load_judge("shapes", source.cfg.model_dump())

    def accuracy(images: torch.Tensor) -> dict[str, float]:
        names, hits = attribute_hits(judge.predict(images), attrs, list(ATTRIBUTES))
        return {
            **{k: round(float(hits[:, i].float().mean()), 3) for i, k in enumerate(names)},
            "all": round(float(hits.all(1).float().mean()), 3),
        }

    rows = [{"row": "originals", **accuracy(x)}, {"row": "hole left black", **accuracy(x * known - mask)}]
    for row in rows:
        print(json.dumps(row), flush=True)
    for run in args.runs:
        model = api.load_model(run)
        text = getattr(getattr(model, "condition", None), "value", "none") == "caption" and not args.no_caption
        for r in [int(v) for v in args.resample.split(",")]:
            t0 = time.perf_counter()
            out = api.edit(
                model,
                x,
                mask,
                condition={"caption": list(captions)} if text else None,
                generator=torch.Generator().manual_seed(args.seed),
                resample=r,
                project_final=False,
            ).images
            own = float(((out - x).abs() * known).sum() / (known.sum() * x.shape[1]))
            row = {
                "row": f"{run} r={r}{' with captions' if text else ''}",
                **accuracy(x * known + out * mask),
                "own_x0_known_mae": round(own, 4),
            }
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
