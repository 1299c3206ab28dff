"""`genzoo import` of OpenAI's releases: a ``.pt`` state dict becomes a genzoo run directory.

improved-diffusion and guided-diffusion ``UNetModel`` files become the ``diffusion`` pipeline with genzoo's U-Net
(class-conditional where the file has ``label_emb``); a guided-diffusion ``EncoderUNetModel`` given with
``--classifier`` becomes the ``classifier`` guidance's noisy classifier; GLIDE's base ``Text2ImUNet`` becomes a
caption-conditional run whose denoiser (``glide-unet``) holds genzoo's text transformer, sampled with
classifier-free guidance. The file is the only pickle genzoo ever opens, with ``torch.load(weights_only=True)``
(tensors and containers only: no code from the file runs); its tensors are written as safetensors straight away,
and the run directory is an ordinary checkpoint (step 0) that ``genzoo sample``, ``eval``, ``compare`` and ``push``
use like any other. The architecture, which a bare state dict does not carry, comes from the flags its README
gives (``flags``), or from the published checkpoint whose exact layout the file has.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from genzoo.errors import GenzooError
from genzoo.interfaces import Importer
from genzoo.registry import component, registered_name

from .convert import (
    Keys,
    classifier_config,
    clip_config,
    convert_classifier,
    convert_clip,
    convert_text,
    convert_unet,
    text_config,
    unet_config,
)
from .layouts import (
    DEFAULTS,
    GLIDE_UPSAMPLER,
    PUBLISHED,
    Codebase,
    Diffusion,
    Published,
    UNetLayout,
    classifier_layout,
    diffusion_of,
    parse_flags,
    published,
    unet_layout,
)

SUFFIXES = (".pt", ".pth")
SCHEDULES = {"linear": "linear", "cosine": "cosine", "squaredcos_cap_v2": "cosine"}
KNOWN_DATA = {"cifar10_uncond_50M_500K.pt": {"type": "torchvision", "name": "CIFAR10"}}


class OpenAIImporterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flags: str | None = Field(
        None,
        description="the model's MODEL/DIFFUSION/SAMPLE flags as its README gives them ('--image_size 64 "
        "--num_channels 192 ...'); None: those of the published checkpoint whose layout the file has",
    )
    codebase: Codebase | None = Field(
        None,
        description="whose script defaults complete the flags; None: the published checkpoint's, glide-text2im "
        "for a Text2ImUNet, else guided-diffusion (improved-diffusion's defaults differ: rescale_timesteps True)",
    )
    classifier: str | None = Field(
        None, description="a guided-diffusion noisy classifier (.pt): the run samples with classifier guidance"
    )
    classifier_flags: str | None = Field(
        None,
        description="the classifier's flags (--image_size, --classifier_*, --classifier_scale); None: the "
        "published classifier's whose layout it has",
    )
    clip_image: str | None = Field(
        None, description="GLIDE's noised CLIP image encoder (clip_image_enc.pt), with clip_text: for --guidance clip"
    )
    clip_text: str | None = Field(None, description="GLIDE's noised CLIP text encoder (clip_text_enc.pt)")
    clip_flags: str | None = Field(
        None, description="the noised CLIP's configuration as '--key value' pairs of its config.yaml; None: that file"
    )
    tokenizer: str | None = Field(
        None,
        description="GLIDE: the folder with its encoder.json(.gz) and vocab.bpe(.gz); None: "
        "glide_text2im/tokenizer of an installed glide-text2im (found, not imported)",
    )
    # a super-resolution model run after the base, reading its class or caption too (GLIDE's upsample.pt after
    # base.pt, guided-diffusion's 64_256_upsampler.pt after 64x64_diffusion.pt); its flags as `flags` gives the base's
    upsampler: str | None = Field(None, description="a super-resolution .pt cascaded after the base (docs/interop.md)")
    upsampler_flags: str | None = Field(None, description="the upsampler's flags; None: its published checkpoint's")


def read_state(path: Path) -> dict[str, Any]:
    """The state dict in ``path`` through ``torch.load(weights_only=True)``: the unpickler builds tensors and plain
    containers only and refuses anything else, so no code from the file runs."""
    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # mmap needs the zip format; files of torch < 1.6 are read whole
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenzooError(
            f"{path}: torch.load(weights_only=True) refused it ({first[:160]}); genzoo reads only state dicts of "
            "tensors, and never unpickles anything else"
        ) from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GenzooError(
            f"{path} holds a {type(obj).__name__} that is not a state dict of tensors; OpenAI's releases are bare "
            "state dicts (torch.save(model.state_dict()))"
        )
    return dict(obj)


def kind_of(state: Mapping[str, Any]) -> str | None:
    """Which published module a state dict belongs to, by its keys: 'unet', 'glide', 'classifier', 'clip'."""
    if "input_blocks.0.0.weight" in state:
        if "output_blocks.0.0.in_layers.0.weight" not in state:
            return "classifier"
        return "glide" if "token_embedding.weight" in state else "unet"
    if "blocks.input.patch_proj" in state or "blocks.input.w_voc" in state:
        return "clip"
    return None


def default_data(name: str, size: int, out: Path) -> dict[str, Any]:
    if name in KNOWN_DATA:
        return {**KNOWN_DATA[name], "image_size": size}
    return {"type": "imagefolder", "root": str((out / "reference-images").resolve()), "image_size": size}


@component("importer", "openai", config=OpenAIImporterConfig)
class OpenAIImporter(Importer):
    """Imports improved-diffusion / guided-diffusion / glide-text2im ``.pt`` files (a diffusion model, with
    ``classifier`` its noisy classifier) as genzoo runs."""

    def detect(self, source: str) -> bool:
        """A ``.pt``/``.pth`` file holding an OpenAI U-Net (read with weights_only=True, memory-mapped)."""
        path = Path(source).expanduser()
        if not (path.is_file() and path.suffix in SUFFIXES):
            return False
        try:
            return kind_of(read_state(path)) is not None
        except GenzooError:
            return False

    def run(
        self, source: str, out: str | Path, *, adapter: bool = False, data: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the run directory ``out`` for the file ``source``; returns its checkpoint folder."""
        from genzoo.checkpoint import has_checkpoint
        from genzoo.data import DataSpec

        out, path = Path(out), Path(source).expanduser()
        if has_checkpoint(out):
            raise GenzooError(f"{out} already holds a genzoo run; import into a new directory")
        if adapter:
            raise GenzooError("--adapter: OpenAI's layouts import into genzoo's own modules; there is no adapter")
        if not path.is_file():
            raise GenzooError(f"{source} is not a file; pass an OpenAI .pt checkpoint")
        state = read_state(path)
        kind = kind_of(state)
        if kind in ("classifier", "clip", None):
            raise GenzooError(
                {
                    "classifier": f"{path} is a noisy classifier (EncoderUNetModel); import its diffusion model and "
                    f"pass this file with --classifier {path}",
                    "clip": f"{path} is part of GLIDE's noised CLIP; import GLIDE's base.pt with --option "
                    "clip_image=clip_image_enc.pt --option clip_text=clip_text_enc.pt",
                    None: f"{path} holds no OpenAI U-Net (no input_blocks.0.0.weight); `genzoo import` reads "
                    "improved-diffusion, guided-diffusion and glide-text2im model files",
                }[kind]
            )
        notes = [
            f"read {path.name} with torch.load(weights_only=True): tensors only, no code from the file ran; "
            f"its weights are written as safetensors under {out}"
        ]
        entry, codebase, args = self._flags(path, state, kind, notes, "flags")
        where = path.name
        layout = unet_layout(codebase, args, super_res=kind_super_res(state), where=where)
        if layout.text is not None and "token_embedding.weight" in state:  # the tokenizer's size, not a flag
            layout = replace(layout, text=replace(layout.text, n_vocab=int(state["token_embedding.weight"].shape[0])))
        if layout.super_res:
            raise GenzooError(
                f"{path.name} is a super-resolution model (its first conv takes the low-resolution image too); "
                f"import its base model and cascade this one after it with --option upsampler={path}"
            )
        diffusion = diffusion_of(codebase, args)
        keys = Keys(state, where)
        unet_state = convert_unet(layout, keys)
        time_scale = 1000.0 / diffusion.steps if diffusion.rescale_timesteps else 1.0
        denoiser: dict[str, Any] = {"type": "unet", **unet_config(layout, time_scale)}
        extra: dict[str, Any] = {"kind": kind, "unet": "native", "codebase": codebase, "flags_from": entry or "flags"}
        encoder = None
        if layout.text is not None:
            denoiser, unet_state = glide_denoiser(layout, keys, unet_state, time_scale)
            encoder = {
                "type": "glide-tokens",
                "bpe": str((out / "tokenizer").resolve()),
                "context": layout.text.text_ctx,
            }
        keys.finish()
        states = [("decoder.denoiser", unet_state)]
        components: dict[str, Any] = {
            "prior": {"type": "gaussian"},
            "decoder": self._decoder(diffusion, denoiser, where),
            "sampler": _sampler(diffusion),
        }
        condition = "caption" if encoder else "class" if layout.num_classes else "none"
        if self.cfg.classifier:
            if encoder:
                raise GenzooError(
                    "--classifier: a noisy ImageNet classifier guides a class model; GLIDE takes captions"
                )
            guidance, cstate = self._classifier(layout.image_size, notes)
            components["guidance"], condition = guidance, "class"
            states.append(("guidance.classifier", cstate))
            extra["classifier"] = str(Path(self.cfg.classifier).expanduser())
        if self.cfg.clip_image or self.cfg.clip_text:
            if not encoder:
                raise GenzooError(
                    "clip_image/clip_text: GLIDE's noised CLIP guides a caption model; import GLIDE's base"
                )
            clip, cstate, context = self._clip(notes)
            tower = clip["image_tower"]
            if (tower["image_size"], tower["timesteps"]) != (layout.image_size, diffusion.steps):
                raise GenzooError(
                    f"the noised CLIP reads {tower['image_size']}px images at {tower['timesteps']} steps but the model "
                    f"draws {layout.image_size}px with {diffusion.steps}; pass the CLIP made for it"
                )
            components["clip"], encoder["clip_context"] = clip, context
            states.append(("clip", cstate))
        if encoder:
            components["encoder"] = encoder
            components["guidance"] = {"type": "cfg", "scale": float(args["guidance_scale"])}
        size, pipeline = layout.image_size, {"type": "diffusion", "condition": condition}
        if self.cfg.upsampler:
            stages, up_state, size = self._upsampler(layout, notes)
            components.update(stages)
            components["decoder"]["image_size"] = layout.image_size  # the data are the upsampler's size
            states.append(("upsampler_decoder.denoiser", up_state))
            pipeline["upsampler_condition"] = bool(encoder or layout.num_classes)
            pipeline["quantize_low_res"] = True  # their scripts hand the upsampler 8-bit images
            extra["upsampler"] = str(Path(self.cfg.upsampler).expanduser())
        body = {
            "description": f"{path.name} ({codebase}) imported into genzoo's U-Net"
            + (" with its noisy classifier" if self.cfg.classifier else "")
            + (f", then {Path(self.cfg.upsampler).name}" if self.cfg.upsampler else ""),
            "pipeline": pipeline,
            "data": dict(data) if data else default_data(path.name, size, out),
            "components": components,
            "sample": {"n": 16},
        }
        spec = DataSpec(
            name="imported",
            image_shape=(layout.in_channels, size, size),
            num_classes=1000 if condition == "class" else None,
            has_captions=condition == "caption",
        )
        if entry and (figure := published(entry).figure):
            notes.append(f"published figure to compare with: {figure}")
        created = not out.exists()
        try:  # GLIDE's tokenizer files go into out first: a failed import leaves nothing behind
            if encoder:
                self._copy_tokenizer(out / "tokenizer", layout.text.n_vocab, notes)
            return self._write(out, path, body, spec, states, {**extra, "notes": notes})
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise

    # ----------------------------------------------------------------------- pieces

    def _flags(
        self, path: Path, state: Mapping[str, Any], kind: str, notes: list[str], option: str
    ) -> tuple[str | None, Codebase, dict[str, Any]]:
        """(published entry whose flags are used, or None; codebase; parsed flags) for the model in ``state``, whose
        README flags the user gave as ``option`` (``flags``, ``upsampler_flags``; unset: the published checkpoint's)."""
        glide, super_res, flags = kind == "glide", kind_super_res(state), getattr(self.cfg, option)
        if flags is None and not glide:
            return self._match(path, state, option)
        codebase: Codebase = self.cfg.codebase or ("glide-text2im" if glide else "guided-diffusion")
        entry = None
        if flags is None:  # GLIDE's files carry model_creation.py's defaults and the notebook's sampling
            entry = next(p for p in PUBLISHED if p.kind == ("glide-upsampler" if super_res else "glide"))
        elif self.cfg.codebase is None and not glide:
            notes.append(
                "flags read with guided-diffusion's defaults; pass --option codebase=improved-diffusion for a "
                "model of improved-diffusion (whose rescale_timesteps defaults to True)"
            )
        text = entry.flags if entry else flags
        args = parse_flags(text, codebase, where="flags", base=_base(codebase, super_res))
        return (entry.name if entry else None), codebase, args

    def _match(self, path: Path, state: Mapping[str, Any], option: str) -> tuple[str, Codebase, dict[str, Any]]:
        """The published checkpoint whose layout ``state`` has exactly (its flags are then the file's)."""
        width = int(state["input_blocks.0.0.weight"].shape[0])
        found = []
        for entry in PUBLISHED:
            if entry.kind not in ("model", "super-res") or (entry.kind == "super-res") != kind_super_res(state):
                continue
            args = parse_flags(
                entry.flags, entry.codebase, where=entry.name, base=_base(entry.codebase, entry.kind == "super-res")
            )
            if args["num_channels"] != width or bool(args.get("class_cond")) != ("label_emb.weight" in state):
                continue
            try:
                layout = unet_layout(entry.codebase, args, super_res=entry.kind == "super-res", where=entry.name)
                keys = Keys(state, path.name)
                convert_unet(layout, keys)
                keys.finish()
            except GenzooError:
                continue
            found.append((entry, args, layout))
        if not found:
            kind = "super-res" if kind_super_res(state) else "model"
            names = ", ".join(p.name for p in PUBLISHED if p.kind == kind)
            raise GenzooError(
                f"{path.name}: its layout is none of OpenAI's published checkpoints ({names}); pass its README "
                f"flags: --option {option}='--image_size 64 --num_channels 192 ...' (and codebase=...)"
            )
        # the file's own name first; then any other whose model is the same (dropout and the default sampling grid,
        # e.g. lsun_bedroom.pt's 1000 steps against 256x256_diffusion_uncond.pt's 250, do not change it)
        entry, args, layout = next((f for f in found if f[0].name == path.name), found[0])

        def model(e: Published, a: dict[str, Any], lay: UNetLayout) -> tuple:
            return replace(lay, dropout=0.0), replace(
                diffusion_of(e.codebase, a), timestep_respacing="", use_ddim=False
            )

        differ = [e.name for e, a, lay in found if e is not entry and model(e, a, lay) != model(entry, args, layout)]
        if differ and entry.name != path.name:
            raise GenzooError(
                f"{path.name} has the layout of {entry.name} and of {', '.join(differ)}, which sample differently; "
                f"pass its flags: --option {option}='...'"
            )
        return entry.name, entry.codebase, args

    def _decoder(self, d: Diffusion, denoiser: dict[str, Any], where: str) -> dict[str, Any]:
        if d.noise_schedule not in SCHEDULES:
            raise GenzooError(f"{where}: noise_schedule '{d.noise_schedule}' is not one genzoo has (linear, cosine)")
        return {
            "type": "diffusion-decoder",
            "schedule": SCHEDULES[d.noise_schedule],
            "timesteps": d.steps,
            "mean_type": "x0" if d.predict_xstart else "eps",
            "var_type": "learned-range" if d.learn_sigma else "fixed-small" if d.sigma_small else "fixed-large",
            "loss": "vlb" if d.use_kl else "hybrid" if d.learn_sigma else "simple",
            "clip_range": 1.0,
            "denoiser": denoiser,
        }

    def _upsampler(self, base: UNetLayout, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any], int]:
        """The cascade's ``upsampler_decoder`` and ``upsampler_sampler``, the upsampler denoiser's genzoo state and the
        size it draws, from ``cfg.upsampler``; it must read what ``base`` reads (the caption, or the class) at the
        size ``base`` draws."""
        path = Path(self.cfg.upsampler).expanduser()
        where = f"upsampler {path.name}"
        if not path.is_file():
            raise GenzooError(f"--option upsampler={self.cfg.upsampler}: no such file")
        state = read_state(path)
        kind = kind_of(state)
        if kind not in ("unet", "glide") or not kind_super_res(state):
            raise GenzooError(
                f"{where} is not a super-resolution model (its first conv takes the low-resolution image)"
            )
        notes.append(f"read {path.name} with torch.load(weights_only=True) too: tensors only, no code ran")
        entry, codebase, args = self._flags(path, state, kind, notes, "upsampler_flags")
        layout = unet_layout(codebase, args, super_res=True, where=where)
        if layout.text is not None:
            layout = replace(layout, text=replace(layout.text, n_vocab=int(state["token_embedding.weight"].shape[0])))
        reads = {"caption": layout.text is not None, "class": bool(layout.num_classes)}
        wants = {"caption": base.text is not None, "class": bool(base.num_classes)}
        for what in ("caption", "class"):
            if reads[what] != wants[what]:
                raise GenzooError(
                    f"{where} {'reads' if reads[what] else 'does not read'} the {what} but the base "
                    f"{'does' if wants[what] else 'does not'}; pass the upsampler trained for this base"
                )
        if layout.text is not None and layout.text.text_ctx != base.text.text_ctx:
            raise GenzooError(f"{where} reads {layout.text.text_ctx} caption tokens but the base {base.text.text_ctx}")
        small = int(args.get("small_size") or base.image_size)
        if small != base.image_size:
            raise GenzooError(f"{where} upsamples {small}px images but the base draws {base.image_size}px")
        diffusion = diffusion_of(codebase, args)
        time_scale = 1000.0 / diffusion.steps if diffusion.rescale_timesteps else 1.0
        keys = Keys(state, path.name)
        up_state = convert_unet(layout, keys)
        denoiser: dict[str, Any] = {"type": "unet", **unet_config(layout, time_scale)}
        if layout.text is not None:
            denoiser, up_state = glide_denoiser(layout, keys, up_state, time_scale)
            notes.append(
                "GLIDE's notebook draws the upsampler's x_T with temperature 0.997 (upsample_temp); genzoo draws it "
                "at 1"
            )
        keys.finish()
        if entry:
            notes.append(f"{where}: the flags of the published {entry}")
        stages = {
            "upsampler_decoder": self._decoder(diffusion, denoiser, where),
            "upsampler_sampler": _sampler(diffusion),
        }
        return stages, up_state, layout.image_size

    def _classifier(self, size: int, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``classifier`` guidance spec and its noisy classifier's genzoo state from ``cfg.classifier``."""
        path = Path(self.cfg.classifier).expanduser()
        if not path.is_file():
            raise GenzooError(f"--classifier {self.cfg.classifier}: no such file")
        state = read_state(path)
        if kind_of(state) != "classifier":
            raise GenzooError(f"--classifier {path}: not a noisy classifier (EncoderUNetModel) state dict")
        notes.append(f"read {path.name} with torch.load(weights_only=True) too: tensors only, no code ran")
        candidates = (
            [self.cfg.classifier_flags]
            if self.cfg.classifier_flags is not None
            else [p.flags for p in PUBLISHED if p.kind == "classifier"]
        )
        errors = []
        for flags in candidates:
            args = parse_flags(flags, "guided-diffusion", where="classifier_flags")
            try:
                layout = classifier_layout(args, where=path.name)
                keys = Keys(state, path.name)
                cstate = convert_classifier(layout, keys)
                keys.finish()
            except GenzooError as e:
                errors.append(str(e))
                continue
            if layout.image_size != size:
                raise GenzooError(
                    f"--classifier {path.name} classifies {layout.image_size}x{layout.image_size} images but the model "
                    f"draws {size}x{size}"
                )
            spec = {"type": "noisy-classifier", **classifier_config(layout)}
            return {"type": "classifier", "scale": float(args["classifier_scale"]), "classifier": spec}, cstate
        if self.cfg.classifier_flags is not None:
            raise GenzooError(errors[0])
        raise GenzooError(
            f"--classifier {path.name}: its layout is none of the published classifiers'; pass --option "
            "classifier_flags='--image_size 64 --classifier_depth 4 ...'"
        )

    def _clip(self, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any], int]:
        """The recipe's ``clip`` (GLIDE's noised CLIP), its genzoo state and its text context, from the two files."""
        if not (self.cfg.clip_image and self.cfg.clip_text):
            raise GenzooError("GLIDE's noised CLIP is two files: pass both clip_image=... and clip_text=...")
        c = parse_flags(self.cfg.clip_flags or "", "glide-clip", where="clip_flags")
        states = []
        for option, key in (("clip_image", "blocks.input.patch_proj"), ("clip_text", "blocks.input.w_voc")):
            path = Path(getattr(self.cfg, option)).expanduser()
            if not path.is_file():
                raise GenzooError(f"{option} {path}: no such file")
            state = read_state(path)
            if key not in state:
                raise GenzooError(f"{option} {path}: not GLIDE's noised CLIP {option[5:]} encoder (no {key})")
            states.append(Keys(state, path.name))
            notes.append(f"read {path.name} with torch.load(weights_only=True) too: tensors only, no code ran")
        image, text = states
        cstate = convert_clip(c, image, text)
        image.finish(), text.finish()
        return {"type": "clip", **clip_config(c)}, cstate, int(c["max_text_len"])

    def _copy_tokenizer(self, dest: Path, n_vocab: int, notes: list[str]) -> None:
        from .glide import GPT2BPE

        folder = self.cfg.tokenizer
        if folder is None:
            import importlib.util

            spec = importlib.util.find_spec("glide_text2im")
            if spec is None or not spec.submodule_search_locations:
                raise GenzooError(
                    "GLIDE needs its tokenizer's files: pass --option tokenizer=DIR, the folder holding "
                    "encoder.json.gz and vocab.bpe.gz (glide_text2im/tokenizer/ in a glide-text2im checkout)"
                )
            folder = str(Path(next(iter(spec.submodule_search_locations))) / "tokenizer")
        src = Path(folder).expanduser()
        bpe = GPT2BPE(src)  # refuses a folder without the files, before anything is copied
        if bpe.n_vocab != n_vocab:
            raise GenzooError(
                f"tokenizer {src} has {bpe.n_vocab} tokens but the model's token_embedding has {n_vocab} rows; "
                "pass GLIDE's own tokenizer folder"
            )
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("encoder.json", "encoder.json.gz", "vocab.bpe", "vocab.bpe.gz"):
            if (src / name).is_file():
                shutil.copyfile(src / name, dest / name)
        notes.append(f"GLIDE's tokenizer files copied from {src} to {dest}")

    def _write(
        self, out: Path, path: Path, body: dict[str, Any], spec: Any, states: list[tuple[str, dict]], extra: dict
    ) -> Path:
        """Resolve the recipe ``body`` for ``spec``, load ``states`` (``role.attr`` -> state) and save step 0."""
        from genzoo import api

        return api.save_imported_run(
            out,
            body,
            name=f"imported-{path.stem}",
            data_spec=spec,
            states=states,
            meta={
                "imported_from": {
                    "format": registered_name(self),
                    "source": str(path),
                    "pipeline": extra.pop("kind"),
                    **extra,
                }
            },
            where=path,
        )


def glide_denoiser(
    layout: UNetLayout, keys: Keys, unet_state: dict[str, Any], time_scale: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``glide-unet`` spec and state: the text transformer's keys and ``transformer_proj`` added to the U-Net's."""
    text_state, proj = convert_text(layout.text, keys, layout.model_channels)
    fields = unet_config(layout, time_scale)
    fields.pop("context_dim"), fields.pop("emb_dim_in")  # the text tower's width, set by glide-unet
    # the U-Net's learned null embedding stays unused (GLIDE's null is the encoded empty caption): zeros
    unet = {**unet_state, **proj, "null_emb": torch.zeros(layout.text.width)}
    state = {**{f"text.{k}": v for k, v in text_state.items()}, **{f"unet.{k}": v for k, v in unet.items()}}
    return {"type": "glide-unet", **fields, "text": text_config(layout.text)}, state


def kind_super_res(state: Mapping[str, Any]) -> bool:
    """A super-resolution model's first conv takes the noisy RGB image and the upsampled low-resolution one."""
    return int(state["input_blocks.0.0.weight"].shape[1]) == 6


def _base(codebase: Codebase, super_res: bool) -> dict[str, Any]:
    """The defaults flags complete: GLIDE's upsampler has its own (model_and_diffusion_defaults_upsampler)."""
    return {**DEFAULTS[codebase], **(GLIDE_UPSAMPLER if codebase == "glide-text2im" and super_res else {})}


def _sampler(d: Diffusion) -> dict[str, Any]:
    """The sampling script's loop: ddpm (p_sample_loop) or ddim (eta 0) over the respaced timesteps."""
    steps: int | str = d.timestep_respacing or d.steps
    if isinstance(steps, str):  # "fast27", GLIDE's upsampler grid, is genzoo's too (schedules.space_timesteps)
        steps = int(steps) if steps.isdigit() else steps
    return {"type": "ddim" if d.use_ddim else "ddpm", "steps": steps, "clip": d.clip_denoised}
