"""Feature- and style-level guidance: the gradient of a frozen network's agreement between x0_hat and a reference.

* ``feature``: log p(ref | x_t) = s cos(f(x0_hat), f(ref)), the cosine similarity of the network's features at the
  chosen levels, averaged over them (the content term of semantic guidance, Liu et al. 2023, on x0_hat);
* ``style``: log p(style | x_t) = -s sum_l w_l E_l with E_l = ||G_l(x0_hat) - G_l(style)||^2 / (4 N_l^2 M_l^2), the
  Gram matrices G_l = F_l F_l^T of the N_l feature maps of M_l positions at level l, w_l = 1 / L (Gatys et al. 2016,
  Eq. 3-5).

The score is a function of x0_hat, the sampler's prediction. Its gradient reaches x_t through the Jacobian of the
exact denoiser of N(0, I) data, d x0_hat / d x_t = sqrt(abar_t) I, instead of the trained denoiser's (a second
backward through the U-Net per step): the shift it makes is then s (1 - abar_t) grad_x0 in x0_hat in the eps form,
bounded at every t. (Holding eps_hat fixed instead gives 1 / sqrt(abar_t), 2e4 at t = T of the cosine schedule,
where the true Jacobian sqrt(abar_t) Cov[x_0 | x_t] / (1 - abar_t) vanishes.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from genzoo.diffusion.guidance import GradientGuidance, grad_wrt
from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition
from genzoo.registry import component

from .reference import Reference, ReferenceConfig

CLIP = "clip"  # the `network` value that means the recipe's CLIP image tower


class NetworkGuidanceConfig(ReferenceConfig):
    network: str = Field(
        "resnet18",
        description="the frozen feature network: a timm model name (timm.list_models()), or 'clip': the recipe's "
        "CLIP image tower (components.clip)",
    )
    pretrained: bool = Field(
        False, description="timm's pretrained weights (downloaded through huggingface_hub); false: from scratch"
    )
    layers: list[int] = Field(
        default_factory=lambda: [1, 2],
        min_length=1,
        description="the timm feature levels compared (features_only out_indices: 0 is stride 2, 1 stride 4, ...)",
    )
    seed: int = Field(0, description="seeds the from-scratch weights, so every build draws the same network")


class FeatureGuidanceConfig(NetworkGuidanceConfig):
    scale: float = Field(
        3e3,
        description="s on the cosine similarity of the features of x0_hat and of the reference; 0: unguided "
        "(3e3 on shapes 16x16: the judge reads the reference's colour in 89% of samples, docs/guidance.md)",
    )


class StyleGuidanceConfig(NetworkGuidanceConfig):
    scale: float = Field(
        1e7,
        description="s on the Gram-matrix distance to the style image (Gatys et al.); 0: unguided (docs/guidance.md)",
    )
    layers: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="the timm feature levels whose Gram matrices are compared (features_only out_indices)",
    )


# --------------------------------------------------------------------------- scores


def cosine_similarity(feats: list[Tensor], ref: list[Tensor]) -> Tensor:
    """Per sample: the cosine of the flattened features, averaged over the levels."""
    return torch.stack([F.cosine_similarity(f.flatten(1), r.flatten(1), dim=1) for f, r in zip(feats, ref)]).mean(0)


def gram(f: Tensor) -> Tensor:
    """G = F F^T of feature maps (B, N, H, W), F the (N, M = H W) matrix per sample (Gatys et al. Eq. 3)."""
    flat = f.flatten(2)
    return flat @ flat.transpose(1, 2)


def style_distance(feats: list[Tensor], ref: list[Tensor]) -> Tensor:
    """Per sample: sum_l w_l ||G_l - A_l||^2 / (4 N_l^2 M_l^2), w_l = 1 / L (Gatys et al. Eq. 4-5)."""
    terms = []
    for f, r in zip(feats, ref):
        n, m = f.shape[1], f[0, 0].numel()
        terms.append((gram(f) - gram(r)).pow(2).sum((1, 2)) / (4 * n**2 * m**2))
    return torch.stack(terms).mean(0)


# --------------------------------------------------------------------------- the networks


class TimmFeatures:
    """A frozen timm network's feature maps at ``layers`` (features_only); pretrained ones see their own input
    normalisation, from-scratch ones the [-1, 1] images as they are. Held outside any module tree, so the guidance has
    no weights to save or to load, and moved to the samples' device and dtype when first called there."""

    def __init__(self, net: nn.Module, *, pretrained: bool) -> None:
        self.net = net.eval().requires_grad_(False)
        cfg = getattr(net, "pretrained_cfg", None) or {}
        self.norm = (cfg.get("mean"), cfg.get("std")) if pretrained and cfg.get("mean") else None

    def __call__(self, x: Tensor) -> list[Tensor]:
        if next(self.net.parameters()).device != x.device or next(self.net.parameters()).dtype != x.dtype:
            self.net.to(device=x.device, dtype=x.dtype)
        if self.norm is not None:
            mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) for v in self.norm)
            x = ((x + 1) / 2 - mean) / std
        return list(self.net(x))


def build_network(cfg: NetworkGuidanceConfig, ctx: Any, *, name: str) -> Callable[[Tensor], list[Tensor]] | None:
    """The timm feature network of ``cfg`` (its random weights drawn from ``cfg.seed``); None for 'clip'."""
    if cfg.network == CLIP:
        return None
    spec = {
        "type": "timm",
        "model": cfg.network,
        "pretrained": cfg.pretrained,
        "num_classes": 1,  # the head is dropped by features_only
        "kwargs": {"features_only": True, "out_indices": list(cfg.layers)},
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            net = ctx.registry.build("network", spec, data=ctx.data, where=f"guidance '{name}': network: ")
        except IndexError:  # timm: an out_index past the network's levels
            raise RegistryError(
                f"guidance '{name}': field 'layers': {cfg.layers} names a level {cfg.network} does not have; pick "
                "from 0 to its number of stages - 1 (resnets: 0-4)"
            ) from None
    return TimmFeatures(net, pretrained=cfg.pretrained)


# --------------------------------------------------------------------------- the guidances


class ReferenceFeatureGuidance(GradientGuidance):
    """A gradient guidance whose log-density is ``score(features(x0_hat), features(reference))``.

    ``features`` is the timm network, or the recipe's CLIP image tower (bound when the model is built: a CLIP's
    unit-norm image embedding is one feature vector).
    """

    score: Callable[[list[Tensor], list[Tensor]], Tensor]

    def __init__(
        self, features: Callable[[Tensor], list[Tensor]] | None, reference: Reference, *, scale: float, name: str
    ) -> None:
        self.features, self.reference, self.scale, self.name = features, reference, scale, name

    def bind_siblings(self, components: Mapping[str, Any], *, where: str = "") -> None:
        if self.features is None:
            clip = components.get("clip")
            if clip is None:
                raise RegistryError(
                    f"{where}guidance '{self.name}': network 'clip' needs the recipe's CLIP (components.clip); "
                    "name a timm model instead (network: resnet18)"
                )
            self.features = lambda x: [clip.encode_image(x)]

    def grad_log_p(self, x0: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        """grad_x0 of the score at x0 (per sample: the batch sum's gradient), ``t`` unused: the network is clean."""
        with torch.no_grad():
            ref = [f.detach() for f in self.features(self.reference.like(x0, cond))]
        x = x0.detach().requires_grad_(True)
        return grad_wrt(self.score(self.features(x), ref).sum(), x)

    def gradient(self, diffusion, x_t, t, cond, pred=None):
        """s sqrt(abar_t) grad_x0 score(x0_hat): the score's gradient at the step's x0_hat, carried to x_t by the
        N(0, I) denoiser's Jacobian (module doc)."""
        if pred is None:
            raise GenzooError(
                f"guidance '{self.name}' scores x0_hat: call it through a sampler, which passes the step's prediction"
            )
        g = self.grad_log_p_at(pred.pred_xstart, diffusion.model_t(t), cond)
        return self.scale * diffusion.extract("sqrt_abar", t, x_t) * g.to(x_t.dtype)


class FeatureGuidance(ReferenceFeatureGuidance):
    """s cos(f(x0_hat), f(ref)) over a frozen network's features (module doc)."""

    score = staticmethod(cosine_similarity)


class StyleGuidance(ReferenceFeatureGuidance):
    """-s sum_l w_l E_l, the Gram-matrix style distance of Gatys et al. 2016 (module doc)."""

    @staticmethod
    def score(feats: list[Tensor], ref: list[Tensor]) -> Tensor:
        return -style_distance(feats, ref)


@component("guidance", "feature", config=FeatureGuidanceConfig)
def make_feature_guidance(cfg: FeatureGuidanceConfig, ctx) -> FeatureGuidance:
    """Feature guidance: the gradient of a frozen network's feature similarity between x0_hat and a reference."""
    reference = Reference(cfg.reference, name="feature", data=getattr(ctx, "data", None))
    return FeatureGuidance(build_network(cfg, ctx, name="feature"), reference, scale=cfg.scale, name="feature")


@component("guidance", "style", config=StyleGuidanceConfig)
def make_style_guidance(cfg: StyleGuidanceConfig, ctx) -> StyleGuidance:
    """Style guidance: the gradient of the Gram-matrix distance (Gatys et al. 2016) between x0_hat and a style image."""
    if cfg.network == CLIP:
        raise RegistryError(
            "guidance 'style': field 'network': 'clip' gives one embedding, not feature maps to take Gram matrices "
            "of; name a timm model (network: resnet18)"
        )
    reference = Reference(cfg.reference, name="style", data=getattr(ctx, "data", None))
    return StyleGuidance(build_network(cfg, ctx, name="style"), reference, scale=cfg.scale, name="style")
