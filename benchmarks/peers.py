"""Issue 23's peers leaderboard (docs/interop.md, "Peers"): three U-Net implementations of matched FLOPs trained by
genzoo's trainer on shapes 16x16 at the same budget, and lucidrains' own Trainer beside them through `genzoo import`.

1. The GFLOP per forward of the three peer recipes' networks at 16x16 (genzoo's U-Net, diffusers' UNet2DModel,
   denoising-diffusion-pytorch's Unet: ``ddpm-shapes16-unet``, ``ddpm-shapes16-diffusers``,
   ``ddpm-shapes16-ddpm-pytorch``).
2. lucidrains' ``Trainer`` trains its ``GaussianDiffusion`` (the same ``Unet`` of dim 30, cosine schedule, pred_x0,
   DDIM over 25 of 1000 steps) on the same shapes training images (written as PNGs, which its Trainer reads) for the
   same steps and batch, its other settings its own (Adam 0.9/0.99, constant lr, its EMA); ``Trainer.save`` writes
   ``model-N.pt``, which `genzoo import` reads.
3. ``genzoo compare`` of the three recipes (trained for ``--steps`` at ``--batch``, warmup 10, seed ``--seed``) and
   the imported run, all sampled by genzoo's DDIM (10 steps: the recipes' 25 at 2.5x the evaluation cost) on one
   sample stream (``--seed``), ``--samples`` images each against the shapes test split in the shapes judge's features;
   beside them the import of its online weights (``weights=model``) and the import with its own sampler (DDIM over
   25 of 1000 steps on its grid). A second run into the same OUT reuses every trained model and only evaluates.

The budget is steps, not minutes: the FLOPs match, so equal steps at equal batch are equal compute, and a shared
machine's load does not move it; each row's wall time and images/s are reported as measured.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/peers.py --seed 0 --out runs/peers-2000-0

writes OUT/compare/leaderboard.{md,csv,json} and OUT/peers.json, and prints the rows docs/interop.md shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RECIPES = ("ddpm-shapes16-unet", "ddpm-shapes16-diffusers", "ddpm-shapes16-ddpm-pytorch")
UNET = {"dim": 30, "dim_mults": [1, 2, 2]}  # ddpm-shapes16-ddpm-pytorch's network
DIFFUSION = {"image_size": 16, "timesteps": 1000, "objective": "pred_x0", "beta_schedule": "cosine"}
DATA = {"type": "shapes", "image_size": 16}


def network_flops() -> dict[str, dict]:
    """Each peer recipe's network: implementation, GFLOP per forward on one 3x16x16 image, parameters (M)."""
    from genzoo import api
    from genzoo.eval.networks import describe_network
    from genzoo.plugins import default_registry

    out = {}
    for recipe in RECIPES:
        resolved = api.resolve_recipe(recipe, sets=["data.num_train=16", "data.num_test=16"])
        model = api.create_model(resolved, data_spec=api.build_data(resolved).spec)
        implementation, gflop = describe_network(model, default_registry())
        params = sum(p.numel() for p in model.components["decoder"].denoiser.parameters()) / 1e6
        out[recipe] = {"implementation": implementation, "gflop_per_forward": gflop, "params_m": params}
    return out


def write_images(root: Path) -> Path:
    """The shapes training split at 16x16 as PNGs: what lucidrains' Trainer reads (ToTensor, then [-1, 1])."""
    from PIL import Image

    from genzoo import api

    folder = root / "images"
    images = api.build_data({"data": DATA}).split("train").tensors()["image"]
    if folder.exists() and len(list(folder.glob("*.png"))) == len(images):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="RGB").save(folder / f"{i:05d}.png")
    return folder


def train_library(root: Path, *, steps: int, batch: int, seed: int) -> tuple[Path, float]:
    """lucidrains' own Trainer for ``steps``; returns (its model-N.pt, wall seconds of its training loop). A
    checkpoint already there is reused (a second run only evaluates again)."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    checkpoint = root / f"results-{seed}" / f"model-{steps}.pt"
    timing = checkpoint.with_suffix(".json")
    if checkpoint.exists() and timing.exists():
        return checkpoint, json.loads(timing.read_text())["seconds"]
    folder = write_images(root)
    torch.manual_seed(seed)
    unet = Unet(dim=UNET["dim"], dim_mults=tuple(UNET["dim_mults"]))
    diffusion = GaussianDiffusion(unet, sampling_timesteps=25, **DIFFUSION)
    trainer = Trainer(
        diffusion,
        str(folder),
        train_batch_size=batch,
        train_lr=1e-3,
        train_num_steps=steps,
        ema_decay=0.995,
        augment_horizontal_flip=False,
        calculate_fid=False,
        save_and_sample_every=10**9,
        results_folder=str(root / f"results-{seed}"),
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.save(steps)
    timing.write_text(json.dumps({"seconds": seconds}))
    return checkpoint, seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="training seeds and the evaluation's sample stream")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--samples", type=int, default=200)
    args = p.parse_args()

    from genzoo import api
    from genzoo.eval.compare import compare
    from genzoo.eval.evaluate import EvalSettings

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    flops = network_flops()
    for recipe, f in flops.items():
        print(f"{recipe}: {f['implementation']}, {f['gflop_per_forward']:.4f} GFLOP/forward, {f['params_m']:.2f}M")
    checkpoint, library_seconds = train_library(
        args.out / "ddpm-pytorch", steps=args.steps, batch=args.batch, seed=args.seed
    )
    imported, online = args.out / "imported", args.out / "imported-online"  # its EMA weights, and the online ones
    options = {"unet": UNET, "diffusion": {**DIFFUSION, "sampling_timesteps": 25}}
    for run, weights in ((imported, "ema"), (online, "model")):
        if not run.exists():
            api.import_model(checkpoint, run, format="ddpm-pytorch", data=DATA, options={**options, "weights": weights})
    sets = [
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        "train.warmup_steps=10",
        f"train.seed={args.seed}",
        f"train.checkpoint_every={args.steps}",
        "train.sample_every=0",
        "train.stages=null",
        "sampler.steps=10",
    ]
    t0 = time.perf_counter()
    rows = compare(
        [*RECIPES, f"{imported}@ddim:10", f"{online}@ddim:10", str(imported)],  # the last: its own DDIM-25 grid
        out=args.out / "compare",
        settings=EvalSettings(samples=args.samples, seed=args.seed),
        segments=1,
        sets=sets,
        log=lambda m: print(m, file=sys.stderr),
    )
    compare_seconds = time.perf_counter() - t0
    result = {
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "samples": args.samples,
        "networks": flops,
        "library_trainer_seconds": library_seconds,
        "compare_seconds": compare_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "rows": [{**r.__dict__, **r.figures} for r in rows],
    }
    (args.out / "peers.json").write_text(json.dumps(result, indent=1, default=str))
    print("| model | implementation | FD | precision | recall | images/s | NFE | GFLOP/fwd | train min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r.figures
        minutes = library_seconds / 60 if r.recipe.startswith(str(imported)) else r.train_minutes
        nfe = f.get("nfe", float("nan"))
        print(
            f"| {Path(r.name).name} | {r.implementation} | {f.get('fd', float('nan')):.1f} | "
            f"{f.get('precision', float('nan')):.2f} | {f.get('recall', float('nan')):.2f} | "
            f"{f.get('images_per_s', float('nan')):.2f} | {nfe:.0f} | {r.gflop:.3f} | {minutes:.1f} |"
            + (f" {r.error}" if r.error else "")
        )
    print(
        f"lucidrains' Trainer {library_seconds:.0f}s, compare {compare_seconds:.0f}s, "
        f"total {result['total_seconds']:.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
