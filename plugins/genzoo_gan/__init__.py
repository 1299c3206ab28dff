"""Built-in plugin: DCGAN (Radford et al. 2016), unconditional and class-conditional."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import gan

    registry.register_module(gan)
