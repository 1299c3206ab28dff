"""`genzoo import` of denoising-diffusion-pytorch checkpoints: a ``Trainer`` checkpoint (``model-N.pt``: ``{'step',
'model': GaussianDiffusion.state_dict(), 'ema', 'opt', ...}``), a results folder of them (the highest milestone), or a
plain ``GaussianDiffusion`` / ``Unet`` state dict (``.pt`` or ``.safetensors``) becomes a genzoo run directory.

Its checkpoints do not carry the constructors' arguments, so the importer's config (``genzoo import ... --option``)
gives them: ``unet`` (``Unet(...)``'s, see ``ddpm-pytorch-unet``) and ``diffusion`` (``GaussianDiffusion(...)``'s;
``image_size`` at least), or a ``config`` file holding both. A GaussianDiffusion state holds its schedule buffers:
T, the schedule and the objective are read from ``betas`` and ``loss_weight`` when not given, and checked against them
when given (process.py).

Pickles are read here only, with ``torch.load(weights_only=True)`` (no code from the file runs), and written as
safetensors at once; every other genzoo command keeps refusing them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from genzoo.errors import CheckpointError, GenzooError
from genzoo.interfaces import Importer
from genzoo.registry import component, registered_name

from .process import TRAINING_ONLY, DiffusionArgs, map_diffusion
from .unet import UnetConfig

PICKLES = (".pt", ".pth", ".ckpt", ".bin")
SUFFIXES = (*PICKLES, ".safetensors")
EMA_PREFIX = "ema_model."  # ema_pytorch.EMA's copy of the GaussianDiffusion


class DDPMPytorchImporterConfig(BaseModel):
    """The constructor arguments a denoising-diffusion-pytorch checkpoint does not carry (`genzoo import SOURCE OUT
    --option unet='{dim: 64}' --option diffusion='{image_size: 128}'`, or --option config=FILE)."""

    model_config = ConfigDict(extra="forbid")
    config: str | None = Field(
        None, description="a YAML or JSON file holding unet, diffusion (and weights); the other options override it"
    )
    unet: UnetConfig = Field(
        default_factory=UnetConfig,
        description="Unet(...)'s arguments: dim, dim_mults, ... (`genzoo info network:ddpm-pytorch-unet`)",
    )
    diffusion: DiffusionArgs | None = Field(
        None,
        description="GaussianDiffusion(...)'s arguments: image_size (required), timesteps, sampling_timesteps, "
        "objective, beta_schedule, ...",
    )
    weights: Literal["ema", "model"] = Field(
        "ema", description="of a Trainer checkpoint: ema (what its Trainer samples with) or model (the online weights)"
    )

    @model_validator(mode="before")
    @classmethod
    def _file_and_yaml(cls, values: Any) -> Any:
        """unet and diffusion given on the command line as YAML text; the config file's keys under the options."""
        if not isinstance(values, dict):
            return values
        values = {
            k: yaml.safe_load(v) if k in ("unet", "diffusion") and isinstance(v, str) else v for k, v in values.items()
        }
        if values.get("config") is None:
            return values
        path = Path(values["config"]).expanduser()
        try:
            file = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"config {path} cannot be read ({e})".splitlines()[0]) from None
        unknown = set(file) - {"unet", "diffusion", "weights"} if isinstance(file, dict) else {"(not a mapping)"}
        if unknown:
            raise ValueError(f"config {path} has unknown keys {sorted(unknown)}; it holds unet, diffusion and weights")
        return {**file, **values}


def checkpoint_file(source: Path) -> Path:
    """``source`` itself, or the highest ``model-N.pt`` milestone of a Trainer's results folder."""
    if not source.is_dir():
        return source
    found = sorted(
        (int(m.group(1)) if m.group(1).isdigit() else -1, p.name, p)
        for p in source.glob("model-*.pt")
        if (m := re.fullmatch(r"model-(.+)\.pt", p.name))
    )
    if not found:
        raise GenzooError(f"{source} holds no model-N.pt; pass a denoising-diffusion-pytorch Trainer checkpoint")
    return found[-1][2]


def read_weights(path: Path) -> Any:
    """The file's tensors and containers: safetensors, or a pickle through ``torch.load(weights_only=True)``."""
    if not path.exists():
        raise GenzooError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in PICKLES:
        raise GenzooError(f"{path}: expected a {', '.join(SUFFIXES)} file or a Trainer's results folder")
    import pickle

    try:  # weights_only: torch's restricted unpickler builds tensors and containers, never calls other code
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True) ({str(e).splitlines()[0][:160]}); genzoo "
            "never unpickles other objects: where you trust the file, save its state dict alone "
            "(torch.save(model.state_dict(), ...)) and import that"
        ) from None


def split_state(obj: Any, weights: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(the Unet's weights, GaussianDiffusion's buffers, what the file was) of a loaded checkpoint."""
    what: dict[str, Any] = {"pipeline": "Unet state dict"}
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):  # Trainer.save
        ema = obj.get("ema")
        use_ema = weights == "ema" and isinstance(ema, Mapping) and any(k.startswith(EMA_PREFIX) for k in ema)
        state = (
            {k[len(EMA_PREFIX) :]: v for k, v in ema.items() if k.startswith(EMA_PREFIX)} if use_ema else obj["model"]
        )
        what = {
            "pipeline": "Trainer checkpoint",
            "weights": "ema" if use_ema else "model",
            "step": obj.get("step"),
            "version": obj.get("version"),
        }
    elif isinstance(obj, Mapping):
        state = obj
    else:
        raise GenzooError(f"expected a state dict or a Trainer checkpoint, found a {type(obj).__name__}")
    if any(k.startswith("model.") for k in state):  # GaussianDiffusion.state_dict(): its Unet under model.
        what.setdefault("weights", "model")
        what["pipeline"] = what["pipeline"] if "step" in what else "GaussianDiffusion state dict"
        unet = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        buffers = {k: v for k, v in state.items() if not k.startswith("model.")}
    else:
        unet, buffers = dict(state), {}
    bad = [k for k, v in {**unet, **buffers}.items() if not isinstance(v, torch.Tensor)]
    if bad or "init_conv.weight" not in unet:
        raise GenzooError(
            "this is not a denoising-diffusion-pytorch Unet's state "
            f"({'non-tensor ' + bad[0] if bad else 'no init_conv.weight'})"
        )
    return unet, buffers, what


@component("importer", "ddpm-pytorch", config=DDPMPytorchImporterConfig)
class DDPMPytorchImporter(Importer):
    """Imports denoising-diffusion-pytorch checkpoints and state dicts as genzoo runs (the ddpm-pytorch-unet
    adapter)."""

    def detect(self, source: str) -> bool:
        """A file or results folder whose state is a denoising-diffusion-pytorch Unet's (peeked with weights_only)."""
        path = Path(source).expanduser()
        if not (path.is_dir() or path.suffix in SUFFIXES):
            return False
        try:
            split_state(read_weights(checkpoint_file(path)), "model")
        except (GenzooError, OSError):
            return False
        return True

    def run(
        self, source: str, out: str | Path, *, adapter: bool = False, data: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the run directory ``out`` for the checkpoint at ``source``; returns its checkpoint folder."""
        from importlib.metadata import version

        out = Path(out)
        args, unet_args = self.cfg.diffusion, self.cfg.unet
        if args is None:
            raise GenzooError(
                "a denoising-diffusion-pytorch checkpoint does not hold GaussianDiffusion's arguments: give at least "
                "--option diffusion='{image_size: N}' (and the Unet's: --option unet='{dim: D, dim_mults: [...]}')"
            )
        path = checkpoint_file(Path(source).expanduser())
        unet_state, buffers, what = split_state(read_weights(path), self.cfg.weights)
        decoder, sampler, inferred = map_diffusion(args, buffers)
        channels = unet_args.channels or int(unet_state["init_conv.weight"].shape[1])
        size = inferred["image_size"]
        denoiser = {"type": "ddpm-pytorch-unet", **unet_args.model_dump(exclude={"learn_sigma", "image_size"})}
        denoiser["channels"] = channels
        body = {
            "description": f"denoising-diffusion-pytorch {what['pipeline']} {source} ({inferred['objective']}, "
            f"{inferred['beta_schedule']} schedule, T = {inferred['timesteps']}) behind the ddpm-pytorch-unet adapter",
            "pipeline": {"type": "diffusion"},
            "data": dict(data) if data else reference_folder(out, channels, size),
            "components": {
                "prior": {"type": "gaussian"},
                "decoder": {"type": "diffusion-decoder", **decoder, "denoiser": denoiser},
                "sampler": sampler,
            },
            "sample": {"n": 16},
        }
        meta = {
            "format": registered_name(self),
            "source": str(source),
            "file": str(path),
            **what,
            "unet": "adapter",
            "inferred": inferred,
            "training_only": {k: getattr(args, k) for k in TRAINING_ONLY},
            "denoising_diffusion_pytorch": version("denoising-diffusion-pytorch"),
            "notes": [
                f"read {path} with torch.load(weights_only=True) (no code from it ran) and wrote its weights as "
                "safetensors"
                if path.suffix in PICKLES
                else f"read {path} (safetensors)",
                f"{what['pipeline']}, {what.get('weights', 'model')} weights; {inferred['objective']}, "
                f"{inferred['beta_schedule']} schedule, T = {inferred['timesteps']}; sampler {sampler['type']} "
                f"{sampler['steps']} steps",
            ],
        }
        return write_run(out, body, (channels, size, size), unet_state, meta, unet_args)


def reference_folder(out: Path, channels: int, size: int) -> dict[str, Any]:
    """The data an import is evaluated against by default: an image folder in the run, to fill (or pass --data)."""
    if channels not in (1, 3):
        raise GenzooError(f"the model draws {channels}-channel images; give the data to evaluate against with --data")
    root = str((out / "reference-images").resolve())
    return {"type": "imagefolder", "root": root, "image_size": size, "channels": channels}


def write_run(
    out: Path,
    body: dict[str, Any],
    shape: tuple[int, int, int],
    unet_state: dict[str, torch.Tensor],
    imported_from: dict[str, Any],
    unet_args: UnetConfig,
) -> Path:
    """The run ``out`` (genzoo.api.save_imported_run): ``body`` built, the Unet's weights in its denoiser, step 0."""
    from genzoo import api
    from genzoo.data import DataSpec

    def check(model: Any) -> None:
        """A Unet config that does not fit the weights, named in the options' terms before any weight is loaded."""
        own = model.components["decoder"].denoiser.model.state_dict()
        differ = sorted(set(own) ^ set(unet_state)) or [k for k in own if own[k].shape != unet_state[k].shape]
        if differ:
            k = differ[0]
            got = f"{tuple(unet_state[k].shape)} in the checkpoint" if k in unet_state else "absent from the checkpoint"
            want = f"{tuple(own[k].shape)} in Unet(...)" if k in own else "not in Unet(...)"
            fields = "dim, init_dim, dim_mults, attn_heads, attn_dim_head, full_attn, channels"
            raise GenzooError(
                f"the checkpoint does not fit Unet({_kwargs(unet_args)}): {k} is {got} but {want} "
                f"({len(differ)} keys differ); give --option unet the arguments it was trained with ({fields})"
            )

    return api.save_imported_run(
        out,
        body,
        name=f"imported-{Path(str(imported_from['source']).rstrip('/')).stem}",
        data_spec=DataSpec(name="imported", image_shape=shape),
        states=[("decoder.denoiser.model", unet_state)],
        meta={"imported_from": imported_from},
        where=imported_from["file"],
        check=check,
    )


def _kwargs(cfg: UnetConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.model_dump(exclude_defaults=True).items()) or "defaults"
