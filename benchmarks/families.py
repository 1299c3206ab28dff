"""Every family's training step and sampling, and the peers, measured in one run (part of `make bench`).

For each recipe on shapes 32x32: steps/s of each training stage and images/s of sampling (at reduced
sampler steps, given in the table), the FLOPs of one step / one sample call counted by
torch.utils.flop_counter and the achieved FLOP/s as a fraction of the measured fp32 matmul peak; where
bf16 is usable (bf16 units, or a GPU), the same again under bf16 autocast against the bf16 peak. Peers
in the same process: diffusers' UNet2DModel of equal FLOPs with its DDPM, DDIM and DPM-Solver++
schedulers (sampling) and in a training step; open_clip's CLIP with the same timm image tower and
text transformer (training step). Only ratios within one run mean anything.

    python benchmarks/families.py [--batch 32] [--quick]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from common import PEER_UNET, best_time, diffusers_unet, flops

from genzoo import api
from genzoo.eval.evaluate import prior_tokens_per_sample
from genzoo.nn import CONV_MEMORY_FORMAT
from genzoo.precision import autocast

# recipe -> sampling swaps (fewer steps than the recipes' defaults, so the run stays short on a CPU)
FAMILIES: dict[str, dict[str, Any]] = {
    "gan-shapes": {},
    "vae-shapes": {},
    "vqvae-shapes": {},
    "dalle-shapes": {},
    "ddpm-shapes": {"sampler": "ddim", "steps": 20},
    "iddpm-shapes": {"steps": 20},
    "adm-shapes": {"sampler": "ddim", "steps": 20},
    "glide-shapes": {"steps": 20, "upsampler_steps": 10},
    "dalle2-shapes": {"prior_steps": 16, "steps": 20, "upsampler_steps": 10},
    "clip-shapes": None,  # draws no images
}


def peak_memory_mb(device: torch.device) -> float:
    """CPU: the process's resident-memory high-water mark so far (cumulative over the run). CUDA: the
    allocator's high-water mark since the previous row (reset after each read)."""
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return mb
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(tensors: dict[str, Any], n: int, device: torch.device) -> dict[str, Any]:
    return {k: (v[:n].to(device) if isinstance(v, torch.Tensor) else list(v[:n])) for k, v in tensors.items()}


def train_step_fn(model, stage: str, batch: dict[str, Any]) -> Callable[[], None]:
    """One optimisation step of ``stage`` (every optimiser of the stage, as the trainer does)."""
    groups = model.optimizer_groups(stage)
    opts = {name: torch.optim.AdamW(params, lr=1e-4) for name, params in groups.items() if params}

    def step() -> None:
        for name, opt in opts.items():
            opt.zero_grad(set_to_none=True)
            model.training_losses(batch, optimizer=name, stage=stage)["loss"].backward()
            opt.step()

    return step


def measure(
    recipe: str,
    what: str,
    batch: int,
    fn: Callable[[], Any],
    repeat: int,
    device: torch.device,
    peak: float,
    bf16_peak: float | None,
) -> dict[str, Any]:
    """One row: images/s and the share of the fp32 peak; under bf16 autocast too when bf16 is usable (same FLOPs)."""
    dt, f = best_time(fn, repeat), flops(fn)
    row = {
        "recipe": recipe,
        "what": what,
        "per_s": batch / dt,
        "unit": "images/s",
        "gflop": f / 1e9,
        "fraction_of_peak": f / dt / 1e9 / peak,
    }
    if bf16_peak:
        with autocast(device, "bf16"):
            dt = best_time(fn, repeat)
        row.update(bf16_per_s=batch / dt, bf16_fraction_of_peak=f / dt / 1e9 / bf16_peak)
    row["peak_memory_mb"] = peak_memory_mb(device)
    return row


def family_rows(
    batch: int, peak: float, device: torch.device, names: list[str], bf16_peak: float | None = None
) -> list[dict[str, Any]]:
    rows, sources = [], {}
    for name in names:
        swaps = FAMILIES[name]
        resolved = api.resolve_recipe(name, **(swaps or {}))
        key = repr(resolved["data"])
        if key not in sources:
            sources[key] = api.build_data(resolved).split("train").tensors()
        data = sources[key]
        torch.manual_seed(0)
        model = api.create_model(resolved, data_spec=api.build_data(resolved).spec, device=device)
        model = model.to(memory_format=CONV_MEMORY_FORMAT).train()  # as the trainer trains it (train.channels_last)
        b = _batch(data, batch, device)
        for stage in model.stages:
            model.begin_stage(stage, _batch(data, 2000, device))
            rows.append(
                measure(name, f"train: {stage}", batch, train_step_fn(model, stage, b), 3, device, peak, bf16_peak)
            )
        if swaps is None:
            continue
        model = api.for_inference(model, device)  # what load_model returns: eval mode, NHWC conv weights
        cond = (
            {"caption": list(data["caption"][:batch])}
            if getattr(getattr(model, "condition", None), "value", "") == "caption"
            else None
        )
        g = torch.Generator(device=device)

        @torch.inference_mode()
        def sample() -> None:
            model.sample(batch, cond, generator=g.manual_seed(0))

        row = measure(
            name, "sample" + "".join(f", {k}={v}" for k, v in swaps.items()), batch, sample, 1, device, peak, bf16_peak
        )
        tokens = prior_tokens_per_sample(model)
        if tokens > 1:  # an autoregressive prior: tokens/s too
            row["what"] += f" ({row['per_s'] * tokens:.0f} tokens/s)"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- peers


def diffusers_peers(batch: int, steps: int, device: torch.device) -> list[dict[str, Any]] | str:
    """Ours vs diffusers' UNet2DModel of equal FLOPs: each of the three samplers, and a training step."""
    try:
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
    except ImportError:
        return "diffusers is not installed (pip install -e '.[bench]')"
    from genzoo.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
    from genzoo.nn import UNet
    from genzoo.plugins import default_registry

    ours = UNet(PEER_UNET).to(device, memory_format=CONV_MEMORY_FORMAT)  # each library at its defaults
    theirs = diffusers_unet().to(device)
    x, t = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 1000, (batch,), device=device)
    with torch.inference_mode():
        f_ours, f_theirs = flops(lambda: ours(x, t)), flops(lambda: theirs(x, t))
    d = GaussianDiffusion(
        betas=get_named_beta_schedule("linear", 1000),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.SIMPLE,
    )
    pairs = {
        "ddpm": DDPMScheduler(num_train_timesteps=1000),
        "ddim": DDIMScheduler(num_train_timesteps=1000),
        "dpm-solver++": DPMSolverMultistepScheduler(
            num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2
        ),
    }
    rows = []
    for name, sched in pairs.items():
        sampler = default_registry().build("sampler", {"type": name, "steps": steps})

        @torch.inference_mode()
        def peer() -> None:
            sched.set_timesteps(steps)
            y = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
            for tt in sched.timesteps:
                y = sched.step(theirs(y, tt).sample, tt, y).prev_sample

        @torch.inference_mode()
        def mine() -> None:
            sampler.sample(d, ours, (batch, 3, 32, 32), generator=torch.Generator(device=device).manual_seed(0))

        a, b = batch / best_time(mine, 1), batch / best_time(peer, 1)
        rows.append(
            {
                "what": f"sample {name} {steps} steps, batch {batch}",
                "genzoo": a,
                "peer": b,
                "ratio": a / b,
                "unit": "images/s",
            }
        )

    def train_step(net: torch.nn.Module, out: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(out(net(x, t)), x).backward()
            opt.step()

        return step

    a = batch / best_time(train_step(ours, lambda o: o))  # NHWC: the trainer's default layout too (train.channels_last)
    b = batch / best_time(train_step(theirs, lambda o: o.sample))
    rows.append(
        {"what": f"U-Net training step, batch {batch}", "genzoo": a, "peer": b, "ratio": a / b, "unit": "images/s"}
    )
    for r in rows:
        r["flops_ratio"] = f_ours / f_theirs
    return rows


def open_clip_peer(batch: int, device: torch.device) -> dict[str, Any] | str:
    """A CLIP training step: genzoo's `clip` with a timm resnet10t tower vs open_clip's CLIP with the same
    tower and the same text transformer (width 128, 3 layers, 32 tokens)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from genzoo.text.clip import contrastive_loss

    resolved = api.resolve_recipe("clip-shapes-timm")
    source = api.build_data(resolved)
    ours = api.create_model(resolved, data_spec=source.spec, device=device).components["clip"].train()
    try:
        theirs = (
            open_clip.CLIP(
                embed_dim=64,
                vision_cfg=CLIPVisionCfg(
                    timm_model_name="resnet10t", image_size=32, timm_pool="avg", timm_proj="linear"
                ),
                text_cfg=CLIPTextCfg(context_length=32, vocab_size=49408, width=128, heads=4, layers=3),
            )
            .to(device)
            .train()
        )
    except Exception as e:  # an open_clip without timm towers
        return f"open_clip could not build the equal CLIP: {type(e).__name__}: {e}"
    data = source.split("train").tensors()
    images, tokens = data["image"][:batch].to(device), ours.tokenize(list(data["caption"][:batch]))

    def step(model, encode_image, encode_text, scale) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            img = torch.nn.functional.normalize(encode_image(images), dim=-1)
            txt = torch.nn.functional.normalize(encode_text(tokens), dim=-1)
            contrastive_loss(img, txt, scale)[0].backward()
            opt.step()

        return run

    mine = step(ours, ours.encode_image, ours.encode_tokens, ours.logit_scale)
    peer = step(theirs, theirs.encode_image, theirs.encode_text, theirs.logit_scale)
    a, b = batch / best_time(mine), batch / best_time(peer)
    return {
        "what": f"CLIP training step (timm resnet10t + 3-layer text), batch {batch}",
        "genzoo": a,
        "peer": b,
        "ratio": a / b,
        "unit": "pairs/s",
        "flops_ratio": flops(mine) / flops(peer),
    }


def options(batch: int, device: torch.device, bf16_usable: bool, peaks: dict[str, float]) -> list[dict[str, Any]]:
    """The U-Net forward contiguous, channels_last (the inference default), with torch.compile and with bf16 autocast;
    and a training step contiguous against channels_last, all in the same run."""
    from genzoo.nn import UNet

    def make(fmt: torch.memory_format) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        cfg = PEER_UNET.model_copy(update={"resblock_updown": True})  # the peer U-Net, resampling in ResBlocks (ADM)
        net = UNet(cfg).to(device).to(memory_format=fmt)
        x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
        return net, x, torch.randint(0, 1000, (batch,), device=device)

    rows = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        net, x, t = make(fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            net(x, t).square().mean().backward()
            opt.step()

        with torch.inference_mode():
            fwd = best_time(lambda: net(x, t))
            fwd_flops = flops(lambda: net(x, t))
        rows.append(
            {"what": f"U-Net forward fp32, {str(fmt)[6:]}", "seconds": fwd, "gflop": fwd_flops / 1e9, "peak": "fp32"}
        )
        rows.append(
            {
                "what": f"U-Net training step fp32, {str(fmt)[6:]}",
                "seconds": best_time(step),
                "gflop": flops(step) / 1e9,
                "peak": "fp32",
            }
        )
    base = rows[2]["seconds"]  # channels_last forward: the reference for the options below
    for r in rows:
        r["speedup"] = (rows[0] if "forward" in r["what"] else rows[1])["seconds"] / r["seconds"]
    net, x, t = make(torch.channels_last)
    net.eval()
    if device.type == "cuda" or bf16_usable:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            dt = best_time(lambda: net(x, t))
        rows.append(
            {
                "what": "U-Net forward, channels_last + bf16 autocast",
                "seconds": dt,
                "speedup": base / dt,
                "gflop": rows[2]["gflop"],
                "peak": "bf16",
            }
        )
        train_net, tx, tt = make(torch.contiguous_format)
        opt = torch.optim.AdamW(train_net.parameters(), lr=1e-4)

        def bf16_step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = train_net(tx, tt).float().square().mean()
            loss.backward()
            opt.step()

        dt = best_time(bf16_step)
        rows.append(
            {
                "what": "U-Net training step, contiguous + bf16 autocast",
                "seconds": dt,
                "speedup": rows[1]["seconds"] / dt,
                "gflop": rows[1]["gflop"],
                "peak": "bf16",
                "note": "speedup against the contiguous fp32 step",
            }
        )
    else:
        rows.append(
            {
                "what": "U-Net forward, channels_last + bf16 autocast",
                "seconds": None,
                "speedup": None,
                "note": "skipped: this CPU has no bf16 units (matmul far slower than fp32)",
            }
        )
    try:
        compiled = torch.compile(net)
        with torch.inference_mode():
            t0 = time.perf_counter()
            compiled(x, t)
            warm = time.perf_counter() - t0
            dt = best_time(lambda: compiled(x, t))
        rows.append(
            {
                "what": "U-Net forward, channels_last + torch.compile",
                "seconds": dt,
                "speedup": base / dt,
                "compile_seconds": warm,
                "gflop": rows[2]["gflop"],
                "peak": "fp32",
            }
        )
    except Exception as e:  # no C++ compiler, unsupported platform
        rows.append(
            {
                "what": "U-Net forward, channels_last + torch.compile",
                "seconds": None,
                "speedup": None,
                "note": f"failed: {type(e).__name__}",
            }
        )
    for r in rows:
        if r.get("seconds") and r.get("gflop"):
            r["gflop_per_s"] = r["gflop"] / r["seconds"]
            r["fraction_of_peak"] = r["gflop_per_s"] / peaks[r["peak"]]
    return rows


def markdown(res: dict[str, Any]) -> str:
    out = [
        "### Families (shapes 32×32)",
        "",
        "| recipe | measured | throughput fp32 | GFLOP | % of fp32 matmul peak | "
        "throughput bf16 autocast | % of bf16 matmul peak | peak memory (MB; CPU: RSS, cumulative) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    bf16 = lambda r: (
        f"{r['bf16_per_s']:.1f} | {100 * r['bf16_fraction_of_peak']:.0f}%"
        if "bf16_per_s" in r  # noqa: E731
        else "not measured: no bf16 units | "
    )
    out += [
        f"| {r['recipe']} | {r['what']} | {r['per_s']:.1f} {r['unit']} | {r['gflop']:.2f} | "
        f"{100 * r['fraction_of_peak']:.0f}% | "
        f"{bf16(r)} | {r['peak_memory_mb']:.0f} |"
        for r in res["families"]
    ]
    out += [
        "",
        "### Peers (same run)",
        "",
        "| measured | genzoo | peer | genzoo / peer | FLOPs genzoo / peer |",
        "|---|---|---|---|---|",
    ]
    peers = res["peers"]["diffusers"] if isinstance(res["peers"]["diffusers"], list) else []
    if isinstance(res["peers"]["open_clip"], dict):
        peers = [*peers, res["peers"]["open_clip"]]
    out += [
        f"| {r['what']} | {r['genzoo']:.2f} {r['unit']} | {r['peer']:.2f} | {r['ratio']:.2f}x | "
        f"{r['flops_ratio']:.2f} |"
        for r in peers
    ]
    out += [f"| {k} | {v} | | | |" for k, v in res["peers"].items() if isinstance(v, str)]
    out += [
        "",
        "### Options (U-Net of the DDIM row, batch 16; speedup against the contiguous fp32 row of its kind, "
        "and against channels_last fp32 for bf16 and compile; % of the matmul peak of the row's precision)",
        "",
        "| option | seconds | speedup | GFLOP/s | % of peak | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["options"]:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.4f}"
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        note = r.get("note") or (f"compiling took {r['compile_seconds']:.0f} s" if "compile_seconds" in r else "")
        rate = (
            f"{r['gflop_per_s']:.0f} | {100 * r['fraction_of_peak']:.0f}% ({r['peak']})"
            if "gflop_per_s" in r
            else " | "
        )
        out.append(f"| {r['what']} | {seconds} | {speedup} | {rate} | {note} |")
    return "\n".join(out) + "\n"


def run(
    batch: int,
    peak: float,
    bf16_usable: bool,
    device: torch.device,
    quick: bool = False,
    bf16_peak: float = float("nan"),
) -> dict[str, Any]:
    names = ["vae-shapes", "ddpm-shapes"] if quick else list(FAMILIES)
    return {
        "families": family_rows(batch, peak, device, names, bf16_peak if bf16_usable else None),
        "peers": {"diffusers": diffusers_peers(16, 20, device), "open_clip": open_clip_peer(batch, device)},
        "options": options(16, device, bf16_usable, {"fp32": peak, "bf16": bf16_peak}),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    from run import peaks

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fp32, bf16, usable = peaks(dev)
    print(markdown(run(args.batch, fp32, usable, dev, args.quick, bf16_peak=bf16)))
