"""Image editing with any diffusion model: inpainting, image-to-image, DDIM inversion (docs/editing.md).

* Inpainting, training-free (RePaint, Lugmayr et al. 2022, Alg. 1): after every reverse step the known region is
  replaced by the known image noised to the step's level, x = m q_sample(x0_known, t) + (1 - m) x (Eqs. 8-9; at the
  end x0_known itself), and the unknown region is harmonised by resampling: every ``jump_length`` steps the chain
  goes back up ``jump_length`` steps through the forward kernel q(x_t | x_{t-1}) and down again, ``resample`` times
  in all (their "jump" schedule, ``repaint_schedule``).
* GLIDE's inpainting model (Nichol et al. 2022, Sec. 4): a denoiser that also takes the known pixels and the mask as
  C + 1 extra input channels (``MaskConditioned``, the diffusion decoder's ``inpaint`` option), trained with random
  masks (``random_known``); ``edit`` feeds it ``cond["inpaint"]`` and replaces the known region as above.
* Image-to-image (SDEdit, Meng et al. 2022): noise the input to t_0 = strength T, x_{t0} = q_sample(x, t0), and
  denoise with the recipe's sampler and guidance; with a mask it is inpainting started at t_0.
* DDIM inversion (Song et al. 2021, Sec. 4.3; eta = 0 run backwards): x_t from x_{t-1} by the DDIM step taken
  upwards with the model evaluated at x_{t-1} (the usual inversion), refined by ``invert_iters`` fixed-point
  iterations towards the exact inverse of the DDIM step (the model evaluated at x_t); then the DDIM reconstruction
  from x_T.

Every edit is an ``EditSampler``: it stands in for a pipeline's diffusion samplers while the pipeline samples, so
each family builds its own condition (a class, a caption, unCLIP's z_i) and cascade (a cascade's upsampler is edited
at its own size) as it does when sampling; it steps with the recipe's sampler through the sampler's public ``step``
and ``respaced``, its guidance included, on the samplers' own loop (``samplers.run_chain``, which RePaint's jumps
up share).

Masks: ``known`` is 1 where the pixel is kept and 0 where it is generated (the CLI's mask file is the other way
round: white is the region to fill, as diffusers' inpainting pipelines take it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion, Model
from genzoo.diffusion.guidance import DiffusionGuidance
from genzoo.diffusion.samplers import DDIMConfig, DDIMSampler, DiffusionSampler, SamplerConfig, randn, run_chain
from genzoo.errors import GenzooError
from genzoo.interfaces import Condition, Sampler, SamplerKind

Mode = Literal["inpaint", "sdedit", "invert"]
SDEDIT_STRENGTH = 0.6  # SDEdit's t_0 in [0.3, 0.6] for stroke edits (Meng et al. 2022, Sec. 4)


class EditConfig(BaseModel):
    """What ``edit`` does; the defaults are RePaint's resampling (j = 10, r = 10) and full-strength inpainting."""

    model_config = ConfigDict(extra="forbid")
    mode: Mode = Field("inpaint", description="inpaint (needs a mask), sdedit (image-to-image) or invert (DDIM)")
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="t_0 / T, how far the input is noised before denoising (SDEdit); None: 1 for inpaint and "
        f"invert (from x_T), {SDEDIT_STRENGTH} for sdedit",
    )
    jump_length: int = Field(10, ge=1, description="RePaint's j: steps per jump back up (only with a mask)")
    resample: int = Field(
        10, ge=1, description="RePaint's r: each jump is walked r times (1: no resampling; costs about r x the steps)"
    )
    invert_iters: int = Field(
        0, ge=0, description="invert: fixed-point iterations per DDIM inversion step (0: the usual inversion)"
    )
    project_final: bool = Field(
        True, description="paste the known pixels into the final x_0 (False: the sampler's own x_0, to measure it)"
    )

    def start_strength(self) -> float:
        return self.strength if self.strength is not None else (SDEDIT_STRENGTH if self.mode == "sdedit" else 1.0)


def edit_config(**settings: Any) -> EditConfig:
    """An :class:`EditConfig`, a bad value reported as one line naming the setting."""
    try:
        return EditConfig(**settings)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(p) for p in err["loc"])
        raise GenzooError(f"edit setting {name}={err.get('input')!r}: {err['msg'].lower()}") from None


# --------------------------------------------------------------------------- the math


def known_region(
    diffusion: GaussianDiffusion, x: Tensor, x0: Tensor, known: Tensor, i: int, *, generator: torch.Generator | None
) -> Tensor:
    """RePaint Eqs. 8-9: the known pixels replaced by x0 noised to grid index ``i`` of ``diffusion`` (x0 itself at
    i = -1, the end of the chain): m q_sample(x0, i) + (1 - m) x."""
    if i < 0:
        noised = x0
    else:
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        noised = diffusion.q_sample(x0, t, randn(x.shape, x, generator=generator))
    return known * noised + (1 - known) * x


def repaint_schedule(top: int, bottom: int, jump_length: int, resample: int) -> list[int]:
    """The grid indices RePaint's chain visits, from ``top`` down to ``bottom`` and then -1 (x_0): after reaching
    each index bottom + k j with bottom + (k + 1) j <= top, it jumps back up j indices and comes down again,
    r - 1 times (Lugmayr et al.'s ``get_schedule_jump`` with n_sample = 1)."""
    jumps = {p: resample - 1 for p in range(bottom, top - jump_length + 1, jump_length)}
    p, path = top, [top]
    while p > bottom:
        p -= 1
        path.append(p)
        while jumps.get(p, 0) > 0:
            jumps[p] -= 1
            path += list(range(p + 1, p + jump_length + 1))
            path += list(range(p + jump_length - 1, p - 1, -1))
    return [*path, -1]


def start_index(diffusion: GaussianDiffusion, proc: GaussianDiffusion, strength: float, bottom: int) -> int:
    """SDEdit's t_0 on the sampler's grid: the largest grid index whose timestep t (1-based) is <= strength T."""
    limit = strength * diffusion.num_timesteps + 1e-9
    kept = [p for p, t in enumerate(proc.timestep_map.tolist()) if t + 1 <= limit]
    if not kept or kept[-1] < bottom:
        first = int(proc.timestep_map[bottom]) + 1
        raise GenzooError(
            f"strength {strength:g} starts at t <= {limit:.0f} of {diffusion.num_timesteps}, below the sampler's "
            f"first step at t = {first}; raise --strength or --steps"
        )
    return kept[-1]


def inversion_sampler(sampler: Any) -> DDIMSampler:
    """DDIM with eta 0 on ``sampler``'s grid, without clamping x0_hat: a clamped step is not invertible."""
    base = sampler.cfg.model_dump(include=set(SamplerConfig.model_fields)) if hasattr(sampler, "cfg") else {}
    return DDIMSampler(DDIMConfig(**{**base, "clip": False, "threshold": None, "eta": 0.0}))


@torch.no_grad()
def ddim_invert(
    sampler: DiffusionSampler,
    diffusion: GaussianDiffusion,
    model: Model,
    x0: Tensor,
    *,
    top: int,
    cond: Condition | None = None,
    guidance: DiffusionGuidance | None = None,
    iters: int = 0,
) -> Tensor:
    """x at grid index ``top`` of the sampler's process whose DDIM (eta 0) chain ends at ``x0``.

    The DDIM step from grid index i maps x_i to x_{i-1} = sqrt(abar_{i-1}) x0_hat + sqrt(1 - abar_{i-1}) eps(x_i, i)
    (abar_{-1} = 1), so its inverse is x_i = sqrt(abar_i / abar_{i-1}) (x_{i-1} - sqrt(1 - abar_{i-1}) eps)
    + sqrt(1 - abar_i) eps with eps = eps(x_i, i), the model at the point sought. The usual inversion (``iters`` = 0)
    takes eps at the point it starts from, eps(x_{i-1}, i - 1) (the clean image at the grid's first timestep for
    i = 0): the Euler step of the probability-flow ODE run forwards (Song et al. 2021, Sec. 4.3). Each iteration
    re-evaluates eps at the x_i found, a fixed-point iteration whose limit the DDIM step maps back to x_{i-1} exactly.
    """
    guidance = guidance if guidance is not None else DiffusionGuidance()
    proc = sampler.respaced(diffusion)
    net = proc.wrap(model)

    def eps_at(x: Tensor, i: int) -> Tensor:
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        return sampler.predict(proc, net, x, t, cond, guidance, eps_form=True).pred_eps

    x, eps = x0, eps_at(x0, 0)
    for i in range(0, top + 1):
        abar, abar_prev = float(proc.tables["abar"][i]), float(proc.tables["abar_prev"][i])
        for k in range(iters + 1):
            guess = math.sqrt(abar / abar_prev) * (x - math.sqrt(1 - abar_prev) * eps) + math.sqrt(1 - abar) * eps
            if i < top or k < iters:  # the model at the point reached: the next iteration's or the next step's eps
                eps = eps_at(guess, i)
        x = guess
    return x


# --------------------------------------------------------------------------- GLIDE's inpainting input


def inpaint_input(x0: Tensor, known: Tensor) -> Tensor:
    """GLIDE's extra input channels: the known pixels (0 elsewhere) and the mask, (B, C + 1, H, W)."""
    known = known.to(x0.dtype).expand(x0.shape[0], 1, *x0.shape[2:])
    return torch.cat([x0 * known, known], dim=1)


def random_known(x0: Tensor, *, full: float = 0.1) -> Tensor:
    """Training masks for GLIDE's inpainting model (Sec. 4 erases "random regions"): per image one rectangle to
    generate, each side uniform in [1/4, 3/4] of the image's, placed uniformly; a fraction ``full`` of the images
    is generated whole (mask 0), so the model also samples without a known region. (B, 1, H, W), 1 = known."""
    b, h, w = x0.shape[0], x0.shape[-2], x0.shape[-1]
    u = torch.rand(b, 5, device=x0.device)
    rh, rw = (0.25 + 0.5 * u[:, 0]) * h, (0.25 + 0.5 * u[:, 1]) * w
    top, left = u[:, 2] * (h - rh), u[:, 3] * (w - rw)
    ys = torch.arange(h, device=x0.device).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=x0.device).view(1, 1, w) + 0.5
    hole = (ys >= top.view(b, 1, 1)) & (ys < (top + rh).view(b, 1, 1))
    hole = hole & (xs >= left.view(b, 1, 1)) & (xs < (left + rw).view(b, 1, 1))
    hole = hole | (u[:, 4] < full).view(b, 1, 1)
    return (~hole).to(x0.dtype).unsqueeze(1)


class MaskConditioned(nn.Module):
    """``net`` called on [x_t, known pixels, mask] (GLIDE Sec. 4); without ``cond["inpaint"]`` the mask is all 0,
    nothing known, and the model samples as an unconditional one."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def cfg(self) -> Any:
        """The wrapped network's config (the pipelines check its condition widths)."""
        return getattr(self.net, "cfg", None)

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        extra = (cond or {}).get("inpaint")
        if extra is None:
            extra = x.new_zeros(x.shape[0], x.shape[1] + 1, *x.shape[2:])
        return self.net(torch.cat([x, extra.to(x.dtype)], dim=1), t, cond)


def mask_channels_spec(spec: Mapping[str, Any], channels: int, out_channels: int, where: str) -> dict[str, Any]:
    """A denoiser spec widened for GLIDE's inpainting input: in_channels = 2 C + 1, out_channels as before."""
    spec = dict(spec)
    want = 2 * channels + 1
    if spec.get("in_channels") not in (None, want):
        raise GenzooError(
            f"{where}inpaint adds the known image and the mask to the input, so in_channels must be {want} "
            f"(2 x {channels} + 1) or unset, not {spec['in_channels']}"
        )
    return {**spec, "in_channels": want, "out_channels": spec.get("out_channels") or out_channels}


# --------------------------------------------------------------------------- the edit as a sampler


def fit_to(x: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
    """``x`` (B or 1, C, H, W) at the stage's shape (B, C', H', W'): area-resized, the batch expanded."""
    if x.dim() != len(shape) or x.shape[1] != shape[1]:
        raise GenzooError(
            f"the {what} has shape {tuple(x.shape[1:])} but this model's diffusion runs on {tuple(shape[1:])}; "
            "inpainting needs an image-shaped (spatial) diffusion"
        )
    if x.dim() == 4 and tuple(x.shape[-2:]) != tuple(shape[-2:]):
        mode = "area" if x.shape[-1] >= shape[-1] else "bilinear"
        x = F.interpolate(x, size=tuple(shape[-2:]), mode=mode)
    if x.shape[0] not in (1, shape[0]):
        raise GenzooError(f"{x.shape[0]} {what}s for {shape[0]} edits: pass one, or one per edit")
    return x.expand(shape[0], *x.shape[1:])


class EditSampler(Sampler):
    """A pipeline's diffusion sampler (``inner``) with an edit: it samples x_0 from ``target`` (the image, in the
    space the decoder diffuses) as ``cfg`` says, stepping with ``inner``. ``latents`` collects x_T of each call in
    invert mode."""

    kind = SamplerKind.DIFFUSION

    def __init__(self, inner: Any, cfg: EditConfig, target: Tensor, known: Tensor | None) -> None:
        if getattr(inner, "kind", None) is not SamplerKind.DIFFUSION or not callable(getattr(inner, "step", None)):
            raise GenzooError(
                "editing needs a diffusion model with a stepping diffusion sampler (ddpm, ddim, dpm-solver++, ...); "
                f"this one samples with {type(inner).__name__}"
            )
        self.inner, self.cfg, self.target, self.known = inner, cfg, target, known
        self.latents: list[Tensor] = []

    @property
    def last_index(self) -> int:
        return self.inner.last_index

    def respaced(self, diffusion: GaussianDiffusion) -> GaussianDiffusion:
        return self.inner.respaced(diffusion)

    def nfe(self) -> int:
        return self.inner.nfe()

    @torch.no_grad()
    def sample(
        self,
        diffusion: GaussianDiffusion,
        model: Model,
        shape: tuple[int, ...],
        *,
        cond: Condition | None = None,
        guidance: DiffusionGuidance | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        device: Any = None,
        progress: bool = False,
    ) -> Tensor:
        cfg, guidance = self.cfg, guidance if guidance is not None else DiffusionGuidance()
        x0 = fit_to(self.target, shape, "image")
        x0 = x0.to(noise.device if noise is not None else device or x0.device)
        known = None if self.known is None else fit_to(self.known, (shape[0], 1, *shape[2:]), "mask").to(x0)
        if known is not None:  # GLIDE's inpainting model reads it; any other denoiser ignores the key
            cond = {**(cond or {}), "inpaint": inpaint_input(x0, known)}
        sampler = inversion_sampler(self.inner) if cfg.mode == "invert" else self.inner
        proc = sampler.respaced(diffusion)
        top = start_index(diffusion, proc, cfg.start_strength(), sampler.last_index)
        if cfg.mode == "invert":
            x = ddim_invert(
                sampler, diffusion, model, x0, top=top, cond=cond, guidance=guidance, iters=cfg.invert_iters
            )
            self.latents.append(x)
        elif top == proc.num_timesteps - 1 and cfg.start_strength() == 1:  # from x_T itself, as sampling starts
            x = noise if noise is not None else randn(shape, x0, generator=generator)
        else:  # SDEdit: x_{t0} ~ q(x_{t0} | x0)
            t = torch.full((shape[0],), top, device=x0.device, dtype=torch.long)
            x = proc.q_sample(x0, t, noise if noise is not None else randn(shape, x0, generator=generator))
        if known is not None and cfg.mode != "invert":
            path = repaint_schedule(top, sampler.last_index, cfg.jump_length, cfg.resample)

            def project(p: GaussianDiffusion, x: Tensor, i: int) -> Tensor:
                if i < 0 and not cfg.project_final:
                    return x
                return known_region(p, x, x0, known, i, generator=generator)

        else:
            path, project = [*range(top, sampler.last_index - 1, -1), -1], None
        return run_chain(
            sampler,
            diffusion,
            model,
            x,
            path,
            cond=cond,
            guidance=guidance,
            generator=generator,
            project=project,
            progress=progress,
        )


# --------------------------------------------------------------------------- editing a pipeline


@dataclass
class EditResult:
    """``images`` (n, C, H, W) in [-1, 1]; ``latents``: x_T of each diffusion stage (invert mode), by sampler role."""

    images: Tensor
    latents: dict[str, list[Tensor]] = field(default_factory=dict)


EDITED_ROLE = re.compile(r"(upsampler\d*_)?sampler")  # the decoder's sampler and a cascade's upsamplers'


@torch.no_grad()
def edit(
    pipeline: Any,
    images: Tensor,
    known: Tensor | None = None,
    *,
    cfg: EditConfig,
    n: int | None = None,
    condition: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> EditResult:
    """Edit ``images`` (1 or n, C, H, W) in [-1, 1] at the pipeline's output size with ``known`` (1 or n, 1, H, W; 1
    = keep) as ``cfg`` says; ``n`` edits (default: one per image). The pipeline samples as usual, its diffusion
    samplers standing in as :class:`EditSampler`; a latent diffusion decoder (one with ``encode``) is edited on the
    latents of the images."""
    c = pipeline.components
    roles = [r for r, v in c.items() if v is not None and EDITED_ROLE.fullmatch(r)]
    if not roles:
        raise GenzooError("editing needs a diffusion model; this one has no sampler (a GAN, VAE or autoencoder)")
    if cfg.mode == "inpaint" and known is None:
        raise GenzooError("inpainting needs a mask: pass --mask FILE (white: the region to fill)")
    if cfg.mode == "invert" and known is not None:
        raise GenzooError("DDIM inversion takes no mask: drop --mask, or use --mode inpaint")
    if known is not None and tuple(known.shape[-2:]) != tuple(images.shape[-2:]):
        raise GenzooError(
            f"the mask is {tuple(known.shape[-2:])} but the image is {tuple(images.shape[-2:])}; pass a mask the "
            "size of the image"
        )
    n = n if n is not None else images.shape[0]
    encode = getattr(c.get("decoder"), "encode", None)  # latent diffusion diffuses its first stage's latents
    editors = {
        r: EditSampler(c[r], cfg, encode(images) if callable(encode) and r == "sampler" else images, known)
        for r in roles
    }
    if condition is None or not any(k in condition for k in ("caption", "emb", "y")):
        if callable(getattr(pipeline, "variations", None)):  # unCLIP: z_i of the image itself, as for variations
            condition = {**(condition or {}), "image": images.expand(n, *images.shape[1:])}
    saved = {r: c[r] for r in roles}
    try:
        c.update(editors)
        out = pipeline.sample(n, condition, generator=generator)
    finally:
        c.update(saved)
    return EditResult(out, {r: e.latents for r, e in editors.items() if e.latents})
