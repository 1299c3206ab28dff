"""OpenAI's model configurations: their scripts' flags, defaults and published checkpoints, read into dataclasses.

An OpenAI ``.pt`` file is a bare state dict: the architecture is in the command-line flags its README gives
(``--num_channels 192 --num_head_channels 64 ...``), read by each codebase's ``script_util.py`` (improved-diffusion,
guided-diffusion) or ``model_creation.py`` (glide-text2im) with its own defaults. This module holds those defaults,
the flags of every published checkpoint (from the READMEs; cited per entry), and turns flags into
:class:`UNetLayout` / :class:`ClassifierLayout`, the constructor arguments of ``UNetModel`` / ``EncoderUNetModel`` /
``Text2ImUNet``. Nothing here reads a file.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from genzoo.errors import GenzooError

Codebase = Literal["improved-diffusion", "guided-diffusion", "glide-text2im"]
CODEBASES: tuple[Codebase, ...] = ("improved-diffusion", "guided-diffusion", "glide-text2im")

# each codebase's script defaults (improved_diffusion/script_util.py model_and_diffusion_defaults;
# guided_diffusion/script_util.py model_and_diffusion_defaults + diffusion_defaults + classifier_defaults;
# glide_text2im/model_creation.py model_and_diffusion_defaults), plus the sampling scripts' flags
_SAMPLE = {"timestep_respacing": "", "use_ddim": False, "clip_denoised": True}
DEFAULTS: dict[str, dict[str, Any]] = {
    "improved-diffusion": {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "attention_resolutions": "16,8",
        "dropout": 0.0,
        "learn_sigma": False,
        "sigma_small": False,
        "class_cond": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": True,
        "rescale_learned_sigmas": True,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
        "large_size": 256,
        "small_size": 64,
        **_SAMPLE,
    },
    "guided-diffusion": {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "num_head_channels": -1,
        "attention_resolutions": "16,8",
        "channel_mult": "",
        "dropout": 0.0,
        "class_cond": False,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "use_fp16": False,
        "use_new_attention_order": False,
        "learn_sigma": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": False,
        "rescale_learned_sigmas": False,
        "classifier_use_fp16": False,
        "classifier_width": 128,
        "classifier_depth": 2,
        "classifier_attention_resolutions": "32,16,8",
        "classifier_use_scale_shift_norm": True,
        "classifier_resblock_updown": True,
        "classifier_pool": "attention",
        "classifier_scale": 1.0,
        "large_size": 256,
        "small_size": 64,
        **_SAMPLE,
    },
    "glide-text2im": {
        "image_size": 64,
        "num_channels": 192,
        "num_res_blocks": 3,
        "channel_mult": "",
        "num_heads": 1,
        "num_head_channels": 64,
        "num_heads_upsample": -1,
        "attention_resolutions": "32,16,8",
        "dropout": 0.1,
        "text_ctx": 128,
        "xf_width": 512,
        "xf_layers": 16,
        "xf_heads": 8,
        "xf_final_ln": True,
        "xf_padding": True,
        "diffusion_steps": 1000,
        "noise_schedule": "squaredcos_cap_v2",
        "use_scale_shift_norm": True,
        "resblock_updown": True,
        "use_fp16": True,
        "cache_text_emb": False,
        "inpaint": False,
        "super_res": False,
        "guidance_scale": 3.0,  # text2im.ipynb's classifier-free guidance scale
        **_SAMPLE,
    },
}
# GLIDE's noised CLIP: glide_text2im/clip/config.yaml (its flags here are that file's keys)
DEFAULTS["glide-clip"] = {
    "logit_scale": 100.0,
    "n_timesteps": 1000,
    "image_size": 64,
    "patch_size": 4,
    "n_vocab": 65536,
    "max_text_len": 77,
    "n_embd": 512,
    "n_head_state_text": 64,
    "n_head_text": 8,
    "n_xf_blocks_text": 12,
    "n_head_state_image": 64,
    "n_head_image": 12,
    "n_xf_blocks_image": 12,
}
# glide_text2im/model_creation.py model_and_diffusion_defaults_upsampler
GLIDE_UPSAMPLER = {"image_size": 256, "num_res_blocks": 2, "noise_schedule": "linear", "super_res": True}
# channel_mult by image size when --channel_mult is "" (each codebase's create_model / sr_create_model)
CHANNEL_MULT: dict[tuple[Codebase, str], dict[int, tuple[float, ...]]] = {
    ("improved-diffusion", "model"): {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
    ("improved-diffusion", "super-res"): {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)},
    ("guided-diffusion", "model"): {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    },
    ("guided-diffusion", "super-res"): {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)},
    ("guided-diffusion", "classifier"): {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    },
    ("glide-text2im", "model"): {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
}
NUM_CLASSES = 1000  # ImageNet, both diffusion codebases' NUM_CLASSES
GLIDE_VOCAB = 50257  # GPT-2's BPE, glide_text2im/tokenizer/bpe.py (its end token, n_vocab - 1, pads)


@dataclass(frozen=True)
class Published:
    """A released checkpoint: its file name, codebase, kind and the README's flags for it."""

    name: str
    codebase: Codebase
    kind: Literal["model", "super-res", "classifier", "glide", "glide-upsampler"]
    flags: str
    source: str
    figure: str = ""  # the published result to compare an imported run with


_GD = "https://github.com/openai/guided-diffusion#"
_ID = "https://github.com/openai/improved-diffusion#models-and-hyperparameters"
_GD64 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
    "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
    "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
)
_GD128 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 --learn_sigma True "
    "--noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True "
    "--use_fp16 True --use_scale_shift_norm True"
)
_GD256 = (
    "--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True "
    "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
    "--use_fp16 True --use_scale_shift_norm True"
)
_SAMPLE250 = " --timestep_respacing 250"  # the README's SAMPLE_FLAGS
_ID64 = (
    "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True --diffusion_steps 4000 "
    "--noise_schedule cosine"
)
_ID32 = (
    "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 --diffusion_steps 4000 "
    "--noise_schedule cosine"
)
_IDLSUN = (
    "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
    "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear "
    "--rescale_learned_sigmas False --rescale_timesteps False"
)
PUBLISHED: tuple[Published, ...] = (
    Published(
        "64x64_diffusion.pt",
        "guided-diffusion",
        "model",
        _GD64 + _SAMPLE250,
        _GD + "classifier-guidance",
        "ImageNet 64x64 FID 2.07 (README Results; classifier-guided, 64x64_classifier.pt at scale 1.0)",
    ),
    Published(
        "128x128_diffusion.pt",
        "guided-diffusion",
        "model",
        _GD128 + _SAMPLE250,
        _GD + "classifier-guidance",
        "ImageNet 128x128 FID 2.97 (README Results; classifier-guided at scale 0.5)",
    ),
    Published(
        "256x256_diffusion.pt",
        "guided-diffusion",
        "model",
        _GD256 + " --class_cond True" + _SAMPLE250,
        _GD + "classifier-guidance",
        "ImageNet 256x256 FID 4.59 (README Results; classifier-guided at scale 1.0)",
    ),
    Published(
        "256x256_diffusion_uncond.pt",
        "guided-diffusion",
        "model",
        _GD256 + " --class_cond False" + _SAMPLE250,
        _GD + "classifier-guidance",
    ),
    Published(
        "lsun_bedroom.pt",
        "guided-diffusion",
        "model",
        _GD256 + " --class_cond False --dropout 0.1 --timestep_respacing 1000",
        _GD + "lsun-models",
        "LSUN Bedroom FID 1.90 (README Results)",
    ),
    Published(
        "64_256_upsampler.pt",
        "guided-diffusion",
        "super-res",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256 --small_size 64 "
        "--learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True" + _SAMPLE250,
        _GD + "upsampling",
    ),
    Published(
        "128_512_upsampler.pt",
        "guided-diffusion",
        "super-res",
        "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 --small_size 128 "
        "--learn_sigma True --noise_schedule linear --num_channels 192 --num_head_channels 64 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True" + _SAMPLE250,
        _GD + "upsampling",
    ),
    Published(
        "64x64_classifier.pt",
        "guided-diffusion",
        "classifier",
        "--image_size 64 --classifier_depth 4 --classifier_scale 1.0",
        _GD + "classifier-guidance",
    ),
    Published(
        "128x128_classifier.pt",
        "guided-diffusion",
        "classifier",
        "--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 --classifier_width 128 "
        "--classifier_pool attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True "
        "--classifier_scale 0.5",
        _GD + "classifier-guidance",
    ),
    Published(
        "256x256_classifier.pt",
        "guided-diffusion",
        "classifier",
        "--image_size 256 --classifier_scale 1.0",
        _GD + "classifier-guidance",
    ),
    Published(
        "imagenet64_uncond_100M_1500K.pt",
        "improved-diffusion",
        "model",
        _ID64,
        _ID,
    ),
    Published(
        "cifar10_uncond_50M_500K.pt",
        "improved-diffusion",
        "model",
        _ID32,
        _ID,
    ),
    Published(
        "imagenet64_cond_270M_250K.pt",
        "improved-diffusion",
        "model",
        "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True "
        "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False",
        _ID,
        "class-conditional ImageNet 64x64 FID 2.92 (Nichol & Dhariwal 2021)",
    ),
    Published(
        "upsample_cond_500K.pt",
        "improved-diffusion",
        "super-res",
        "--num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True --diffusion_steps 4000 "
        "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False",
        _ID,
    ),
    Published("lsun_uncond_100M_1200K_bs128.pt", "improved-diffusion", "model", _IDLSUN, _ID),
    Published("base.pt", "glide-text2im", "glide", "--timestep_respacing 100", "glide_text2im/model_creation.py"),
    Published(
        "upsample.pt",
        "glide-text2im",
        "glide-upsampler",
        "--timestep_respacing fast27",
        "glide_text2im/model_creation.py model_and_diffusion_defaults_upsampler",
    ),
)


def published(name: str) -> Published | None:
    return next((p for p in PUBLISHED if p.name == name), None)


def parse_flags(text: str, codebase: str, *, where: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--name value`` pairs read as ``codebase``'s scripts read them (argparse over its defaults: a flag's type is
    its default's, booleans as str2bool), on top of ``base`` (the defaults when None). Unknown flags are refused."""
    args = dict(DEFAULTS[codebase] if base is None else base)
    words = shlex.split(text)
    if len(words) % 2 or any(not w.startswith("--") for w in words[::2]):
        raise GenzooError(f"{where}: expected '--name value' pairs as in OpenAI's README, got {text!r}")
    for flag, value in zip(words[::2], words[1::2]):
        name = flag[2:]
        if name not in DEFAULTS[codebase]:
            raise GenzooError(
                f"{where}: {flag} is not a flag of {codebase}'s scripts; known: {', '.join(sorted(DEFAULTS[codebase]))}"
            )
        default = DEFAULTS[codebase][name]
        try:
            args[name] = _typed(value, default)
        except ValueError:
            raise GenzooError(f"{where}: {flag} {value!r} is not a {type(default).__name__}") from None
    return args


def _typed(value: str, default: Any) -> Any:
    if isinstance(default, bool):  # guided_diffusion.script_util.str2bool
        if value.lower() in ("yes", "true", "t", "y", "1"):
            return True
        if value.lower() in ("no", "false", "f", "n", "0"):
            return False
        raise ValueError(value)
    return type(default)(value)


# --------------------------------------------------------------------------- constructor arguments


@dataclass(frozen=True)
class TextLayout:
    """Text2ImUNet's text transformer (glide_text2im/text2im_model.py, xf.py)."""

    text_ctx: int
    width: int
    layers: int
    heads: int
    final_ln: bool
    padding: bool
    n_vocab: int = GLIDE_VOCAB


@dataclass(frozen=True)
class UNetLayout:
    """The arguments of improved/guided-diffusion's ``UNetModel`` (or ``SuperResModel``) and GLIDE's Text2ImUNet."""

    image_size: int
    in_channels: int  # of the image; a super-resolution model's first conv takes twice as many
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_ds: tuple[int, ...]  # downsampling rates with attention (the flags give resolutions)
    channel_mult: tuple[float, ...]
    dropout: float
    num_classes: int | None
    num_heads: int
    num_head_channels: int
    num_heads_upsample: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    new_attention_order: bool
    super_res: bool = False
    text: TextLayout | None = None

    def heads(self, ch: int) -> int:
        return self.num_heads if self.num_head_channels == -1 else ch // self.num_head_channels


@dataclass(frozen=True)
class ClassifierLayout:
    """The arguments of guided-diffusion's ``EncoderUNetModel`` as ``create_classifier`` passes them."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_ds: tuple[int, ...]
    channel_mult: tuple[float, ...]
    num_head_channels: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    pool: str


@dataclass(frozen=True)
class Diffusion:
    """``create_gaussian_diffusion``'s arguments and the sampling flags."""

    steps: int
    noise_schedule: str
    learn_sigma: bool
    sigma_small: bool
    predict_xstart: bool
    use_kl: bool
    rescale_timesteps: bool
    timestep_respacing: str
    use_ddim: bool
    clip_denoised: bool
    extra: dict[str, Any] = field(default_factory=dict)


def _mult(codebase: Codebase, kind: str, size: int, given: str, where: str) -> tuple[float, ...]:
    if given:
        return tuple(float(m) if "." in m else int(m) for m in given.split(","))
    table = CHANNEL_MULT[(codebase, kind)]
    if size not in table:
        raise GenzooError(f"{where}: {codebase} has no channel_mult for image size {size} (it knows {sorted(table)})")
    return table[size]


def _ds(size: int, resolutions: str) -> tuple[int, ...]:
    return tuple(size // int(r) for r in resolutions.split(","))


def unet_layout(codebase: Codebase, args: dict[str, Any], *, super_res: bool, where: str) -> UNetLayout:
    """The model ``codebase``'s ``create_model`` (``sr_create_model`` for ``super_res``) builds from ``args``."""
    glide = codebase == "glide-text2im"
    if glide and args["inpaint"]:
        raise GenzooError(
            f"{where}: GLIDE's inpainting models (--inpaint True) are not imported; base and upsample are"
        )
    size = args["large_size"] if super_res and not glide else args["image_size"]
    kind = "super-res" if super_res and not glide else "model"
    learn_sigma = True if glide else args["learn_sigma"]  # Text2ImUNet always has out_channels=6
    text = None
    if glide and args["xf_width"]:
        text = TextLayout(
            text_ctx=args["text_ctx"],
            width=args["xf_width"],
            layers=args["xf_layers"],
            heads=args["xf_heads"],
            final_ln=args["xf_final_ln"],
            padding=args["xf_padding"],
        )
    return UNetLayout(
        image_size=size,
        in_channels=3,
        model_channels=args["num_channels"],
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=args["num_res_blocks"],
        attention_ds=_ds(size, args["attention_resolutions"]),
        channel_mult=_mult(codebase, kind, size, args.get("channel_mult", ""), where),
        dropout=args["dropout"],
        num_classes=NUM_CLASSES if args.get("class_cond") else None,
        num_heads=args["num_heads"],
        num_head_channels=args.get("num_head_channels", -1),
        num_heads_upsample=args["num_heads_upsample"],
        use_scale_shift_norm=args["use_scale_shift_norm"],
        resblock_updown=args.get("resblock_updown", False),
        new_attention_order=args.get("use_new_attention_order", False),  # GLIDE's QKVAttention is the legacy order
        super_res=super_res,
        text=text,
    )


def classifier_layout(args: dict[str, Any], *, where: str) -> ClassifierLayout:
    """guided_diffusion.script_util.create_classifier."""
    size = args["image_size"]
    return ClassifierLayout(
        image_size=size,
        in_channels=3,
        model_channels=args["classifier_width"],
        out_channels=NUM_CLASSES,
        num_res_blocks=args["classifier_depth"],
        attention_ds=_ds(size, args["classifier_attention_resolutions"]),
        channel_mult=_mult("guided-diffusion", "classifier", size, "", where),
        num_head_channels=64,
        use_scale_shift_norm=args["classifier_use_scale_shift_norm"],
        resblock_updown=args["classifier_resblock_updown"],
        pool=args["classifier_pool"],
    )


def diffusion_of(codebase: Codebase, args: dict[str, Any]) -> Diffusion:
    glide = codebase == "glide-text2im"
    return Diffusion(
        steps=args["diffusion_steps"],
        noise_schedule=args["noise_schedule"],
        learn_sigma=True if glide else args["learn_sigma"],
        sigma_small=args.get("sigma_small", False),
        predict_xstart=args.get("predict_xstart", False),
        use_kl=args.get("use_kl", False),
        rescale_timesteps=args.get("rescale_timesteps", False),
        timestep_respacing=args["timestep_respacing"],
        use_ddim=args["use_ddim"],
        clip_denoised=args["clip_denoised"],
    )
