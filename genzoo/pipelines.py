"""What every family's pipeline shares: how the dataset's label or caption becomes the condition, and sample-time checks."""

from __future__ import annotations

from enum import Enum
from typing import Any, Mapping

import torch
from torch import Tensor

from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition, Pipeline


class Conditioning(str, Enum):
    none = "none"
    class_ = "class"
    caption = "caption"


class LabelledPipeline(Pipeline):
    """A pipeline that is unconditional, or conditioned on the dataset's class label ``y`` or caption.

    ``condition_of(batch)`` gives the training condition (a caption goes through the ``encoder``,
    which trains with the model, as GLIDE's text transformer); ``sample`` checks what the user asks
    for against what the model can take. An unconditioned grid of a class-conditional model shows
    every class in turn; a caption model without a prompt samples its null (unconditional) caption.
    """

    def __init__(self, components: Mapping[str, Any], *, condition: Conditioning, num_classes: int | None) -> None:
        super().__init__(components)
        self.condition = condition
        self.num_classes = num_classes

    def condition_of(self, batch: Mapping[str, Any], *, encode: bool = True) -> Condition | None:
        """The training condition of ``batch``; ``encode=False`` gives a caption's tokens only (for a
        guidance with its own text tower, trained while the encoder is not)."""
        if self.condition is Conditioning.class_:
            return {"y": batch["label"]}
        if self.condition is Conditioning.caption:
            encoder = self.components["encoder"]
            return encoder.encode({"caption": batch["caption"]}) if encode else {"tokens": encoder.tokenize(batch["caption"])}
        return None

    @torch.no_grad()
    def sample(self, n: int, condition: Mapping[str, Any] | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        if condition and "caption" in condition and self.components.get("encoder") is None:
            raise GenzooError("this model has no text encoder, so it cannot take a prompt; "
                              "use a text-conditional recipe, or --class K for a class-conditional one")
        if condition and "y" in condition and self.condition is not Conditioning.class_:
            if self.condition is Conditioning.caption:
                raise GenzooError("this model is conditioned on captions, not classes; pass --prompt TEXT instead of --class")
            raise GenzooError("this model is unconditional; drop --class (or train a recipe with condition: class)")
        if condition is None and self.condition is Conditioning.class_:
            condition = {"y": torch.arange(n, device=self.device) % self.num_classes}
        return super().sample(n, condition, generator=generator)

    @property
    def device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")


def labelled_args(name: str, condition: Conditioning, ctx: Any) -> dict[str, Any]:
    """``condition`` and ``num_classes`` for a :class:`LabelledPipeline`, with the errors for data or
    components that cannot give that condition."""
    num_classes = getattr(ctx.data, "num_classes", None)
    if condition is Conditioning.class_ and not num_classes:
        raise RegistryError(f"pipeline '{name}': field 'condition' is 'class' but the dataset has no classes; use condition: none")
    if condition is Conditioning.caption:
        if ctx.data is not None and not ctx.data.has_captions:
            raise RegistryError(f"pipeline '{name}': field 'condition' is 'caption' but dataset '{ctx.data.name}' has no captions; "
                                "use shapes, or an imagefolder with a captions file")
        if ctx.components.get("encoder") is None:
            raise RegistryError(f"pipeline '{name}': field 'condition' is 'caption' and needs a text encoder; "
                                "add components.encoder: {type: text-transformer}")
    return {"condition": condition, "num_classes": num_classes}
