"""Sample quality against the number of network evaluations (NFE), for every diffusion sampler on every time grid.

    python benchmarks/sampler_quality.py --mixtures [--n 100000] [--nfe 5,10,20,40] [--seeds 2] [--names ...]
        [--plot PNG] [--json OUT]
    python benchmarks/sampler_quality.py --fd RUN [RUN ...] [--samples 500] [--nfe 5,10,20] [--plot PNG] [--json OUT]
    python benchmarks/sampler_quality.py RUN [--n 1000]          # the older pixel-space Fréchet distance per sampler

``--mixtures``: the closed-form Gaussian mixtures of ``genzoo.diffusion.gmm`` under the exact denoiser (no training),
the linear schedule at T = 1000: weight, mean and covariance errors (``GaussianMixture.errors``) of each genzoo
sampler x grid and of diffusers' multistep schedulers on the same exact denoiser, beside ancestral DDPM-1000 and
exact draws of the same size. Seconds per configuration.

``--fd``: trained checkpoints, FD in the dataset judge's features (``genzoo eval``'s metric) of each sampler on its
default grid and on the others, against ancestral sampling at 250 steps of the same model; one seeded stream.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from genzoo import api

GRIDS = ("uniform", "quadratic", "log-snr", "karras")
# (label, registry name, extra config): the solvers whose order or grid matter
SOLVERS = (
    ("DDIM", "ddim", {}),
    ("DPM-Solver++(2M)", "dpm-solver++", {}),
    ("DPM-Solver++(3M)", "dpmpp-3m", {}),
    ("DPM-Solver++(3M) SDE", "dpmpp-3m-sde", {}),
    ("UniPC-2 (bh2)", "unipc", {}),
    ("UniPC-3 (bh2)", "unipc", {"order": 3}),
    ("EDM Heun", "edm-heun", {}),
)
METRICS = ("weight", "mean", "cov")


def steps_for(name: str, nfe: int) -> int:
    """The ``steps`` that spend at most ``nfe`` evaluations: Heun's ``steps`` levels cost 2 steps - 1."""
    return (nfe + 1) // 2 if name == "edm-heun" else nfe


# --------------------------------------------------------------------------- closed-form mixtures


def mixtures() -> dict[str, Any]:
    from genzoo.diffusion.gmm import GaussianMixture, small_variance_mixture

    f64 = torch.float64
    separated = GaussianMixture(  # tests/test_samplers_closed_form.py's: > 6 standard deviations apart
        weights=torch.tensor([0.2, 0.3, 0.5], dtype=f64),
        means=torch.tensor([[-3.0, 0.0], [2.0, 2.5], [2.0, -2.5]], dtype=f64),
        covs=torch.tensor(
            [[[0.3, 0.0], [0.0, 0.6]], [[0.5, 0.2], [0.2, 0.4]], [[0.4, -0.15], [-0.15, 0.3]]], dtype=f64
        ),
    )
    return {"small-variance": small_variance_mixture(), "separated": separated}


def linear_process(timesteps: int = 1000):
    from genzoo.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule

    return GaussianDiffusion(
        betas=get_named_beta_schedule("linear", timesteps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.SIMPLE,
        clip_range=None,
    )


class Counted:
    """The exact denoiser, counting its evaluations."""

    def __init__(self, model: Callable) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x, t, cond=None):
        self.calls += 1
        return self.model(x, t, cond)


def diffusers_configs() -> list[tuple[str, Callable[[], Any]]]:
    """diffusers' multistep schedulers as their docs recommend them, each with and without Karras sigmas (and
    DPM-Solver's uniform log-SNR ``use_lu_lambdas``); all end with ``final_sigmas_type="zero"`` (their default)."""
    import diffusers

    common = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    out = []
    for order in (2, 3):
        for label, extra in (
            ("", {}),
            (", karras", {"use_karras_sigmas": True}),
            (", lu-lambdas", {"use_lu_lambdas": True}),
        ):
            out.append(
                (
                    f"diffusers DPMSolverMultistep {order}M{label}",
                    lambda o=order, e=extra: diffusers.DPMSolverMultistepScheduler(solver_order=o, **common, **e),
                )
            )
    out.append(
        (
            "diffusers DPMSolverMultistep 2M SDE, karras",
            lambda: diffusers.DPMSolverMultistepScheduler(
                solver_order=2, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, **common
            ),
        )
    )
    for order in (2, 3):
        for label, extra in (("", {}), (", karras", {"use_karras_sigmas": True})):
            out.append(
                (
                    f"diffusers UniPCMultistep {order}{label}",
                    lambda o=order, e=extra: diffusers.UniPCMultistepScheduler(solver_order=o, **common, **e),
                )
            )
    out.append(
        ("diffusers HeunDiscrete, karras", lambda: diffusers.HeunDiscreteScheduler(use_karras_sigmas=True, **common))
    )
    return out


def diffusers_sample(make: Callable[[], Any], model: Counted, noise: torch.Tensor, nfe: int, seed: int) -> torch.Tensor:
    """A diffusers scheduler's loop on the exact denoiser: the model gets the scheduler's timestep rounded to an
    integer (as an integer-trained network is used with interpolated Karras timesteps) and the VP input."""
    sched = make()
    heun = type(sched).__name__ == "HeunDiscreteScheduler"
    sched.set_timesteps((nfe + 1) // 2 if heun else nfe)
    g = torch.Generator().manual_seed(seed)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        t_int = torch.full((len(x),), int(round(float(t))), dtype=torch.long)
        eps = model(sched.scale_model_input(x, t), t_int, None)
        kw = {"generator": g} if "generator" in sched.step.__code__.co_varnames else {}
        x = sched.step(eps, t, x, **kw).prev_sample
    return x


def mixture_benchmark(
    n: int = 100_000,
    nfes: tuple[int, ...] = (5, 10, 20, 40),
    seeds: int = 1,
    peers: bool = True,
    names: tuple[str, ...] = ("small-variance", "separated"),
    log: Callable[[str], None] = print,
) -> dict:
    """Errors of each sampler x grid x NFE, averaged over ``seeds`` draws of ``n`` samples (the same noise for
    every sampler of a seed), beside ancestral DDPM-1000, exact draws, and diffusers' schedulers (``peers``)."""
    from genzoo.diffusion.gmm import exact_eps_model
    from genzoo.plugins import default_registry

    registry, d = default_registry(), linear_process()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: threads only add wake-ups
    results: dict[str, Any] = {"n": n, "seeds": seeds, "process": "linear, T = 1000", "mixtures": {}}
    try:
        for name in names:
            gmm = mixtures()[name]
            model = Counted(exact_eps_model(gmm, d))
            rows: list[dict] = []

            def record(label, grid, nfe, draw, **extra):
                errs = []
                for seed in range(seeds):
                    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
                    model.calls = 0
                    t0 = time.perf_counter()
                    x = draw(noise, seed)
                    errs.append(gmm.errors(x))
                    calls, seconds = model.calls, time.perf_counter() - t0
                row = {
                    "sampler": label,
                    "grid": grid,
                    "nfe": calls if nfe is None else nfe,
                    "seconds": seconds,
                    **extra,
                    **{m: sum(e[m] for e in errs) / seeds for m in METRICS},
                }
                rows.append(row)
                log(
                    f"{name:15s} {label:45s} {grid or '':9s} nfe {row['nfe']:4d}  "
                    + "  ".join(f"{m} {row[m]:.4f}" for m in METRICS)
                )

            record(
                "exact draws", None, 0, lambda noise, seed: gmm.sample(n, torch.Generator().manual_seed(2000 + seed))[0]
            )
            ddpm = registry.build("sampler", {"type": "ddpm", "steps": 1000, "clip": False})
            record(
                "ancestral DDPM-1000",
                "uniform",
                None,
                lambda noise, seed: ddpm.sample(
                    d, model, (n, 2), noise=noise, generator=torch.Generator().manual_seed(seed)
                ),
            )
            for nfe in nfes:
                for label, sampler_name, extra in SOLVERS:
                    for grid in GRIDS:
                        spec = {
                            "type": sampler_name,
                            "steps": steps_for(sampler_name, nfe),
                            "grid": grid,
                            "clip": False,
                            **extra,
                        }
                        sampler = registry.build("sampler", spec)
                        record(
                            label,
                            grid,
                            None,
                            lambda noise, seed, s=sampler: s.sample(
                                d, model, (n, 2), noise=noise, generator=torch.Generator().manual_seed(seed)
                            ),
                            target_nfe=nfe,
                        )
                if peers:
                    for label, make in diffusers_configs():
                        record(
                            label,
                            None,
                            None,
                            lambda noise, seed, mk=make, k=nfe: diffusers_sample(mk, model, noise, k, seed),
                            target_nfe=nfe,
                        )
            results["mixtures"][name] = rows
    finally:
        torch.set_num_threads(before)
    return results


def mixture_markdown(results: dict, name: str = "small-variance", nfes: tuple[int, ...] | None = None) -> str:
    """The table of one mixture: per target NFE, each sampler on each grid and each diffusers setting."""
    rows = results["mixtures"][name]
    fixed = [r for r in rows if "target_nfe" not in r]
    nfes = nfes or tuple(sorted({r["target_nfe"] for r in rows if "target_nfe" in r}))
    lines = [
        f"**{name}** mixture, {results['n']} samples x {results['seeds']} seed(s), {results['process']}; "
        "errors: weight "
        "|w_hat - w|, mean in component standard deviations, covariance ||S_hat - S||_F / ||S||_F, each the worst "
        "component.",
        "",
        "| sampler | grid | NFE | weight | mean | cov |",
        "|---|---|---|---|---|---|",
    ]
    for r in fixed:
        lines.append(
            f"| {r['sampler']} | {r['grid'] or ''} | {r['nfe']} | {r['weight']:.4f} | {r['mean']:.4f} | "
            f"{r['cov']:.4f} |"
        )
    for nfe in nfes:
        for r in (r for r in rows if r.get("target_nfe") == nfe):
            lines.append(
                f"| {r['sampler']} | {r['grid'] or ''} | {r['nfe']} | {r['weight']:.4f} | {r['mean']:.4f} | "
                f"{r['cov']:.4f} |"
            )
    return "\n".join(lines)


def mixture_plot(results: dict, path: str, name: str = "small-variance") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["mixtures"][name]
    ddpm = next(r for r in rows if r["sampler"] == "ancestral DDPM-1000")
    exact = next(r for r in rows if r["sampler"] == "exact draws")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), sharey=True)
    for ax, grid in zip(axes, GRIDS):
        for label, _, _ in SOLVERS:
            pts = sorted((r["nfe"], r["cov"]) for r in rows if r["sampler"] == label and r["grid"] == grid)
            ax.plot(*zip(*pts), marker="o", label=label)
        best = {}
        for r in rows:
            if r["sampler"].startswith("diffusers") and "target_nfe" in r:
                best[r["target_nfe"]] = min(best.get(r["target_nfe"], (float("inf"), 0)), (r["cov"], r["nfe"]))
        ax.plot(
            [v[1] for _, v in sorted(best.items())],
            [v[0] for _, v in sorted(best.items())],
            "k--",
            marker="x",
            label="diffusers, best setting per NFE",
        )
        ax.axhline(ddpm["cov"], color="grey", lw=1, label="ancestral DDPM-1000")
        ax.axhline(exact["cov"], color="grey", lw=1, ls=":", label="exact draws (sampling error)")
        ax.set(xscale="log", yscale="log", title=f"{grid} grid", xlabel="NFE")
    axes[0].set_ylabel(f"covariance error, {name} mixture")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- trained models: judge FD


def fd_benchmark(
    run: str,
    *,
    samples: int = 500,
    nfes: tuple[int, ...] = (5, 10, 20),
    reference: tuple[str, int] | None = ("ddpm", 250),
    grids: tuple[str, ...] = GRIDS,
    solvers=SOLVERS,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """FD (judge features, ``samples`` against as many test images, one seeded stream) of each solver x grid x NFE
    and of ``reference`` (ancestral 250 steps) for the checkpoint ``run``."""
    from genzoo.checkpoint import load_checkpoint
    from genzoo.eval.evaluate import EvalSettings, evaluate
    from genzoo.eval.judges import load_judge
    from genzoo.plugins import default_registry

    device = torch.device("cpu")
    source = api.build_data(load_checkpoint(run).recipe)
    judge = load_judge(source.spec.name, source.cfg.model_dump(), device=device)
    metrics = {"fd": default_registry().build("metric", {"type": "fd"})}
    settings = EvalSettings(samples=samples, seed=0)
    rows = []

    def measure(label: str, sampler: str, steps: int, sets: list[str], **extra):
        model = api.load_model(run, sampler=sampler, steps=steps, sets=sets)
        t0 = time.perf_counter()
        fd = evaluate(model, source, metrics=metrics, judge=judge, settings=settings, device=device)["fd"]
        rows.append(
            {
                "run": run,
                "sampler": label,
                "nfe": model.components["sampler"].nfe(),
                "fd": fd,
                "seconds": time.perf_counter() - t0,
                "sets": sets,
                **extra,
            }
        )
        log(json.dumps(rows[-1]))

    if reference is not None:
        measure(f"ancestral {reference[1]}", reference[0], reference[1], [], grid="uniform")
    for nfe in nfes:
        for label, name, extra in solvers:
            # today's samplers on today's grid are always measured, as the baseline
            for grid in dict.fromkeys((*grids, "uniform") if name in ("ddim", "dpm-solver++") else grids):
                sets = [f"sampler.grid={grid}", *(f"sampler.{k}={v}" for k, v in extra.items())]
                measure(label, name, steps_for(name, nfe), sets, grid=grid, target_nfe=nfe)
    return rows


def fd_markdown(rows: list[dict]) -> str:
    ref = next(r for r in rows if "target_nfe" not in r)
    lines = [
        f"`{ref['run']}`: FD of {ref['sampler']} steps = {ref['fd']:.3g}",
        "",
        "| sampler | grid | NFE | FD | FD / ancestral-250 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "target_nfe" in r:
            lines.append(f"| {r['sampler']} | {r['grid']} | {r['nfe']} | {r['fd']:.3g} | {r['fd'] / ref['fd']:.2f} |")
    return "\n".join(lines)


def fd_plot(tables: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.2), squeeze=False)
    for ax, (title, rows) in zip(axes[0], tables.items()):
        ref = next(r for r in rows if "target_nfe" not in r)
        for k, (label, _, _) in enumerate(SOLVERS):  # a colour per solver, a line style per grid
            for grid, style in (("log-snr", "-"), ("karras", "--"), ("uniform", ":")):
                pts = sorted(
                    (r["nfe"], r["fd"])
                    for r in rows
                    if r["sampler"] == label and r.get("grid") == grid and "target_nfe" in r
                )
                if pts:
                    ax.plot(*zip(*pts), ls=style, color=f"C{k}", marker="o", label=f"{label}, {grid}")
        ax.axhline(ref["fd"], color="grey", lw=1, label=f"{ref['sampler']} steps ({ref['nfe']} NFE)")
        ax.axhline(1.2 * ref["fd"], color="grey", lw=1, ls="-.", label="1.2x that")
        ax.set(xscale="log", yscale="log", title=title, xlabel="NFE", ylabel="FD (judge features)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- the older pixel-space sweep


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    middle = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * middle)


def pixel_fd(run: str, n: int) -> None:
    """Pixel-space Fréchet distance of ddpm / ddim / dpm-solver++ at several steps (benchmarks/sampler_quality.md)."""
    ck_model = api.load_model(run)
    resolved = ck_model.resolved_recipe
    source = api.build_data(resolved)
    # equal sample counts everywhere: the Fréchet distance of a finite sample is biased by its size
    test = source.split("test").tensors()["image"][:n]
    train = source.split("train").tensors()["image"][: len(test)]
    rows = [{"sampler": "train split (floor)", "steps": None, "fd_pixels": frechet(train, test)}]
    for sampler, steps_list in (("ddpm", (10, 20, 50, 100)), ("ddim", (10, 20, 50)), ("dpm-solver++", (10, 20, 50))):
        for steps in steps_list:
            model = api.load_model(run, sampler=sampler, steps=steps)
            t0 = time.perf_counter()
            x = model.sample(len(test), generator=torch.Generator().manual_seed(0))
            rows.append(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "fd_pixels": frechet(x, test),
                    "images_per_s": len(test) / (time.perf_counter() - t0),
                }
            )
            print(json.dumps(rows[-1]))
    print("\n| sampler | steps | pixel FD to test | images/s |\n|---|---|---|---|")
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if "images_per_s" in r else ""
        print(f"| {r['sampler']} | {r['steps'] or ''} | {r['fd_pixels']:.3f} | {ips} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="*", help="checkpoint(s): the pixel-FD sweep, or with --fd the judge-FD sweep")
    p.add_argument("--mixtures", action="store_true", help="closed-form mixtures with the exact denoiser")
    p.add_argument("--fd", action="store_true", help="judge FD against NFE on the trained checkpoints RUN")
    p.add_argument("--n", type=int, default=None, help="samples (mixtures: 100000; pixel FD: 1000)")
    p.add_argument("--samples", type=int, default=500, help="--fd: samples and test images")
    p.add_argument("--nfe", default=None, help="comma-separated NFE (mixtures: 5,10,20,40; --fd: 5,10,20)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--names", default="small-variance,separated", help="--mixtures: which mixtures")
    p.add_argument("--grids", default=",".join(GRIDS), help="--fd: the grids to sweep")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--plot", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.mixtures:
        nfes = tuple(int(v) for v in (args.nfe or "5,10,20,40").split(","))
        res = mixture_benchmark(
            args.n or 100_000, nfes, args.seeds, peers=not args.no_diffusers, names=tuple(args.names.split(","))
        )
        for name in res["mixtures"]:
            print("\n" + mixture_markdown(res, name))
        if args.plot:
            mixture_plot(res, args.plot)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    elif args.fd:
        nfes = tuple(int(v) for v in (args.nfe or "5,10,20").split(","))
        tables = {
            run: fd_benchmark(run, samples=args.samples, nfes=nfes, grids=tuple(args.grids.split(",")))
            for run in args.run
        }
        for rows in tables.values():
            print("\n" + fd_markdown(rows))
        if args.plot:
            fd_plot(tables, args.plot)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(tables, f, indent=1)
    else:
        for run in args.run:
            pixel_fd(run, args.n or 1000)


if __name__ == "__main__":
    main()
