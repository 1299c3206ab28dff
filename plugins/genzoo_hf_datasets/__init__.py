"""Built-in plugin: Hugging Face datasets as a genzoo dataset (`hf-dataset`), behind the optional extra
``pip install 'genzoo[hf]'`` (the ``datasets`` package). Without it the hook raises ImportError, which
``genzoo plugins`` reports, and every other plugin loads."""

from genzoo.plugins import hookimpl, require_extra


@hookimpl
def register_components(registry) -> None:
    require_extra("hf-datasets", "datasets", "hf")
    from . import hf

    registry.register_module(hf)
