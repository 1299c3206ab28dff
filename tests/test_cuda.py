"""The CUDA paths, run where a GPU is present (skipped elsewhere): sampling agrees with the CPU, the
sampling loops never synchronise with the host, training resumes exactly and its checkpoints load
on a CPU. docs/performance.md gives the one device command that runs this with benchmarks/gpu.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny import gaussian_diffusion, tiny_unet

from genzoo import api
from genzoo.checkpoint import load_checkpoint
from genzoo.diffusion import (
    ClassifierFreeGuidance,
    GaussianDiffusion,
)
from genzoo.diffusion.guidance import CFGConfig
from genzoo.eval import metrics
from genzoo.interfaces import Pipeline
from genzoo.nn import UNet
from genzoo.plugins import default_registry
from genzoo.priors import FittedGaussian, FittedGaussianConfig
from genzoo.training import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu import Denoiser  # noqa: E402  the U-Net and its diffusion loss as a pipeline, as the GPU benchmark trains it

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")

DIFFUSION_SAMPLERS = [e.name for e in default_registry().entries("sampler") if e.plugin == "diffusion"]


@pytest.fixture(autouse=True)
def exact_fp32():
    # TF32 convolutions (cuDNN's default) differ from the CPU by ~1e-3; these tests compare at fp32
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def small_unet(**kw) -> UNet:
    return tiny_unet(image_size=16, model_channels=32, attention_resolutions=[8], **kw)


def diffusion() -> GaussianDiffusion:
    return gaussian_diffusion(1000, "cosine")


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_sampling_on_cuda_matches_the_cpu(name: str) -> None:
    """The same noise (drawn by a CPU generator) gives the same samples on both devices."""
    sampler, net, d = default_registry().build("sampler", {"type": name, "steps": 10}), small_unet(), diffusion()
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    want = sampler.sample(
        d, api.for_inference(net, "cpu"), noise.shape, noise=noise, generator=torch.Generator().manual_seed(1)
    )
    got = sampler.sample(
        d, api.for_inference(net, CUDA), noise.shape, noise=noise.to(CUDA), generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_guided_sampling_loops_never_synchronise(name: str) -> None:
    """No .item(), no host copies, no data-dependent shapes inside the loop: the GPU is never waited on."""
    sampler, net, d = (
        default_registry().build("sampler", {"type": name, "steps": 5}),
        api.for_inference(small_unet(num_classes=3), CUDA),
        diffusion(),
    )
    g = torch.Generator(CUDA).manual_seed(0)
    noise = torch.randn(4, 3, 16, 16, device=CUDA, generator=g)
    cond, cfg = {"y": torch.tensor([0, 1, 2, 0], device=CUDA)}, ClassifierFreeGuidance(CFGConfig(scale=3.0))
    sampler.sample(d, net, noise.shape, noise=noise, cond=cond, guidance=cfg, generator=g)  # builds the respacing once
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            out = sampler.sample(d, net, noise.shape, noise=noise, cond=cond, guidance=cfg, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == noise.shape and out.device.type == "cuda"


DATA = {"image": torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1}


def test_knn_metrics_and_the_fitted_gaussian_take_cuda_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g) + 0.3
    for metric in (metrics.precision_recall, metrics.density_coverage):
        assert metric(real.to(CUDA), fake.to(CUDA)) == pytest.approx(metric(real, fake), abs=1e-9)
    cfg = FittedGaussianConfig(shape=[8])
    on_cpu, on_cuda = FittedGaussian(cfg), FittedGaussian(cfg).to(CUDA)
    on_cpu.fit(real)
    on_cuda.fit(real.to(CUDA))  # an autoencoder's latents are encoded on its device
    torch.testing.assert_close(on_cuda.scale_tril.cpu(), on_cpu.scale_tril)


def test_the_trainer_keeps_a_small_data_set_on_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches, batch = {}, Trainer._batch
    monkeypatch.setattr(Trainer, "_batch", lambda self: batches.setdefault(self.device.type, batch(self)))
    trainers = {}
    for device in ("cuda", "cpu"):
        cfg = TrainConfig(steps=1, batch_size=8, checkpoint_every=100, device=device)
        trainers[device] = Trainer(
            Denoiser(small_unet(), diffusion()),
            DATA,
            config=cfg,
            run_dir=tmp_path / device,
            recipe={"name": "cuda-test"},
            progress=False,
        )
        trainers[device].fit()
    assert trainers["cuda"].data["image"].is_cuda and not DATA["image"].is_cuda  # moved once; the caller's untouched
    assert batches["cuda"]["image"].is_cuda
    torch.testing.assert_close(batches["cuda"]["image"].cpu(), batches["cpu"]["image"], rtol=0, atol=0)  # same order


def train(run: Path, precision: str, **fit) -> Pipeline:
    p = Denoiser(small_unet(), diffusion())  # small_unet seeds the init
    cfg = TrainConfig(
        steps=8,
        batch_size=8,
        lr=1e-3,
        warmup_steps=2,
        ema_decay=0.9,
        checkpoint_every=100,
        device="cuda",
        precision=precision,
    )
    Trainer(p, DATA, config=cfg, run_dir=run, recipe={"name": "cuda-test"}, progress=False).fit(**fit)
    return p


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_cuda_resumes_exactly_and_loads_on_cpu(tmp_path: Path, precision: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # deterministic kernels (cuDNN's, the math attention), so that two runs can agree; a tolerance of
    # 1e-6 still catches a lost RNG or optimiser state: Adam moves each weight by about lr = 1e-3 a step
    torch.backends.cudnn.deterministic = True
    try:
        with sdpa_kernel(SDPBackend.MATH):
            train(tmp_path / "straight", precision)
            train(tmp_path / "resumed", precision, stop_at=4)
            train(tmp_path / "resumed", precision, resume=True)
    finally:
        torch.backends.cudnn.deterministic = False
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for role in a.components:
        for k, v in a.components[role].items():
            assert v.device.type == "cpu", k  # a CUDA run's checkpoint loads on a machine without one
            torch.testing.assert_close(
                b.components[role][k], v, rtol=1e-6, atol=1e-6, msg=f"{role}.{k} differs after resume"
            )


# ---------------------------------------------------------------------- this session's additions on CUDA


def ddpm_on_cuda() -> Pipeline:
    """An untrained ddpm-shapes-small at 16x16 on the GPU: enough to drive every code path on the device."""
    return api.for_inference(
        api.create_model(api.resolve_recipe("ddpm-shapes-small", sets=["data.image_size=16"]), seed=0), CUDA
    )


@pytest.mark.parametrize("mode", ["inpaint", "sdedit", "invert"])
def test_editing_runs_on_cuda_and_keeps_the_known_region(mode: str) -> None:
    model = ddpm_on_cuda()
    images = (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(CUDA)
    mask = torch.zeros(2, 1, 16, 16, device=CUDA)
    mask[..., 8:, :] = 1  # the lower half generated
    settings = {"resample": 2, "jump_length": 2} if mode == "inpaint" else {}
    out = api.edit(
        model,
        images,
        mask if mode != "invert" else None,
        mode=mode,
        generator=torch.Generator(CUDA).manual_seed(0),
        **settings,
    )
    assert out.images.device.type == "cuda" and torch.isfinite(out.images).all()
    if mode == "inpaint":
        torch.testing.assert_close(out.images[..., :8, :], images[..., :8, :], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm-solver++", "unipc"])
def test_pixel_guidance_on_cuda_gives_the_reference_low_pass(name: str) -> None:
    """ILVR down to x_0 (stop 0): the sample's 4x4 block means are the reference's, on the device."""
    reg = default_registry()
    net, d = api.for_inference(small_unet(), CUDA), diffusion()
    sampler = reg.build("sampler", {"type": name, "steps": 10})
    guidance = reg.build("guidance", {"type": "pixel", "factor": 4})
    ref = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(CUDA)
    x = sampler.sample(
        d,
        net,
        (2, 3, 16, 16),
        cond={"reference": ref},
        guidance=guidance,
        generator=torch.Generator(CUDA).manual_seed(0),
        device=CUDA,
    )
    pool = torch.nn.functional.avg_pool2d
    torch.testing.assert_close(pool(x, 4), pool(ref, 4).expand(2, -1, -1, -1), rtol=0, atol=1e-5)
