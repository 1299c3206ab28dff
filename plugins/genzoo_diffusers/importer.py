"""`genzoo import` of diffusers pipelines: a pipeline folder or hub id becomes a genzoo run directory.

DDPMPipeline and DDIMPipeline import whole: the ``UNet2DModel`` natively into genzoo's U-Net where its layout is
genzoo's (``native.py``; faster), else behind the ``diffusers-unet2d`` adapter; the scheduler config as genzoo's
Gaussian process and sampler (``scheduler.py``). LDMPipeline becomes the ``latent-diffusion`` composition (genzoo_ldm,
named by type only) with the ``diffusers-vqmodel`` adapter as its first stage and the same U-Net and scheduler mapping
on the latents. UnCLIPPipeline (Karlo) becomes genzoo's ``dalle2`` pipeline (``unclip.py``): the CLIP text encoder,
the prior, the decoder with its text projection and the super-resolution stage whose last step ``super_res_last``
serves. The run directory is an ordinary checkpoint (resolved recipe + safetensors, step 0) that ``genzoo sample``,
``eval``, ``push`` and ``--init-from`` use like any other.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from genzoo.errors import GenzooError
from genzoo.interfaces import Importer
from genzoo.registry import component, registered_name

from .loading import fetch, is_hub_id, read_config, require_safetensors

# -> the pipeline's default num_inference_steps (at most T); unCLIP's are per stage (UNCLIP_STEPS)
PIPELINES = {"DDPMPipeline": 1000, "DDIMPipeline": 50, "LDMPipeline": 50, "UnCLIPPipeline": 25}
NOT_YET: dict[str, str] = {}
# UnCLIPPipeline.__call__'s defaults: steps of the prior, the decoder and super-resolution; the two guidance scales
UNCLIP_STEPS = {"prior": 25, "decoder": 25, "super_res": 7}
UNCLIP_SCALES = {"prior": 4.0, "decoder": 8.0}
UNCLIP_MODULES = {  # model_index.json entry -> the class UnCLIPPipeline holds there
    "prior": "PriorTransformer",
    "decoder": "UNet2DConditionModel",
    "text_proj": "UnCLIPTextProjModel",
    "text_encoder": "CLIPTextModelWithProjection",
    "tokenizer": "CLIPTokenizer",
    "super_res_first": "UNet2DModel",
    "super_res_last": "UNet2DModel",
    "prior_scheduler": "UnCLIPScheduler",
    "decoder_scheduler": "UnCLIPScheduler",
    "super_res_scheduler": "UnCLIPScheduler",
}
# the data a published model was trained on, as a genzoo dataset spec (eval compares against it)
KNOWN_DATA = {"google/ddpm-cifar10-32": {"type": "torchvision", "name": "CIFAR10"}}


class DiffusersImporterConfig(BaseModel):
    """The diffusers importer has no settings."""

    model_config = ConfigDict(extra="forbid")


def default_data(source: str, channels: int, size: int, out: Path) -> dict[str, Any]:
    """The dataset an imported model is evaluated against: its training data where known, else a folder to fill."""
    if source in KNOWN_DATA:
        return {**KNOWN_DATA[source], "image_size": size}
    if channels not in (1, 3):
        raise GenzooError(f"the model draws {channels}-channel images; give the data to evaluate against with --data")
    return {
        "type": "imagefolder",
        "root": str((out / "reference-images").resolve()),
        "image_size": size,
        "channels": channels,
    }


@component("importer", "diffusers", config=DiffusersImporterConfig)
class DiffusersImporter(Importer):
    """Imports diffusers DDPM / DDIM / LDM / UnCLIP pipeline folders and hub ids (safetensors only) as genzoo runs."""

    def detect(self, source: str) -> bool:
        """A folder with diffusers' model_index.json, or a hub id (owner/name)."""
        path = Path(source).expanduser()
        return (path / "model_index.json").exists() if path.exists() else is_hub_id(source)

    def run(
        self, source: str, out: str | Path, *, adapter: bool = False, data: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the run directory ``out`` for the pipeline at ``source``; returns its checkpoint folder."""
        from genzoo.checkpoint import has_checkpoint
        from genzoo.data import DataSpec

        from .adapters import ModuleConfig, build_module, module_config
        from .native import native_state_dict, native_unet_config
        from .scheduler import map_scheduler

        out = Path(out)
        if has_checkpoint(out):
            raise GenzooError(f"{out} already holds a genzoo run; import into a new directory")
        folder = fetch(str(source))
        index = read_config(folder, "model_index.json")
        pipeline = index.get("_class_name")
        if pipeline in NOT_YET:
            raise GenzooError(f"{pipeline} is not yet supported by `genzoo import`: {NOT_YET[pipeline]}")
        if pipeline not in PIPELINES:
            raise GenzooError(f"{folder} holds a {pipeline}; `genzoo import` reads {', '.join(PIPELINES)}")
        if pipeline == "UnCLIPPipeline":
            from .unclip import import_unclip

            created = not out.exists()
            try:  # it writes the tokenizer's files into out first: a failed import leaves nothing behind
                body, spec, states, extra = import_unclip(folder, index, str(source), out, data)
                return self._write(out, source, folder, pipeline, body, spec, states, extra)
            except BaseException:
                if created:
                    shutil.rmtree(out, ignore_errors=True)
                raise
        unet_cls = (index.get("unet") or [None, None])[1]
        if unet_cls != "UNet2DModel":
            raise GenzooError(f"{folder}: the pipeline's unet is a {unet_cls}; a {pipeline} imports a UNet2DModel")
        sched_cls = (index.get("scheduler") or [None, None])[1]
        ddim = pipeline in ("DDIMPipeline", "LDMPipeline") or sched_cls == "DDIMScheduler"
        sched_cfg = read_config(folder / "scheduler", "scheduler_config.json")
        steps = min(PIPELINES[pipeline], int(sched_cfg.get("num_train_timesteps", 1000)))
        decoder, sampler = map_scheduler(sched_cls, sched_cfg, ddim=ddim, steps=steps)
        require_safetensors(folder / "unet")
        unet = build_module("UNet2DModel", ModuleConfig(pretrained=str(folder), subfolder="unet"))
        native, why = (None, "--adapter") if adapter else native_unet_config(unet.config)
        if native is not None:
            denoiser, state = {"type": "unet", **native}, native_state_dict(unet.state_dict(), native)
        else:
            denoiser, state = (
                {"type": "diffusers-unet2d", "config": module_config(unet)},
                {f"model.{k}": v for k, v in unet.state_dict().items()},
            )
        size, channels = int(native["image_size"]) if native else _size(unet.config), int(unet.config.in_channels)
        how = "genzoo's U-Net (native)" if native else f"the diffusers-unet2d adapter ({why})"
        extra: dict[str, Any] = {}
        if pipeline == "LDMPipeline":  # latent diffusion: the same U-Net and scheduler mapping, on the VQ latents
            vq_state, first_stage, size, channels, scale = _ldm_first_stage(folder, unet, size)
            decoder_spec = {
                "type": "latent-diffusion",
                "autoencoder": first_stage,
                "diffusion": {"type": "diffusion-decoder", **decoder, "denoiser": denoiser},
                "scale_factor": scale,  # never null: null would refit it on whatever data the run is evaluated on
            }
            states = [("decoder.denoiser", state), ("decoder.autoencoder", vq_state)]
            pipeline_spec = {"type": "latent-diffusion"}
            how += f" on the latents of the diffusers-vqmodel adapter (scale_factor {scale})"
            extra = {"first_stage": "diffusers-vqmodel", "scale_factor": scale}
        else:
            decoder_spec = {"type": "diffusion-decoder", **decoder, "denoiser": denoiser}
            states, pipeline_spec = [("decoder.denoiser", state)], {"type": "diffusion"}
        body = {
            "description": f"{pipeline} {source} imported from diffusers into {how}",
            "pipeline": pipeline_spec,
            "data": dict(data) if data else default_data(str(source), channels, size, out),
            "components": {"prior": {"type": "gaussian"}, "decoder": decoder_spec, "sampler": sampler},
            "sample": {"n": 16},
        }
        spec = DataSpec(name="imported", image_shape=(channels, size, size))
        extra = {"scheduler": sched_cls, "unet": "native" if native else "adapter", "adapter_reason": why, **extra}
        return self._write(out, source, folder, pipeline, body, spec, states, extra)

    def _write(
        self,
        out: Path,
        source: str,
        folder: Path,
        pipeline: str,
        body: dict[str, Any],
        spec: Any,
        states: list[tuple[str, dict[str, Any]]],
        extra: dict[str, Any],
    ) -> Path:
        """Build the recipe ``body`` for ``spec``, load ``states`` (``role.attr`` -> state dict) and save step 0."""
        import diffusers

        from genzoo import api

        imported_from = {"format": registered_name(self), "source": str(source), "pipeline": pipeline, **extra}
        return api.save_imported_run(
            out,
            body,
            name=f"imported-{Path(str(source).rstrip('/')).name}",
            data_spec=spec,
            states=states,
            meta={"imported_from": {**imported_from, "diffusers": diffusers.__version__}},
            where=folder,
        )


def _ldm_first_stage(
    folder: Path, unet: Any, latent_size: int
) -> tuple[dict[str, Any], dict[str, Any], int, int, float]:
    """LDMPipeline's ``vqvae``: (its state for the diffusers-vqmodel adapter, the adapter's spec, image size,
    image channels, scaling factor). The U-Net diffuses (latent_channels, h, w) latents; the images are f = 2^(levels
    - 1) times larger."""
    from .adapters import ModuleConfig, build_module, module_config

    require_safetensors(folder / "vqvae")
    vq = build_module("VQModel", ModuleConfig(pretrained=str(folder), subfolder="vqvae"))
    c = vq.config
    if int(c.latent_channels) != int(unet.config.in_channels) or int(unet.config.out_channels) != int(
        unet.config.in_channels
    ):
        raise GenzooError(
            f"{folder}: the VQModel's latents have {c.latent_channels} channels but the UNet2DModel takes "
            f"{unet.config.in_channels} and gives {unet.config.out_channels}; an LDMPipeline's U-Net diffuses the "
            "VQModel's latents"
        )
    factor = 2 ** (len(c.block_out_channels) - 1)
    state = {f"model.{k}": v for k, v in vq.state_dict().items()}
    return (
        state,
        {"type": "diffusers-vqmodel", "config": module_config(vq)},
        factor * latent_size,
        int(c.in_channels),
        float(c.scaling_factor),
    )


def _size(cfg: Any) -> int:
    size = cfg.sample_size
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise GenzooError(f"the UNet2DModel's sample_size {list(size)} is not square; genzoo's images are")
        size = size[0]
    return int(size)
