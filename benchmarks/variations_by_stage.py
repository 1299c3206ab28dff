"""Issue 22: where do a DALL·E 2 run's variations lose an attribute, in the base decoder or the upsampler?

    .venv/bin/python benchmarks/variations_by_stage.py RUN [ARM ...] [--images 200]

One variation of each of the first IMAGES test images (unCLIP Sec. 3.1: the image's CLIP z_i decoded again), judged
against the image's attributes, for each ARM: a ``;``-separated list of ``--set`` overrides of the run's sampling
(``"upsampler_sampler.type=ddpm;upsampler_sampler.steps=25"``; an empty string is the recipe's own), or ``base``: the
base decoder's output alone, brought to the judge's size bilinearly, no upsampler. Every arm draws from seed 0.
Prints shape / colour / size / position and all four per arm (docs/dalle2.md, "Where the variations lost colour").
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from genzoo import api
from genzoo.checkpoint import load_checkpoint
from genzoo.eval.judges import load_judge


@torch.no_grad()
def variations(model, images: torch.Tensor, *, base: bool, size: int, generator: torch.Generator) -> torch.Tensor:
    """One variation per image in [-1, 1]: through the whole cascade, or the base decoder's alone at ``size``."""
    if not base:
        return model.variations(images, generator=generator).float().clamp(-1, 1)
    c, z_i = model.components, model.image_embeddings(images)
    x_T = torch.randn((len(images), *c["decoder"].produces.shape), generator=generator)
    low = c["decoder"].decode(x_T, {"emb": z_i}, generator=generator, sampler=c["sampler"], guidance=c["guidance"])
    return F.interpolate(low.clamp(-1, 1), size=size, mode="bilinear", align_corners=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("arms", nargs="*", default=["", "base"])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    source = api.build_data(load_checkpoint(args.run).recipe)
    judge = load_judge(source.spec.name, source.cfg.model_dump())
    test = source.split("test").tensors()
    x, want = test["image"][: args.images], test["attributes"][: args.images]
    names = list(source.spec.attributes)
    for arm in args.arms:
        t0 = time.perf_counter()
        parts = [s for s in arm.split(";") if s]
        base = "base" in parts
        model = api.load_model(args.run, sets=[f"components.{s}" for s in parts if s != "base"])
        g = torch.Generator().manual_seed(0)
        v = torch.cat(
            [
                variations(model, x[i : i + args.batch], base=base, size=x.shape[-1], generator=g)
                for i in range(0, len(x), args.batch)
            ]
        )
        pred = judge.predict(v)
        hits = torch.stack([pred[a] == want[:, j] for j, a in enumerate(names)], 1)
        figures = " / ".join(f"{h:.3f}" for h in hits.double().mean(0).tolist())
        print(
            f"{arm or 'the recipe'}: {'/'.join(names)} {figures}, all four {hits.all(1).double().mean():.3f} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
