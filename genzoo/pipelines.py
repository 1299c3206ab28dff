"""What the families' pipelines share: the label or caption as the condition, sample-time checks, the token pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition, Pipeline
from genzoo.nn.quantize import perplexity
from genzoo.text.clip import clip_losses


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
            return (
                encoder.encode({"caption": batch["caption"]})
                if encode
                else {"tokens": encoder.tokenize(batch["caption"])}
            )
        return None

    @torch.no_grad()
    def sample(
        self, n: int, condition: Mapping[str, Any] | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        return super().sample(n, self.sample_condition(n, condition), generator=generator)

    def sample_condition(self, n: int, condition: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """``condition`` checked against what the model takes; a class model asked for none gets every class in
        turn."""
        if condition and "caption" in condition and self.components.get("encoder") is None:
            raise GenzooError(
                "this model has no text encoder, so it cannot take a prompt; "
                "use a text-conditional recipe, or --class K for a class-conditional one"
            )
        if condition and "y" in condition and self.condition is not Conditioning.class_:
            if self.condition is Conditioning.caption:
                raise GenzooError(
                    "this model is conditioned on captions, not classes; pass --prompt TEXT instead of --class"
                )
            raise GenzooError("this model is unconditional; drop --class (or train a recipe with condition: class)")
        if condition is None and self.condition is Conditioning.class_:
            condition = {"y": torch.arange(n, device=self.device) % self.num_classes}
        return condition

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
        raise RegistryError(
            f"pipeline '{name}': field 'condition' is 'class' but the dataset has no classes; use condition: none"
        )
    if condition is Conditioning.caption:
        if ctx.data is not None and not ctx.data.has_captions:
            raise RegistryError(
                f"pipeline '{name}': field 'condition' is 'caption' but dataset '{ctx.data.name}' has no captions; "
                "use shapes, or an imagefolder with a captions file"
            )
        if ctx.components.get("encoder") is None:
            raise RegistryError(
                f"pipeline '{name}': field 'condition' is 'caption' and needs a text encoder; "
                "add components.encoder: {type: text-transformer}"
            )
    return {"condition": condition, "num_classes": num_classes}


class TokenPipeline(LabelledPipeline):
    """Stages ``tokenizer`` (VQ-VAE or dVAE), then ``prior`` on the frozen tokenizer's codes, then
    ``clip`` when the recipe has one (DALL·E's reranker); logs reconstruction MSE and code perplexity.

    With ``rerank`` N > 1 and a caption, every prompt gets N candidates and the recipe's CLIP keeps
    the best (DALL·E Sec. 2.5, which drew 512).
    """

    def __init__(self, components, *, rerank: int = 1, **kw) -> None:
        super().__init__(components, **kw)
        self.rerank = rerank
        trainable_prior = callable(getattr(components.get("prior"), "training_losses", None))
        self.stages = (
            ("tokenizer",)
            + (("prior",) if trainable_prior else ())
            + (("clip",) if components.get("clip") is not None else ())
        )

    def optimizer_groups(self, stage: str = "tokenizer") -> dict[str, list[nn.Parameter]]:
        module = self.components[{"prior": "prior", "clip": "clip"}.get(stage, "decoder")]
        return {"main": [p for p in module.parameters() if p.requires_grad]}

    @torch.no_grad()
    def sample(self, n: int, condition=None, *, generator=None) -> Tensor:
        if self.rerank == 1 or not condition or "caption" not in condition:
            return super().sample(n, condition, generator=generator)
        if self.components.get("clip") is None:
            raise GenzooError(
                "rerank needs a CLIP: add components.clip to the recipe (trained in its clip stage), or set rerank: 1"
            )
        k, captions = self.rerank, list(condition["caption"])
        many = [c for c in captions for _ in range(k)]
        x = super().sample(n * k, {**condition, "caption": many}, generator=generator)
        clip = self.components["clip"]
        score = (clip.encode_image(x) * clip.encode_text(many)).sum(-1).view(n, k)
        return x.view(n, k, *x.shape[1:])[torch.arange(n, device=x.device), score.argmax(1).to(x.device)]

    def training_losses(
        self, batch: dict[str, Any], *, optimizer: str = "main", stage: str = "tokenizer"
    ) -> dict[str, Tensor]:
        tokenizer, x = self.components["decoder"], batch["image"]
        if stage == "prior":
            return self.components["prior"].training_losses(tokenizer.encode_codes(x), self.condition_of(batch))
        if stage == "clip":
            return clip_losses(self.components["clip"], x, self.condition_of(batch, encode=False))
        return tokenizer.training_losses(x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        vq = self.components["decoder"]
        return vq.decode(vq.encode_codes(x))

    @torch.no_grad()
    def codebook_usage(self, images: Tensor, batch: int = 512) -> dict[str, float]:
        """Over ``images``: the perplexity of the code histogram and the fraction of codes used at least once."""
        vq = self.components["decoder"]
        codes = torch.cat([vq.encode_codes(images[i : i + batch]) for i in range(0, len(images), batch)]).flatten()
        counts = torch.bincount(codes, minlength=vq.num_codes)
        return {
            "perplexity": float(perplexity(counts)),
            "used_fraction": float((counts > 0).double().mean()),
            "codebook_size": vq.num_codes,
        }


def make_token_pipeline(name: str, condition: Conditioning, ctx: Any, *, rerank: int = 1) -> TokenPipeline:
    """A :class:`TokenPipeline` for pipeline ``name`` (``vqvae``, ``dalle``); refuses a decoder that is no tokenizer."""
    dec = ctx.components.get("decoder")
    if dec is None or not hasattr(dec, "encode_codes"):
        raise RegistryError(
            f"pipeline '{name}' needs a tokenizer as its decoder: {{type: vq-autoencoder}} or {{type: dvae}}"
        )
    return TokenPipeline(ctx.components, rerank=rerank, **labelled_args(name, condition, ctx))
