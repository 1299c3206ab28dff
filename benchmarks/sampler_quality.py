"""Sample quality against the number of steps for each sampler, on a trained checkpoint.

    python benchmarks/sampler_quality.py runs/demo [--n 1000]

Quality is the Fréchet distance between samples and the test split in *pixel* space (the
Gaussian-fit distance of FID, without a feature network): a stand-in until the evaluation issue
brings judge features. Lower is better; the test split against the train split is the floor.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genzoo import api


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    middle = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * middle)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    ck_model = api.load_model(args.run)
    resolved = ck_model.resolved_recipe
    source = api.build_data(resolved)
    # equal sample counts everywhere: the Fréchet distance of a finite sample is biased by its size
    test = source.split("test").tensors()["image"][: args.n]
    train = source.split("train").tensors()["image"][: len(test)]
    rows = [{"sampler": "train split (floor)", "steps": None, "fd_pixels": frechet(train, test)}]
    for sampler, steps_list in (("ddpm", (10, 20, 50, 100)), ("ddim", (10, 20, 50)), ("dpm-solver++", (10, 20, 50))):
        for steps in steps_list:
            model = api.load_model(args.run, sampler=sampler, steps=steps)
            t0 = time.perf_counter()
            x = model.sample(len(test), generator=torch.Generator().manual_seed(0))
            rows.append({"sampler": sampler, "steps": steps, "fd_pixels": frechet(x, test),
                         "images_per_s": len(test) / (time.perf_counter() - t0)})
            print(json.dumps(rows[-1]))
    print("\n| sampler | steps | pixel FD to test | images/s |\n|---|---|---|---|")
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if "images_per_s" in r else ""
        print(f"| {r['sampler']} | {r['steps'] or ''} | {r['fd_pixels']:.3f} | {ips} |")


if __name__ == "__main__":
    main()
