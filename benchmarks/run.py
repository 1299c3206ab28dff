"""`make bench`: throughput against the machine's measured matmul peak, and peers where installed.

Writes benchmarks/results.json and benchmarks/results.md. Timings are only comparable as ratios
within one run: machines differ from session to session.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from genzoo import api
from genzoo.diffusion import (
    DDIMSampler,
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from genzoo.diffusion.samplers import DDIMConfig
from genzoo.nn import UNet

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import PEER_UNET, best_time, diffusers_unet, flops  # noqa: E402

CPU = torch.device("cpu")


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), device: torch.device = CPU) -> float:
    """The machine's practical GEMM peak in GFLOP/s: the best of square matmuls over ``sizes`` and of a
    1x1 convolution (the same GEMM through oneDNN). Both are there because torch's CPU matmul and conv
    kernels come from different libraries (MKL, oneDNN) that do not reach the same rate on every CPU:
    on the AMD development machine the matmuls peaked at 210 GFLOP/s and the 1x1 conv at 320. A 3x3
    conv is not used: oneDNN may run it with fewer multiplications (Winograd) than the count assumes
    (it measured 508 "GFLOP/s")."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        best = max(best, 2 * n**3 / best_time(lambda: a @ b, 5) / 1e9)
    if len(sizes) > 1:
        conv = torch.nn.Conv2d(512, 512, 1, bias=False).to(device, dtype, memory_format=torch.channels_last)
        x = torch.randn(16, 512, 32, 32, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            best = max(best, 2 * 16 * 32 * 32 * 512 * 512 / best_time(lambda: conv(x), 5) / 1e9)
    return best


def peaks(device: torch.device) -> tuple[float, float, bool]:
    """(fp32 peak, bf16 peak, whether bf16 is usable) in GFLOP/s. bf16 is probed at 512² first: without bf16
    units it is hundreds of times slower, and then its full probe is skipped."""
    fp32, bf16 = matmul_peak(torch.float32, device=device), matmul_peak(torch.bfloat16, (512,), device)
    usable = bf16 > 0.5 * fp32 or device.type == "cuda"
    return fp32, max(bf16, matmul_peak(torch.bfloat16, device=device)) if usable else bf16, usable


def unet_forward(batch: int = 16, device: torch.device = CPU) -> dict:
    net = api.for_inference(UNet(PEER_UNET), device)  # genzoo's inference default (NHWC)
    x, t = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 1000, (batch,), device=device)
    with torch.inference_mode():
        f = flops(lambda: net(x, t))
        dt = best_time(lambda: net(x, t), 5)
    return {
        "config": PEER_UNET.model_dump(),
        "batch": batch,
        "gflop": f / 1e9,
        "seconds": dt,
        "gflop_per_s": f / dt / 1e9,
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
    }


def ddim_images_per_s(batch: int = 16, steps: int = 20, device: torch.device = CPU) -> float:
    net = api.for_inference(UNet(PEER_UNET), device)  # genzoo's inference default (NHWC)
    d = GaussianDiffusion(
        betas=get_named_beta_schedule("linear", 1000),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_LARGE,
        loss_type=LossType.SIMPLE,
    )
    sampler = DDIMSampler(DDIMConfig(steps=steps))
    run = lambda: sampler.sample(d, net, (batch, 3, 32, 32), generator=torch.Generator(device).manual_seed(0))  # noqa: E731
    return batch / best_time(run, 2)


def diffusers_ddim_images_per_s(batch: int = 16, steps: int = 20, device: torch.device = CPU) -> dict | str:
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        return "diffusers is not installed (pip install -e '.[bench]')"
    net = diffusers_unet().to(device).eval()
    x, t = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 1000, (batch,), device=device)
    with torch.inference_mode():
        f = flops(lambda: net(x, t))  # both libraries counted the same way (CPU SDPA included)
    sched = DDIMScheduler(num_train_timesteps=1000)

    @torch.inference_mode()
    def run():
        sched.set_timesteps(steps)
        y = torch.randn(batch, 3, 32, 32, generator=torch.Generator(device).manual_seed(0), device=device)
        for tt in sched.timesteps:
            y = sched.step(net(y, tt).sample, tt, y).prev_sample
        return y

    return {"images_per_s": batch / best_time(run, 2), "gflop_forward": f / 1e9}


if __name__ == "__main__":
    from trainer_overhead import measure

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # every figure below on this one device
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        }
    }
    results["matmul_fp32_gflop_s"], bf16, results["bf16_usable"] = peaks(device)
    results["matmul_bf16_gflop_s"] = bf16
    results["unet_forward_fp32"] = unet_forward(device=device)
    # the peak probe drifts between runs on a shared host (285-480 GFLOP/s seen), so the U-Net's share is
    # also taken against three peaks each measured just before it
    pairs = []
    for _ in range(3):
        peak_now = matmul_peak(torch.float32, device=device)
        pairs.append(unet_forward(device=device)["gflop_per_s"] / peak_now)
    results["unet_forward_fp32"]["fraction_of_peak_paired"] = sorted(pairs)
    results["unet_forward_fp32"]["fraction_of_matmul_peak"] = (
        results["unet_forward_fp32"]["gflop_per_s"] / results["matmul_fp32_gflop_s"]
    )
    results["ddim20_images_per_s_fp32"] = ddim_images_per_s(device=device)
    peer = diffusers_ddim_images_per_s(device=device)
    results["diffusers_ddim20"] = peer
    if isinstance(peer, dict):
        results["ddim20_ratio_vs_diffusers"] = results["ddim20_images_per_s_fp32"] / peer["images_per_s"]
        results["flops_ratio_vs_diffusers"] = results["unet_forward_fp32"]["gflop"] / peer["gflop_forward"]
    results["trainer_overhead"] = measure(400)
    from interop import imported
    from interop import markdown as interop_markdown

    results["imported_ddpm_cifar10"] = imported()  # issue 20: `genzoo sample` on an imported diffusers model
    from families import markdown as families_markdown
    from families import run as families_run

    results.update(
        families_run(
            32,
            results["matmul_fp32_gflop_s"],
            results["bf16_usable"],
            device,
            quick="--quick" in sys.argv,
            bf16_peak=results["matmul_bf16_gflop_s"],
        )
    )
    from sampler_quality import mixture_benchmark, mixture_markdown

    # issue 25: every sampler x time grid at 10 and 20 NFE on the closed-form mixtures (exact denoiser),
    # diffusers beside
    results["sampler_mixtures"] = mixture_benchmark(n=100_000, nfes=(10, 20), seeds=1, log=lambda m: None)
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    u = results["unet_forward_fp32"]
    lines = [
        "| measure | value |",
        "|---|---|",
        "| fp32 GEMM peak (best of matmul 1024², 2048², 4096² and a 512-channel 1×1 conv) | "
        f"{results['matmul_fp32_gflop_s']:.1f} GFLOP/s |",
        f"| bf16 matmul peak | {bf16:.1f} GFLOP/s ({'usable' if results['bf16_usable'] else 'no bf16 units: slow'}) |",
        f"| U-Net forward, batch 16, 32×32 ({u['gflop']:.1f} GFLOP) | {u['gflop_per_s']:.1f} GFLOP/s = "
        f"{u['fraction_of_matmul_peak']:.0%} of peak; "
        f"back-to-back pairs {', '.join(f'{f:.0%}' for f in u['fraction_of_peak_paired'])} |",
        f"| DDIM-20 images/s, batch 16, 32×32 (genzoo) | {results['ddim20_images_per_s_fp32']:.2f} |",
        f"| DDIM-20 images/s (diffusers UNet2DModel, {peer['gflop_forward']:.1f} GFLOP/forward) | "
        f"{peer['images_per_s']:.2f}: genzoo is {results['ddim20_ratio_vs_diffusers']:.2f}x |"
        if isinstance(peer, dict)
        else f"| diffusers | {peer} |",
        *(
            f"| trainer / bare loop steps/s, MLP width {k[6:]} ({v['bare_steps_per_s']:.0f} bare steps/s) | "
            f"{v['trainer_over_bare']:.2f} |"
            for k, v in results["trainer_overhead"].items()
            if k.startswith("width_")
        ),
    ]
    lines.append(interop_markdown(results["imported_ddpm_cifar10"]))
    text = "\n".join(lines) + "\n\n" + families_markdown(results)
    text += "\n\n## Samplers x time grids on the closed-form mixtures (docs/diffusion.md)\n\n" + "\n\n".join(
        mixture_markdown(results["sampler_mixtures"], name) for name in results["sampler_mixtures"]["mixtures"]
    )
    (HERE / "results.md").write_text(text)
    print(text)
