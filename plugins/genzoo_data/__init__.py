"""Built-in plugin: the bundled datasets (shapes, digits, imagefolder) and the BPE tokenizer."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


class DataSource:
    """A dataset config bound to its factory: ``.spec`` and ``.split(name)``, each split built once."""

    def __init__(self, cfg: BaseModel, make: Callable[[BaseModel, str], Any]) -> None:
        self.cfg = cfg
        self._make = make
        self._splits: dict[str, Any] = {}

    def split(self, name: str) -> Any:
        if name not in self._splits:
            self._splits[name] = self._make(self.cfg, name)
        return self._splits[name]

    @property
    def spec(self) -> Any:
        return self.split("train").spec


@hookimpl
def register_components(registry) -> None:
    from genzoo.data import DATASETS
    from genzoo.data.tokenizer import BPETokenizer, BPETokenizerConfig

    for name, (config, make) in DATASETS.items():
        registry.register("dataset", name, config=config, factory=lambda cfg, make=make: DataSource(cfg, make),
                          summary=(make.__doc__ or config.__doc__ or "").strip().split("\n")[0])
    registry.register("tokenizer", "bpe", config=BPETokenizerConfig, factory=BPETokenizer)
