"""Any timm image model as a network (Wightman 2019): one string names it, as in timm itself."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from genzoo.errors import GenzooError, RegistryError
from genzoo.registry import component


class TimmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("resnet18", description="a timm model name (timm.list_models())")
    pretrained: bool = Field(False, description="load timm's pretrained weights (downloads through huggingface_hub)")
    num_classes: int | None = Field(None, ge=1, description="output size of the head; None takes the dataset's classes")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra timm.create_model arguments, e.g. {img_size: 32} for a ViT"
    )


@component("network", "timm", config=TimmConfig)
def build_timm(cfg: TimmConfig, ctx: Any = None) -> nn.Module:
    """Any timm image model by name (Wightman 2019), from scratch or pretrained."""
    import timm

    if not timm.list_models(cfg.model):
        raise RegistryError(
            f"network 'timm': field 'model': '{cfg.model}' is not a timm model; "
            f"try timm.list_models('{cfg.model[:4]}*'): {timm.list_models(cfg.model[:4] + '*')[:8]}"
        )
    data = getattr(ctx, "data", None)
    num_classes = cfg.num_classes or getattr(data, "num_classes", None)
    if num_classes is None:
        raise RegistryError("network 'timm': field 'num_classes' is needed (the dataset has no classes)")
    in_chans = data.image_shape[0] if data is not None else 3
    try:
        return timm.create_model(
            cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, in_chans=in_chans, **cfg.kwargs
        )
    except (OSError, RuntimeError) as e:
        if cfg.pretrained:
            raise GenzooError(
                f"network 'timm': could not fetch pretrained weights for {cfg.model} (no network?): "
                f"{type(e).__name__}; set pretrained: false, or download them where there is a network"
            ) from e
        raise
