"""Built-in plugin: the evaluation metrics (FD, KID, precision/recall, density/coverage, accuracy, NLL, speed, ...)."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo.eval import evaluate

    registry.register("metric", "fd", config=evaluate.NoConfig, factory=evaluate.metric_fd)
    registry.register("metric", "kid", config=evaluate.KIDConfig, factory=evaluate.metric_kid)
    registry.register("metric", "precision-recall", config=evaluate.KNNConfig, factory=evaluate.metric_precision_recall)
    registry.register("metric", "density-coverage", config=evaluate.KNNConfig, factory=evaluate.metric_density_coverage)
    registry.register("metric", "class-coverage", config=evaluate.NoConfig, factory=evaluate.metric_class_coverage)
    registry.register(
        "metric", "attribute-accuracy", config=evaluate.NoConfig, factory=evaluate.metric_attribute_accuracy
    )
    registry.register("metric", "nll", config=evaluate.NLLConfig, factory=evaluate.metric_nll)
    registry.register("metric", "reconstruction", config=evaluate.NoConfig, factory=evaluate.metric_reconstruction)
    registry.register("metric", "codebook", config=evaluate.NoConfig, factory=evaluate.metric_codebook)
    registry.register("metric", "throughput", config=evaluate.NoConfig, factory=evaluate.metric_throughput)
    registry.register("metric", "zero-shot", config=evaluate.NoConfig, factory=evaluate.metric_zero_shot)
    registry.register("metric", "upsampler", config=evaluate.NoConfig, factory=evaluate.metric_upsampler)
    registry.register("metric", "embedding-prior", config=evaluate.PairsConfig, factory=evaluate.metric_embedding_prior)
    registry.register("metric", "variations", config=evaluate.PairsConfig, factory=evaluate.metric_variations)
    registry.register("metric", "inception", config=evaluate.NoConfig, factory=evaluate.metric_torch_fidelity)
    registry.register("metric", "clip-score", config=evaluate.ClipScoreConfig, factory=evaluate.metric_clip_score)
