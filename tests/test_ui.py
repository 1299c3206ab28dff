"""`genzoo serve`'s web page (plugins/genzoo_ui), driven over HTTP with gradio_client on 127.0.0.1: sample, change the
sampler and guidance, read the images back, read the training-and-evaluation tab, and bad inputs answered by a visible
error while the server keeps serving. The browser check (a real headless Chromium) is `make ui-check` (docs/ui.md)."""

from __future__ import annotations

import socket
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import free_port, write_recipes

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from genzoo.cli import main  # noqa: E402
from genzoo.diffusion.samplers import AncestralSampler, SamplerConfig  # noqa: E402
from genzoo.plugins import default_registry, hookimpl, load_plugins  # noqa: E402

LEADERBOARD = "| model | FD ↓ |\n|---|---|\n| tiny-ddpm | 12.5 |\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two tiny runs trained in-process, served on 127.0.0.1 in this process's threads; (app, client, runs)."""
    root = tmp_path_factory.mktemp("ui")
    write_recipes(root / "tiny.yaml", "ui-ddpm", "tiny-cfg", rename={"ui-ddpm": "tiny-ddpm"})
    runs = {}
    for name in ("tiny-ddpm", "tiny-cfg"):
        runs[name] = root / "runs" / name
        assert (
            main(["train", name, "--recipes", str(root / "tiny.yaml"), "--out", str(runs[name]), "--no-progress"]) == 0
        )
    (root / "runs" / "leaderboard.md").write_text(LEADERBOARD)  # as `genzoo compare` leaves beside its runs
    app = default_registry().build(
        "app",
        {
            "type": "gradio",
            "runs": [str(p) for p in runs.values()],
            "device": "cpu",
            "port": free_port(),
            "max_samples": 8,
        },
    )
    url = app.launch(block=False)
    assert url.startswith("http://127.0.0.1:")
    client = gradio_client.Client(url, verbose=False)
    yield app, client, runs
    client.close() if hasattr(client, "close") else None
    app.close()


def read_gallery(gallery) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for item in gallery:
        with Image.open(item["image"]) as im:
            out.append(np.asarray(im))
    return out


def test_generate_returns_images_a_grid_and_a_status(served) -> None:
    app, client, runs = served
    gallery, download, status = client.predict(n=3, seed=1, api_name="/generate_tiny_ddpm")
    images = read_gallery(gallery)
    assert len(images) == 3
    for a in images:  # 8x8 digits enlarged by a whole factor to the display size, grey levels in 0..255
        assert a.shape == (128, 128) and a.dtype == np.uint8 and a.max() > a.min()
        assert (a[::16, ::16].repeat(16, 0).repeat(16, 1) == a).all()  # nearest: blocks of one value
    grid = Path(download["value"] if isinstance(download, dict) else download)
    assert grid.suffix == ".png" and grid.stat().st_size > 0
    assert "3 image(s)" in status and "the run's own settings" in status
    again = read_gallery(client.predict(n=3, seed=1, api_name="/generate_tiny_ddpm")[0])
    other = read_gallery(client.predict(n=3, seed=2, api_name="/generate_tiny_ddpm")[0])
    assert all((a == b).all() for a, b in zip(images, again))  # the seed decides
    assert not all((a == b).all() for a, b in zip(images, other))


def test_changing_the_sampler_and_guidance_loads_the_swapped_model_once(served) -> None:
    app, client, runs = served
    before = len(app.cache)
    ddim = read_gallery(client.predict(n=2, seed=0, api_name="/generate_tiny_ddpm")[0])
    _, _, status = client.predict(n=2, seed=0, sampler="ddpm", steps=20, api_name="/generate_tiny_ddpm")
    assert "--sampler ddpm --steps 20" in status
    ddpm = read_gallery(client.predict(n=2, seed=0, sampler="ddpm", steps=20, api_name="/generate_tiny_ddpm")[0])
    assert not all((a == b).all() for a, b in zip(ddim, ddpm))
    assert len(app.cache) == before + 1  # the swapped model is cached per (run, swaps)
    gallery, _, status = client.predict(
        n=2, class_id=3, guidance="none", sampler="dpm-solver++", steps=5, api_name="/generate_tiny_cfg"
    )
    assert len(read_gallery(gallery)) == 2 and "--guidance none" in status and "--scale" not in status
    _, _, status = client.predict(n=1, class_id=7, scale=1.5, api_name="/generate_tiny_cfg")
    assert "--scale 1.5" in status


def test_the_controls_come_from_the_registry(served) -> None:
    app, client, runs = served
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = lambda ep: [p["parameter_name"] for p in api[ep]["parameters"]]  # noqa: E731
    assert names("/generate_tiny_ddpm") == [
        "prompt",
        "class_id",
        "mode",
        "image",
        "image_b",
        "n",
        "seed",
        "sampler",
        "steps",
    ]
    assert names("/generate_tiny_cfg")[-4:] == ["sampler", "steps", "guidance", "scale"]
    view = app.views[1]
    diffusion_samplers = {e.name for e in default_registry().entries("sampler")} - {"token"}
    assert set(view.control("sampler").choices) == diffusion_samplers
    assert {"none", "cfg", "classifier"} <= set(view.control("guidance").choices) and "logit-cfg" not in view.control(
        "guidance"
    ).choices
    assert view.control("steps").maximum == 100 and view.control("scale").value == 3.0

    class TestSampler(AncestralSampler):
        """A sampler a third-party plugin adds."""

    plugin = types.SimpleNamespace(
        register_components=hookimpl(
            lambda registry: registry.register("sampler", "test-ancestral", config=SamplerConfig, factory=TestSampler)
        )
    )
    reg, _ = load_plugins(extra=[("third-party", plugin)])
    from genzoo_ui.controls import controls_for

    controls = {c.key: c for c in controls_for(view.recipe, reg, conditional=True)}
    assert "test-ancestral" in controls["sampler"].choices


def test_token_models_get_temperature_and_token_samplers_only() -> None:
    from genzoo_ui.controls import controls_for

    import genzoo.api as gz

    controls = {
        c.key: c for c in controls_for(gz.resolve_recipe("vqvae-shapes"), default_registry(), conditional=False)
    }
    assert controls["prior_sampler"].choices == ["token"] and "prior_steps" not in controls
    assert {"temperature", "top_k", "top_p"} <= set(controls)
    dalle2 = {c.key: c for c in controls_for(gz.resolve_recipe("dalle2-shapes"), default_registry(), conditional=True)}
    assert {"prior_sampler", "prior_steps", "prior_guidance", "prior_scale", "upsampler_sampler"} <= set(dalle2)
    assert "temperature" not in dalle2 and "ddim" in dalle2["prior_sampler"].choices


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "minimum"),  # the slider's own check
        ({"steps": 500}, "greater than maximum value 100"),  # the slider's range: the model's timesteps
        ({"prompt": "a red circle"}, "unconditional; it takes no prompt"),
        ({"class_id": 3}, "not class-conditional"),
        ({"sampler": "token"}, "not in the list of choices"),  # a token sampler for a diffusion model
        ({"n": 9}, "greater than maximum value 8"),  # --max-samples
        ({"mode": "variations"}, "not in the list of choices"),  # an image mode of a model without one
    ],
)
def test_bad_input_is_a_visible_error_and_the_server_keeps_serving(served, kwargs, message) -> None:
    app, client, runs = served
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        client.predict(**kwargs, api_name="/generate_tiny_ddpm")
    assert message in str(err.value)
    assert len(read_gallery(client.predict(n=1, api_name="/generate_tiny_ddpm")[0])) == 1


def test_bad_input_to_the_class_conditional_run(served) -> None:
    app, client, runs = served
    for kwargs, message in (
        ({"class_id": 42}, "not one of the run's classes 0..9"),
        ({"class_id": None}, "pick a class"),
        ({"guidance": "classifier", "class_id": 1}, "no weights for guidance 'classifier'"),
    ):
        with pytest.raises(gradio_client.exceptions.AppError) as err:
            client.predict(**kwargs, api_name="/generate_tiny_cfg")
        assert message in str(err.value), str(err.value)


def test_progress_counts_each_samplers_model_calls(served) -> None:
    from genzoo_ui import controls as C

    app, client, runs = served
    seen = []
    C.generate(
        app.views[0],
        {"n": 1, "sampler": "ddpm", "steps": 25},
        app.cache,
        device=torch.device("cpu"),
        max_samples=8,
        report=lambda done, total, what: seen.append((done, total, what)),
    )
    assert seen[0] == (0, 25, "sampler") and seen[-1] == (25, 25, "sampler") and len(seen) == 26
    job = client.submit(n=2, sampler="ddpm", steps=100, api_name="/generate_tiny_ddpm")
    job.result()
    assert job.status().success


def test_the_run_files_tab_shows_the_curve_evaluations_and_leaderboard(served) -> None:
    from genzoo.runs import record_evaluation

    app, client, runs = served
    record_evaluation(
        runs["tiny-ddpm"],
        {"step": 4, "samples": 64, "split": "test", "swaps": {"sampler": "ddpm"}, "figures": {"fd": 31.5, "kid": 0.02}},
    )
    summary, plot, table, board, grid = client.predict(api_name="/run_files_tiny_ddpm")
    assert "tiny-ddpm" in summary and "**step** 4" in summary
    assert plot["columns"] == ["step", "loss", "stage"] and [row[0] for row in plot["data"]] == [1, 2, 3, 4]
    assert {"fd", "kid", "swaps"} <= set(table["headers"]) and table["data"][0][table["headers"].index("fd")] == 31.5
    assert "tiny-ddpm | 12.5" in board
    assert grid["visible"] and Path(grid["value"]).is_file()  # an update: the image is shown when the run has a grid
    summary, plot, table, board, grid = client.predict(api_name="/run_files_tiny_cfg")
    assert table["headers"] == ["evaluations"]  # nothing recorded
    assert grid["value"] is None and not grid["visible"]  # no sample grid written: the image is hidden


def test_image_modes_need_their_images(served) -> None:
    """A pipeline that decodes image embeddings (DALL·E 2) gets variations and interpolate; each checks its inputs."""
    from genzoo_ui import controls as C

    app, client, runs = served

    class Stub:
        components: dict = {}

        def sample(self, n, cond=None, *, generator=None):
            return torch.zeros(n, 3, 8, 8)

        def variations(self, images, k, *, generator=None):
            return images.repeat(k, 1, 1, 1)

        def interpolate(self, a, b, steps, *, generator=None):
            return torch.stack([a + (b - a) * w for w in torch.linspace(0, 1, steps)])

    cache = C.ModelCache(lambda path, **swaps: Stub())
    view = C.RunView(Path("stub"), "stub", {}, {}, "caption", ["sample", "variations", "interpolate"], [], 8, 3, [])
    read = lambda value: torch.full((3, 8, 8), float(value))  # noqa: E731
    gen = lambda **values: C.generate(
        view,
        values,
        cache,
        device=torch.device("cpu"),
        max_samples=8,  # noqa: E731
        read_image=read,
    )
    assert gen(mode="variations", image=0.5, n=2).shape == (2, 3, 8, 8)
    path = gen(mode="interpolate", image=-1.0, image_b=1.0, n=3)
    assert torch.allclose(path[:, 0, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    for values, message in (
        ({"mode": "variations"}, "needs an image"),
        ({"mode": "interpolate", "image": 0.0}, "the second image"),
        ({"mode": "interpolate", "image": 0.0, "image_b": 1.0, "n": 1}, "at least 2"),
        ({"mode": "variations", "image": 0.0, "prompt": "x"}, "takes no prompt"),
        ({"mode": "sample"}, "enter a prompt"),
    ):
        with pytest.raises(Exception, match=message):
            gen(**values)


def test_serve_errors_are_one_line(served, monkeypatch, capsys) -> None:
    app, client, runs = served
    with socket.socket() as taken:  # a port in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(runs["tiny-ddpm"]), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"genzoo serve: error: cannot serve on 127.0.0.1:{port}")
    assert main(["serve", str(runs["tiny-ddpm"].parent / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # without the extra: the ui plugin's hook fails (as `genzoo plugins` shows) and `genzoo serve` says what to install
    import importlib.util

    import genzoo.plugins

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    reg, infos = load_plugins()
    ui = next(i for i in infos if i.name == "ui")
    assert "pip install 'genzoo[ui]'" in ui.error and not reg.names("app")
    monkeypatch.setattr(genzoo.plugins, "default_registry", lambda: reg)
    assert main(["serve", str(runs["tiny-ddpm"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'genzoo[ui]'" in err[0]
