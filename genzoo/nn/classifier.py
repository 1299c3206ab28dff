"""The noisy classifier of classifier guidance: the U-Net's downsampling half, then pooling (ADM Sec. 4)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.nn.embeddings import timestep_embedding
from genzoo.nn.unet import Attention, Level, ResBlock, norm


class NoisyClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_classes: int | None = Field(None, description="classes to predict; None takes the dataset's")
    model_channels: int = Field(32, ge=8, description="channels at the first resolution")
    channel_mult: list[int] = Field([1, 2, 2], description="channel multiplier per resolution")
    num_res_blocks: int = Field(1, ge=1, description="residual blocks per resolution")
    attention_resolutions: list[int] = Field([8], description="resolutions with self-attention")
    in_channels: int | None = Field(None, description="image channels; None takes the dataset's")
    image_size: int | None = Field(None, description="image side; None takes the dataset's")


class NoisyClassifier(nn.Module):
    """``forward(x_t, t) -> logits``: trained on x_t ~ q(x_t | x_0) at every t, so its gradient guides sampling."""

    def __init__(self, cfg: NoisyClassifierConfig) -> None:
        super().__init__()
        if None in (cfg.num_classes, cfg.in_channels, cfg.image_size):
            raise ValueError(
                "NoisyClassifierConfig: num_classes, in_channels and image_size must be set (or built for a dataset)"
            )
        self.cfg = cfg
        ch0, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        block = dict(dropout=0.0, scale_shift=True)
        levels, ch, res = [], ch0, cfg.image_size
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                attn = Attention(mult * ch0, 32, None) if res in cfg.attention_resolutions else None
                levels.append(Level(ResBlock(ch, emb_dim, mult * ch0, **block), attn))
                ch = mult * ch0
            if i < len(cfg.channel_mult) - 1:
                levels.append(Level(ResBlock(ch, emb_dim, ch, resample="down", **block), None))
                res //= 2
        self.levels = nn.ModuleList(levels)
        self.head = nn.Sequential(
            norm(ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, cfg.num_classes)
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        h = self.input_conv(x)
        for level in self.levels:
            h = level(h, emb, None, None)
        return self.head(h)


def build_noisy_classifier(cfg: NoisyClassifierConfig, ctx=None) -> NoisyClassifier:
    """The ADM encoder half as a classifier of noisy images p(y | x_t, t) (Dhariwal & Nichol 2021)."""
    data = getattr(ctx, "data", None)
    if data is not None:
        c, h, _ = data.image_shape
        cfg = cfg.model_copy(
            update={
                "in_channels": cfg.in_channels or c,
                "image_size": cfg.image_size or h,
                "num_classes": cfg.num_classes or data.num_classes,
            }
        )
    return NoisyClassifier(cfg)
