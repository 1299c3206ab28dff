"""The reference image a guidance compares samples with: ``cond["reference"]`` (a tensor, from the Python API) or the
image file named by the guidance's ``reference`` field (from a recipe or `genzoo sample --set guidance.reference=F`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition
from genzoo.training.images import load_image

KEY = "reference"  # the condition entry that overrides the file: (1 or B, C, H, W) in [-1, 1]


class ReferenceConfig(BaseModel):
    """The field every reference-image guidance has."""

    model_config = ConfigDict(extra="forbid")
    reference: str | None = Field(
        None,
        description=f"the reference image: a PNG or JPEG file, resized to the model's size; a condition "
        f"{{'{KEY}': tensor (1 or B, C, H, W) in [-1, 1]}} given to sample() takes its place",
    )

    @field_validator("reference")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:  # a resolved recipe names the same file from anywhere
        return None if v is None else str(Path(v).expanduser().resolve())


class Reference:
    """The reference image of guidance ``name``, shaped like the state ``x`` it is compared with."""

    def __init__(self, path: str | None, *, name: str, data: Any) -> None:
        self.name, self.image = name, None
        if path is not None:
            if not Path(path).is_file():
                raise RegistryError(
                    f"guidance '{name}': field 'reference': no image file at {path}; pass a PNG or JPEG file"
                )
            shape = tuple(getattr(data, "image_shape", None) or (3, 64, 64))
            self.image = load_image(path, size=shape[-1], channels=shape[0])[None]

    def like(self, x: Tensor, cond: Condition | None) -> Tensor:
        """(B, C, H, W) like ``x``: the condition's reference, else the file's; area- or bilinearly resized to x's
        size (a cascade's base model draws smaller images than the data's), grey from RGB by the channel mean."""
        ref = cond.get(KEY) if cond else None
        ref = self.image if ref is None else ref
        if ref is None:
            raise GenzooError(
                f"guidance '{self.name}' needs a reference image: --set guidance.reference=IMAGE.png, or pass the "
                f"condition {{'{KEY}': tensor}} to sample()"
            )
        ref = ref.to(device=x.device, dtype=x.dtype)
        ref = ref[None] if ref.dim() == x.dim() - 1 else ref
        if ref.shape[0] not in (1, x.shape[0]):
            raise GenzooError(
                f"guidance '{self.name}': the reference holds {ref.shape[0]} images for {x.shape[0]} samples; pass "
                "one, or one per sample"
            )
        if ref.shape[1] != x.shape[1]:
            ref = ref.mean(1, keepdim=True).expand(-1, x.shape[1], *ref.shape[2:])
        if ref.shape[-2:] != x.shape[-2:]:
            shrink = ref.shape[-1] > x.shape[-1]
            ref = (
                F.interpolate(ref, size=x.shape[-2:], mode="area")
                if shrink
                else F.interpolate(ref, size=x.shape[-2:], mode="bilinear", align_corners=False)
            )
        return ref.expand(x.shape[0], *ref.shape[1:])
