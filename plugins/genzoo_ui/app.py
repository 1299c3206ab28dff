"""The ``gradio`` app behind `genzoo serve`: one tab per run, with a generate page and a training-and-evaluation page.

The generate page's inputs follow the run's conditioning and its controls come from the registry
(:mod:`genzoo_ui.controls`); every run's endpoint takes the same conditioning parameters (``prompt``, ``class_id``,
``mode``, ``image``, ``image_b``, ``n``, ``seed``; those the run does not use are hidden, and given one anyway is a
visible error) and then the swaps it offers, by their genzoo.swaps keys (``sampler``, ``steps``, ``guidance``,
``scale``, ``prior_steps``, ``temperature``, ...). The endpoint is ``/generate`` when one run is served, else
``/generate_<name>``. It returns the gallery, the grid PNG to download and a status line.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry and no version check from a local tool

import gradio as gr  # noqa: E402

from genzoo import api  # noqa: E402
from genzoo.errors import GenzooError  # noqa: E402

from . import controls as C  # noqa: E402
from .config import GradioAppConfig  # noqa: E402

# served in-process from `genzoo serve`: the caller owns the thread, nothing is shared or opened, errors show
LAUNCH_OPTIONS: dict[str, Any] = {
    "prevent_thread_lock": True,
    "share": False,
    "inbrowser": False,
    "show_error": True,
    "quiet": True,
    "ssr_mode": False,
    "mcp_server": False,
}


def _kw(fn: Any, **kwargs: Any) -> dict[str, Any]:
    """The keywords ``fn`` accepts (gradio's signatures change between majors)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "run"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class GradioApp:
    """Builds the page for ``cfg.runs`` (each loaded once with its own settings) and serves it."""

    def __init__(self, cfg: GradioAppConfig, ctx) -> None:
        from genzoo.training import resolve_device

        self.cfg, self.registry = cfg, ctx.registry
        self.device = resolve_device(cfg.device)
        self.cache = C.ModelCache(
            lambda path, **swaps: api.load_model(path, device=self.device, registry=self.registry, **swaps),
            size=cfg.cache_size,
        )
        self.views: list[C.RunView] = []
        taken: set[str] = set()
        for path in cfg.runs:
            model = self.cache.get(Path(path), {})  # a run that does not load fails here, before serving
            name = base = Path(path).resolve().name or "run"
            i = 2
            while _slug(name) in taken:  # the slug names the endpoints and the page's element ids
                name, i = f"{base}-{i}", i + 1
            taken.add(_slug(name))
            self.views.append(C.describe_run(path, name, model, self.registry))
        self.blocks: gr.Blocks | None = None
        self.url: str | None = None
        self.out_dir = Path(tempfile.mkdtemp(prefix="genzoo-serve-"))

    # ------------------------------------------------------------------ serving
    def api_name(self, view: C.RunView, endpoint: str = "generate") -> str:
        """``generate`` / ``run_files`` when one run is served, else ``generate_<name>`` / ``run_files_<name>``."""
        return endpoint if len(self.views) == 1 else f"{endpoint}_{_slug(view.name)}"

    def build(self) -> gr.Blocks:
        if self.blocks is None:
            with gr.Blocks(**_kw(gr.Blocks.__init__, title=self.cfg.title, analytics_enabled=False)) as blocks:
                gr.Markdown(
                    f"# {self.cfg.title}\nServing {len(self.views)} run(s) from "
                    + ", ".join(f"`{v.path}`" for v in self.views)
                )
                if len(self.views) == 1:
                    self._run_page(self.views[0])
                else:
                    with gr.Tabs():
                        for view in self.views:
                            with gr.Tab(view.name):
                                self._run_page(view)
            blocks.queue(**_kw(gr.Blocks.queue, default_concurrency_limit=1))
            self.blocks = blocks
        return self.blocks

    def launch(self, block: bool = True) -> str:
        """Serve on ``cfg.host``:``cfg.port``; returns the URL (after the server stops when ``block``)."""
        blocks = self.build()
        blocks.launch(
            **_kw(
                blocks.launch,
                server_name=self.cfg.host,
                server_port=self.cfg.port,
                allowed_paths=[str(self.out_dir)],
                **LAUNCH_OPTIONS,
            )
        )
        self.url = blocks.local_url
        print(f"genzoo serve: {', '.join(v.name for v in self.views)} at {self.url} (Ctrl-C stops)", flush=True)
        if block:
            try:
                blocks.block_thread()
            finally:
                self.close()
        return self.url

    def close(self) -> None:
        if self.blocks is not None:
            self.blocks.close()
        shutil.rmtree(self.out_dir, ignore_errors=True)  # the grids written for downloads

    # ------------------------------------------------------------------ one run
    def _run_page(self, view: C.RunView) -> None:
        with gr.Tabs():
            with gr.Tab("Generate"):
                self._generate_tab(view)
            with gr.Tab("Training & evaluation"):
                self._info_tab(view)

    def _generate_tab(self, view: C.RunView) -> None:
        slug = _slug(view.name)
        what = {"caption": "captions", "class": "a class", "none": "nothing (unconditional)"}[view.condition]
        recipe_name = view.recipe.get("name", "?")
        gr.Markdown(
            f"**{view.name}**: recipe `{recipe_name}`, step {view.meta.get('step')}, "
            f"{view.channels}×{view.image_size}×{view.image_size} images, conditioned on {what}"
            + (f"; image modes: {', '.join(view.modes[1:])}" if len(view.modes) > 1 else "")
        )
        with gr.Row():
            with gr.Column(scale=1):
                inputs: dict[str, Any] = {}
                inputs["prompt"] = gr.Textbox(
                    label="prompt",
                    placeholder="a large red circle in the top left",
                    visible=view.condition == "caption",
                    elem_id=f"{slug}-prompt",
                )
                inputs["class_id"] = gr.Dropdown(
                    choices=view.classes,
                    value=0 if view.condition == "class" else None,
                    allow_custom_value=True,
                    label="class",
                    visible=view.condition == "class",
                    elem_id=f"{slug}-class",
                )  # a value off the list gets genzoo's own error
                inputs["mode"] = gr.Radio(
                    choices=view.modes,
                    value="sample",
                    label="mode",
                    visible=len(view.modes) > 1,
                    info="variations of an image, or the path between two images' CLIP embeddings",
                )
                images = len(view.modes) > 1
                inputs["image"] = gr.Image(
                    type="filepath", label="image (variations, interpolation start)", visible=images
                )
                inputs["image_b"] = gr.Image(type="filepath", label="second image (interpolation end)", visible=images)
                inputs["n"] = gr.Slider(
                    1, self.cfg.max_samples, value=min(8, self.cfg.max_samples), step=1, label="number of images"
                )
                inputs["seed"] = gr.Number(value=0, precision=0, label="seed", minimum=0)
                with gr.Accordion("sampling settings (from the registry)", open=True):
                    for c in view.controls:
                        inputs[c.key] = self._control(c, slug)
                button = gr.Button("Generate", variant="primary", elem_id=f"{slug}-generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    label="samples",
                    columns=4,
                    elem_id=f"{slug}-gallery",
                    format="png",
                    **_kw(
                        gr.Gallery.__init__,
                        buttons=["download", "download_all", "fullscreen"],
                        show_download_button=True,
                    ),
                )
                download = gr.DownloadButton("Download the grid (PNG)", visible=False, elem_id=f"{slug}-download")
                status = gr.Markdown(elem_id=f"{slug}-status")
        keys = view.keys
        fn = self._endpoint(view, keys, {k: inputs[k].value for k in keys})
        button.click(
            fn,
            inputs=[inputs[k] for k in keys],
            outputs=[gallery, download, status],
            api_name=self.api_name(view),
            **_kw(button.click, concurrency_limit=1),
        )

    def _control(self, c: C.Control, slug: str) -> Any:
        elem_id = f"{slug}-{c.key.replace('_', '-')}"
        if c.type == "choice":
            return gr.Dropdown(choices=c.choices, value=c.value, label=c.label, info=c.help, elem_id=elem_id)
        if c.key.endswith("steps") and c.maximum is not None:
            return gr.Slider(
                1,
                int(c.maximum),
                value=c.value or min(50, int(c.maximum)),
                step=1,
                label=c.label,
                info=c.help,
                elem_id=elem_id,
            )
        if c.type == "int":
            return gr.Number(value=c.value, precision=0, label=c.label, info=c.help, elem_id=elem_id)
        if c.minimum is not None and c.maximum is not None:
            return gr.Slider(c.minimum, c.maximum, value=c.value, label=c.label, info=c.help, elem_id=elem_id)
        return gr.Number(value=c.value, label=c.label, info=c.help, elem_id=elem_id)

    def _endpoint(self, view: C.RunView, keys: list[str], defaults: dict[str, Any]) -> Any:
        """A function whose parameters are ``keys`` (gradio names the API's parameters after them) with the page's
        initial values as defaults (an API client passes only what it changes), then the progress."""

        def run(*args: Any, progress: gr.Progress = gr.Progress()) -> tuple[Any, Any, str]:  # noqa: B008
            values = dict(zip(keys, args))
            return self.generate(view, values, progress)

        params = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults.get(k)) for k in keys]
        params.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress()))
        run.__signature__ = inspect.Signature(params)
        run.__name__ = self.api_name(view)
        return run

    def generate(self, view: C.RunView, values: dict[str, Any], progress: Any = None) -> tuple[Any, Any, str]:
        """The endpoint's body: images, the grid file and a status line; a bad input raises gr.Error (shown on the
        page, returned to an API client as an error) and the server keeps serving."""
        from genzoo.training.images import load_image, save_grid, to_uint8

        def report(done: int, total: int | None, what: str) -> None:
            if progress is not None:
                progress((done, total), desc=f"sampling: {what}", unit="steps")  # model calls, or tokens

        read = lambda path: load_image(path, size=view.image_size, channels=view.channels)  # noqa: E731
        t0 = time.perf_counter()
        try:
            x = C.generate(
                view,
                values,
                self.cache,
                device=self.device,
                max_samples=self.cfg.max_samples,
                report=report,
                read_image=read,
            )
        except (GenzooError, ValueError) as e:  # the user's input: said on one line
            raise gr.Error(_one_line(e), **_kw(gr.Error.__init__, print_exception=False)) from None
        except Exception as e:  # a bug, but the page says so and the server keeps serving
            traceback.print_exc(file=sys.stderr)
            raise gr.Error(
                f"unexpected {type(e).__name__}: {_one_line(e)[:300]} (the server log has the traceback)"
            ) from None
        dt = time.perf_counter() - t0
        x = x.float().cpu()
        seed = int(float(values.get("seed") or 0))
        grid = save_grid(x, self.out_dir / f"{_slug(view.name)}-seed{seed}-{os.getpid()}-{int(t0 * 1e3) % 10**9}.png")
        arrays = to_uint8(x).numpy()
        factor = max(1, -(-self.cfg.display_size // max(arrays.shape[1], 1)))
        if factor > 1:
            arrays = arrays.repeat(factor, axis=1).repeat(factor, axis=2)
        if arrays.shape[-1] == 1:
            arrays = arrays[..., 0]
        swaps = C.swaps_of(view, values)
        settings = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in swaps.items()) or "the run's own settings"
        gallery = [(a, f"seed {seed} #{i}") for i, a in enumerate(arrays)]
        status = f"{len(x)} image(s) in {dt:.2f}s with {settings} (seed {seed})"
        return gallery, gr.DownloadButton(value=str(grid), visible=True), status

    # ------------------------------------------------------------------ the run's files
    def _info_tab(self, view: C.RunView) -> None:
        summary, plot, table, board, grid = self._info(view)
        outputs = [
            gr.Markdown(summary),
            gr.LinePlot(plot, x="step", y="loss", color="stage", title="training loss", height=300),
            gr.Dataframe(table, label="evaluations (genzoo eval)", interactive=False),
            gr.Markdown(board),
            gr.Image(
                grid, label="latest training sample grid", interactive=False, format="png", visible=grid is not None
            ),
        ]
        refresh = gr.Button("Reload the run's files")

        def reload() -> list[Any]:
            *rest, image = self._info(view)
            return [*rest, gr.Image(value=image, visible=image is not None)]

        refresh.click(reload, outputs=outputs, api_name=self.api_name(view, "run_files"))

    def _info(self, view: C.RunView) -> list[Any]:
        import pandas as pd
        from PIL import Image

        from genzoo import runs

        run_dir = view.run_dir
        losses = C.loss_rows(run_dir)
        evals = C.evaluation_rows(run_dir)
        board = C.leaderboard(run_dir)
        grid = runs.latest_grid(run_dir) if run_dir is not None else None
        comps = ", ".join(
            f"{role}: `{(s or {}).get('type')}`" for role, s in (view.recipe.get("components") or {}).items() if s
        )
        summary = (
            f"**run** `{run_dir or view.path}` · **recipe** `{view.recipe.get('name', '?')}` · "
            f"**step** {view.meta.get('step')} · **data** `{(view.recipe.get('data') or {}).get('type')}`\n\n"
            f"components: {comps}\n\n"
            + ("" if losses else "No training log (`metrics.jsonl`) in this run.\n\n")
            + ("" if evals else "No recorded evaluations yet: `genzoo eval RUN` records one.\n\n")
        )
        plot = pd.DataFrame(losses or [], columns=["step", "loss", "stage"])
        table = pd.DataFrame(evals) if evals else pd.DataFrame({"evaluations": ["none recorded"]})
        board_md = (
            (f"### Leaderboard ({board})\n\n" + board.read_text())
            if board
            else "No `genzoo compare` leaderboard.md beside this run."
        )
        image = None
        if grid is not None:
            with Image.open(grid) as im:
                image = im.convert("RGB")
        return [summary, plot, table, board_md, image]


def make_app(cfg: GradioAppConfig, ctx) -> GradioApp:
    """The Gradio app: one page per run, its inputs from the run's conditioning, its controls from the registry."""
    return GradioApp(cfg, ctx)
