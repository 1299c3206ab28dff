"""DALL·E 2's remaining parts: text diffs (closed form), the two-upsampler cascade (trained stage by stage, each
stage's sampler honoured, aligned training crops), convolution-only upsamplers (and older checkpoints whose
upsampler had attention still load), CLIP guidance on the unCLIP decoder with the ancestral and DDIM samplers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from genzoo_dalle2.pipeline import random_crops, resize, text_diff_embeddings
from test_dalle2 import CAPTIONS, TINY, TINY_PRIOR
from tiny import assert_refused, train

from genzoo import api
from genzoo.errors import GenzooError
from genzoo.nn.unet import Attention

pytestmark = pytest.mark.usefixtures("one_thread")


def test_text_diff_is_a_slerp_from_z_i_toward_the_normalised_caption_difference() -> None:
    g = torch.Generator().manual_seed(0)
    z_i, z_t0, z_t = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    theta = torch.linspace(0, 1, 11)
    z = text_diff_embeddings(z_i, z_t0, z_t, theta)
    z_d = F.normalize(z_t - z_t0, dim=-1)
    assert torch.allclose(z[0], z_i, atol=1e-6) and torch.allclose(z[-1], z_d, atol=1e-5)
    assert torch.allclose(z.norm(dim=-1), torch.ones(11), atol=1e-5)  # on the sphere all the way
    cos = z @ z_d
    assert (cos.diff() > 0).all(), cos  # toward z_d, monotonically ...
    omega = torch.arccos(z_i @ z_d)  # ... at constant angular speed: the angle left is (1 - theta) omega
    assert torch.allclose(torch.arccos(cos.clamp(-1, 1)), (1 - theta) * omega, atol=1e-3)
    # an embedding that is not unit-norm (Karlo's) keeps its norm; the same caption twice has no direction
    assert torch.allclose(text_diff_embeddings(3 * z_i, z_t0, z_t, theta).norm(dim=-1), torch.full((11,), 3.0))
    with pytest.raises(GenzooError, match="same CLIP embedding"):
        text_diff_embeddings(z_i, z_t, z_t, theta)


def test_upsampler_crops_are_aligned_with_their_low_res_crops() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    low = resize(x, 16)
    crops, low_crops = random_crops(x, low, 8)
    assert crops.shape == (6, 3, 8, 8) and low_crops.shape == (6, 3, 4, 4)
    assert torch.allclose(resize(crops, 4), low_crops, atol=1e-6)  # the same region at both sizes
    for i in range(6):  # and a window of the image itself
        assert any(
            torch.equal(crops[i], x[i, :, r : r + 8, c : c + 8]) for r in range(0, 25, 2) for c in range(0, 25, 2)
        )


def _attention_layers(module: torch.nn.Module) -> int:
    return sum(isinstance(m, Attention) for m in module.modules())


@pytest.mark.parametrize("recipe", ["dalle2-shapes", "dalle2-ar-shapes", "dalle2-cascade-shapes"])
def test_the_recipes_upsamplers_are_convolution_only(recipe: str) -> None:
    spec = api.resolve_recipe(recipe, sets=["data.num_train=8", "data.num_test=8", "pipeline.fit_images=8"])
    model = api.create_model(spec, data_spec=api.build_data(spec).spec)
    ups = [f"{stage}_decoder" for stage in model.cascade]
    assert ups == ["upsampler_decoder", "upsampler2_decoder"][: len(ups)] and ups
    assert all(_attention_layers(model.components[role]) == 0 for role in ups)
    assert _attention_layers(model.components["decoder"]) == 11  # the base decoder keeps its attention (8x8, 4x4)


CASCADE = [
    *TINY,
    *TINY_PRIOR["dalle2-shapes"],
    "data.image_size=64",
    "data.num_train=256",
    "data.num_test=16",
    "pipeline.fit_images=128",
    "decoder.image_size=16",
    "upsampler_decoder.image_size=32",
    "upsampler2_decoder.denoiser.model_channels=16",
    "train.batch_size=8",
    "upsampler_sampler={type: ddim, steps: 3}",
    "upsampler2_sampler={type: ddpm, steps: 2}",
    "train.stages={clip: 2, prior: 2, decoder: 2, upsampler: 3, upsampler2: 3}",
]


@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory) -> tuple[Path, object]:
    run = tmp_path_factory.mktemp("cascade")
    model, _, _ = train(run, "dalle2-cascade-shapes", CASCADE)
    return run, model


def test_a_two_upsampler_cascade_trains_stage_by_stage_and_samples_at_64_px(cascade_run) -> None:
    run, model = cascade_run
    assert model.stages == ("clip", "prior", "decoder", "upsampler", "upsampler2")
    assert model.image_size == 64 and [model.stage_size(s) for s in ("decoder", *model.cascade)] == [16, 32, 64]
    fresh = api.create_model(api.resolve_recipe("dalle2-cascade-shapes", sets=CASCADE))
    for role in ("upsampler_decoder", "upsampler2_decoder"):  # each trained in its own stage
        mine, init = model.components[role].state_dict(), fresh.components[role].state_dict()
        assert any(not torch.equal(mine[k].cpu(), init[k]) for k in mine), role
    calls = {}

    def count(role):
        def hook(*_):
            calls[role] = calls.get(role, 0) + 1

        return hook

    for role in ("decoder", "upsampler_decoder", "upsampler2_decoder"):
        model.components[role].denoiser.register_forward_hook(count(role))
    x = model.sample(2, {"caption": CAPTIONS[:2]}, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 64, 64) and torch.isfinite(x).all()
    # each stage ran its own sampler: the decoder DDPM-8, the first upsampler DDIM-3, the second DDPM-2
    assert calls == {"decoder": 8, "upsampler_decoder": 3, "upsampler2_decoder": 2}
    m = api.load_model(run, upsampler2_sampler="ddim", upsampler2_steps=4, upsampler_steps=2)
    assert m.components["upsampler2_sampler"].cfg.steps == 4 and m.components["upsampler_sampler"].cfg.steps == 2
    assert registered(m.components["upsampler2_sampler"]) == "ddim"
    low = torch.rand(2, 3, 16, 16) * 2 - 1  # the cascade alone, from base-size images (the `upsampler` metric)
    assert m.upsample(low, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 64, 64)


def registered(component) -> str:
    from genzoo.registry import registered_name

    return registered_name(component)


def test_the_cascade_from_the_command_line(cascade_run, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from genzoo.cli import main
    from genzoo.training.images import save_grid

    run, _ = cascade_run
    out = tmp_path / "grid.png"
    argv = ["sample", str(run), "-n", "2", "--prompt", CAPTIONS[0], "--prior-steps", "2", "--steps", "2"]
    assert main([*argv, "--upsampler-steps", "2", "--upsampler2-steps", "2", "--out", str(out)]) == 0
    assert main([*argv, "--upsampler2-scale", "2", "--out", str(out)]) == 2  # the second upsampler has no guidance
    # CLIP guidance swapped in for the decoder's CFG, with either sampler
    for sampler in ("ddpm", "ddim"):
        assert main([*argv, "--guidance", "clip", "--scale", "3", "--sampler", sampler, "--out", str(out)]) == 0
    # text diffs of an image file: -n frames up to --theta
    image, saved = tmp_path / "image.png", tmp_path / "frames.safetensors"
    save_grid(torch.zeros(1, 3, 64, 64), image, min_side=1)
    diff = ["--text-diff", "a red circle", "a blue circle", "--theta", "0.3", "--steps", "2", "--save", str(saved)]
    assert main(["sample", str(run), "-n", "3", "--image", str(image), *diff, "--out", str(out)]) == 0
    assert load_file(str(saved))["samples"].shape == (3, 3, 64, 64)
    assert main(["sample", str(run), "-n", "2", "--image", str(image), *diff, "--fixed-noise", "--out", str(out)]) == 0
    assert main(["sample", str(run), "-n", "3", *diff, "--out", str(out)]) == 2  # no --image


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["upsampler2_sampler=null"], "upsampler2_decoder needs a"),
        (
            ["components.upsampler3_decoder={type: diffusion-decoder}", "components.upsampler2_decoder=null"],
            "numbered in order",
        ),
        (["upsampler_decoder.image_size=16"], "not more than decoder's"),
        (["upsampler2_decoder.image_size=32"], "not more than"),
        (["pipeline.upsampler_crop=0.3"], r"10 px, which must be a multiple of 2 .* x 4"),
    ],
)
def test_a_cascade_that_does_not_fit_is_refused(sets: list[str], match: str) -> None:
    assert_refused("dalle2-cascade-shapes", [*CASCADE, "data.num_train=16", *sets], match)


def test_a_checkpoint_whose_upsampler_had_attention_still_loads(tmp_path: Path) -> None:
    """A run saved before the upsamplers lost their attention (and before the U-Net had `middle_attention`)
    rebuilds from its own recipe, attention included, and loads; its weights do not fit the new template."""
    from genzoo.checkpoint import load_checkpoint, load_state_into, save_checkpoint
    from genzoo.errors import CheckpointError

    old = ["upsampler_decoder.denoiser.attention_resolutions=[8]", "upsampler_decoder.denoiser.middle_attention=true"]
    resolved = api.resolve_recipe("dalle2-shapes", sets=[*TINY, "data.num_train=16", *old])
    del resolved["components"]["upsampler_decoder"]["denoiser"]["middle_attention"]  # as such runs stored it
    source = api.build_data(resolved)
    model = api.create_model(resolved, data_spec=source.spec)
    assert _attention_layers(model.components["upsampler_decoder"]) == 4  # 8x8 down, up (2) and middle
    save_checkpoint(
        tmp_path,
        step=1,
        recipe=resolved,
        components={role: child.state_dict() for role, child in model.named_children() if child.state_dict()},
        meta={"data_spec": api.data_spec_dict(source.spec)},
    )
    loaded = api.load_model(tmp_path)
    a, b = model.components["upsampler_decoder"].state_dict(), loaded.components["upsampler_decoder"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resolved_now = api.resolve_recipe("dalle2-shapes", sets=[*TINY, "data.num_train=16"])
    new = api.create_model(resolved_now, data_spec=source.spec)
    roles = api.init_from(new, resolved_now, tmp_path)  # --init-from skips it: its spec differs
    assert "decoder" in roles and "upsampler_decoder" not in roles
    ckpt = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="'upsampler_decoder'.*unexpected"):
        load_state_into(
            new.components["upsampler_decoder"],
            ckpt.components["upsampler_decoder"],
            role="upsampler_decoder",
            where=tmp_path,
        )


@pytest.fixture(scope="module")
def untrained():
    """A tiny dalle2-shapes model without upsampler, not trained: every path of its decoder made live (ADM
    zero-initialises the residual branches and the output, which would make it ignore z_i)."""
    spec = api.resolve_recipe(
        "dalle2-shapes",
        sets=[*TINY, "data.num_train=16", "data.num_test=8", "upsampler_decoder=null", "upsampler_sampler=null"],
    )
    source = api.build_data(spec)
    model = api.create_model(spec, data_spec=source.spec).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for p in model.components["decoder"].denoiser.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return model, source


def _swap(model, role: str, spec: dict) -> None:
    from genzoo.plugins import default_registry

    kind = role.rsplit("_", 1)[-1]
    model.components[role] = default_registry().build(kind, spec)
    if hasattr(model.components[role], "bind_siblings"):
        model.components[role].bind_siblings(model.components)


def test_text_diff_frames_start_from_the_image_and_share_their_noise(untrained) -> None:
    model, source = untrained
    _swap(model, "sampler", {"type": "ddpm", "steps": 3})
    _swap(model, "guidance", {"type": "cfg", "scale": 3.0})
    image = source.split("test").tensors()["image"][0]

    def frames(theta: float, **kw):
        g = torch.Generator().manual_seed(0)
        return model.text_diff(image, "a red circle", "a blue circle", 3, theta=theta, generator=g, **kw)

    # the paper's way: x_T from DDIM inversion, so theta = 0 gives the image back (at the decoder's 8 px)
    recon, edited = frames(0.5, invert_iters=5), frames(0.0, invert_iters=5)
    assert (recon[0] - resize(image[None], 8)[0]).abs().max() < 0.02
    assert torch.equal(edited[0], edited[2]) and not torch.allclose(recon[2], edited[2], atol=0.1)
    # fixed noise instead: every frame draws the same x_T and ancestral noise, so only z_theta varies between them
    still, moved = frames(0.0, invert=False), frames(0.5, invert=False)
    assert still.shape == (3, 3, 8, 8)
    assert torch.equal(still[0], still[1]) and torch.equal(still[0], still[2])
    assert torch.equal(moved[0], still[0]) and not torch.allclose(moved[2], still[2])
    with pytest.raises(GenzooError, match="same CLIP embedding"):
        model.text_diff(image, "a red circle", "a red circle", 2)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_guidance_steers_the_unclip_decoder_toward_the_caption(untrained, sampler: str) -> None:
    """`--guidance clip` on a dalle2 recipe: GLIDE's CLIP guidance, reached through the registry, borrows the
    recipe's CLIP and reads the caption's tokens, which the pipeline passes to the decoder's guidance."""
    model, _ = untrained
    _swap(model, "sampler", {"type": sampler, "steps": 6})
    _swap(model, "guidance", {"type": "clip", "scale": 1.0})
    guidance, clip = model.components["guidance"], model.components["clip"]
    assert guidance.clip is clip  # borrowed, not a second CLIP
    text = model.components["encoder"].encode({"caption": CAPTIONS})
    z_i = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)

    def draw(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        guidance.scale = scale
        x = model.decode_embeddings(z_i, text, generator=torch.Generator().manual_seed(0))
        return x, (clip.encode_image(x) * clip.encode_tokens(text["tokens"])).sum(-1)

    (x0, plain), (x1, steered) = draw(0.0), draw(100.0)
    assert x0.shape == (3, 3, 8, 8) and not torch.allclose(x0, x1)  # the guidance changes the samples ...
    assert (steered > plain).all(), (plain, steered)  # ... toward the caption in the CLIP's eyes
    with pytest.raises(ValueError, match="needs a caption"):
        model.decode_embeddings(z_i, None)
