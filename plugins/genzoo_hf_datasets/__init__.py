"""Built-in plugin: Hugging Face datasets as a genzoo dataset (`hf-dataset`), behind the optional extra
``pip install 'genzoo[hf]'`` (the ``datasets`` package). Without it the hook raises ImportError, which
``genzoo plugins`` reports, and every other plugin loads."""

import importlib.util

from genzoo.data import data_source
from genzoo.plugins import hookimpl


@hookimpl
def register_components(registry) -> None:
    if importlib.util.find_spec("datasets") is None:
        raise ImportError("the hf-datasets plugin needs the datasets package: pip install 'genzoo[hf]'")
    from . import hf

    registry.register("dataset", "hf-dataset", config=hf.HFDatasetConfig, factory=data_source(hf.make_hf_dataset))
