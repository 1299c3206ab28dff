"""DALL·E: the dVAE's schedules and KL, the text/image transformer's vocabulary and loss weights, that
the trained transformer reads the caption, logit CFG, CLIP reranking, and the VQ tokenizer swap."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from genzoo_dalle.dvae import DiscreteVAEConfig
from genzoo_dalle.transformer import DalleTransformer, DalleTransformerConfig
from tiny import build, train

from genzoo import api
from genzoo.interfaces import Spec

TINY = [
    "data.image_size=16",
    "data.num_train=2000",
    "decoder.codebook_size=32",
    "decoder.encoder.channels=32",
    "decoder.decoder.channels=32",
    "prior.layers=2",
    "prior.width=64",
    "clip.embed_dim=32",
    "clip.text_tower.width=32",
    "clip.text_tower.layers=1",
    "clip.image_tower.model_channels=16",
    "train.batch_size=64",
    "train.lr=2e-3",
    "train.warmup_steps=20",
    "decoder.temperature_steps=300",
    "decoder.kl_warmup_steps=150",
]
LEARN = [*TINY[:-2], "decoder.temperature_steps=1000", "decoder.kl_warmup_steps=500"]


def test_dvae_schedules_and_kl_match_their_formulas(loaded_registry) -> None:
    dvae = build("dalle-shapes", TINY)[0].components["decoder"]
    cfg: DiscreteVAEConfig = dvae.cfg
    for step, tau in (
        (0, 1.0),
        (150, 0.25),
        (300, 1 / 16),
        (10_000, 1 / 16),
    ):  # exponential: the midpoint is the geometric mean
        dvae.step.fill_(step)
        assert dvae.temperature() == pytest.approx(tau)
    dvae.step.fill_(75)
    assert dvae.kl_weight() == pytest.approx(cfg.kl_weight / 2)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    dvae.step.fill_(10_000)
    with torch.no_grad():  # uniform logits: KL to the uniform prior is 0; confident ones: log K
        for weight, want in ((0.0, 0.0), (1e3, math.log(32))):
            for p in dvae.encoder.parameters():
                p.zero_()
            last = [m for m in dvae.encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
            last.bias[0] = weight
            assert dvae.training_losses(x)["kl"].item() == pytest.approx(want, abs=1e-3)
    assert int(dvae.step) == 10_002  # every training forward advances the schedules


def test_transformer_text_slots_pads_and_weighted_loss() -> None:
    torch.manual_seed(0)
    prior = DalleTransformer(
        DalleTransformerConfig(text_length=6, text_vocab_size=4, layers=1, width=32, cond_drop=0.0)
    )
    prior.bind(Spec(shape=(2, 2), dtype="long", vocab_size=8))
    tokens = torch.tensor([[49406, 500, 600, 49407, 0, 0, 0, 0], [49406, 700, 49407, 0, 0, 0, 0, 0]])
    text = prior.text_tokens({"tokens": tokens}, 2, learn=True)
    # slots in order of first appearance among sorted unique ids: 500, 600, 700 (then no room: 3 = unknown)
    assert text.tolist() == [[3, 0, 1, 3, 8, 9], [3, 2, 3, 7, 8, 9]]
    assert int(prior.slots_used) == 3
    dropped = prior.text_tokens({"tokens": tokens, "drop": torch.tensor([True, False])}, 2)
    assert dropped[0].tolist() == [4, 5, 6, 7, 8, 9] and torch.equal(dropped[1], text[1])
    codes = torch.randint(0, 8, (2, 2, 2))
    out = prior.training_losses(codes, {"tokens": tokens})
    seq = torch.cat([text, codes.flatten(1) + prior.image_offset], 1)
    logits, _ = prior.gpt(seq[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten(), reduction="none").view(2, -1)
    want = (1 / 8) * ce[:, :5].mean() + (7 / 8) * ce[:, 5:].mean()
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["image_nll"].item() == pytest.approx(ce[:, 5:].mean().item(), rel=1e-5)


@pytest.fixture(scope="module")
def dalle_run(tmp_path_factory) -> tuple[Path, object, object]:
    run = tmp_path_factory.mktemp("dalle")
    model, source, _ = train(run, "dalle-shapes", [*LEARN, "train.stages={tokenizer: 1000, prior: 400, clip: 150}"])
    return run, model, source


def test_dalle_tokenizer_and_transformer_learn_and_read_the_caption(dalle_run) -> None:
    _, model, source = dalle_run
    test = source.split("test").tensors()
    x = test["image"][:512]
    mse = torch.mean((model.reconstruct(x) - x) ** 2).item()
    assert mse < 0.5 * torch.mean((x - x.mean(0)) ** 2).item()  # measured 0.39
    usage = model.codebook_usage(x)
    assert usage["perplexity"] > 8 and usage["used_fraction"] > 0.5, usage  # of 32 codes; measured 17.6 and 0.91
    prior, codes = model.components["prior"], model.components["decoder"].encode_codes(x)
    enc = model.components["encoder"]

    def nll(captions: list[str]) -> float:
        return prior.training_losses(codes, {"tokens": enc.tokenize(captions)})["image_nll"].item()

    prior.cfg = prior.cfg.model_copy(update={"cond_drop": 0.0})
    right, shuffled = nll(test["caption"][:512]), nll(test["caption"][1:513])
    assert right < shuffled - 0.05, (right, shuffled)  # nats per image token


def test_dalle_samples_with_logit_cfg_and_clip_reranking(dalle_run) -> None:
    run, _, _ = dalle_run
    prompts = ["a large red circle in the top left", "a small blue cross in the centre"]
    m = api.load_model(run, sets=["prior_guidance.scale=3"])
    out = m.sample(2, {"caption": prompts}, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1
    plain = api.load_model(run)
    candidates = plain.sample(
        2 * 4, {"caption": [p for p in prompts for _ in range(4)]}, generator=torch.Generator().manual_seed(1)
    )
    ranked = api.load_model(run, sets=["pipeline.rerank=4"]).sample(
        2, {"caption": prompts}, generator=torch.Generator().manual_seed(1)
    )
    clip = plain.components["clip"]
    scores = (
        (clip.encode_image(candidates) * clip.encode_text([p for p in prompts for _ in range(4)])).sum(-1).view(2, 4)
    )
    best = candidates.view(2, 4, 3, 16, 16)[torch.arange(2), scores.argmax(1)]
    assert torch.allclose(ranked, best, atol=1e-5)  # the same stream of candidates, the CLIP's favourite kept


def test_dalle_from_the_command_line(dalle_run, tmp_path: Path) -> None:
    from genzoo.cli import main

    out = tmp_path / "grid.png"
    prompted = ["sample", str(dalle_run[0]), "-n", "2", "--prompt", "a large red circle in the top left"]
    assert main([*prompted, "--rerank", "2", "--top-k", "8", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_the_vq_tokenizer_swaps_into_the_dalle_recipe(tmp_path: Path) -> None:
    model, source, _ = train(
        tmp_path,
        "dalle-shapes-vq",
        [
            *TINY[:2],
            "train.stages={tokenizer: 30, prior: 10, clip: 0}",
            "decoder.codebook_size=32",
            "prior.layers=1",
            "prior.width=32",
        ],
    )
    assert type(model.components["decoder"]).__name__ == "VQAutoencoder"
    out = model.sample(
        2, {"caption": ["a large red circle in the top left"] * 2}, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (2, 3, 16, 16)
