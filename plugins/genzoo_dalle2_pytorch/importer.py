"""`genzoo import` of DALLE2-pytorch checkpoints: a trained ``DiffusionPrior`` and ``Decoder`` become genzoo's
``dalle2`` pipeline.

SOURCE is a folder holding, in DALLE2-pytorch's own formats: the prior's config (a ``TrainDiffusionPriorConfig`` JSON
as ``train_diffusion_prior.py`` reads, or its ``prior`` part alone) and the decoder's (``TrainDecoderConfig`` or its
``decoder`` part), and their weights: state dicts (``torch.save(model.state_dict())``, what LAION published) or its
trackers' saves (a dict whose ``model`` is the state dict), as ``.pth`` / ``.pt`` / ``.ckpt``, or ``.safetensors``.
The CLIP is the configs' ``clip`` (OpenAI's or open_clip's, as genzoo's ``open-clip``) or the ``clip`` option, any
genzoo CLIP spec (``--option clip='{type: clip, weights: RUN}'``).

A pickle is read here only, with ``torch.load(weights_only=True)`` (tensors and plain containers; no code runs), and
its tensors are written as safetensors into the run at once. The configs are resolved by DALLE2-pytorch's own config
classes and modules (built on the meta device: nothing is allocated), so every default is the library's; then each
field is mapped onto genzoo's process and sampler, and what genzoo cannot represent is refused with the field named.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from genzoo.errors import GenzooError
from genzoo.interfaces import Importer
from genzoo.registry import component, registered_name

WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
# the prefix of each model's network weights in its state dict (the rest are schedule buffers derived from the config)
OWN_KEYS = {"prior": ("net.",), "decoder": ("unets.",)}


class Dalle2PytorchImporterConfig(BaseModel):
    """The CLIP the imported prior and decoder read (``genzoo import ... --option clip=SPEC``)."""

    model_config = ConfigDict(extra="forbid")
    clip: dict[str, Any] | None = Field(
        None,
        description="the CLIP as a genzoo spec (YAML on the command line), e.g. {type: open-clip, model: ViT-L-14, "
        "pretrained: openai} or {type: clip, weights: RUN}; null: the CLIP the configs name (their clip: make, model)",
    )

    @field_validator("clip", mode="before")
    @classmethod
    def _yaml(cls, v: Any) -> Any:
        return yaml.safe_load(v) if isinstance(v, str) else v


def refuse(field: str, value: Any, why: str) -> GenzooError:
    return GenzooError(f"DALLE2-pytorch field '{field}' = {value!r}: {why}")


# --------------------------------------------------------------------------- reading the folder


def find_configs(folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """``prior`` / ``decoder`` -> (file, its DiffusionPriorConfig / DecoderConfig dict) among the folder's JSON."""
    found: dict[str, list[tuple[Path, dict[str, Any]]]] = {"prior": [], "decoder": []}
    for path in sorted(folder.glob("*.json")):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(raw, dict):
            continue
        for kind, key in (("prior", "net"), ("decoder", "unets")):
            part = raw.get(kind) if isinstance(raw.get(kind), dict) else raw
            if key in part:
                found[kind].append((path, part))
    for kind, hits in found.items():
        if len(hits) > 1:
            raise GenzooError(
                f"{folder} holds {len(hits)} {kind} configs ({', '.join(p.name for p, _ in hits)}); keep one"
            )
    return {kind: hits[0] for kind, hits in found.items() if hits}


def read_weights(path: Path) -> dict[str, Tensor]:
    """A state dict from ``path``: safetensors, or a pickle through ``torch.load(weights_only=True)`` only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # weights_only: its unpickler builds tensors and plain containers and refuses anything else
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenzooError(
            f"{path}: torch.load(weights_only=True) refused it ({first}); genzoo never unpickles objects: where you "
            "trust it, save its state dict alone (torch.save(model.state_dict(), PATH)) or as safetensors"
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):  # a tracker's or trainer's save
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise GenzooError(f"{path} holds no state dict (a mapping of names to tensors, or one under 'model')")
    return dict(obj)


def find_weights(folder: Path) -> tuple[dict[str, tuple[Path, dict[str, Tensor]]], list[str]]:
    """``prior`` / ``decoder`` -> (file, state dict), told apart by their keys; and the pickles read."""
    found: dict[str, list[tuple[Path, dict[str, Tensor]]]] = {"prior": [], "decoder": []}
    pickles = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        state = read_weights(path)
        if path.suffix != ".safetensors":
            pickles.append(path.name)
        for kind, prefixes in OWN_KEYS.items():
            if any(k.startswith(prefixes) for k in state):
                found[kind].append((path, state))
    for kind, hits in found.items():
        if len(hits) > 1:
            raise GenzooError(f"{folder} holds {len(hits)} {kind} state dicts ({', '.join(p.name for p, _ in hits)})")
    return {kind: hits[0] for kind, hits in found.items() if hits}, pickles


def check_state(kind: str, path: Path, state: Mapping[str, Tensor], model: torch.nn.Module) -> None:
    """Every key of the library's model (built from the config) is in the state dict with its shape, and no other."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("clip.")}
    got = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("clip.")}
    missing, unexpected = sorted(set(own) - set(got)), sorted(set(got) - set(own))
    shapes = [k for k in own if k in got and own[k] != got[k]]
    if missing or unexpected or shapes:
        what = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"{shapes[0]} is {got[shapes[0]]}, the config gives {own[shapes[0]]}"
        )
        raise GenzooError(f"{path}: the {kind} weights do not match its config ({what})")


# --------------------------------------------------------------------------- the library's models, on meta


def library_models(configs: Mapping[str, tuple[Path, dict[str, Any]]]) -> tuple[Any, Any, Any, Any]:
    """(prior config, DiffusionPrior, decoder config, Decoder) as DALLE2-pytorch builds them from the configs (its
    ``create``), on the meta device and without their CLIP."""
    from dalle2_pytorch.train_configs import DecoderConfig, DiffusionPriorConfig

    out = []
    for kind, cls in (("prior", DiffusionPriorConfig), ("decoder", DecoderConfig)):
        path, raw = configs[kind]
        try:
            cfg = cls(**{**raw, "clip": None})
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")  # its pydantic v1 idioms (.dict()) warn under pydantic 2
                model = cfg.create()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GenzooError(f"{path}: DALLE2-pytorch rejects the {kind} config: {first}") from e
        out += [cfg, model]
    return tuple(out)


def process_fields(name: str, timesteps: int, field: str) -> dict[str, Any]:
    """DALLE2-pytorch's named beta schedule as genzoo's: the same name where the betas agree in float64 (cosine,
    linear with 1000/T scaling), else its betas (quadratic, sigmoid, jsd)."""
    from dalle2_pytorch import dalle2_pytorch as lib

    from genzoo.diffusion.schedules import get_named_beta_schedule

    make = {
        "cosine": lib.cosine_beta_schedule,
        "linear": lib.linear_beta_schedule,
        "quadratic": lib.quadratic_beta_schedule,
        "sigmoid": lib.sigmoid_beta_schedule,
        "jsd": lambda n: 1.0 / torch.linspace(n, 1, n, dtype=torch.float64),
    }
    if name not in make:
        raise refuse(field, name, f"DALLE2-pytorch names {', '.join(make)}")
    betas = make[name](timesteps).double().numpy()
    if name in ("cosine", "linear") and np.abs(get_named_beta_schedule(name, timesteps) - betas).max() < 1e-12:
        return {"schedule": name, "timesteps": timesteps}
    return {"betas": betas.tolist(), "timesteps": timesteps}


def mean_type(predict_v: bool, predict_x_start: bool) -> str:
    return "v" if predict_v else "x0" if predict_x_start else "eps"


def sampler_spec(steps: int | None, timesteps: int, eta: float, notes: list[str], where: str) -> dict[str, Any]:
    """Its full chain (``p_sample_loop_ddpm``) is genzoo's ancestral sampler over every step; fewer
    ``sample_timesteps`` run its DDIM loop, mapped to genzoo's DDIM with the same count and eta."""
    if steps is None or steps >= timesteps:
        return {"type": "ddpm", "steps": timesteps}
    notes.append(
        f"{where}: sample_timesteps {steps} < {timesteps} runs DALLE2-pytorch's DDIM loop; genzoo runs its own DDIM "
        f"({steps} steps, eta {eta}) on its even grid, ending at abar = 1 (see docs/interop.md)"
    )
    return {"type": "ddim", "steps": steps, "eta": eta}


def map_prior(cfg: Any, prior: Any, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DiffusionPrior as a ``dalle2-pytorch-prior`` spec and its sampler."""
    if prior.net.self_cond:
        raise refuse("prior.net.self_cond", True, "self-conditioning is not in genzoo's samplers")
    if prior.sampling_clamp_l2norm and prior.predict_x_start:
        raise refuse(
            "prior.sampling_clamp_l2norm",
            True,
            "it renormalises x0_hat at every step; genzoo's samplers clamp it at most (final_l2norm is supported)",
        )
    timesteps = prior.noise_scheduler.num_timesteps
    if prior.noise_scheduler.loss_type != "l2":
        notes.append(f"prior.loss_type {prior.noise_scheduler.loss_type}: genzoo trains it with the MSE")
    if prior.training_clamp_l2norm:
        notes.append("prior.training_clamp_l2norm: genzoo trains without it")
    if prior.text_cond_drop_prob != prior.image_cond_drop_prob:
        notes.append(
            "prior: text and image condition dropout differ; genzoo drops both together with the text's probability"
        )
    diffusion = {
        "type": "diffusion-decoder",
        **process_fields(cfg.beta_schedule, timesteps, "prior.beta_schedule"),
        "mean_type": mean_type(prior.predict_v, prior.predict_x_start),
        "var_type": "fixed-small",  # its p_sample uses posterior_log_variance_clipped
        "loss": "simple",
        # p_mean_variance clamps x0_hat to [-1, 1] unless it predicts x0 (whatever predict_v says)
        "clip_range": None if prior.predict_x_start else 1.0,
        "cond_drop": float(prior.text_cond_drop_prob),
        "denoiser": {
            "type": "dalle2-pytorch-prior-network",
            "net": cfg.net.model_dump(),
            "text_encodings": bool(prior.condition_on_text_encodings),
        },
    }
    spec = {
        "type": "dalle2-pytorch-prior",
        "embedding_dim": int(prior.image_embed_dim),
        "image_embed_scale": float(prior.image_embed_scale),
        "best_of": 2,  # DALLE2's prior_num_samples
        "init_l2norm": bool(prior.init_image_embed_l2norm),
        "final_l2norm": bool(prior.sampling_final_clamp_l2norm and prior.predict_x_start),
        "diffusion": diffusion,
    }
    # its DDIM loop defaults to eta 1 (p_sample_loop_ddim's default; DiffusionPrior passes none)
    return spec, sampler_spec(prior.sample_timesteps, timesteps, 1.0, notes, "prior")


def unet_kwargs(unet: Any) -> dict[str, Any]:
    """The keyword arguments the Decoder built (cast) this Unet with, as JSON values."""
    kw = {k: v for k, v in unet._locals.items() if k != "kwargs"}
    kw.update(unet._locals.get("kwargs") or {})
    return json.loads(json.dumps(kw, default=list))


def map_decoder(cfg: Any, decoder: Any, notes: list[str]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each of the Decoder's U-Nets as a ``diffusion-decoder`` spec with its sampler: the first is genzoo's
    ``decoder``, the others the cascade's upsamplers."""
    from dalle2_pytorch.dalle2_pytorch import VQGanVAE, cast_tuple

    n = decoder.num_unets
    if decoder.unconditional:
        raise refuse("decoder.unconditional", True, "the dalle2 pipeline decodes the prior's image embeddings")
    if decoder.learned_variance_constrain_frac:
        raise refuse(
            "decoder.learned_variance_constrain_frac", True, "genzoo's learned range interpolates with (v + 1) / 2"
        )
    if any(isinstance(v, VQGanVAE) for v in decoder.vaes):
        raise refuse("decoder.vae", "VQGanVAE", "latent stages are not mapped; import a pixel-space decoder")
    if any(c is not None and c.use_noise for c in decoder.lowres_conds):
        raise refuse(
            "decoder.use_noise_for_lowres_cond", True, "genzoo's upsamplers do not noise their low-resolution image"
        )
    threshold = None
    if decoder.use_dynamic_thres:
        threshold = float(decoder.dynamic_thres_percentile)
        if not 0.5 < threshold <= 1:
            raise refuse("decoder.dynamic_thres_percentile", threshold, "genzoo's dynamic thresholding takes (0.5, 1]")
    # Decoder.__init__'s default schedules: cosine for every U-Net but a last upsampler, linear
    names = cast_tuple(cfg.beta_schedule or ("cosine", *(("cosine",) * max(n - 2, 0)), *(("linear",) * int(n > 1))), n)
    timesteps = decoder.noise_schedulers[0].num_timesteps
    if decoder.noise_schedulers[0].loss_type != "l2" or decoder.noise_schedulers[0].has_p2_loss_reweighting:
        notes.append("decoder: its loss_type / p2 loss weighting is not genzoo's; genzoo trains with the MSE")
    stages = []
    for i, unet in enumerate(decoder.unets):
        learned = bool(decoder.learned_variance[i])
        spec = {
            "type": "diffusion-decoder",
            **process_fields(names[i], timesteps, f"decoder.beta_schedule[{i}]"),
            "mean_type": mean_type(decoder.predict_v[i], decoder.predict_x_start[i]),
            "var_type": "learned-range" if learned else "fixed-small",
            "loss": "hybrid" if learned else "simple",
            "clip_range": 1.0,  # Decoder.sample clips x0_hat of every pixel-space stage
            "image_size": int(decoder.image_sizes[i]),
            "denoiser": {"type": "dalle2-pytorch-unet", "unet": unet_kwargs(unet)},
        }
        if i == 0:
            spec.update(emb_drop=float(decoder.image_cond_drop_prob), context_drop=float(decoder.text_cond_drop_prob))
        sampler = sampler_spec(
            decoder.sample_timesteps[i], timesteps, float(decoder.ddim_sampling_eta), notes, f"decoder unet {i + 1}"
        )
        if threshold is not None:
            sampler["threshold"] = threshold
        stages.append((spec, sampler))
    if n > 1:
        notes.append("decoder: the upsamplers' training blur and random crops are DALLE2-pytorch's; genzoo's differ")
    return stages


def clip_spec(
    given: Mapping[str, Any] | None, folder: Path, configs: Mapping[str, tuple[Path, dict[str, Any]]]
) -> dict[str, Any]:
    """The ``clip`` option (a genzoo CLIP spec), else the configs' CLIP (an ``AdapterConfig``) as ``open-clip``."""
    if given is not None:
        if "type" not in given:
            raise GenzooError(f"--option clip={dict(given)}: a genzoo CLIP spec needs a type, e.g. {{type: open-clip}}")
        return dict(given)
    adapter = next((raw["clip"] for _, raw in configs.values() if raw.get("clip")), None)
    if adapter is None:
        raise GenzooError(
            f"{folder}: the configs name no CLIP (trained on precomputed embeddings); name the one that computed "
            "them: --option clip='{type: open-clip, model: ViT-L-14, pretrained: openai}'"
        )
    make, model = adapter.get("make", "openai"), adapter.get("model", "ViT-L/14")
    if make == "openai":  # OpenAI's CLIP weights, through open_clip's 'openai' tag
        return {"type": "open-clip", "model": model.replace("/", "-"), "pretrained": "openai"}
    if make == "open_clip":
        import open_clip

        return {"type": "open-clip", "model": model, "pretrained": dict(open_clip.list_pretrained())[model]}
    raise refuse("clip.make", make, "genzoo's CLIPs are its own and open_clip's: give one with --option clip=SPEC")


def check_widths(clip: Any, prior: Any, decoder: Any) -> None:
    """The prior and the U-Nets read the CLIP's embedding and token widths."""
    pairs = [("prior.image_embed_dim", int(prior.image_embed_dim), "embedding", int(clip.embed_dim))]
    if prior.condition_on_text_encodings:
        pairs.append(("prior.net.dim (its text encodings' width)", int(prior.net.dim), "token", int(clip.text_width)))
    for i, unet in enumerate(decoder.unets):
        if unet.cond_on_image_embeds:
            dim = int(unet._locals["image_embed_dim"])
            pairs.append((f"decoder.unets[{i}].image_embed_dim", dim, "embedding", int(clip.embed_dim)))
        if unet.cond_on_text_encodings:
            pairs.append(
                (f"decoder.unets[{i}].text_embed_dim", int(unet.text_embed_dim), "token", int(clip.text_width))
            )
    for field, got, what, want in pairs:
        if got != want:
            raise GenzooError(f"DALLE2-pytorch field '{field}' is {got} but the CLIP's {what} width is {want}")


# --------------------------------------------------------------------------- the importer


@component("importer", "dalle2-pytorch", config=Dalle2PytorchImporterConfig)
class Dalle2PytorchImporter(Importer):
    """Imports a DALLE2-pytorch prior + decoder (configs and state dicts) as a genzoo ``dalle2`` run."""

    def detect(self, source: str) -> bool:
        """A folder holding a DALLE2-pytorch prior or decoder config."""
        path = Path(source).expanduser()
        return path.is_dir() and bool(find_configs(path))

    def run(
        self, source: str, out: str | Path, *, adapter: bool = False, data: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the run directory ``out`` for the checkpoint folder ``source``; returns its checkpoint folder."""
        from genzoo.checkpoint import has_checkpoint

        folder, out = Path(source).expanduser(), Path(out)
        if has_checkpoint(out):
            raise GenzooError(f"{out} already holds a genzoo run; import into a new directory")
        if not folder.is_dir():
            raise GenzooError(f"{source} is not a folder; give the folder holding the configs and weights")
        configs = find_configs(folder)
        weights, pickles = find_weights(folder)
        for kind, what in (("prior", "config (JSON)"), ("decoder", "config (JSON)")):
            if kind not in configs:
                raise GenzooError(f"{folder} holds no DALLE2-pytorch {kind} {what}; the dalle2 pipeline needs both")
            if kind not in weights:
                raise GenzooError(f"{folder} holds no {kind} state dict (keys {OWN_KEYS[kind][0]}*)")
        prior_cfg, prior, decoder_cfg, decoder = library_models(configs)
        notes: list[str] = []
        prior_spec, prior_sampler = map_prior(prior_cfg, prior, notes)
        stages = map_decoder(decoder_cfg, decoder, notes)
        for kind, model in (("prior", prior), ("decoder", decoder)):
            check_state(kind, weights[kind][0], weights[kind][1], model)
        channels, size = int(decoder.channels), int(decoder.image_sizes[-1])
        components: dict[str, Any] = {
            "clip": clip_spec(self.cfg.clip if self.cfg else None, folder, configs),
            "encoder": {"type": "clip-text"},
            "prior": prior_spec,
            "prior_sampler": prior_sampler,
        }
        for i, (spec, sampler) in enumerate(stages):
            role = "" if i == 0 else "upsampler_" if i == 1 else f"upsampler{i}_"
            components[f"{role}decoder"], components[f"{role}sampler"] = spec, sampler
        body = {
            "description": f"DALLE2-pytorch prior and {len(stages)}-stage decoder from {folder.name}, behind the "
            "dalle2-pytorch adapters in genzoo's dalle2 pipeline",
            "pipeline": {"type": "dalle2"},
            "data": dict(data)
            if data
            else {
                "type": "imagefolder",
                "root": str((out / "reference-images").resolve()),
                "image_size": size,
                "channels": channels,
            },
            "components": components,
            "sample": {"n": 4},
        }
        states = [("prior.diffusion_decoder.denoiser", _under(weights["prior"][1], "net.", "model."))]
        for i in range(len(stages)):
            role = "decoder" if i == 0 else "upsampler_decoder" if i == 1 else f"upsampler{i}_decoder"
            states.append((f"{role}.denoiser", _under(weights["decoder"][1], f"unets.{i}.", "model.")))
        created = not out.exists()
        try:
            return self._write(out, folder, body, states, (channels, size), notes, pickles, (prior, decoder))
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise

    def _write(
        self,
        out: Path,
        folder: Path,
        body: dict[str, Any],
        states: list[tuple[str, dict[str, Tensor]]],
        shape: tuple[int, int],
        notes: list[str],
        pickles: list[str],
        library: tuple[Any, Any],
    ) -> Path:
        """The run, its CLIP's widths checked against the library's models; then say which pickles it read."""
        import dalle2_pytorch

        from genzoo import api
        from genzoo.data import DataSpec

        meta = {
            "imported_from": {
                "format": registered_name(self),
                "source": str(folder),
                "pipeline": f"DALLE2-pytorch DiffusionPrior + Decoder ({len(library[1].unets)} U-Nets)",
                "unet": "adapter",
                "adapter_reason": "DALLE2-pytorch's networks have no native genzoo counterpart",
                "read_with_weights_only": pickles,
                "differences": notes,
                "dalle2_pytorch": dalle2_pytorch.__version__,
            }
        }
        path = api.save_imported_run(
            out,
            body,
            name=f"imported-{folder.resolve().name}",
            data_spec=DataSpec(name="imported", image_shape=(shape[0], shape[1], shape[1]), has_captions=True),
            states=states,
            meta=meta,
            where=folder,
            check=lambda model: check_widths(model.components["clip"], *library),
        )
        if pickles:
            print(
                f"genzoo import: read {', '.join(pickles)} with torch.load(weights_only=True) (no code runs); the "
                f"weights are now safetensors in {path}",
                file=sys.stderr,
            )
        return path


def _under(state: Mapping[str, Tensor], prefix: str, new: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix``, renamed under ``new``."""
    return {new + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
