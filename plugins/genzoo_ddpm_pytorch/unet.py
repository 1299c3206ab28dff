"""lucidrains' denoising-diffusion-pytorch ``Unet`` behind genzoo's denoiser interface: ``model(x_t, t, cond)``.

Its U-Net (Ho et al. 2020's layout with Wang et al.'s RMSNorm, linear attention at the outer levels and full attention
with memory key/values at the innermost one) is kept as it is: no genzoo network has its layout, so its weights are
never renamed. The config holds the ``Unet`` constructor's own arguments; the ones genzoo's process replaces are
refused with the field named.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from genzoo.errors import RegistryError
from genzoo.interfaces import Condition
from genzoo.registry import component

# Unet arguments genzoo's samplers cannot serve -> why (GaussianDiffusion refuses the last two itself)
REFUSED = {
    "self_condition": "genzoo's samplers do not feed the previous x0_hat back into the network",
    "learned_sinusoidal_cond": "it embeds continuous times; genzoo's process, like GaussianDiffusion, gives integer t",
    "random_fourier_features": "it embeds continuous times; genzoo's process, like GaussianDiffusion, gives integer t",
}


class UnetConfig(BaseModel):
    """The ``denoising_diffusion_pytorch.Unet`` constructor's arguments (its defaults), sized for the data."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(64, ge=2, description="base width (Unet's dim); the time embedding is 4 dim wide")
    init_dim: int | None = Field(None, ge=1, description="the stem's width; None: dim")
    dim_mults: list[int] = Field([1, 2, 4, 8], min_length=1, description="width of each level, in units of dim")
    channels: int | None = Field(None, ge=1, description="image channels; None takes the dataset's")
    sinusoidal_pos_emb_theta: int = Field(10000, ge=1, description="the sinusoidal time embedding's base")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in the residual blocks")
    attn_dim_head: int | list[int] = Field(32, description="attention head width (one per level, or all levels)")
    attn_heads: int | list[int] = Field(4, description="attention heads (one per level, or all levels)")
    full_attn: bool | list[bool] | None = Field(
        None, description="full (not linear) attention per level; None: the innermost level only"
    )
    flash_attn: bool = Field(False, description="torch's fused attention kernel in the full attention")
    self_condition: bool = Field(False, description="refused: " + REFUSED["self_condition"])
    learned_sinusoidal_cond: bool = Field(False, description="refused: " + REFUSED["learned_sinusoidal_cond"])
    random_fourier_features: bool = Field(False, description="refused: " + REFUSED["random_fourier_features"])
    learn_sigma: bool | None = Field(
        None,
        description="set by the diffusion decoder for a learned-range variance: twice the channels out "
        "(Unet's learned_variance)",
    )
    image_size: int | None = Field(None, ge=1, description="set by a cascade's diffusion decoder (its image_size)")

    @model_validator(mode="after")
    def _supported(self) -> UnetConfig:
        for field, why in REFUSED.items():
            if getattr(self, field):
                raise ValueError(f"{field} true is not supported: {why}; set {field}: false")
        return self

    def unet_kwargs(self, channels: int) -> dict:
        """The keyword arguments of ``Unet(...)``."""
        kw = self.model_dump(exclude={"learn_sigma", "image_size", "channels"})
        kw["dim_mults"] = tuple(kw["dim_mults"])
        for k in ("attn_dim_head", "attn_heads", "full_attn"):
            kw[k] = tuple(kw[k]) if isinstance(kw[k], list) else kw[k]
        return {**kw, "channels": channels, "learned_variance": bool(self.learn_sigma)}


class UnetAdapter(nn.Module):
    """``Unet(x_t, t)``: unconditional, so ``cond`` is not read (a classifier guidance's ``y`` passes by)."""

    def __init__(self, *, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        return self.model(x, t)


@component("network", "ddpm-pytorch-unet", config=UnetConfig)
def build_unet(cfg: UnetConfig, ctx=None) -> UnetAdapter:
    """lucidrains' denoising-diffusion-pytorch ``Unet`` (its own layout) as a genzoo denoiser."""
    from denoising_diffusion_pytorch import Unet

    data = getattr(ctx, "data", None)
    channels = cfg.channels or (data.image_shape[0] if data is not None else 3)
    size = cfg.image_size or (data.image_shape[-1] if data is not None else None)
    factor = 2 ** (len(cfg.dim_mults) - 1)
    if size is not None and size % factor:
        raise RegistryError(
            f"network 'ddpm-pytorch-unet': {len(cfg.dim_mults)} levels halve the image {len(cfg.dim_mults) - 1} "
            f"times, so its side must be a multiple of {factor}, not {size}; use fewer dim_mults"
        )
    try:
        model = Unet(**cfg.unet_kwargs(channels))
    except (AssertionError, TypeError, ValueError) as e:
        raise RegistryError(f"network 'ddpm-pytorch-unet': Unet rejects the config: {e or type(e).__name__}") from e
    return UnetAdapter(model=model)
