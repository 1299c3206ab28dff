"""Each upsampler of a DALL·E 2 cascade against bilinear upsampling, stage by stage (docs/dalle2.md): every stage is
fed the test images brought down (area) to its input size, at full size and on a crop of the size it trained on.

    python benchmarks/dalle2_cascade.py RUN [--images 8] [--grid out.png]

Prints the MSE to the real images at the stage's size for the upsampler and for bilinear upsampling; the grid's
rows are the real images, bilinear from the base size, the first stage's output and the whole cascade's.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from genzoo import api
from genzoo.checkpoint import load_checkpoint
from genzoo.training.images import save_grid


def bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--grid")
    args = p.parse_args()
    model = api.load_model(args.run)
    source = api.build_data(load_checkpoint(args.run).recipe)
    real = source.split("test").tensors()["image"][: args.images]
    c, g = model.components, torch.Generator().manual_seed(0)

    def run(stage: str, low: torch.Tensor, size: int) -> torch.Tensor:
        noise = torch.randn(len(low), low.shape[1], size, size, generator=g)
        return c[f"{stage}_decoder"].decode(noise, {"low_res": low}, generator=g, sampler=c[f"{stage}_sampler"])

    sizes = [model.stage_size(s) for s in ("decoder", *model.cascade)]
    print("| stage | input | upsampler MSE | bilinear MSE | on a training-size crop: upsampler | bilinear |")
    print("|---|---|---|---|---|---|")
    outs = []
    for k, stage in enumerate(model.cascade):
        low, high = F.interpolate(real, size=sizes[k], mode="area"), F.interpolate(real, size=sizes[k + 1], mode="area")
        up = run(stage, low, sizes[k + 1])
        outs.append(up)
        side = max(1, round(model.upsampler_crop * sizes[k + 1]))  # a centred crop of the training size
        at, f = (sizes[k + 1] - side) // 2, sizes[k + 1] // sizes[k]
        at -= at % f
        crop = run(stage, low[..., at // f : (at + side) // f, at // f : (at + side) // f], side)
        target = high[..., at : at + side, at : at + side]
        row = [
            ((up - high) ** 2).mean(),
            ((bilinear(low, sizes[k + 1]) - high) ** 2).mean(),
            ((crop - target) ** 2).mean(),
            ((bilinear(low[..., at // f : (at + side) // f, at // f : (at + side) // f], side) - target) ** 2).mean(),
        ]
        print(f"| {stage} | {sizes[k]} -> {sizes[k + 1]} px | " + " | ".join(f"{float(v):.4f}" for v in row) + " |")
    if args.grid:
        low = F.interpolate(real, size=sizes[0], mode="area")
        full = model.upsample(low, generator=g)
        rows = [real, bilinear(low, sizes[-1]), bilinear(outs[0], sizes[-1]), full]
        save_grid(torch.cat(rows).clamp(-1, 1), args.grid, nrow=len(real))


if __name__ == "__main__":
    main()
