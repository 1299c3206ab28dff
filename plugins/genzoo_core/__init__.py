"""Built-in plugin: the shared pieces every family composes (Gaussian prior, networks, token sampling)."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo import nn as gnn
    from genzoo.priors import GaussianPriorConfig, make_gaussian_prior
    from genzoo.tokens import LogitCFG, LogitCFGConfig, TokenSampler, TokenSamplerConfig

    registry.register("prior", "gaussian", config=GaussianPriorConfig, factory=make_gaussian_prior)
    registry.register("sampler", "token", config=TokenSamplerConfig, factory=TokenSampler)
    registry.register("guidance", "logit-cfg", config=LogitCFGConfig, factory=LogitCFG)
    for name, (config, factory) in gnn.NETWORKS.items():
        registry.register("network", name, config=config, factory=factory)
