"""Built-in plugin: the web page behind `genzoo serve` (docs/ui.md), a Gradio app registered as the ``app``
component ``gradio``.

Needs the optional extra: ``pip install 'genzoo[ui]'`` (gradio and gradio_client). Without it the hook raises
ImportError, which ``genzoo plugins`` reports, every other plugin loads, and `genzoo serve` says which extra to
install. gradio itself is imported only when the app is built (importing it costs seconds).
"""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl, require_extra

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    require_extra("ui", "gradio", "ui")
    from . import config

    registry.register_module(config)
