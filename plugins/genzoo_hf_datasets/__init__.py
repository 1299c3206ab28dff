"""Built-in plugin: Hugging Face datasets as a genzoo dataset (`hf-dataset`), behind the optional extra
``pip install 'genzoo[hf]'`` (the ``datasets`` package). Without it the hook raises ImportError, which
``genzoo plugins`` reports, and every other plugin loads."""

from genzoo.data import data_source
from genzoo.plugins import hookimpl, require_extra


@hookimpl
def register_components(registry) -> None:
    require_extra("hf-datasets", "datasets", "hf")
    from . import hf

    registry.register("dataset", "hf-dataset", config=hf.HFDatasetConfig, factory=data_source(hf.make_hf_dataset))
