"""What several test files share: tiny recipes, the `genzoo` command in a process of its own, small builders.

Imported as ``from tiny import ...``: pytest puts tests/ (it has no __init__.py) on sys.path (rootdir/prepend mode).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from genzoo.training.loggers import TrainingLogger

# Recipes small enough to train in seconds on CPU. `pieces` (a key the recipe loader does not read) holds the parts
# several recipes share; write_recipes writes the recipes a test names, under the names it uses.
RECIPES = """
pieces:
  digits: &digits {type: digits, image_size: 8}
  unet16: &unet16 {type: unet, model_channels: 16, channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: [4]}
  unet16-classes: &unet16-classes {<<: *unet16, num_classes: 10}
  unet8: &unet8 {type: unet, model_channels: 8, channel_mult: [1], num_res_blocks: 1, attention_resolutions: []}
  ddim10: &ddim10 {type: ddim, steps: 10}
  ddpm100: &ddpm100
    prior: {type: gaussian}
    decoder: {type: diffusion-decoder, timesteps: 100, denoiser: *unet16}
    sampler: {type: ddpm, steps: 100}
  autoencoder: &autoencoder {type: autoencoder, latent_dim: 4, encoder: {type: conv-encoder, channels: 8, norm: group},
                             decoder: {type: conv-decoder, channels: 8, norm: group}}
  train20: &train20 {steps: 20, batch_size: 32, lr: 1.0e-3, ema_decay: null, log_every: 5}

recipes:
  # tests/test_cli.py: train -> sample -> resume, and an ADM-shaped run
  tiny-ddpm:
    description: a DDPM small enough to train in seconds on CPU
    pipeline: {type: diffusion}
    data: *digits
    components: *ddpm100
    train: {steps: 4, batch_size: 8, lr: 1.0e-3, checkpoint_every: 2, log_every: 1, sample_every: 0}
    sample: {n: 4}
  tiny-adm:
    description: ADM-shaped, small enough to train in seconds on CPU
    pipeline: {type: diffusion, condition: class}
    data: *digits
    components:
      prior: {type: gaussian}
      decoder: {type: diffusion-decoder, timesteps: 100, var_type: learned-range, loss: hybrid,
                denoiser: *unet16-classes}
      sampler: {type: ddpm, steps: 100}
      guidance: {type: classifier, scale: 1.0,
                 classifier: {type: noisy-classifier, model_channels: 16, channel_mult: [1, 2]}}
    train: {stages: {decoder: 2, guidance: 2}, batch_size: 8, log_every: 1}

  # tests/test_cli_errors.py and tests/test_ddp.py
  tiny:
    description: a DDPM small enough to train in a second on CPU
    pipeline: {type: diffusion}
    data: *digits
    components:
      prior: {type: gaussian}
      decoder: {type: diffusion-decoder, timesteps: 20, denoiser: *unet8}
      sampler: {type: ddpm, steps: 20}
    train: {steps: 2, batch_size: 4, checkpoint_every: 1000, log_every: 1, sample_every: 0}

  # tests/test_ui.py: the unconditional one is written as tiny-ddpm
  ui-ddpm:
    description: an unconditional DDPM small enough to train in a second
    pipeline: {type: diffusion}
    data: *digits
    components: {<<: *ddpm100, sampler: *ddim10}
    train: {steps: 4, batch_size: 8, lr: 1.0e-3, checkpoint_every: 4, log_every: 1, sample_every: 4, sample_n: 4}
  tiny-cfg:
    description: a class-conditional DDPM with classifier-free guidance
    pipeline: {type: diffusion, condition: class}
    data: *digits
    components:
      prior: {type: gaussian}
      decoder: {type: diffusion-decoder, timesteps: 100, cond_drop: 0.1, denoiser: *unet16-classes}
      sampler: *ddim10
      guidance: {type: cfg, scale: 3.0}
    train: {steps: 4, batch_size: 8, lr: 1.0e-3, checkpoint_every: 4, log_every: 1, sample_every: 0}

  # tests/test_eval.py: `genzoo compare`; the DDPM is written as tiny-ddpm
  tiny-vae:
    description: tiny VAE for the compare test
    pipeline: {type: vae}
    data: *digits
    components: {prior: {type: gaussian}, decoder: {<<: *autoencoder, variational: true}}
    train: *train20
  tiny-ae:
    description: tiny AE whose mixture prior is fitted when the minutes budget runs out
    pipeline: {type: autoencoder}
    data: *digits
    components: {prior: {type: gmm, components: 3}, decoder: *autoencoder}
    train: *train20
  compare-ddpm:
    description: tiny DDPM for the compare test
    pipeline: {type: diffusion}
    data: *digits
    components:
      prior: {type: gaussian}
      decoder: {type: diffusion-decoder, denoiser: *unet8}
      sampler: {type: ddim, steps: 4}
    train: {steps: 20, batch_size: 32, lr: 1.0e-3, log_every: 5}
"""


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:
        return True


def write_recipes(path: Path, *names: str, rename: dict[str, str] | None = None) -> Path:
    """Write the recipes ``names`` of :data:`RECIPES` to ``path`` as a `--recipes` file, each under
    ``rename.get(name, name)``; returns ``path``."""
    recipes = yaml.safe_load(RECIPES)["recipes"]
    rename = rename or {}
    body = {"recipes": {rename.get(n, n): recipes[n] for n in names}}
    path.write_text(yaml.dump(body, Dumper=_NoAliases, sort_keys=False))
    return path


# --------------------------------------------------------------------------- processes


def environ(**env: str | None) -> dict[str, str]:
    """This process's environment, offline (HF_HUB_OFFLINE=1), with ``env`` over it (a value None: unset)."""
    out = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return {k: v for k, v in out.items() if v is not None}


def run(*argv: str, env: dict[str, str | None] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``argv`` in a process of its own (300 s at most), its output captured; ``env`` as :func:`environ` takes it."""
    return subprocess.run(argv, capture_output=True, text=True, env=environ(**(env or {})), cwd=cwd, timeout=300)


def genzoo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "genzoo", *args]


def run_genzoo(
    *args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``python -m genzoo ARGS`` from scratch, as :func:`run` runs it."""
    return run(*genzoo_argv(*args), env=env, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The start of a ``torch.distributed.run`` command line: ``nproc`` processes on a free local port."""
    rendezvous = ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *rendezvous]


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- models


def fit(pipeline, source, resolved: dict, run_dir: Path):
    """Train ``pipeline`` on ``source``'s train split under ``resolved['train']`` into ``run_dir``, with the
    meta.json `genzoo train` writes; returns the trainer's result."""
    from genzoo import api
    from genzoo.training import TrainConfig, Trainer

    train_split = source.split("train")
    meta = {"data_spec": api.data_spec_dict(source.spec), "data_fingerprint": train_split.fingerprint()}
    config = TrainConfig.model_validate(resolved["train"])
    return Trainer(
        pipeline, train_split.tensors(), config=config, run_dir=run_dir, recipe=resolved, meta=meta, progress=False
    ).fit()


def build(name: str, sets: list[str] = ()) -> tuple[object, object, dict]:
    """A recipe's untrained model for its data (global RNG as it is); returns (pipeline, source, resolved)."""
    from genzoo import api

    resolved = api.resolve_recipe(name, sets=list(sets))
    source = api.build_data(resolved)
    return api.create_model(resolved, data_spec=source.spec), source, resolved


def train(tmp_path: Path, name: str, sets: list[str]) -> tuple[object, object, dict]:
    """Train a recipe through the trainer into tmp_path, the model seeded at 0; returns (pipeline, source, resolved)."""
    torch.manual_seed(0)
    pipeline, source, resolved = build(
        name, ["train.log_every=10", "train.checkpoint_every=100000", "train.sample_every=0", *sets]
    )
    fit(pipeline, source, resolved, tmp_path)
    return pipeline.eval(), source, resolved


def assert_refused(recipe: str, sets: list[str], match: str) -> None:
    """The recipe with ``sets`` resolves, but building its model raises a RegistryError matching ``match``."""
    from genzoo import api
    from genzoo.errors import RegistryError

    spec = api.resolve_recipe(recipe, sets=sets)
    with pytest.raises(RegistryError, match=match):
        api.create_model(spec, data_spec=api.build_data(spec).spec)


def tiny_unet(std: float | None = None, **kw):
    """A U-Net seeded at 0: 3 channels, 8x8 images, 16 channels at [1, 2], attention at 4 (``kw`` over these);
    ``std``: every weight then drawn from N(0, std^2), the zero-initialised output layer too."""
    from genzoo.nn import UNet, UNetConfig

    base = dict(in_channels=3, image_size=8, model_channels=16, channel_mult=[1, 2], num_res_blocks=1)
    torch.manual_seed(0)
    net = UNet(UNetConfig(**{**base, "attention_resolutions": [4], **kw}))
    for p in net.parameters() if std is not None else ():
        torch.nn.init.normal_(p, std=std)
    return net


def gaussian_diffusion(
    T: int = 1000,
    schedule: str = "linear",
    *,
    betas=None,
    mean="eps",
    var="fixed-small",
    loss="simple",
    clip_range: float | None = 1.0,
):
    """A GaussianDiffusion over the named ``schedule``'s ``T`` betas (or over ``betas``), predicting ``mean`` with
    variance ``var`` under loss ``loss`` (each an enum or its value), x0_hat clamped to ``clip_range`` (None: not)."""
    from genzoo.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule

    return GaussianDiffusion(
        betas=get_named_beta_schedule(schedule, T) if betas is None else betas,
        model_mean_type=ModelMeanType(mean),
        model_var_type=ModelVarType(var),
        loss_type=LossType(loss),
        clip_range=clip_range,
    )


def lambda_linear(T: int = 1601):
    """lambda = log(alpha / sigma) linear in t, 5 at t = 1 to -5 at t = T (abar = sigmoid(2 lambda)): the uniform grids
    of N - 1 dividing T - 1 are uniform in lambda, so halving the step halves h exactly and measured orders are clean.
    eps-predicting, fixed small variances, no clipping."""
    abar = 1 / (1 + np.exp(-2 * np.linspace(5.0, -5.0, T)))
    return gaussian_diffusion(betas=1 - abar / np.append(1.0, abar[:-1]), clip_range=None)


def assert_ends_at_dirac(sampler, var) -> None:
    """For data x0* (a point) E[eps | x_t] = (x_t - sqrt(abar) x0*) / sqrt(1 - abar) exactly: ``sampler`` must end
    at x0* (to 1e-6, float64) from any noise, with variance type ``var`` (a learned one gets a zero output)."""
    from genzoo.diffusion import ModelVarType

    d = gaussian_diffusion(200, "cosine", var=var)
    target = torch.linspace(-0.9, 0.9, 2 * 3 * 4 * 4, dtype=torch.float64).view(2, 3, 4, 4)
    sqrt_abar, sqrt_1m = torch.as_tensor(d.tables["sqrt_abar"]), torch.as_tensor(d.tables["sqrt_one_minus_abar"])

    def model(x, t, cond):
        eps = (x - sqrt_abar[t].view(-1, 1, 1, 1) * target) / sqrt_1m[t].view(-1, 1, 1, 1)
        return eps if var is ModelVarType.FIXED_SMALL else torch.cat([eps, torch.zeros_like(eps)], dim=1)

    noise = torch.randn(target.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = sampler.sample(d, model, tuple(target.shape), generator=torch.Generator().manual_seed(0), noise=noise)
    torch.testing.assert_close(x, target, atol=1e-6, rtol=0)


def shapes_judge(metrics: dict):
    """``judged(model, **settings)``: ``metrics`` of a model against ddpm-shapes' data with the shapes judge, on the
    CPU (settings: 300 samples, seed 0, batches of 100 unless told)."""
    from genzoo import api
    from genzoo.eval import judges
    from genzoo.eval.evaluate import EvalSettings, evaluate

    source = api.build_data(api.resolve_recipe("ddpm-shapes"))
    judge = judges.load_judge("shapes", source.cfg.model_dump())

    def judged(model, **settings) -> dict:
        settings = EvalSettings(**{"samples": 300, "seed": 0, "batch_size": 100, **settings})
        return evaluate(model, source, metrics=metrics, judge=judge, settings=settings, device=torch.device("cpu"))

    return judged


class RecordingLogger(TrainingLogger):
    """A training logger that appends what it is given to ``events``: ("start", run), ("metrics", dict, step),
    ("image", tag, image, step), ("finish", status). With ``fail``, start records the run, then raises it."""

    def __init__(self, events: list | None = None, fail: Exception | None = None) -> None:
        self.events, self.fail = [] if events is None else events, fail

    def start(self, run) -> None:
        self.events.append(("start", run))
        if self.fail is not None:
            raise self.fail

    def log_metrics(self, metrics, step) -> None:
        self.events.append(("metrics", dict(metrics), step))

    def log_image(self, tag, image, step) -> None:
        self.events.append(("image", tag, image, step))

    def finish(self, status="success") -> None:
        self.events.append(("finish", status))
