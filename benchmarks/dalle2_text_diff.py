"""DALL·E 2 text diffs on shapes, judged (docs/dalle2.md): each test image's own caption is the source, the same
caption with its colour word replaced the target; the shapes judge reads the colour (and the other attributes) of
every frame along theta.

    python benchmarks/dalle2_text_diff.py RUN [--images 60] [--frames 4 --theta 0.75] [--grid out.png]

Prints a Markdown table: for each theta, the share of frames judged in the target colour, in the source colour,
and with shape / size / position kept; for DDIM-inverted x_T (the paper's way) and for fixed noise.
"""

from __future__ import annotations

import argparse
import time

import torch

from genzoo import api
from genzoo.checkpoint import load_checkpoint
from genzoo.data.shapes import COLOURS
from genzoo.eval import judges
from genzoo.training.images import save_grid


def recolour(caption: str, old: str, new: str) -> str:
    words = caption.split(" ")
    return " ".join(new if w.strip(",.:") == old else w for w in words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--images", type=int, default=60, help="test images edited")
    p.add_argument("--frames", type=int, default=4, help="frames per edit, at theta = 0 .. --theta")
    p.add_argument("--theta", type=float, default=0.75, help="the last frame's slerp weight toward the text diff")
    p.add_argument("--shift", type=int, default=2, help="target colour = COLOURS[(i + shift) % 6] (2: red -> blue)")
    p.add_argument("--invert-iters", type=int, default=0, help="fixed-point iterations of the DDIM inversion")
    p.add_argument(
        "--grid",
        help="write the first 4 images' rows to this PNG: the original, its inverted frames, its fixed-noise ones",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    thetas = torch.linspace(0, args.theta, args.frames).tolist()

    model = api.load_model(args.run)
    source = api.build_data(load_checkpoint(args.run).recipe)
    test = source.split("test").tensors()
    judge = judges.load_judge("shapes", source.cfg.model_dump())
    names = list(source.spec.attributes)
    rows, stats = {}, {}
    t0 = time.perf_counter()
    for invert in (True, False):
        hits = torch.zeros(len(thetas), 5)  # target colour, source colour, shape, size, position
        for i in range(args.images):
            attrs = test["attributes"][i]
            old = COLOURS[int(attrs[names.index("colour")])]
            new = COLOURS[(COLOURS.index(old) + args.shift) % len(COLOURS)]
            caption = test["caption"][i]
            frames = model.text_diff(
                test["image"][i],
                caption,
                recolour(caption, old, new),
                args.frames,
                theta=args.theta,
                invert=invert,
                invert_iters=args.invert_iters,
                generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i),
            ).float()
            pred = judge.predict(frames.clamp(-1, 1))
            hits[:, 0] += (pred["colour"] == COLOURS.index(new)).float()
            hits[:, 1] += (pred["colour"] == COLOURS.index(old)).float()
            for j, name in enumerate(("shape", "size", "position")):
                hits[:, 2 + j] += (pred[name] == attrs[names.index(name)]).float()
            if args.grid and i < 4:
                rows.setdefault(i, [test["image"][i][None]]).append(frames.clamp(-1, 1))
        stats["DDIM-inverted" if invert else "fixed noise"] = hits / args.images
    print(f"{args.images} test images, {time.perf_counter() - t0:.0f} s\n")
    print("| x_T | theta | target colour | source colour | shape kept | size kept | position kept |")
    print("|---|---|---|---|---|---|---|")
    for mode, h in stats.items():
        for k, t in enumerate(thetas):
            print(f"| {mode} | {t:.2f} | " + " | ".join(f"{v:.2f}" for v in h[k].tolist()) + " |")
    if rows:
        save_grid(torch.cat([torch.cat(r) for r in rows.values()]), args.grid, nrow=2 * len(thetas) + 1)


if __name__ == "__main__":
    main()
