"""Built-in plugin: TensorBoard event files as a genzoo ``logger`` (``genzoo train --log tensorboard``;
docs/training.md, "Training curves").

Needs the optional extra: ``pip install 'genzoo[tensorboard]'``. Without it the hook raises ImportError, which
``genzoo plugins`` reports, every other plugin loads, and ``--log tensorboard`` says which extra to install.
TensorBoard itself is imported only when a run starts logging.
"""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl, require_extra

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    require_extra("tensorboard", "tensorboard", "tensorboard")
    from . import logger

    registry.register_module(logger)
