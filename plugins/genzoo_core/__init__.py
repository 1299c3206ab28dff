"""Built-in plugin: the shared pieces every family composes (priors, networks, token sampling)."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo import nn as gnn
    from genzoo.priors import PRIORS
    from genzoo.tokens import LogitCFG, LogitCFGConfig, TokenSampler, TokenSamplerConfig

    for name, (config, factory) in PRIORS.items():
        registry.register("prior", name, config=config, factory=factory)
    registry.register("sampler", "token", config=TokenSamplerConfig, factory=TokenSampler)
    registry.register("guidance", "logit-cfg", config=LogitCFGConfig, factory=LogitCFG)
    for name, (config, factory) in gnn.NETWORKS.items():
        registry.register("network", name, config=config, factory=factory)
