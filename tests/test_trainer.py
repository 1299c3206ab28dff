"""The trainer: bitwise exact resume, NaN stop, signals, LR schedule and EMA against closed form, logs."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from tiny import tiny_unet
from torch import nn

from genzoo.checkpoint import load_checkpoint
from genzoo.errors import TrainingError
from genzoo.interfaces import Pipeline
from genzoo.training import TrainConfig, Trainer, lr_factor
from genzoo.training.ema import EMA


class Noisy(Pipeline):
    """A linear-Gaussian denoiser with dropout whose loss draws noise from the global RNG, like diffusion."""

    stages = ("main",)

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__({"decoder": nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 4))})
        self.nan_at, self.calls = nan_at, 0

    def training_losses(self, batch, *, optimizer="main", stage="main"):
        self.calls += 1
        x = batch["image"].flatten(1)
        noise = torch.randn_like(x)
        loss = (self.components["decoder"](x + noise) - x).pow(2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "mse": loss.detach()}

    def sample(self, n, condition=None, *, generator=None):
        return torch.rand(n, 1, 2, 2, generator=generator) * 2 - 1


class TwoPlayer(Pipeline):
    """Two optimisers and two stages, like a GAN after a pretraining stage."""

    stages = ("pre", "game")

    def __init__(self) -> None:
        super().__init__({"decoder": nn.Linear(4, 4), "discriminator": nn.Linear(4, 1)})

    def optimizer_groups(self, stage="pre"):
        if stage == "pre":
            return {"main": list(self.components["decoder"].parameters())}
        return {
            "discriminator": list(self.components["discriminator"].parameters()),
            "generator": list(self.components["decoder"].parameters()),
        }

    def training_losses(self, batch, *, optimizer="main", stage="pre"):
        x = batch["image"].flatten(1)
        fake = self.components["decoder"](torch.randn_like(x))
        if optimizer == "discriminator":
            return {
                "loss": nn.functional.softplus(self.components["discriminator"](fake.detach())).mean()
                + nn.functional.softplus(-self.components["discriminator"](x)).mean()
            }
        if optimizer == "generator":
            return {"loss": nn.functional.softplus(-self.components["discriminator"](fake)).mean()}
        return {"loss": (fake - x).pow(2).mean()}


DATA = {
    "image": torch.randn(40, 1, 2, 2, generator=torch.Generator().manual_seed(1)),
    "label": torch.arange(40) % 3,
    "caption": [f"item {i}" for i in range(40)],
}
RECIPE = {"name": "toy", "pipeline": {"type": "toy"}, "data": {"type": "toy"}, "components": {}}


def cfg(**kw) -> TrainConfig:
    base = dict(
        steps=12, batch_size=8, lr=1e-2, warmup_steps=3, ema_decay=0.9, checkpoint_every=100, log_every=1, device="cpu"
    )
    return TrainConfig(**{**base, **kw})


def train(make, run: Path, config: TrainConfig, **fit) -> tuple[Pipeline, object]:
    torch.manual_seed(123)  # model init
    p = make()
    return p, Trainer(p, DATA, config=config, run_dir=run, recipe=RECIPE, progress=False).fit(**fit)


def weights(run: Path) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(run, with_trainer_state=True)
    return {
        **{f"{r}.{k}": v for r, sd in ck.components.items() for k, v in sd.items()},
        **{f"raw.{k}": v for k, v in ck.trainer_state["model"].items()},
    }


@pytest.mark.parametrize(
    "make, config",
    [(Noisy, cfg()), (TwoPlayer, cfg(stages={"pre": 5, "game": 7}, optimizer_ratio={"discriminator": 2}))],
    ids=["dropout-noise-ema", "two-stages-two-optimisers"],
)
def test_resume_is_bitwise_exact(tmp_path: Path, make, config) -> None:
    train(make, tmp_path / "straight", config)
    _, first = train(make, tmp_path / "resumed", config, stop_at=6)
    assert first.step == 6 and first.stopped_early
    _, second = train(make, tmp_path / "resumed", config, resume=True)
    assert second.step == 12
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the run really moved: the EMA weights differ from the raw ones
    assert any(not torch.equal(a[k], a["raw." + k]) for k in a if not k.startswith("raw."))


def test_a_partial_recipe_from_the_python_api_resumes(tmp_path: Path) -> None:
    """A Trainer given only a name (no pipeline, data or components, as tests/test_cuda.py does) resumes: the
    stored recipe is not padded with keys the caller's lacks (found on the first GPU run)."""
    for kw in ({"stop_at": 3}, {"resume": True}):
        torch.manual_seed(123)
        out = Trainer(Noisy(), DATA, config=cfg(), run_dir=tmp_path, recipe={"name": "toy"}, progress=False).fit(**kw)
    assert out.step == 12


def test_nan_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(
        TrainingError, match=r"step 7 \(main/main\): loss term 'loss' is nan; .*last good checkpoint is .*step-00000005"
    ):
        train(lambda: Noisy(nan_at=7), tmp_path, cfg(checkpoint_every=5))
    ck = load_checkpoint(tmp_path, with_trainer_state=True)
    assert ck.meta["step"] == 5
    assert all(torch.isfinite(v).all() for sd in ck.components.values() for v in sd.values())


@pytest.mark.parametrize("clip", [None, 0.5])
def test_the_nan_advice_fits_the_config(tmp_path: Path, clip: float | None) -> None:
    """Issue 21.4: no advice to set train.grad_clip when it is set."""
    with pytest.raises(TrainingError) as e:
        train(lambda: Noisy(nan_at=2), tmp_path, cfg(grad_clip=clip))
    if clip:
        assert str(e.value).endswith("; lower train.lr (train.grad_clip is already 0.5)")
    else:
        assert str(e.value).endswith("; lower train.lr or set train.grad_clip")


def test_sigterm_checkpoints_and_resume_continues_exactly(tmp_path: Path) -> None:
    train(Noisy, tmp_path / "straight", cfg())

    class Signalling(Noisy):
        def training_losses(self, batch, **kw):
            if self.calls == 4:  # delivered mid-run, as `kill -TERM` would
                threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()
                threading.Event().wait(0.2)
            return super().training_losses(batch, **kw)

    _, r = train(Signalling, tmp_path / "sig", cfg())
    assert r.stopped_early and 5 <= r.step < 12 and r.interrupted == "SIGTERM"
    assert load_checkpoint(tmp_path / "sig").meta["step"] == r.step
    train(Noisy, tmp_path / "sig", cfg(), resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "sig")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_sigterm_while_the_last_checkpoint_is_written_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    """A scheduler that repeats its SIGTERM, or a second `kill`, arrives while the stopped run saves: the save
    completes (before the fix the default handler killed the process mid-write and the run had no checkpoint)."""
    from genzoo.training import trainer as trainer_module

    save = trainer_module.Trainer._save

    def save_under_fire(self):
        if self._stop_reason is not None:  # the final save of an interrupted run
            os.kill(os.getpid(), signal.SIGTERM)
        return save(self)

    class Signalling(Noisy):
        def training_losses(self, batch, **kw):
            if self.calls == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().training_losses(batch, **kw)

    monkeypatch.setattr(trainer_module.Trainer, "_save", save_under_fire)
    before = signal.getsignal(signal.SIGTERM)
    _, r = train(Signalling, tmp_path, cfg())
    assert r.interrupted == "SIGTERM" and load_checkpoint(tmp_path).meta["step"] == r.step
    assert signal.getsignal(signal.SIGTERM) is before


def test_lr_schedule_and_log(tmp_path: Path) -> None:
    _, r = train(Noisy, tmp_path, cfg(steps=10, warmup_steps=4, min_lr_ratio=0.1))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 11))
    for row in rows:  # lr logged after the step: the factor of the next step
        s = row["step"]
        want = 1e-2 * ((s + 1) / 4 if s < 4 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 6)))
        assert row["lr/main"] == pytest.approx(want, rel=1e-9)
        assert {"loss", "mse", "grad_norm", "it_s"} <= set(row)
    assert lr_factor(0, warmup=0, total=10, schedule="constant", min_ratio=0.1) == 1.0


def test_an_optimiser_stepped_twice_a_step_follows_the_same_lr_schedule(tmp_path: Path) -> None:
    config = cfg(
        stages={"pre": 0, "game": 6},
        optimizer_ratio={"discriminator": 2},
        warmup_steps=2,
        lr_schedule="cosine",
        min_lr_ratio=0.0,
        ema_decay=None,
    )
    train(TwoPlayer, tmp_path, config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = [config.lr * lr_factor(s, warmup=2, total=6, schedule="cosine", min_ratio=0.0) for s in range(1, 7)]
    assert [r["lr/discriminator"] for r in rows] == pytest.approx(
        want
    )  # was twice as far along: the cosine ended at step 3
    assert [r["lr/generator"] for r in rows] == pytest.approx(want)


def test_ema_matches_closed_form() -> None:
    m = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(m.weight)
    ema = EMA(m, decay=0.5)
    values, shadow = [1.0, 2.0, 3.0], 0.0
    for n, v in enumerate(values):
        m.weight.data.fill_(v)
        ema.update(m)
        d = min(0.5, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * v
    assert ema.shadow["weight"].item() == pytest.approx(shadow)


def test_ema_averages_a_tied_weight_under_both_of_its_names() -> None:
    m = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    m[1].weight = m[0].weight  # GPT ties lm_head to wte: two state-dict keys, one parameter
    ema = EMA(m, decay=0.5)
    start = m[0].weight.detach().clone()
    m[0].weight.data.add_(1.0)
    ema.updates = 100  # past the warm-up, so d = 0.5
    ema.update(m)
    sd = ema.weights_for(m)
    torch.testing.assert_close(sd["0.weight"], start + 0.5)
    torch.testing.assert_close(sd["1.weight"], start + 0.5)  # was the raw weight, start + 1
    fresh = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    fresh[1].weight = fresh[0].weight
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh[0].weight.detach(), start + 0.5)


class FitsAPrior(Noisy):
    """Fits a 'prior' to its decoder after training, like an autoencoder's latent GMM."""

    def __init__(self) -> None:
        super().__init__()
        self.components["prior"] = nn.Module()
        self.components["prior"].register_buffer("fitted_to", torch.zeros(16, 4))
        self.add_module("prior", self.components["prior"])

    def fit_after_training(self, data) -> None:
        self.components["prior"].fitted_to.copy_(self.components["decoder"][0].weight.detach())


class FitFails(Noisy):
    def fit_after_training(self, data) -> None:
        raise RuntimeError("EM did not converge")


def test_the_last_step_is_saved_once_and_even_when_the_fit_after_training_fails(tmp_path: Path) -> None:
    train(Noisy, tmp_path / "ok", cfg(steps=8, checkpoint_every=4, keep_checkpoints=5))
    assert sorted(p.name for p in (tmp_path / "ok" / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    train(TwoPlayer, tmp_path / "empty-last-stage", cfg(stages={"pre": 4, "game": 0}, checkpoint_every=4))
    assert [p.name for p in (tmp_path / "empty-last-stage" / "checkpoints").iterdir()] == ["step-00000004"]
    with pytest.raises(RuntimeError, match="EM did not converge"):
        train(FitFails, tmp_path / "fails", cfg(steps=8, checkpoint_every=100))
    assert load_checkpoint(tmp_path / "fails").step == 8  # eight steps of training are not lost with it


def test_the_latent_prior_is_fitted_to_the_averaged_weights_it_is_saved_with(tmp_path: Path) -> None:
    p, _ = train(FitsAPrior, tmp_path, cfg())
    w = weights(tmp_path)
    assert not torch.equal(w["decoder.0.weight"], w["raw.decoder.0.weight"])  # EMA and raw differ after 12 steps
    torch.testing.assert_close(w["prior.fitted_to"], w["decoder.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        p.components["decoder"][0].weight.detach(), w["raw.decoder.0.weight"]
    )  # training goes on raw


def test_a_run_saved_before_a_config_field_existed_resumes_and_inits(tmp_path: Path) -> None:
    from genzoo import api

    resolved = api.resolve_recipe(
        "ddpm-digits", sets=["decoder.denoiser.model_channels=8", "decoder.denoiser.attention_resolutions=[]"]
    )
    source = api.build_data(resolved)
    older = {**resolved, "components": {**resolved["components"], "decoder": dict(resolved["components"]["decoder"])}}
    del older["components"]["decoder"]["low_res_blur"]  # as a genzoo before that field would have stored it

    def trainer(recipe, steps: int, **kw) -> Trainer:
        config = TrainConfig(steps=steps, batch_size=8, checkpoint_every=100, device="cpu")
        return Trainer(
            api.create_model(resolved, data_spec=source.spec),
            source.split("train").tensors(),
            config=config,
            run_dir=tmp_path,
            recipe=recipe,
            progress=False,
            **kw,
        )

    trainer(older, 2).fit()
    assert "decoder" in api.init_from(
        api.create_model(resolved, data_spec=source.spec), resolved, tmp_path
    )  # --init-from too
    assert trainer(resolved, 3).fit(resume=True).step == 3  # compared as today's registry resolves it
    changed = {
        **resolved,
        "components": {**resolved["components"], "decoder": {**resolved["components"]["decoder"], "timesteps": 500}},
    }
    with pytest.raises(TrainingError, match="the recipe's 'components' differs from the checkpoint's"):
        trainer(changed, 4).fit(resume=True)  # a real difference is still refused


def test_init_except_keeps_a_component_at_its_fresh_initialisation(tmp_path: Path) -> None:
    """`--init-from DIR --init-except ROLE`: every other matching component is loaded, ROLE keeps the weights it was
    built with (a fresh upsampler on a trained decoder, docs/text.md)."""
    from genzoo import api
    from genzoo.errors import GenzooError

    resolved = api.resolve_recipe(
        "ddpm-digits", sets=["decoder.denoiser.model_channels=8", "decoder.denoiser.attention_resolutions=[]"]
    )
    source = api.build_data(resolved)
    config = TrainConfig(steps=2, batch_size=8, lr=1e-2, checkpoint_every=100, ema_decay=None, device="cpu")
    model = api.create_model(resolved, data_spec=source.spec)
    Trainer(
        model, source.split("train").tensors(), config=config, run_dir=tmp_path, recipe=resolved, progress=False
    ).fit()
    trained = model.components["decoder"].state_dict()

    fresh = api.create_model(resolved, data_spec=source.spec)
    built = {k: v.clone() for k, v in fresh.components["decoder"].state_dict().items()}
    assert "decoder" not in api.init_from(fresh, resolved, tmp_path, exclude=["decoder"])
    for k, v in fresh.components["decoder"].state_dict().items():
        torch.testing.assert_close(v, built[k], rtol=0, atol=0)
    assert "decoder" in api.init_from(fresh, resolved, tmp_path)
    for k, v in fresh.components["decoder"].state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    assert any(not torch.equal(built[k], trained[k]) for k in built)  # so the two checks above tell them apart
    with pytest.raises(
        GenzooError,
        match="--init-except upsampler_decoder: this recipe has no such component; its components are .*decoder",
    ):
        api.init_from(fresh, resolved, tmp_path, exclude=["upsampler_decoder"])


def test_errors(tmp_path: Path) -> None:
    train(Noisy, tmp_path, cfg(steps=2))
    with pytest.raises(TrainingError, match="already holds a checkpoint; pass --resume"):
        train(Noisy, tmp_path, cfg(steps=2))
    with pytest.raises(TrainingError, match="holds no checkpoint; train without --resume first"):
        train(Noisy, tmp_path / "empty", cfg(), resume=True)
    other = {**RECIPE, "components": {"decoder": {"type": "x"}}}
    with pytest.raises(TrainingError, match="the recipe's 'components' differs"):
        Trainer(Noisy(), DATA, config=cfg(), run_dir=tmp_path, recipe=other, progress=False).fit(resume=True)
    with pytest.raises(TrainingError, match="batch_size 64 exceeds the 40 training items"):
        Trainer(Noisy(), DATA, config=cfg(batch_size=64), run_dir=tmp_path / "b", recipe=RECIPE)
    with pytest.raises(TrainingError, match=r"train.stages names \['nope'\]"):
        train(Noisy, tmp_path / "c", cfg(stages={"nope": 3}))


def test_sample_grids_are_written(tmp_path: Path) -> None:
    train(Noisy, tmp_path, cfg(steps=4, sample_every=2, sample_n=4))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]


def test_bf16_autocast_runs_the_loss_in_bf16(tmp_path: Path) -> None:
    seen = []

    class Recording(Noisy):
        def training_losses(self, batch, **kw):
            seen.append(self.components["decoder"][0](batch["image"].flatten(1)).dtype)
            return super().training_losses(batch, **kw)

    _, r = train(Recording, tmp_path, cfg(steps=2, precision="bf16"))
    assert seen == [torch.bfloat16, torch.bfloat16] and math.isfinite(r.losses["loss"])
    assert all(
        v.dtype == torch.float32 for v in load_checkpoint(tmp_path).components["decoder"].values()
    )  # weights stay fp32


def test_minutes_budget_stops_at_a_step_boundary_and_checkpoints(tmp_path: Path) -> None:
    class Slow(Noisy):
        def training_losses(self, batch, **kw):
            threading.Event().wait(0.05)
            return super().training_losses(batch, **kw)

    _, r = train(Slow, tmp_path, cfg(steps=None, minutes=0.2 / 60))  # a 0.2 s budget, 0.05 s steps
    assert r.stopped_early and 3 <= r.step <= 8
    assert load_checkpoint(tmp_path).meta["step"] == r.step


def test_each_stage_starts_its_own_ema_warm_up(tmp_path: Path) -> None:
    """A stage trained after a long one is saved as its trained weights, not as a blend with its initialisation."""
    torch.manual_seed(123)
    init = {k: v.clone() for k, v in TwoPlayer().components["discriminator"].state_dict().items()}
    train(TwoPlayer, tmp_path, cfg(stages={"pre": 300, "game": 40}, ema_decay=0.999, warmup_steps=0))
    w = weights(tmp_path)
    for k in ("weight", "bias"):
        saved, raw = w[f"discriminator.{k}"], w[f"raw.discriminator.{k}"]
        # with one warm-up count for the whole run the decay would be 0.97 here: 0.97^40 = 30% initialisation
        assert (saved - raw).norm() < 0.2 * (init[k] - raw).norm(), k


class ConvNoisy(Noisy):
    """Noisy with a convolution, so that the memory format matters."""

    def __init__(self) -> None:
        super().__init__()
        # registered as the module "decoder" too (replacing Noisy's), so that the trainer sees and converts it
        self.decoder = self.components["decoder"] = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.Dropout(0.2), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1)
        )

    def training_losses(self, batch, *, optimizer="main", stage="main"):
        x = batch["image"]
        loss = (self.components["decoder"](x + torch.randn_like(x)) - x).pow(2).mean()
        return {"loss": loss, "mse": loss.detach()}


def test_channels_last_training_resumes_exactly_and_saves_plain_tensors(tmp_path: Path) -> None:
    config = cfg(channels_last=True)
    p, _ = train(ConvNoisy, tmp_path / "straight", config)
    assert p.components["decoder"][3].weight.is_contiguous(memory_format=torch.channels_last)
    assert not p.components["decoder"][3].weight.is_contiguous()  # (1, 8, 3, 3): the two layouts differ
    train(ConvNoisy, tmp_path / "resumed", config, stop_at=5)
    train(ConvNoisy, tmp_path / "resumed", config, resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.is_contiguous() for v in a.values())  # checkpoints are NCHW whatever the training layout


def test_resumed_optimiser_state_takes_its_parameters_memory_format(tmp_path: Path) -> None:
    """Adam's moments come back from the checkpoint contiguous; CUDA's fused AdamW refuses them beside channels_last
    conv weights ("must have same dtype, device, and layout", found on the first GPU run), so they take the layout."""
    config = cfg(channels_last=True)
    train(ConvNoisy, tmp_path, config, stop_at=5)
    torch.manual_seed(123)
    trainer = Trainer(ConvNoisy(), DATA, config=config, run_dir=tmp_path, recipe=RECIPE, progress=False)
    trainer._begin(resume=True)
    moments = [
        (p, v)
        for o in trainer.opts.values()
        for p, state in o.state.items()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.shape == p.shape
    ]
    assert any(p.dim() == 4 and not p.is_contiguous() for p, _ in moments)  # channels_last conv weights among them
    assert all(v.stride() == p.stride() for p, v in moments)


def test_for_inference_stores_conv_weights_nhwc_with_the_same_outputs() -> None:
    from genzoo import api

    net = tiny_unet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    with torch.no_grad():
        want = net.eval()(x, t)
        fast = api.for_inference(net)
        assert any(
            p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            for p in fast.parameters()
        )
        torch.testing.assert_close(fast(x, t), want, rtol=1e-4, atol=1e-5)
