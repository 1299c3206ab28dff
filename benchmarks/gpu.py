"""Issue 11's GPU figures in one short run: DDIM-50 images/s at 64x64, and the bf16 U-Net training step's it/s and MFU.

Sized for a 15-minute device lease: every figure is written to ``OUT/gpu.json`` (and printed) as soon as it
is measured, so a run stopped at its time limit still returns what it finished. MFU (PaLM, Chowdhery et al.
2022, App. B) = the step's model FLOPs (forward + backward as torch.utils.flop_counter counts them; the
optimiser's are not model FLOPs) / seconds per step / peak, against the bf16 matmul rate measured in this
run (8192^3) and against the datasheet's dense bf16 rate where the device is known.

That the sampling loops never synchronise with the GPU is checked by tests/test_cuda.py, which
benchmarks/gpu_check.sh runs first.

    python benchmarks/gpu.py --out DIR            # on the GPU machine (docs/performance.md: how to run it there)
    python benchmarks/gpu.py --out DIR --smoke    # tiny sizes on any device: the test suite runs this on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, flops, mean_time  # noqa: E402
from run import matmul_peak  # noqa: E402

from genzoo.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule  # noqa: E402
from genzoo.interfaces import Pipeline  # noqa: E402
from genzoo.nn import CONV_MEMORY_FORMAT, UNet, UNetConfig  # noqa: E402
from genzoo.plugins import default_registry  # noqa: E402
from genzoo.precision import autocast  # noqa: E402
from genzoo.training import TrainConfig, Trainer  # noqa: E402

# dense bf16 tensor-core rate by the vendors' datasheets, TFLOP/s (sparsity excluded)
DATASHEET_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
}

# U-Nets at 64x64: DDPM's shape (Ho et al. 2020, App. B, widened to four resolutions) and ADM's ImageNet-64
# model (Dhariwal & Nichol 2021, Table 14: 192 channels, 3 blocks, attention at 32/16/8, 64-channel heads)
MODELS: dict[str, dict[str, Any]] = {
    "ddpm-64": {
        "model_channels": 128,
        "channel_mult": [1, 2, 2, 2],
        "num_res_blocks": 2,
        "attention_resolutions": [16],
        "use_scale_shift_norm": False,
        "resblock_updown": False,
        "learn_sigma": False,
    },
    "adm-64": {
        "model_channels": 192,
        "channel_mult": [1, 2, 3, 4],
        "num_res_blocks": 3,
        "attention_resolutions": [32, 16, 8],
        "num_head_channels": 64,
        "learn_sigma": True,
    },
}
SMOKE = {
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [4],
    "num_head_channels": 8,
}


class Report:
    """Results written to disk after every figure: a run cut off at its limit keeps what it measured."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.data = out / "gpu.json", {}

    def add(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self.path.write_text(json.dumps(self.data, indent=2))
        print(f"{section} {key}: {json.dumps(value)}", flush=True)


def datasheet_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if all(w in name for w in k.split())), None)


def build(name: str, image_size: int, smoke: bool, device: torch.device) -> tuple[torch.nn.Module, GaussianDiffusion]:
    kw = {**MODELS[name], **(SMOKE if smoke else {})}
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=3, image_size=image_size, **kw)).to(device, memory_format=CONV_MEMORY_FORMAT)
    learned = kw["learn_sigma"]
    d = GaussianDiffusion(
        betas=get_named_beta_schedule("cosine" if learned else "linear", 1000),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE if learned else ModelVarType.FIXED_SMALL,
        loss_type=LossType.HYBRID if learned else LossType.SIMPLE,
    )
    return net, d


class Denoiser(Pipeline):
    """The U-Net and its diffusion loss as a pipeline: the step timed bare below, and what the Trainer runs."""

    def __init__(self, net: torch.nn.Module, d: GaussianDiffusion) -> None:
        super().__init__({"decoder": net})
        self.diffusion = d

    def training_losses(self, batch, *, optimizer="main", stage="main"):
        x0 = batch["image"]
        t = torch.randint(0, self.diffusion.num_timesteps, (len(x0),), device=x0.device)
        return {"loss": self.diffusion.training_losses(self.components["decoder"], x0, t)["loss"].mean()}


def images(batch: int, image_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "image": torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
            memory_format=CONV_MEMORY_FORMAT
        )
    }


def forward_backward(pipe: Denoiser, batch: dict[str, torch.Tensor]) -> None:
    """The diffusion loss under bf16 autocast (train.precision=bf16) and its backward: the model FLOPs of a step."""
    with autocast(batch["image"].device, "bf16"):
        loss = pipe.training_losses(batch)["loss"]
    loss.backward()


def train_step(pipe: Denoiser, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One step as the trainer takes it: forward and backward in bf16, then fused AdamW on CUDA."""
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-4, fused=batch["image"].is_cuda)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        forward_backward(pipe, batch)
        opt.step()

    return step


def model_flops(pipe: Denoiser, batch: dict[str, torch.Tensor]) -> int:
    """Forward + backward FLOPs of the diffusion loss (no optimiser), as timed."""
    n = flops(lambda: forward_backward(pipe, batch))
    pipe.zero_grad(set_to_none=True)
    return n


def through_trainer(pipe: Denoiser, batch: int, image_size: int, steps: int, device: torch.device) -> float:
    """Steps/s of `genzoo train` on this U-Net: bf16, NHWC, EMA, grad clipping, the per-step NaN check and logging."""
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch,
        lr=1e-4,
        precision="bf16",
        device=str(device),
        log_every=10**6,
        checkpoint_every=10**9,
    )
    with tempfile.TemporaryDirectory() as run:
        return (
            Trainer(
                pipe,
                images(4 * batch, image_size, torch.device("cpu")),
                config=cfg,
                run_dir=run,
                recipe={"name": "gpu-bench"},
                progress=False,
            )
            .fit()
            .steps_per_sec
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, measures nothing useful")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument(
        "--train-batch",
        default="64,128",
        help="comma-separated batch sizes of the eager training step "
        "(the first also compiled and run through the Trainer)",
    )
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sampling figure")
    p.add_argument(
        "--train-steps", type=int, default=20, help="timed training steps per figure (after 3 warm-up steps)"
    )
    p.add_argument(
        "--compile",
        default="adm-64",
        help="models whose training step is also timed under torch.compile (compiling takes minutes); '' for none",
    )
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke
    size, steps, n_train = (8, 3, 2) if smoke else (64, args.sample_steps, args.train_steps)
    sb, batches = (2, [2]) if smoke else (args.sample_batch, [int(b) for b in args.train_batch.split(",")])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolution once
    rep = Report(args.out)
    rep.add("machine", "torch", torch.__version__)
    rep.add("machine", "device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    rep.add(
        "machine", "tf32", {"matmul": torch.backends.cuda.matmul.allow_tf32, "conv": torch.backends.cudnn.allow_tf32}
    )
    big = (512,) if smoke or device.type != "cuda" else (8192,)
    peak_bf16 = matmul_peak(torch.bfloat16, big, device)
    rep.add("matmul_tflops", "bf16", peak_bf16 / 1e3)
    rep.add("matmul_tflops", "fp32", matmul_peak(torch.float32, big, device) / 1e3)
    rep.add("matmul_tflops", "bf16_datasheet", datasheet_tflops(device))
    names = args.models.split(",")
    for name in names:
        net, d = build(name, size, smoke, device)
        rep.add(name, "params_m", sum(p.numel() for p in net.parameters()) / 1e6)
        ddim = default_registry().build("sampler", {"type": "ddim", "steps": steps})
        net.eval()
        for precision in ("fp32", "bf16"):

            def sample() -> None:
                with torch.inference_mode(), autocast(device, precision):
                    ddim.sample(d, net, (sb, 3, size, size), generator=torch.Generator(device).manual_seed(0))

            rep.add(name, f"ddim{steps}_{size}px_images_per_s_{precision}", sb / best_time(sample, 1 if smoke else 2))
        rep.add(name, "sample_batch", sb)
        if device.type == "cuda":
            rep.add(name, "sample_peak_mem_gb", torch.cuda.max_memory_allocated() / 2**30)
        net.train()
        # eager at every batch size first, compiling last: a run cut off by its time limit loses only that
        runs = [(tb, False) for tb in batches] + ([(batches[0], True)] if name in args.compile.split(",") else [])
        for tb, compiled in runs:
            try:
                train_figures(
                    rep,
                    name,
                    net,
                    d,
                    tb,
                    size,
                    n_train,
                    device,
                    peak_bf16,
                    compiled=compiled,
                    trainer_too=not compiled and tb == batches[0] and name == names[0],
                )
            except torch.cuda.OutOfMemoryError:
                rep.add(name, f"train_bf16_{'compile' if compiled else 'eager'}_b{tb}", "out of memory")
                torch.cuda.empty_cache()


def train_figures(
    rep: Report,
    name: str,
    net: torch.nn.Module,
    d: GaussianDiffusion,
    tb: int,
    size: int,
    n_train: int,
    device: torch.device,
    peak_bf16: float,
    *,
    compiled: bool,
    trainer_too: bool,
) -> None:
    """it/s and MFU of the bf16 training step at batch ``tb``, eager or compiled; optionally through the Trainer too."""
    pipe, batch, label = (
        Denoiser(torch.compile(net) if compiled else net, d),
        images(tb, size, device),
        "compile" if compiled else "eager",
    )
    f = model_flops(pipe, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = train_step(pipe, batch)
    t0 = time.perf_counter()
    step()  # the first call compiles
    first = time.perf_counter() - t0
    dt = mean_time(step, n_train)
    if trainer_too:  # the same step through the Trainer, once the kernels are tuned
        trainer = through_trainer(pipe, tb, size, 2 * n_train, device)
        rep.add(name, f"train_bf16_trainer_b{tb}", {"it_per_s": trainer, "trainer_over_bare": trainer * dt})
    rep.add(
        name,
        f"train_bf16_{label}_b{tb}",
        {
            "it_per_s": 1 / dt,
            "images_per_s": tb / dt,
            "batch": tb,
            "model_tflop_per_step": f / 1e12,
            "mfu_vs_measured": f / dt / (peak_bf16 * 1e9),
            "first_step_seconds": first,
            **({"mfu_vs_datasheet": f / dt / (datasheet_tflops(device) * 1e12)} if datasheet_tflops(device) else {}),
            **({"peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30} if device.type == "cuda" else {}),
        },
    )


if __name__ == "__main__":
    main()
