"""Evaluation end to end: the sample stream, judge-based metrics on oracle models, `genzoo eval`, `genzoo compare`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny import write_recipes

from genzoo import api
from genzoo.eval import evaluate as evaluate_module
from genzoo.eval import judges
from genzoo.eval.evaluate import EvalContext, EvalSettings, evaluate
from genzoo.plugins import default_registry


class Oracle(torch.nn.Module):
    """A 'model' that returns real images of the requested class (or noise): metrics must tell them apart."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, *, noise: bool = False, num_classes: int | None = None
    ):
        super().__init__()
        self.images, self.labels, self.noise = images, labels, noise
        self.components = {}
        if num_classes:
            from genzoo.pipelines import Conditioning

            self.condition, self.num_classes = Conditioning.class_, num_classes

    def sample(self, n, condition=None, *, generator=None):
        if self.noise:
            return torch.rand((n, *self.images.shape[1:]), generator=generator) * 2 - 1
        if condition is None:
            idx = torch.randint(0, len(self.images), (n,), generator=generator)
        else:
            idx = torch.stack(
                [
                    torch.nonzero(self.labels == y)[
                        torch.randint(0, int((self.labels == y).sum()), (1,), generator=generator)
                    ].squeeze()
                    for y in condition["y"]
                ]
            )
        return self.images[idx]


def _all_metrics():
    reg = default_registry()
    names = "fd kid precision-recall density-coverage class-coverage attribute-accuracy throughput".split()
    return {m: reg.build("metric", {"type": m}) for m in names}


def test_metrics_separate_real_images_from_noise_and_score_conditions(cheap_judges) -> None:
    source = api.build_data(api.resolve_recipe("cfg-digits"))
    judge = judges.load_judge("digits", source.cfg.model_dump())
    train = source.split("train").tensors()
    settings = EvalSettings(samples=400, seed=0, batch_size=100)
    real = evaluate(
        Oracle(train["image"], train["label"], num_classes=10),
        source,
        metrics=_all_metrics(),
        judge=judge,
        settings=settings,
        device=torch.device("cpu"),
    )
    noise = evaluate(
        Oracle(train["image"], train["label"], noise=True),
        source,
        metrics=_all_metrics(),
        judge=judge,
        settings=settings,
        device=torch.device("cpu"),
    )
    assert real["fd"] < 0.1 * noise["fd"] and real["kid"] < 0.1 * noise["kid"]
    assert real["precision"] > 0.6 and noise["precision"] < 0.1
    assert real["class_coverage"] == 1.0 and real["max_class_share"] < 0.2
    # the oracle draws train images of the asked class: the judge's accuracy bounds the label accuracy
    assert real["label_accuracy"] > 0.8 and "label_accuracy" not in noise
    assert real["images_per_s"] > 0 and real["nfe"] == 1


def test_throughput_counts_the_network_evaluations_of_every_sampler_of_a_cascade() -> None:
    """nfe per sample: the decoder's sampler, a token prior's per token (and per best-of draw), each upsampler's."""
    s = lambda n, kind="diffusion": SimpleNamespace(nfe=lambda: n, kind=SimpleNamespace(value=kind))  # noqa: E731
    parts = {"sampler": s(20), "upsampler_sampler": s(7), "upsampler2_sampler": s(3), "guidance": None}
    model = SimpleNamespace(components=parts)
    ev = EvalContext(model, None, None, EvalSettings(samples=8), device=torch.device("cpu"))
    ev.samples, ev.sample_seconds = torch.zeros(8, 1, 2, 2), 2.0
    run = evaluate_module.metric_throughput(evaluate_module.NoConfig())
    assert run(ev) == {"images_per_s": 4.0, "nfe": 30.0}
    prior = SimpleNamespace(shape=(2, 3), best_of=2)
    model.components = {**parts, "prior": prior, "prior_sampler": s(1, "token"), "upsampler2_sampler": None}
    assert run(ev)["nfe"] == 20 + 7 + 1 * 6 * 2


def test_the_upsampler_metric_gives_a_reading_upsampler_each_images_own_condition() -> None:
    """unCLIP's upsample takes no condition (it must not be passed one); a diffusion cascade with
    upsampler_condition gets each test image's class or caption, batch by batch."""
    g = torch.Generator().manual_seed(0)
    real = {"image": torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, "label": torch.arange(6), "caption": list("abcdef")}
    seen = []

    def upsample(low, *, generator=None, **kw):  # no condition parameter unless the model reads one
        seen.append(kw.get("condition"))
        return F.interpolate(low, size=8, mode="nearest")

    judge = SimpleNamespace(features=lambda x: x.flatten(1)[:, :4].double())
    for reads, condition, want in [
        (False, None, [None, None]),
        (True, "class", [{"y": [0, 1, 2, 3]}, {"y": [4, 5]}]),
        (True, "caption", [{"caption": ["a", "b", "c", "d"]}, {"caption": ["e", "f"]}]),
    ]:
        model = SimpleNamespace(upsampler=object(), base_size=4, upsample=upsample, upsampler_condition=reads)
        if reads:
            model.condition = SimpleNamespace(value=condition)
        ev = EvalContext(model, None, judge, EvalSettings(samples=6, batch_size=4), device=torch.device("cpu"))
        ev.real, ev.real_features = real, judge.features(real["image"])
        seen.clear()
        out = evaluate_module.metric_upsampler(evaluate_module.NoConfig())(ev)
        got = [
            None if c is None else {k: list(v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
            for c in seen
        ]
        assert got == want and {"upsampler_fd", "bilinear_fd", "upsampler_mse", "bilinear_mse"} <= set(out)


def test_same_stream_for_every_model_and_cached_real_features(cheap_judges) -> None:
    source = api.build_data(api.resolve_recipe("ddpm-digits"))
    judge = judges.load_judge("digits", source.cfg.model_dump())
    train = source.split("train").tensors()
    s = EvalSettings(samples=64, seed=3, batch_size=16)
    a = EvalContext(Oracle(train["image"], train["label"]), source, judge, s, device=torch.device("cpu"))
    b = EvalContext(Oracle(train["image"], train["label"]), source, judge, s, device=torch.device("cpu"))
    assert torch.equal(a.samples, b.samples)  # per-batch seeds: the same stream
    files = list((judges.cache_dir() / "features").glob("*.safetensors"))
    feats = a.real_features
    assert len(list((judges.cache_dir() / "features").glob("*.safetensors"))) == len(files) + 1
    assert torch.equal(b.real_features, feats)


class _AutocastProbe:
    """A model that reports the autocast state its sample() runs under, as the pixel value."""

    def sample(self, n, cond=None, *, generator=None):
        on = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        return torch.full((n, 1, 8, 8), 0.5 if on else -0.5)


@pytest.mark.parametrize("precision, pixel", [("fp32", -0.5), ("bf16", 0.5)])
def test_settings_precision_is_the_autocast_the_model_generates_in(precision: str, pixel: float) -> None:
    s = EvalSettings(samples=4, batch_size=2, precision=precision)
    ev = EvalContext(_AutocastProbe(), None, None, s, device=torch.device("cpu"))
    assert torch.equal(ev.samples, torch.full((4, 1, 8, 8), pixel))
    assert not torch.is_autocast_enabled("cpu")  # and only while it generates


def test_unknown_precision_names_the_choices_and_slow_cpu_bf16_warns(monkeypatch) -> None:
    from genzoo import precision

    with pytest.raises(ValueError, match="precision 'fp16' is unknown; use one of fp32, bf16"):
        precision.autocast("cpu", "fp16")
    precision.cpu_has_fast_bf16.cache_clear()
    before = torch.get_rng_state()
    precision.cpu_has_fast_bf16()  # the probe draws from its own generator: training's random stream is untouched
    assert torch.equal(torch.get_rng_state(), before)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 on this CPU is far slower than fp32"):
        precision.autocast("cpu", "bf16")


def test_every_metric_is_registered_and_unavailable_ones_say_how_to_enable(monkeypatch) -> None:
    names = {e.name for e in api.list_components("metric")}
    assert {"fd", "kid", "precision-recall", "nll", "throughput", "inception", "clip-score"} <= names
    import builtins

    real_import = builtins.__import__

    def no_fidelity(name, *a, **k):
        if name == "torch_fidelity":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_fidelity)
    from genzoo.errors import GenzooError

    fn = default_registry().build("metric", {"type": "inception"})
    with pytest.raises(GenzooError, match="install torch-fidelity"):
        fn(None)


def test_compare_writes_the_leaderboard_grids_plots_and_error_rows(tmp_path: Path, cheap_judges) -> None:
    from genzoo.cli import main

    recipes = write_recipes(
        tmp_path / "tiny.yaml", "tiny-vae", "tiny-ae", "compare-ddpm", rename={"compare-ddpm": "tiny-ddpm"}
    )
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "tiny-vae",
            "tiny-ae",
            "tiny-ddpm",
            "tiny-ddpm@ddpm:5",
            "no-such-recipe",
            "--out",
            str(out),
            "--recipes",
            str(recipes),
            "--samples",
            "64",
            "--sweep",
            "ddim:2,4",
            "--segments",
            "2",
            "--budget-minutes",
            "0.02",
            "--metrics",
            "fd,precision-recall,reconstruction,throughput",
            "--precision",
            "bf16",
        ]
    )
    assert rc == 0
    board = json.loads((out / "leaderboard.json").read_text())
    rows = board["rows"]
    assert board["settings"]["precision"] == "bf16"  # what fixed the sample stream is recorded with it
    assert "generated in bf16" in (out / "leaderboard.md").read_text().splitlines()[0]
    by = {r["name"]: r for r in rows}
    assert set(by) == {"tiny-vae", "tiny-ae", "tiny-ddpm", "tiny-ddpm@ddpm:5", "no-such-recipe"}
    assert "no-such-recipe" in by["no-such-recipe"]["error"] and rows[-1]["name"] == "no-such-recipe"  # errors last
    assert by["tiny-ddpm@ddpm:5"]["nfe"] == 5 and by["tiny-ddpm"]["nfe"] == 4  # one model, two samplers
    assert by["tiny-vae"]["recon_mse"] > 0 and "recon_mse" not in by["tiny-ddpm"]
    fds = [r["fd"] for r in rows if not r["error"]]
    assert fds == sorted(fds)
    table = list(csv.reader((out / "leaderboard.csv").open()))
    assert table[0][0] == "model" and len(table) == 6
    assert not by["tiny-ae"]["error"] and by["tiny-ae"]["fd"] > 0  # a spent budget still fits the AE's prior
    assert "| tiny-vae |" in (out / "leaderboard.md").read_text().replace("| tiny-vae | vae", "| tiny-vae |")
    for f in (
        "grids/tiny-vae.png",
        "grids/tiny-ddpm_ddpm-5.png",
        "fd_vs_training_time.png",
        "fd_vs_steps_tiny-ddpm.png",
    ):
        assert (out / f).stat().st_size > 0, f
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves["training"]["tiny-vae"]) == 2 and [s for s, _ in curves["steps"]["tiny-ddpm"]["ddim"]] == [2, 4]
