"""Exponential moving average of the weights (Polyak averaging), the weights genzoo samples with."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """shadow <- d shadow + (1 - d) w with d = min(decay, (1 + n) / (10 + n)) after n updates."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {k: p.detach().clone() for k, p in model.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        names, params = zip(*model.named_parameters())
        torch._foreach_lerp_([self.shadow[k] for k in names], [p.detach() for p in params], 1 - d)  # one fused kernel
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages (a frozen stage-1 tokenizer = the saved one)."""
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k])

    def weights_for(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's full state dict with the averaged parameters in place of the raw ones."""
        # by identity, not name: a tied weight (GPT's lm_head = wte) has two state-dict keys but one parameter name
        name = {id(p): k for k, p in model.named_parameters()}
        return {
            k: self.shadow[name[id(v)]] if id(v) in name else v.detach()
            for k, v in model.state_dict(keep_vars=True).items()
        }
