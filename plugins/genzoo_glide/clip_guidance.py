"""CLIP guidance (GLIDE, Nichol et al. 2021, Sec. 2.4): the gradient of a noised CLIP's image-caption
similarity steers any diffusion sampler toward the caption."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion
from genzoo.diffusion.guidance import GradientGuidance, grad_wrt, noised_clip_losses
from genzoo.errors import RegistryError
from genzoo.interfaces import Condition
from genzoo.registry import component, spec_field


class ClipGuidanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(3.0, description="gradient scale s on the CLIP logit exp(tau) <f(x_t, t), g(c)>")
    clip: dict[str, Any] | None = spec_field(
        "clip",
        None,
        "null: the recipe's own `clip` component (a noised CLIP trained in the pipeline's clip stage); "
        "or a CLIP spec of its own, trained in the guidance stage ({type: clip, noised: true}); a clean "
        "CLIP (noised: false) is allowed but adversarial (GLIDE Sec. 2.4)",
    )


class ClipGuidance(nn.Module, GradientGuidance):
    """CLIP guidance (GLIDE Sec. 2.4): mu' = mu + s Sigma grad_x exp(tau) <f(x_t, t), g(c)>.

    The caption arrives as ``cond["tokens"]`` (the text encoder passes them on) and is embedded by the
    CLIP's own text tower. With ``clip: null`` it uses the recipe's ``clip`` component, so one trained
    noised CLIP serves whichever guidance is swapped in at sampling time.
    """

    def __init__(self, clip: nn.Module | None, *, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.needs_condition = frozenset({"tokens"})
        if clip is not None:
            self.clip = clip  # owned: trained in the guidance stage
        else:
            self.__dict__["clip"] = None  # borrowed from the recipe (bind_siblings), not saved twice

    def bind_siblings(self, components: Mapping[str, Any], *, where: str = "") -> None:
        if self.clip is None:
            if components.get("clip") is None:
                raise RegistryError(
                    f"{where}guidance 'clip' has no CLIP: add components.clip: {{type: clip, noised: true}} "
                    "to the recipe, or give the guidance its own (clip: {type: clip, noised: true})"
                )
            self.__dict__["clip"] = components["clip"]

    def grad_log_p(self, x_t: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        if not cond or "tokens" not in cond:
            raise ValueError("CLIP guidance needs a caption: pass condition {'caption': [...]} (CLI: --prompt TEXT)")
        with torch.no_grad():
            text = self.clip.encode_tokens(cond["tokens"])
        x = x_t.detach().requires_grad_(True)
        logit = self.clip.logit_scale.exp() * (self.clip.encode_image(x, t) * text).sum()
        return grad_wrt(logit, x)

    def training_losses(self, x0: Tensor, cond: Condition | None, diffusion: GaussianDiffusion) -> dict[str, Tensor]:
        return noised_clip_losses(self.clip, x0, cond, diffusion)


@component("guidance", "clip", config=ClipGuidanceConfig)
def make_clip_guidance(cfg: ClipGuidanceConfig, ctx) -> ClipGuidance:
    """CLIP guidance: the gradient of a noised CLIP's image-caption similarity shifts the mean (GLIDE Sec. 2.4)."""
    clip = (
        None
        if cfg.clip is None
        else ctx.registry.build("clip", dict(cfg.clip), data=ctx.data, where="guidance 'clip': clip: ")
    )
    return ClipGuidance(clip, scale=cfg.scale)
