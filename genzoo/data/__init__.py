"""Bundled datasets (no download) and the text tokenizer; see docs/data.md."""

from genzoo.data.base import DataSource, DataSpec, TensorImageDataset, data_source, dataset

__all__ = ["DataSource", "DataSpec", "TensorImageDataset", "data_source", "dataset"]
