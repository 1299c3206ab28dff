"""Built-in plugin: the evaluation metrics (FD, KID, precision/recall, density/coverage, accuracy, NLL, speed, ...)."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo.eval import evaluate

    registry.register_module(evaluate)
