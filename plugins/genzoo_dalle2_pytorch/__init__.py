"""Built-in plugin: DALLE2-pytorch interop (docs/interop.md). Adapters that put lucidrains' DALLE2-pytorch
``DiffusionPriorNetwork`` and ``Unet`` behind genzoo's denoiser interface, its ``DiffusionPrior`` as a genzoo prior, and
the ``dalle2-pytorch`` importer behind `genzoo import` (a prior + decoder checkpoint into genzoo's ``dalle2`` pipeline).

Needs the optional extra: ``pip install 'genzoo[dalle2-pytorch]'``. It pins open-clip-torch < 3, so `make test` keeps it
out of .venv and `make test-interop` installs it in .venv-interop. Without it the hook raises ImportError, which
``genzoo plugins`` reports, and every other plugin loads; it is a ``MissingExtra``, so ``GENZOO_STRICT_PLUGINS=1`` does
not make the extra left out of the default install fatal. dalle2_pytorch itself is imported only when a component is
built or a checkpoint imported.
"""

from __future__ import annotations

import genzoo
from genzoo.errors import MissingExtra
from genzoo.plugins import hookimpl, require_extra

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    require_extra("dalle2-pytorch", "dalle2_pytorch", "dalle2-pytorch", package="dalle2-pytorch", error=MissingExtra)
    from . import adapters, importer

    registry.register_module(adapters, importer)
