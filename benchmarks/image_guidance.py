"""Reference-image guidance on a trained shapes model (docs/guidance.md): similarity to the reference with and without
the `pixel`, `feature` and `style` guidances.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/image_guidance.py RUN [--refs 12] [--n 8] [--out FILE.json]

RUN is a trained shapes diffusion run (16x16: `genzoo train ddpm-shapes-small --set data.image_size=16 ...`). Each of
``--refs`` test images is the reference of ``--n`` samples; every configuration draws from the same noise. Measured:
the MSE of the 4x4-block low-pass to the reference (ILVR's phi_4), the cosine of a from-scratch resnet18's features
(the feature guidance's own network), the Gram distance of its feature maps (the style guidance's), and, from a
network no guidance sees, the shapes judge's agreement with the reference's attributes, plus the samples' diversity
(mean pairwise RMS distance between the samples of one reference).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from genzoo_image_guidance.features import cosine_similarity, style_distance
from genzoo_image_guidance.ilvr import low_pass

from genzoo import api
from genzoo.eval.judges import load_judge
from genzoo.plugins import default_registry

CONFIGS = {
    "none": None,
    "pixel N=4": {"type": "pixel", "factor": 4},
    "pixel N=8": {"type": "pixel", "factor": 8},
    "pixel N=4, t >= 500": {"type": "pixel", "factor": 4, "stop": 500},
    "feature s=1e3": {"type": "feature", "scale": 1e3},
    "feature s=3e3": {"type": "feature", "scale": 3e3},
    "feature s=1e4": {"type": "feature", "scale": 1e4},
    "style s=1e6": {"type": "style", "scale": 1e6},
    "style s=1e7": {"type": "style", "scale": 1e7},
    "style s=1e8": {"type": "style", "scale": 1e8},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--refs", type=int, default=12)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--out")
    p.add_argument(
        "--grid", help="write only a PNG: per row a reference, then 3 samples each of none, pixel, feature, style"
    )
    args = p.parse_args(argv)
    if args.grid:
        return grid(args.run, args.grid)
    registry = default_registry()
    source = api.build_data(_recipe(args.run))
    test = source.split("test").tensors()
    refs = test["image"][: args.refs]
    attrs = {a: test["attributes"][: args.refs, i] for i, a in enumerate(source.spec.attributes)}
    judge = load_judge("shapes", source.cfg.model_dump())
    # the measuring networks: the guidances' own defaults (resnet18 from scratch, seed 0)
    feature_net = registry.build("guidance", {"type": "feature"}, data=source.spec).features
    style_net = registry.build("guidance", {"type": "style"}, data=source.spec).features
    n, k = args.n, args.refs
    ref_rep = refs.repeat_interleave(n, 0)
    rows = {}
    for name, spec in CONFIGS.items():
        sets = [f"guidance.{f}={v}" for f, v in (spec or {}).items() if f != "type"]
        model = api.load_model(args.run, guidance=spec["type"] if spec else "none", sets=sets)
        t0 = time.perf_counter()
        x = model.sample(k * n, {"reference": ref_rep}, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            pred = judge.predict(x)
            flat = x.reshape(k, n, -1)
            pair = torch.cdist(flat, flat) / flat.shape[-1] ** 0.5
            rows[name] = {
                "lowpass_mse": (low_pass(x, 4) - low_pass(ref_rep, 4)).pow(2).mean().item(),
                "feature_cos": cosine_similarity(feature_net(x), feature_net(ref_rep)).mean().item(),
                "gram_dist": style_distance(style_net(x), style_net(ref_rep)).mean().item(),
                **{f"judge_{a}": (pred[a] == attrs[a].repeat_interleave(n, 0)).float().mean().item() for a in attrs},
                "diversity": (pair.sum((1, 2)) / (n * (n - 1))).mean().item(),
                "seconds": seconds,
            }
        print(name, {m: round(v, 4 if m != "gram_dist" else 7) for m, v in rows[name].items()}, flush=True)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def grid(run: str, path: str, refs: int = 4, n: int = 3) -> int:
    from genzoo.training.images import save_grid

    images = api.build_data(_recipe(run)).split("test").tensors()["image"][:refs]
    cols = [images[:, None]]
    for name in ("none", "pixel N=4", "feature s=3e3", "style s=1e7"):
        spec = CONFIGS[name] or {}
        sets = [f"guidance.{f}={v}" for f, v in spec.items() if f != "type"]
        model = api.load_model(run, guidance=spec.get("type", "none"), sets=sets)
        x = model.sample(
            refs * n, {"reference": images.repeat_interleave(n, 0)}, generator=torch.Generator().manual_seed(1)
        )
        cols.append(x.clamp(-1, 1).reshape(refs, n, *x.shape[1:]))
    save_grid(torch.cat(cols, 1).reshape(-1, *images.shape[1:]), path, nrow=1 + 4 * n, min_side=48)
    return 0


def _recipe(run: str) -> dict:
    from genzoo.checkpoint import load_checkpoint

    return load_checkpoint(run).recipe


def table(rows: dict[str, dict[str, float]]) -> str:
    cols = ["lowpass_mse", "feature_cos", "gram_dist", "judge_colour", "judge_shape", "judge_position", "judge_size"]
    cols += ["diversity", "seconds"]
    lines = ["| guidance | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [
            f"{r[c]:.2e}" if c == "gram_dist" else f"{r[c]:.3f}" if c != "seconds" else f"{r[c]:.0f}" for c in cols
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
