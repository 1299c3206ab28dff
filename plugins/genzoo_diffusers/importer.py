"""`genzoo import` of diffusers pipelines: a pipeline folder or hub id becomes a genzoo run directory.

DDPMPipeline and DDIMPipeline import whole: the ``UNet2DModel`` natively into genzoo's U-Net where its layout is
genzoo's (``native.py``; faster), else behind the ``diffusers-unet2d`` adapter; the scheduler config as genzoo's
Gaussian process and sampler (``scheduler.py``). The run directory is an ordinary checkpoint (resolved recipe +
safetensors, step 0) that ``genzoo sample``, ``eval``, ``push`` and ``--init-from`` use like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from genzoo.errors import GenzooError

from .loading import fetch, is_hub_id, read_config, require_safetensors

PIPELINES = {"DDPMPipeline": 1000, "DDIMPipeline": 50}  # -> the pipeline's default num_inference_steps (at most T)
NOT_YET = {
    "LDMPipeline": "latent diffusion needs a latent-diffusion composition genzoo does not have yet; its VQModel / "
    "AutoencoderKL "
    "and UNet2DConditionModel load as the adapters diffusers-vqmodel / diffusers-autoencoder-kl and "
    "diffusers-unet2d-condition",
    "UnCLIPPipeline": "unCLIP needs the prior + decoder + two-upsampler cascade genzoo does not have yet; its "
    "PriorTransformer and "
    "UNet2DConditionModel (with the text projection) load as the adapters diffusers-prior-transformer and "
    "diffusers-unet2d-condition",
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


class DiffusersImporter:
    """Imports diffusers DDPMPipeline / DDIMPipeline folders and hub ids (safetensors only) as genzoo runs."""

    format = "diffusers"

    def __init__(self, cfg: DiffusersImporterConfig | None = None) -> None:
        self.cfg = cfg

    def detect(self, source: str) -> bool:
        """A folder with diffusers' model_index.json, or a hub id (owner/name)."""
        path = Path(source).expanduser()
        return (path / "model_index.json").exists() if path.exists() else is_hub_id(source)

    def run(
        self, source: str, out: str | Path, *, adapter: bool = False, data: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the run directory ``out`` for the pipeline at ``source``; returns its checkpoint folder."""
        from genzoo import api
        from genzoo.checkpoint import has_checkpoint, load_state_into, save_checkpoint
        from genzoo.data import DataSpec
        from genzoo.plugins import default_registry
        from genzoo.recipes import Recipe, resolve

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
            raise GenzooError(
                f"{folder} holds a {pipeline}; `genzoo import` reads {', '.join(PIPELINES)} "
                f"(and not yet {', '.join(NOT_YET)})"
            )
        unet_cls = (index.get("unet") or [None, None])[1]
        if unet_cls != "UNet2DModel":
            raise GenzooError(f"{folder}: the pipeline's unet is a {unet_cls}; a {pipeline} imports a UNet2DModel")
        sched_cls = (index.get("scheduler") or [None, None])[1]
        ddim = pipeline == "DDIMPipeline" or sched_cls == "DDIMScheduler"
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
        name = f"imported-{Path(str(source).rstrip('/')).name}"
        how = "genzoo's U-Net (native)" if native else f"the diffusers-unet2d adapter ({why})"
        recipe = Recipe.model_validate(
            {
                "description": f"{pipeline} {source} imported from diffusers into {how}",
                "pipeline": {"type": "diffusion"},
                "data": dict(data) if data else default_data(str(source), channels, size, out),
                "components": {
                    "prior": {"type": "gaussian"},
                    "decoder": {"type": "diffusion-decoder", **decoder, "denoiser": denoiser},
                    "sampler": sampler,
                },
                "sample": {"n": 16},
            }
        )
        registry = default_registry()
        resolved = resolve(name, recipe, registry)
        spec = DataSpec(name="imported", image_shape=(channels, size, size))
        model = api.create_model(resolved, data_spec=spec, registry=registry)
        load_state_into(model.components["decoder"].denoiser, state, role="decoder.denoiser", where=folder)
        components = {role: sd for role, child in model.named_children() if (sd := child.state_dict())}
        import diffusers

        meta = {
            "data_spec": spec.to_dict(),
            "recipe_name": name,
            "imported_from": {
                "format": self.format,
                "source": str(source),
                "pipeline": pipeline,
                "scheduler": sched_cls,
                "unet": "native" if native else "adapter",
                "adapter_reason": why,
                "diffusers": diffusers.__version__,
            },
        }
        return save_checkpoint(out, step=0, recipe=resolved, components=components, meta=meta)


def _size(cfg: Any) -> int:
    size = cfg.sample_size
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise GenzooError(f"the UNet2DModel's sample_size {list(size)} is not square; genzoo's images are")
        size = size[0]
    return int(size)
