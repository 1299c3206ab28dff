"""Built-in plugin: Weights & Biases runs as a genzoo ``logger`` (``genzoo train --log wandb``; docs/training.md,
"Training curves"). Offline by default: the run is written under the run directory and nothing leaves the machine
until ``wandb sync``.

Needs the optional extra: ``pip install 'genzoo[wandb]'``. Without it the hook raises ImportError, which
``genzoo plugins`` reports, every other plugin loads, and ``--log wandb`` says which extra to install. wandb itself
is imported only when a run starts logging.
"""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl, require_extra

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    require_extra("wandb", "wandb", "wandb")
    from . import logger

    registry.register_module(logger)
