"""DCGAN (Radford et al. 2016) as components: the generator is a decoder, its noise a Gaussian prior.

The pipeline owns the adversarial objective with two optimisers (``discriminator`` then
``generator`` each iteration; ``train.optimizer_ratio`` changes the ratio). The generator loss is
the non-saturating ``-E log D(G(z))`` (Goodfellow et al. 2014, Sec. 3), not ``E log(1 - D(G(z)))``,
whose gradient vanishes while D wins. Class-conditional: the class embedding joins z in the
generator and a projection term (Miyato & Koyama 2018) in the discriminator.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.errors import RegistryError
from genzoo.interfaces import Condition, Decoder, Spec
from genzoo.pipelines import Conditioning, LabelledPipeline, labelled_args
from genzoo.registry import component, spec_field


class GeneratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    z_dim: int = Field(100, ge=1, description="size of the noise vector z (DCGAN: 100)")
    class_conditional: bool = Field(False, description="take the dataset's class y as a second input")
    network: dict[str, Any] = spec_field(
        "network", {"type": "conv-decoder", "norm": "batch"}, "the generator network (z -> image)"
    )


class Generator(Decoder):
    """``decode(z, {y}) = G(z, y)``: one forward pass, no sampler."""

    def __init__(self, net: nn.Module, z_dim: int, image_shape: tuple[int, ...], class_conditional: bool) -> None:
        super().__init__()
        self.net = net
        self.consumes, self.produces = Spec(shape=(z_dim,)), Spec(shape=tuple(image_shape))
        self.needs_condition = frozenset({"y"}) if class_conditional else frozenset()

    def decode(
        self, z: Tensor, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None
    ) -> Tensor:
        return self.net(z, (condition or {}).get("y"))


@component("decoder", "generator", config=GeneratorConfig)
def make_generator(cfg: GeneratorConfig, ctx) -> Generator:
    """The DCGAN generator: a latent vector through transposed convolutions to an image."""
    if ctx.data is None:
        raise RegistryError("decoder 'generator' needs a dataset to size its output")
    spec = {**cfg.network, "dim": cfg.z_dim, "num_classes": ctx.data.num_classes if cfg.class_conditional else None}
    net = ctx.registry.build("network", spec, data=ctx.data, where="decoder 'generator': network: ")
    return Generator(net, cfg.z_dim, ctx.data.image_shape, cfg.class_conditional)


class GANPipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    condition: Conditioning = Field(
        Conditioning.none, description="none, or class: the dataset's label conditions G and D"
    )
    discriminator: dict[str, Any] = spec_field(
        "network", {"type": "conv-encoder", "norm": "batch"}, "the discriminator network (image -> logit)"
    )


class GANPipeline(LabelledPipeline):
    """Optimisers ``discriminator`` and ``generator``; logged ``d_real``/``d_fake`` are D's mean probabilities."""

    def __init__(self, components, *, discriminator: nn.Module, **kw) -> None:
        super().__init__(components, **kw)
        self.discriminator = discriminator

    def optimizer_groups(self, stage: str = "main") -> dict[str, list[nn.Parameter]]:
        return {
            "discriminator": list(self.discriminator.parameters()),
            "generator": list(self.components["decoder"].parameters()),
        }

    def training_losses(
        self, batch: dict[str, Any], *, optimizer: str = "generator", stage: str = "main"
    ) -> dict[str, Tensor]:
        x, cond = batch["image"], self.condition_of(batch)
        y = cond["y"] if cond else None
        with torch.set_grad_enabled(optimizer == "generator"):  # D's step needs no graph through G
            fake = self.components["decoder"].decode(self.components["prior"].sample(len(x)), cond)
        if optimizer == "discriminator":
            real_logit, fake_logit = self.discriminator(x, y), self.discriminator(fake, y)
            loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()  # -log D(x) - log(1 - D(G(z)))
            return {
                "loss": loss,
                "d_real": torch.sigmoid(real_logit).mean().detach(),
                "d_fake": torch.sigmoid(fake_logit).mean().detach(),
            }
        return {"loss": F.softplus(-self.discriminator(fake, y)).mean()}  # non-saturating: -log D(G(z))


@component("pipeline", "gan", config=GANPipelineConfig)
def make_gan_pipeline(cfg: GANPipelineConfig, ctx) -> GANPipeline:
    """DCGAN (Radford et al. 2016): generator and discriminator trained adversarially (non-saturating loss)."""
    args = labelled_args("gan", cfg.condition, ctx)
    decoder = ctx.components.get("decoder")
    conditional = cfg.condition is Conditioning.class_
    if decoder is not None and ("y" in getattr(decoder, "needs_condition", ())) != conditional:
        raise RegistryError(
            f"pipeline 'gan': condition is '{cfg.condition.value}' but decoder.class_conditional is "
            f"{not conditional}; set decoder.class_conditional: {str(conditional).lower()}"
        )
    spec = {**cfg.discriminator, "dim": 1, "num_classes": ctx.data.num_classes if conditional else None}
    disc = ctx.registry.build("network", spec, data=ctx.data, where="pipeline 'gan': discriminator: ")
    return GANPipeline(ctx.components, discriminator=disc, **args)
