"""lucidrains' denoising-diffusion-pytorch in genzoo (docs/interop.md): the ``ddpm-pytorch-unet`` adapter, `genzoo
import` of its checkpoints, and the peers' recipes, checked against the library itself.

Every model is a small random ``Unet`` + ``GaussianDiffusion`` of the library built here (1 channel, 8x8, T = 20 or
100), saved in its own formats: ``Trainer.save`` (``model-N.pt`` with the EMA copy), ``GaussianDiffusion.state_dict``
and a bare ``Unet.state_dict``. Sampling runs are compared with its own ``p_sample_loop`` / ``ddim_sample`` from the
same seed: both draw x_T and then one noise tensor per step, in the same order, from the same stream.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import threads

ddp = pytest.importorskip("denoising_diffusion_pytorch")

from genzoo import api  # noqa: E402
from genzoo.errors import CheckpointError, GenzooError  # noqa: E402

DIGITS = {"type": "digits", "image_size": 8}
UNET = {"dim": 8, "dim_mults": [1, 2], "channels": 1, "attn_heads": 2, "attn_dim_head": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threads(1):
        yield


def library_model(seed: int = 0, **diffusion) -> torch.nn.Module:
    """A random ``GaussianDiffusion`` over a tiny ``Unet`` (8x8, one channel), in eval mode."""
    torch.manual_seed(seed)
    unet = ddp.Unet(**{**UNET, "dim_mults": tuple(UNET["dim_mults"])})
    return ddp.GaussianDiffusion(unet, **{"image_size": 8, "timesteps": 20, **diffusion}).eval()


def trainer_checkpoint(diffusion: torch.nn.Module, root: Path) -> tuple[Path, torch.nn.Module]:
    """``Trainer.save`` of ``diffusion`` (its own format: step, model, ema, opt, ...), the EMA copy moved away from
    the online weights so that an import shows which it read; returns (model-3.pt, the EMA's GaussianDiffusion)."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    for i in range(100):  # its Trainer wants 100 images; it never reads them here
        Image.fromarray(np.full((8, 8), i, dtype=np.uint8), mode="L").save(images / f"{i}.png")
    trainer = ddp.Trainer(
        diffusion,
        str(images),
        train_batch_size=16,
        results_folder=str(root / "results"),
        calculate_fid=False,
        save_and_sample_every=10**9,
    )
    with torch.no_grad():
        for p in trainer.ema.ema_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trainer.step = 3
    trainer.save(3)
    return root / "results" / "model-3.pt", trainer.ema.ema_model.eval()


def import_run(source: Path, out: Path, **options):
    options = {"unet": UNET, **options}
    return api.import_model(source, out, format="ddpm-pytorch", data=DIGITS, options=options)


def library_sample(diffusion: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # its loops draw from the global generator
    return diffusion.sample(batch_size=n)


def genzoo_sample(run: Path, n: int, seed: int) -> torch.Tensor:
    """The imported run's samples in [0, 1], as its loops return them with auto_normalize."""
    return (api.load_model(run).sample(n, generator=torch.Generator().manual_seed(seed)) + 1) / 2


# --------------------------------------------------------------------------- a Trainer checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Trainer checkpoint of a pred_x0 / cosine model with DDIM over 5 of 20 steps, and its import."""
    root = tmp_path_factory.mktemp("ddpm-pytorch")
    diffusion = library_model(objective="pred_x0", beta_schedule="cosine", sampling_timesteps=5)
    path, ema = trainer_checkpoint(diffusion, root)
    run = import_run(path.parent, root / "run", diffusion={"image_size": 8, "sampling_timesteps": 5})
    return {"path": path, "diffusion": diffusion, "ema": ema, "run": run}


def test_the_import_of_a_trainer_checkpoint_computes_what_the_library_computes(trained) -> None:
    """Its EMA weights (what its Trainer samples with), its schedule and objective read from the buffers, and one
    DDIM run equal to ``ddim_sample``; the online weights on request."""
    meta = json.loads((trained["run"] / "meta.json").read_text())["imported_from"]
    assert meta["pipeline"] == "Trainer checkpoint" and meta["weights"] == "ema" and meta["step"] == 3
    assert meta["inferred"] == {"beta_schedule": "cosine", "timesteps": 20, "objective": "pred_x0", "image_size": 8}
    assert meta["file"].endswith("model-3.pt")  # the folder's highest milestone
    model = api.load_model(trained["run"])
    decoder = model.components["decoder"]
    assert decoder.diffusion.model_mean_type.value == "x0" and decoder.diffusion.model_var_type.value == "fixed-small"
    sampler = model.components["sampler"].cfg
    assert (sampler.steps, sampler.spacing, sampler.steps_offset, sampler.eta, sampler.clipped_eps) == (
        5,
        "leading",
        3,
        0.0,
        True,
    )
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 7, 19])
    with torch.no_grad():
        want = trained["ema"].model(x, t)
        assert (decoder.denoiser(x, t, {}) - want).abs().max() < 1e-5
        assert (decoder.denoiser(x, t, {}) - trained["diffusion"].model(x, t)).abs().max() > 1e-3  # not the online
    assert (genzoo_sample(trained["run"], 4, seed=1) - library_sample(trained["ema"], 4, seed=1)).abs().max() < 1e-5
    online = import_run(trained["path"], trained["run"].parent / "online", weights="model", diffusion={"image_size": 8})
    with torch.no_grad():
        got = api.load_model(online).components["decoder"].denoiser(x, t, {})
    assert (got - trained["diffusion"].model(x, t)).abs().max() < 1e-5


def test_a_pickle_is_read_only_with_weights_only(trained, tmp_path, monkeypatch) -> None:
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or load(*a, **kw))
    import_run(trained["path"], tmp_path / "run", diffusion={"image_size": 8})
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    monkeypatch.setattr(torch, "load", load)
    marker = tmp_path / "ran"
    evil = tmp_path / "model-1.pt"
    evil.write_bytes(pickle.dumps(Touch(str(marker))))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        import_run(evil, tmp_path / "evil", diffusion={"image_size": 8})
    assert not marker.exists() and not (tmp_path / "evil").exists()


class Touch:
    """A pickle that would create a file when loaded by an unrestricted unpickler."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# --------------------------------------------------------------------------- schedules, objectives, samplers


@pytest.mark.parametrize(
    "objective, schedule, timesteps, steps, eta",
    [
        ("pred_noise", "linear", 50, None, 0.0),  # p_sample_loop over every step (linear at T = 20 ends at beta 1)
        ("pred_v", "sigmoid", 20, None, 0.0),  # its sigmoid schedule: explicit betas
        ("pred_v", "sigmoid", 20, 5, 0.5),  # ddim_sample with noise
        ("pred_noise", "cosine", 20, 4, 0.0),  # eps rederived from the clamped x0_hat
    ],
)
def test_a_sampling_run_equals_the_librarys_loop(objective, schedule, timesteps, steps, eta, tmp_path) -> None:
    diffusion = library_model(
        objective=objective,
        beta_schedule=schedule,
        timesteps=timesteps,
        sampling_timesteps=steps,
        ddim_sampling_eta=eta,
    )
    path = tmp_path / "diffusion.pt"
    torch.save(diffusion.state_dict(), path)
    args = {"image_size": 8, "sampling_timesteps": steps, "ddim_sampling_eta": eta}
    run = import_run(path, tmp_path / "run", diffusion=args)
    recipe = json.loads((run / "recipe.json").read_text())
    decoder = recipe["components"]["decoder"]
    assert decoder["mean_type"] == {"pred_noise": "eps", "pred_x0": "x0", "pred_v": "v"}[objective]
    assert (decoder["betas"] is not None) == (schedule == "sigmoid")  # its linear and cosine are genzoo's named ones
    assert recipe["components"]["sampler"]["type"] == ("ddpm" if steps is None else "ddim")
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, timesteps // 2, timesteps - 1])
    with torch.no_grad():
        got = api.load_model(run).components["decoder"].denoiser(x, t, {})
        assert (got - diffusion.model(x, t)).abs().max() < 1e-5
    assert (genzoo_sample(run, 3, seed=2) - library_sample(diffusion, 3, seed=2)).abs().max() < 1e-5


def test_plain_state_dicts_import_with_their_config(tmp_path) -> None:
    """A bare Unet state dict as safetensors has no buffers: the schedule is the config's (or GaussianDiffusion's
    defaults), and an import of it samples as the library does."""
    from safetensors.torch import save_file

    diffusion = library_model(objective="pred_noise", beta_schedule="cosine")
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in diffusion.model.state_dict().items()}, str(path))
    config = tmp_path / "config.yaml"  # the file form of the options; an option given beside it wins
    config.write_text(json.dumps({"unet": UNET, "diffusion": {"image_size": 8, "objective": "pred_x0"}}))
    run = api.import_model(
        path,
        tmp_path / "run",
        format="ddpm-pytorch",
        data=DIGITS,
        options={
            "config": str(config),
            "diffusion": "{image_size: 8, timesteps: 20, objective: pred_noise, beta_schedule: cosine}",
        },
    )
    meta = json.loads((run / "meta.json").read_text())["imported_from"]
    assert meta["pipeline"] == "Unet state dict" and "safetensors" in meta["notes"][0]
    assert (genzoo_sample(run, 2, seed=3) - library_sample(diffusion, 2, seed=3)).abs().max() < 1e-5
    defaults = import_run(path, tmp_path / "defaults", diffusion={"image_size": 8})  # GaussianDiffusion's defaults
    assert json.loads((defaults / "meta.json").read_text())["imported_from"]["inferred"]["objective"] == "pred_v"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"diffusion": {"image_size": 8, "objective": "pred_noise"}}, "field 'objective' = 'pred_noise'"),
        ({"diffusion": {"image_size": 8, "beta_schedule": "linear"}}, "field 'beta_schedule' = 'linear'"),
        ({"diffusion": {"image_size": 8, "timesteps": 30}}, "field 'timesteps' = 30"),
        ({"diffusion": {"image_size": 8, "sampling_timesteps": 3}}, "field 'sampling_timesteps' = 3"),
        ({"diffusion": {"image_size": 8, "auto_normalize": False}}, "field 'auto_normalize' = False"),
        ({"diffusion": {"image_size": [8, 16]}}, "field 'image_size'"),
        ({"diffusion": {}}, "field 'diffusion.image_size': Field required"),
        ({"diffusion": {"image_size": 8, "timestep": 20}}, "field 'diffusion.timestep': unknown field"),
        ({"unet": {**UNET, "self_condition": True}, "diffusion": {"image_size": 8}}, "self_condition true"),
        ({"unet": {**UNET, "dim": 16}, "diffusion": {"image_size": 8}}, "does not fit Unet\\(dim=16"),
        ({"config": "/nonexistent/ddpm.yaml", "diffusion": {"image_size": 8}}, "config /nonexistent/ddpm.yaml cannot"),
    ],
)
def test_what_genzoo_cannot_represent_is_refused_with_its_field(trained, tmp_path, options, match) -> None:
    with pytest.raises(GenzooError, match=match):
        import_run(trained["path"], tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()


def test_the_cli_imports_says_how_and_samples(trained, tmp_path, capsys) -> None:
    from genzoo.cli import main

    run = tmp_path / "run"
    argv = ["import", str(trained["path"]), str(run), "--data", "{type: digits, image_size: 8}"]
    argv += ["--option", f"unet={json.dumps(UNET)}", "--option", "diffusion={image_size: 8, sampling_timesteps: 5}"]
    assert main(argv) == 0  # found by its detect(): no --format
    out = capsys.readouterr().out
    assert "(Trainer checkpoint, adapter)" in out and "torch.load(weights_only=True)" in out
    assert main(["sample", str(run), "-n", "2", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 0
    assert main(argv) == 2  # an existing run is never overwritten
    assert "already holds a genzoo run" in capsys.readouterr().err
    assert main(["import", str(trained["path"]), str(tmp_path / "x"), "--format", "ddpm-pytorch"]) == 2
    assert "--option diffusion='{image_size: N}'" in capsys.readouterr().err


# --------------------------------------------------------------------------- peers: the adapter as a recipe's denoiser


@pytest.mark.parametrize("recipe", ["ddpm-shapes16-ddpm-pytorch", "ddpm-shapes16-diffusers", "ddpm-shapes16-unet"])
def test_the_peer_recipes_train_and_their_flops_match(recipe, tmp_path) -> None:
    """Each peer trains through genzoo's trainer; the leaderboard's GFLOP per forward of the three are within 10%."""
    from tiny import fit

    from genzoo.eval.networks import describe_network
    from genzoo.plugins import default_registry

    if recipe.endswith("diffusers"):
        pytest.importorskip("diffusers")
    sets = ["train.steps=2", "train.batch_size=4", "train.sample_every=0", "train.log_every=1", "data.num_train=64"]
    resolved = api.resolve_recipe(recipe, sets=[*sets, "train.checkpoint_every=2"])
    source = api.build_data(resolved)
    model = api.create_model(resolved, data_spec=source.spec)
    before = [p.detach().clone() for p in model.parameters()]
    assert fit(model, source, resolved, tmp_path / "run").step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    implementation, gflop = describe_network(api.load_model(tmp_path / "run"), default_registry())
    plugin = {"ddpm-pytorch": "ddpm_pytorch: ddpm-pytorch-unet", "diffusers": "diffusers: diffusers-unet2d"}
    assert implementation == plugin.get(recipe.partition("shapes16-")[2], "core: unet")
    assert abs(gflop / 0.158 - 1) < 0.1, gflop


def test_a_type_set_on_the_command_line_starts_the_spec_afresh() -> None:
    """`--set decoder.denoiser.type=...` swaps the network: the old type's fields go, fields set beside it stay."""
    resolved = api.resolve_recipe(
        "ddpm-shapes16-unet", sets=["decoder.denoiser.dim=12", "decoder.denoiser.type=ddpm-pytorch-unet"]
    )
    denoiser = resolved["components"]["decoder"]["denoiser"]
    assert denoiser["type"] == "ddpm-pytorch-unet" and denoiser["dim"] == 12 and "model_channels" not in denoiser
    with pytest.raises(GenzooError, match="set exactly one of config"):  # diffusers' adapter needs its config
        pytest.importorskip("diffusers")
        api.resolve_recipe("ddpm-shapes16-unet", sets=["decoder.denoiser.type=diffusers-unet2d"])


def test_without_the_library_the_plugin_reports_its_load_error_and_its_recipe_is_absent(monkeypatch) -> None:
    import importlib.util

    from genzoo.plugins import load_plugins

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "denoising_diffusion_pytorch" else real(name, *a)
    )
    registry, infos = load_plugins(strict=False)
    info = {i.name: i for i in infos}["ddpm_pytorch"]
    assert "pip install 'genzoo[ddpm-pytorch]'" in info.error and not info.registered and not info.recipes
    assert "ddpm-pytorch-unet" not in registry.names("network") and "unet" in registry.names("network")
