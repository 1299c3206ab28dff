"""The ``gradio`` app's settings (no gradio import: registering the app must stay cheap)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from genzoo.registry import component


class GradioAppConfig(BaseModel):
    """A web page (Gradio) for trained runs: generate with any sampler, read their curves and evaluations."""

    model_config = ConfigDict(extra="forbid")
    runs: list[str] = Field(..., min_length=1, description="run or checkpoint directories to serve")
    host: str = Field("127.0.0.1", description="the address to bind; 127.0.0.1 serves this machine only")
    port: int | None = Field(None, ge=1, le=65535, description="the port; None: the first free one from 7860")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    max_samples: int = Field(16, ge=1, le=256, description="the most images one request may ask for")
    display_size: int = Field(
        128,
        ge=8,
        description="gallery images are enlarged (nearest) by a whole factor to at "
        "least this many pixels; the downloaded grid keeps the model's size",
    )
    cache_size: int = Field(4, ge=1, description="loaded models kept, per (run, swaps)")
    title: str = Field("genzoo", description="the page title")


@component("app", "gradio", config=GradioAppConfig)
def build_app(cfg: GradioAppConfig, ctx):
    """A web page (Gradio) for trained runs: generate with any registered sampler and guidance, read their curves."""
    from .app import make_app  # gradio's import costs seconds: only when the app is built

    return make_app(cfg, ctx)
