"""The `t5` encoder (plugins/genzoo_t5): a frozen transformers text encoder by name, tested on a small random T5 built
here and loaded from a folder; the glide-t5-shapes recipe trained briefly with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import threads, train

from genzoo import api
from genzoo.checkpoint import load_checkpoint
from genzoo.errors import CheckpointError, GenzooError, OfflineError
from genzoo.plugins import default_registry

transformers = pytest.importorskip("transformers")

WORDS = "a an the large small big tiny red green blue yellow purple orange circle square triangle cross in at of top"
WORDS += " bottom left right centre center middle upper lower corner on , :"
CAPTIONS = ["a large red circle in the top left", "bottom right: a small blue cross"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with threads(1):
        yield


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """A random T5 encoder (width 32) and a word-level tokenizer, saved as transformers saves them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS.split()))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    folder = tmp_path_factory.mktemp("t5")
    transformers.T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build(t5_dir: Path, **fields):
    return default_registry().build("encoder", {"type": "t5", "model": str(t5_dir), **fields})


def test_t5_context_is_the_encoders_own_output_and_the_model_stays_frozen(t5_dir: Path) -> None:
    enc = build(t5_dir, max_length=12)
    out = enc.encode({"caption": CAPTIONS, "reference": torch.zeros(1)})
    reference = transformers.T5EncoderModel.from_pretrained(t5_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(t5_dir)
    batch = tokenizer(CAPTIONS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = reference(**batch).last_hidden_state
    assert (
        enc.width == 32
        and out["context"].shape == (2, 12, 32)
        and set(enc.produces.condition)
        == {
            "emb",
            "context",
            "context_mask",
        }
    )
    torch.testing.assert_close(out["context"], want, rtol=0, atol=0)
    assert torch.equal(out["context_mask"], batch.attention_mask.bool())
    assert out["context_mask"].sum(1).tolist() == [9, 8]  # 8 words / 6 words and ':', + the end token
    m = batch.attention_mask[..., None].float()
    torch.testing.assert_close(out["emb"], (want * m).sum(1) / m.sum(1))
    assert "reference" in out and "caption" not in out  # other entries pass through (a guidance's reference)
    assert not list(enc.parameters()) and not enc.state_dict()  # frozen outside the tree: nothing to save or train
    enc.train()
    assert not enc.model.training  # no dropout, whatever the trainer sets
    enc.to(torch.float64)
    assert enc.model.dtype == torch.float64 and enc.encode({"caption": CAPTIONS})["context"].dtype == torch.float32


def test_t5_errors_are_one_line(t5_dir: Path, tmp_path: Path, monkeypatch) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="holds no .safetensors weights; .*genzoo never unpickles"):
        build(pickled)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        OfflineError, match="could not load 'genzoo-tests/no-such-t5' .*hf download genzoo-tests/no-such-t5"
    ) as e:
        build("genzoo-tests/no-such-t5")
    assert "\n" not in str(e.value)


TINY_GLIDE_T5 = [
    "data.image_size=16",
    "data.num_train=500",
    "decoder.image_size=8",
    "decoder.denoiser.model_channels=16",
    "decoder.denoiser.num_res_blocks=1",
    "decoder.denoiser.context_dim=32",
    "decoder.denoiser.emb_dim_in=32",
    "decoder.denoiser.attention_resolutions=[4]",
    "components.upsampler_decoder=null",
    "components.upsampler_sampler=null",
    "train.batch_size=8",
    "train.stages={decoder: 4}",
    "train.ema_decay=0.9",
    "sampler.steps=4",
]


def test_glide_t5_recipe_trains_the_unet_on_the_frozen_encoder(t5_dir: Path, tmp_path: Path) -> None:
    """glide-t5-shapes with the small T5: the U-Net trains, the encoder does not and is not saved; the loaded run
    reads prompts through the same encoder; a width that differs from the U-Net's context_dim is refused."""
    sets = [*TINY_GLIDE_T5, f"encoder.model={t5_dir}"]
    model, _, _ = train(tmp_path, "glide-t5-shapes", sets)
    before = {k: v.clone() for k, v in model.components["encoder"].model.state_dict().items()}
    assert "encoder" not in load_checkpoint(tmp_path).components
    frozen = transformers.T5EncoderModel.from_pretrained(t5_dir).state_dict()
    assert all(torch.equal(before[k], frozen[k]) for k in frozen)
    loaded = api.load_model(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = loaded.sample(2, {"caption": CAPTIONS}, generator=g)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    cond = loaded.components["encoder"].encode({"caption": CAPTIONS})
    dec = loaded.components["decoder"]
    x0, t = torch.zeros(2, 3, 8, 8), torch.full((2,), 500)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    eps = [
        dec.denoiser(dec.diffusion.q_sample(x0, t, noise), t, c) for c in (cond, {**cond, "drop": torch.ones(2).bool()})
    ]
    assert not torch.allclose(eps[0], eps[1])  # the caption reaches the U-Net
    with pytest.raises(GenzooError, match="context_dim is 48 but the text encoder needs 32"):
        spec = api.resolve_recipe("glide-t5-shapes", sets=[*sets, "decoder.denoiser.context_dim=48"])
        api.create_model(spec, data_spec=api.build_data(spec).spec)
