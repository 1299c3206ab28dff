"""The interfaces fit DALL·E 2 and DALL·E: compositions of small registered test components, end to end.

DALL·E 2 shape: a text encoder -> a diffusion prior over 1-D embeddings (CFG) -> a decoder
conditioned on that embedding (CFG), each stage with its own sampler. DALL·E shape: an encoder ->
a token prior driven by the token sampler with logit CFG -> a decoder from tokens. Plus the
composition errors that name both components.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from tiny import gaussian_diffusion
from torch import Tensor, nn

from genzoo.diffusion import GaussianDiffusion
from genzoo.interfaces import CompositionError, Decoder, Encoder, Pipeline, Prior, SamplerKind, Spec
from genzoo.nn import MLPDenoiser, MLPDenoiserConfig
from genzoo.plugins import hookimpl, load_plugins
from genzoo.recipes import build_pipeline

EMB, VOCAB, CODES = 8, 16, 4


class Dim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(EMB, description="embedding size")


class TextEncoder(Encoder):
    """Hashes captions to tokens and a pooled embedding (a stand-in for CLIP's text tower)."""

    def __init__(self, cfg: Dim) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, cfg.dim)
        self.produces = Spec(condition=frozenset({"emb", "tokens"}))

    def encode(self, condition):
        tokens = torch.tensor([[ord(ch) % VOCAB for ch in c[:6].ljust(6)] for c in condition["caption"]])
        return {"tokens": tokens, "emb": self.table(tokens).mean(1)}


def _diffusion() -> GaussianDiffusion:
    return gaussian_diffusion(100, "cosine", mean="x0", clip_range=None)


class DiffusionPrior(Prior):
    """p(z_img | text emb) as a diffusion over (B, D) vectors, on the image samplers' code path."""

    sampler_kind = SamplerKind.DIFFUSION

    def __init__(self, cfg: Dim) -> None:
        super().__init__()
        self.denoiser = MLPDenoiser(MLPDenoiserConfig(dim=cfg.dim, hidden=32, depth=1, emb_dim_in=cfg.dim))
        self.diffusion = _diffusion()
        self.produces = Spec(shape=(cfg.dim,))
        self.needs_condition = frozenset({"emb"})
        self.calls: list[int] = []

    def sample(self, n, condition=None, *, generator=None, sampler=None, guidance=None):
        def model(x, t, cond):
            self.calls.append(x.shape[0])
            return self.denoiser(x, t, cond)

        return sampler.sample(
            self.diffusion,
            model,
            (n, self.produces.shape[0]),
            cond={"emb": condition["emb"]},
            guidance=guidance,
            generator=generator,
        )


class EmbeddingDecoder(Decoder):
    """x ~ p(x | z_img): a diffusion over 1x4x4 images conditioned on the image embedding."""

    sampler_kind = SamplerKind.DIFFUSION

    def __init__(self, cfg: Dim) -> None:
        super().__init__()
        self.denoiser = MLPDenoiser(MLPDenoiserConfig(dim=16, hidden=32, depth=1, emb_dim_in=cfg.dim))
        self.diffusion = _diffusion()
        self.diffusion.clip_range = 1.0
        self.consumes, self.produces = Spec(shape=(cfg.dim,)), Spec(shape=(1, 4, 4))
        self.seen: Tensor | None = None

    def decode(self, z, condition=None, *, generator=None, sampler=None, guidance=None):
        self.seen = z
        return sampler.sample(
            self.diffusion,
            self.denoiser,
            (z.shape[0], 1, 4, 4),
            cond={"emb": z},
            guidance=guidance,
            generator=generator,
        )


class TokenPrior(Prior):
    """A bigram 'GPT' over image tokens, conditioned on the text embedding; driven by any token sampler."""

    def __init__(self, cfg: Dim) -> None:
        super().__init__()
        self.logit_table = nn.Embedding(VOCAB + 1, VOCAB)
        self.cond_proj = nn.Linear(cfg.dim, VOCAB)
        self.null = nn.Parameter(torch.zeros(cfg.dim))
        self.produces = Spec(shape=(CODES,), dtype="long", vocab_size=VOCAB)
        self.sampler_kind = SamplerKind.TOKEN

    def logits(self, tokens, cond):
        emb = cond["emb"] if "drop" not in cond else torch.where(cond["drop"][:, None], self.null, cond["emb"])
        return self.logit_table(tokens[:, -1]) + self.cond_proj(emb)

    def sample(self, n, condition=None, *, generator=None, sampler=None, guidance=None):
        start = torch.full((n, 1), VOCAB, dtype=torch.long)
        return sampler.sample(
            self.logits, start, CODES, condition={"emb": condition["emb"]}, guidance=guidance, generator=generator
        )


class TokenDecoder(Decoder):
    """Codebook lookup: tokens -> 1x4x4 image (a stand-in for a dVAE decoder)."""

    def __init__(self, cfg: Dim) -> None:
        super().__init__()
        self.codebook = nn.Embedding(VOCAB, 4)
        self.consumes, self.produces = Spec(shape=(CODES,), dtype="long", vocab_size=VOCAB), Spec(shape=(1, 4, 4))

    def decode(self, z, condition=None, *, generator=None, sampler=None, guidance=None):
        return self.codebook(z).view(-1, 1, 4, 4).tanh()


class Plain(Pipeline):
    def training_losses(self, batch, *, optimizer="main", stage="main"):
        return {"loss": torch.zeros(())}


class Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TestPlugin:
    """Registered exactly as a third-party plugin would register them."""

    @hookimpl
    def register_components(self, registry):
        for kind, name, cls in (
            ("encoder", "toy-text", TextEncoder),
            ("prior", "toy-diffusion-prior", DiffusionPrior),
            ("decoder", "toy-embedding-decoder", EmbeddingDecoder),
            ("prior", "toy-token-prior", TokenPrior),
            ("decoder", "toy-token-decoder", TokenDecoder),
        ):
            registry.register(kind, name, config=Dim, factory=cls)
        registry.register("pipeline", "plain", config=Empty, factory=lambda cfg, ctx: Plain(ctx.components))


@pytest.fixture(scope="module")
def reg():
    registry, infos = load_plugins(extra=[("composition-test", TestPlugin())], strict=True)
    return registry


def resolved(components) -> dict:
    return {"name": "t", "pipeline": {"type": "plain"}, "components": {k: v for k, v in components.items() if v}}


DALLE2 = {
    "encoder": {"type": "toy-text"},
    "prior": {"type": "toy-diffusion-prior"},
    "prior_sampler": {"type": "ddim", "steps": 10},
    "prior_guidance": {"type": "cfg", "scale": 3.0},
    "decoder": {"type": "toy-embedding-decoder"},
    "sampler": {"type": "dpm-solver++", "steps": 8},
    "guidance": {"type": "cfg", "scale": 2.0},
}
CAPTIONS = {"caption": ["a red circle", "a blue square", "a cross"]}


def test_dalle2_shaped_composition_samples_end_to_end(reg) -> None:
    torch.manual_seed(0)
    p = build_pipeline(resolved(DALLE2), reg, None)
    for m in p.modules():  # nonzero weights everywhere, so guidance has something to amplify
        for w in m.parameters(recurse=False):
            torch.nn.init.normal_(w, std=0.3)
    x = p.sample(3, CAPTIONS, generator=torch.Generator().manual_seed(1))
    assert x.shape == (3, 1, 4, 4) and x.abs().max() <= 1
    prior = p.components["prior"]
    assert prior.calls == [6] * 10  # CFG: conditional and null passes batched, one forward per step
    assert p.components["decoder"].seen.shape == (3, EMB)  # the decoder consumed the prior's embedding
    again = p.sample(3, CAPTIONS, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, again)  # seeded end to end
    # each stage's guidance is swappable on its own: scale 1 is the conditional model, a different image
    one = build_pipeline(resolved({**DALLE2, "guidance": {"type": "cfg", "scale": 1.0}}), reg, None)
    one.load_state_dict(p.state_dict())
    assert not torch.allclose(one.sample(3, CAPTIONS, generator=torch.Generator().manual_seed(1)), x)


TOKENS = {
    "encoder": {"type": "toy-text"},
    "prior": {"type": "toy-token-prior"},
    "prior_sampler": {"type": "token", "top_k": 4},
    "prior_guidance": {"type": "logit-cfg", "scale": 2.0},
    "decoder": {"type": "toy-token-decoder"},
}


def test_dalle_shaped_token_composition(reg) -> None:
    p = build_pipeline(resolved(TOKENS), reg, None)
    x = p.sample(3, CAPTIONS, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 4, 4)
    assert torch.equal(x, p.sample(3, CAPTIONS, generator=torch.Generator().manual_seed(0)))


def test_composition_errors_name_both_components(reg) -> None:
    bad = {**DALLE2, "decoder": {"type": "toy-embedding-decoder", "dim": 12}}
    with pytest.raises(
        CompositionError,
        match=r"prior 'toy-diffusion-prior' produces shape \(8\) float but decoder "
        r"'toy-embedding-decoder' consumes shape \(12\) float: shapes differ",
    ):
        build_pipeline(resolved(bad), reg, None)
    with pytest.raises(
        CompositionError,
        match="guidance 'logit-cfg' is a token guidance but sampler 'dpm-solver\\+\\+' is a diffusion sampler",
    ):
        build_pipeline(resolved({**DALLE2, "guidance": {"type": "logit-cfg"}}), reg, None)
    with pytest.raises(
        CompositionError,
        match="prior 'toy-token-prior' needs a token sampler but prior_sampler 'ddim' is a diffusion sampler",
    ):
        build_pipeline(resolved({**TOKENS, "prior_sampler": {"type": "ddim"}, "prior_guidance": None}), reg, None)
