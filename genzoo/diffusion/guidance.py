"""Guidance for diffusion samplers: every guidance works with every sampler through three methods.

A sampler calls ``model_output`` (how the denoiser is evaluated), then the process's
``p_mean_variance``, then ``condition_mean`` (ancestral samplers) or ``condition_eps`` (DDIM,
DPM-Solver++). The base class is "no guidance"; a guidance overrides what it changes.
Timesteps ``t`` are indices of the (possibly respaced) process; ``diffusion.model_t(t)`` gives the
original index a network was trained with.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion, Model, Prediction
from genzoo.interfaces import Condition, Guidance, SamplerKind
from genzoo.tokens import batch_with_null


class DiffusionGuidance(Guidance):
    """No guidance: the model's own prediction."""

    kind = SamplerKind.DIFFUSION

    def model_output(self, model: Model, x_t: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        return model(x_t, t, cond)

    def condition_mean(self, diffusion: GaussianDiffusion, pred: Prediction, x_t: Tensor, t: Tensor, cond: Condition | None) -> Prediction:
        return pred

    def condition_eps(self, diffusion: GaussianDiffusion, pred: Prediction, x_t: Tensor, t: Tensor, cond: Condition | None) -> Prediction:
        return pred


class GradientGuidance(DiffusionGuidance):
    """Guidance by the gradient of a log-density of the noised input (classifier, CLIP guidance)."""

    scale: float

    @abstractmethod
    def grad_log_p(self, x_t: Tensor, t_model: Tensor, cond: Condition | None) -> Tensor:
        """grad_x log p(c | x_t) at the ORIGINAL timestep index ``t_model``."""

    def condition_mean(self, diffusion, pred, x_t, t, cond):
        """mu' = mu + s Sigma grad (Dhariwal & Nichol 2021, Alg. 1)."""
        g = self.grad_log_p(x_t, diffusion.model_t(t), cond)
        return replace(pred, mean=pred.mean + self.scale * pred.variance * g)

    def condition_eps(self, diffusion, pred, x_t, t, cond):
        """eps' = eps - sqrt(1 - abar_t) s grad, then x0 and the mean from eps' (Alg. 2)."""
        g = self.grad_log_p(x_t, diffusion.model_t(t), cond)
        eps = pred.pred_eps - diffusion.extract("sqrt_one_minus_abar", t, x_t) * self.scale * g
        return diffusion.with_eps(pred, x_t, t, eps)


class ClassifierGuidanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(1.0, description="gradient scale s; 0 is no guidance")
    classifier: dict[str, Any] = Field(
        default_factory=lambda: {"type": "noisy-classifier"},
        description="the noisy classifier network p(y | x_t, t)", json_schema_extra={"kind": "network"},
    )


class ClassifierGuidance(nn.Module, GradientGuidance):
    """Classifier guidance with a classifier trained on noised inputs (Dhariwal & Nichol 2021, Sec. 4)."""

    def __init__(self, classifier: nn.Module, *, scale: float) -> None:
        super().__init__()
        self.classifier, self.scale = classifier, scale
        self.needs_condition = frozenset({"y"})

    def grad_log_p(self, x_t: Tensor, t_model: Tensor, cond: Condition | None) -> Tensor:
        if not cond or "y" not in cond:
            raise ValueError("classifier guidance needs a class: pass condition {'y': ...} (CLI: --class K)")
        with torch.enable_grad():  # samplers run under no_grad
            x = x_t.detach().requires_grad_(True)
            logp = F.log_softmax(self.classifier(x, t_model).float(), dim=-1)
            # summing over the batch gives each sample its own gradient: samples are independent
            selected = logp.gather(1, cond["y"].view(-1, 1)).sum()
            return torch.autograd.grad(selected, x)[0].to(x_t.dtype)

    def training_losses(self, x0: Tensor, cond: Condition | None, diffusion: GaussianDiffusion) -> dict[str, Tensor]:
        """Cross-entropy on x_t ~ q(x_t | x0) at t uniform over the decoder's own schedule."""
        if not cond or "y" not in cond:
            raise ValueError("training the noisy classifier needs labels: set the pipeline's condition to 'class'")
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        logits = self.classifier(diffusion.q_sample(x0, t), diffusion.model_t(t))
        loss = F.cross_entropy(logits, cond["y"])
        return {"loss": loss, "accuracy": (logits.argmax(-1) == cond["y"]).float().mean()}


def make_classifier_guidance(cfg: ClassifierGuidanceConfig, ctx) -> ClassifierGuidance:
    net = ctx.registry.build("network", dict(cfg.classifier), data=ctx.data, where="guidance 'classifier': classifier: ")
    return ClassifierGuidance(net, scale=cfg.scale)


class CFGConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(3.0, description="s in eps_u + s (eps_c - eps_u); 1 is the conditional model, no guidance (GLIDE)")


class ClassifierFreeGuidance(DiffusionGuidance):
    """eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2021), both passes in one batched forward.

    The null pass marks ``cond["drop"]``; the denoiser swaps in its learned null condition. With a
    learned variance only the mean channels are mixed; the variance comes from the conditional pass.
    """

    def __init__(self, cfg: CFGConfig) -> None:
        self.scale = cfg.scale

    def model_output(self, model, x_t, t, cond):
        if not cond:
            return model(x_t, t, cond)
        n = x_t.shape[0]
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), batch_with_null(cond, n))
        c, u = both[:n], both[n:]
        k = x_t.shape[1]
        mixed = u[:, :k] + self.scale * (c[:, :k] - u[:, :k])
        return torch.cat([mixed, c[:, k:]], dim=1) if c.shape[1] > k else mixed


GUIDANCES = {
    "classifier": (ClassifierGuidanceConfig, make_classifier_guidance),
    "cfg": (CFGConfig, ClassifierFreeGuidance),
}
