"""Issue 20's measurement: `genzoo sample` on an imported diffusers model against diffusers' own DDIMPipeline.

The model has google/ddpm-cifar10-32's configuration (its config.json) with random weights; both libraries sample
it in this process with DDIM-50 at batch 16 from the same seed, and the images' max difference is reported with
the network's own (one forward, t = 999). `python benchmarks/interop.py` runs it alone and writes
benchmarks/interop.json; `make bench` (run.py) runs it with the rest.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import flops  # noqa: E402

MISSING = "diffusers is not installed (pip install -e '.[diffusers]')"
# google/ddpm-cifar10-32's unet/config.json (35.7M parameters)
CIFAR10_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    mid_block_scale_factor=1,
    time_embedding_type="positional",
)
# its scheduler: linear 1e-4..0.02 over T = 1000, x0 clipped to [-1, 1] (variance_type plays no part in DDIM)
CIFAR10_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True
)


def saved_pipeline(folder: Path, seed: int):
    """A DDIMPipeline of google/ddpm-cifar10-32's configuration, random weights from ``seed``, saved to ``folder``
    (in the default dtype)."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**CIFAR10_UNET)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**CIFAR10_SCHEDULER))
    pipe.save_pretrained(str(folder))
    return pipe


def imported_cifar10_ddim(batch: int = 16, steps: int = 50, seed: int = 0, rounds: int = 2) -> dict | str:
    """images/s of `genzoo sample` (native import) and of diffusers' DDIMPipeline on the same random model, CPU.

    The two alternate for ``rounds`` rounds and each keeps its best time, so that load from other jobs on the
    machine does not favour one side. Between the rounds diffusers runs once more with its U-Net in channels_last:
    the difference of its own two outputs is the floor that float32 rounding sets for the comparison.
    """
    if importlib.util.find_spec("diffusers") is None:
        return MISSING
    import diffusers
    from safetensors.torch import load_file

    from genzoo import api
    from genzoo.checkpoint import load_checkpoint
    from genzoo.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        saved_pipeline(tmp / "pipe", seed)
        api.import_model(tmp / "pipe", tmp / "run")
        how = load_checkpoint(tmp / "run").meta["imported_from"]["unet"]
        pipe = diffusers.DDIMPipeline.from_pretrained(str(tmp / "pipe"))
        pipe.set_progress_bar_config(disable=True)
        ours = api.load_model(tmp / "run").components["decoder"].denoiser
        x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 999)
        with torch.inference_mode():
            want = pipe.unet(x, t).sample
            forward_diff = (ours(x.contiguous(memory_format=torch.channels_last), t) - want).abs().max().item()
            f_ours, f_theirs = flops(lambda: ours(x, t)), flops(lambda: pipe.unet(x, t))

        def genzoo_sample() -> tuple[float, torch.Tensor]:
            """`genzoo sample` itself; its own timing of the sampling (what it prints), to the millisecond."""
            out, raw = io.StringIO(), tmp / "x.safetensors"
            args = ["sample", str(tmp / "run"), "-n", str(batch), "--steps", str(steps), "--seed", str(seed)]
            with contextlib.redirect_stdout(out):
                assert main([*args, "--device", "cpu", "--out", str(tmp / "grid.png"), "--save", str(raw)]) == 0
            seconds = float(re.search(r" in ([\d.]+)s \(", out.getvalue()).group(1))
            return seconds, (load_file(str(raw))["samples"] / 2 + 0.5).clamp(0, 1)

        def diffusers_sample() -> tuple[float, torch.Tensor]:
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(seed)
            images = pipe(batch_size=batch, num_inference_steps=steps, generator=g, output_type="pt").images
            return time.perf_counter() - t0, images

        ours_s, theirs_s = [], []
        for i in range(rounds):
            s, x_ours = genzoo_sample()
            ours_s.append(s)
            s, x_theirs = diffusers_sample()
            theirs_s.append(s)
            if i == 0:
                pipe.unet.to(memory_format=torch.channels_last)
                floor_s, x_floor = diffusers_sample()
                pipe.unet.to(memory_format=torch.contiguous_format)
    return {
        "model": "google/ddpm-cifar10-32's configuration, random weights",
        "import": how,
        "batch": batch,
        "sampler": f"DDIM {steps}, eta 0",
        "threads": torch.get_num_threads(),
        "seconds": {"genzoo_sample": ours_s, "diffusers_ddim_pipeline": theirs_s, "diffusers_channels_last": floor_s},
        "genzoo_sample_images_per_s": batch / min(ours_s),
        "diffusers_ddim_pipeline_images_per_s": batch / min(theirs_s),
        "ratio": min(theirs_s) / min(ours_s),
        "gflop_forward": {"genzoo": f_ours / 1e9, "diffusers": f_theirs / 1e9},
        "max_abs_diff_images_0_1": (x_ours - x_theirs).abs().max().item(),
        "max_abs_diff_diffusers_vs_itself_channels_last": (x_floor - x_theirs).abs().max().item(),
        "max_abs_diff_forward_t999": forward_diff,
    }


def forward_profile(batch: int = 16, seed: int = 0, rounds: int = 3) -> dict | str:
    """Where one forward's time goes, per side: the best of ``rounds`` forwards, and the share of oneDNN's
    convolutions (``aten::mkldnn_convolution`` under torch.profiler), which both libraries call with the same shapes.

    A model that spent no time outside those convolutions would run diffusers' forward time / diffusers' convolution
    time faster than diffusers: the most any reimplementation on these kernels can reach (docs/interop.md).
    """
    if importlib.util.find_spec("diffusers") is None:
        return MISSING
    from torch.profiler import profile

    from genzoo import api

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        unet = saved_pipeline(tmp / "pipe", seed).unet.eval()
        ours = api.load_model(api.import_model(tmp / "pipe", tmp / "run")).components["decoder"].denoiser
    x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 500)
    x_last = x.contiguous(memory_format=torch.channels_last)
    sides = {"genzoo": lambda: ours(x_last, t), "diffusers": lambda: unet(x, t)}
    out = {}
    with torch.inference_mode():
        for name, forward in sides.items():
            forward()
            seconds = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                forward()
                seconds.append(time.perf_counter() - t0)
            with profile() as prof:
                forward()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            conv = sum(e.self_cpu_time_total for e in events if e.key == "aten::mkldnn_convolution")
            out[name] = {"seconds": min(seconds), "convolution_share": conv / total}
    g, d = out["genzoo"], out["diffusers"]
    return {
        "batch": batch,
        "threads": torch.get_num_threads(),
        **out,
        "ratio": d["seconds"] / g["seconds"],
        "bound_at_no_time_outside_convolutions": 1 / d["convolution_share"],
    }


def float64_agreement(batch: int = 2, seed: int = 0, steps: int = 50) -> dict | str:
    """The same comparison in float64: max |diff| of the images of genzoo's sampling (`api.load_model(RUN).sample`,
    what `genzoo sample` calls) and of DDIMPipeline.

    In float32 the 50-step chain of a random network amplifies rounding past 1e-4 (diffusers against itself in
    channels_last differs by as much as against genzoo), so agreement to the target is measured where rounding is
    1e-16: both models, the noise and diffusers' scheduler tables in float64 (genzoo's abar is the same float32
    product in float64), the same seed and the same DDIM-50.
    """
    if importlib.util.find_spec("diffusers") is None:
        return MISSING
    import diffusers

    from genzoo import api

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # diffusers then draws float64 noise, as genzoo's sampler does
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            saved_pipeline(tmp / "pipe", seed)
            model = api.load_model(api.import_model(tmp / "pipe", tmp / "run"))
            pipe = diffusers.DDIMPipeline.from_pretrained(str(tmp / "pipe"), dtype=torch.float64)
            pipe.set_progress_bar_config(disable=True)
            s = pipe.scheduler
            s.alphas_cumprod, s.final_alpha_cumprod = s.alphas_cumprod.double(), s.final_alpha_cumprod.double()
            dtypes = {p.dtype for p in model.components["decoder"].parameters()}
            assert model.components["sampler"].genzoo_spec["steps"] == steps  # the pipeline's default, as imported
            with torch.inference_mode():
                theirs = pipe(
                    batch_size=batch,
                    num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="pt",
                ).images
                ours = (model.sample(batch, generator=torch.Generator().manual_seed(seed)) / 2 + 0.5).clamp(0, 1)
    finally:
        torch.set_default_dtype(before)
    return {
        "batch": batch,
        "sampler": f"DDIM {steps}, eta 0",
        "genzoo_dtypes": sorted(str(d) for d in dtypes),
        "max_abs_diff_images_0_1": (ours - theirs).abs().max().item(),
    }


def markdown(r: dict | str) -> str:
    if isinstance(r, str):
        return f"| imported diffusers model | {r} |"
    return (
        f"| `genzoo sample`, imported google/ddpm-cifar10-32 configuration ({r['import']}), {r['sampler']}, batch "
        f"{r['batch']}, {r['threads']} thread(s) | {r['genzoo_sample_images_per_s']:.3f} images/s vs diffusers' "
        f"DDIMPipeline {r['diffusers_ddim_pipeline_images_per_s']:.3f}: {r['ratio']:.2f}x; max |diff| images "
        f"{r['max_abs_diff_images_0_1']:.2g} (diffusers against itself in channels_last: "
        f"{r['max_abs_diff_diffusers_vs_itself_channels_last']:.2g}), one forward "
        f"{r['max_abs_diff_forward_t999']:.2g}"
        + _profile_markdown(r.get("forward_profile"))
        + _float64_markdown(r.get("float64"))
        + " |"
    )


def _profile_markdown(p: dict | str | None) -> str:
    if not isinstance(p, dict):
        return ""
    return (
        f"; one forward {p['genzoo']['seconds']:.2f} s vs {p['diffusers']['seconds']:.2f} s ({p['ratio']:.2f}x), "
        f"convolutions {p['genzoo']['convolution_share']:.0%} / {p['diffusers']['convolution_share']:.0%} of it, "
        f"bound {p['bound_at_no_time_outside_convolutions']:.2f}x"
    )


def _float64_markdown(f: dict | str | None) -> str:
    if not isinstance(f, dict):
        return ""
    return f"; in float64 (batch {f['batch']}) max |diff| images {f['max_abs_diff_images_0_1']:.1e}"


def imported() -> dict | str:
    """All three: the sampling race, where a forward's time goes, and the agreement in float64."""
    result = imported_cifar10_ddim()
    if isinstance(result, dict):
        result["forward_profile"], result["float64"] = forward_profile(), float64_agreement()
    return result


if __name__ == "__main__":
    result = imported()
    (HERE / "interop.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(markdown(result))
