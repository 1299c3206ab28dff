"""Guidance for diffusion samplers: every guidance works with every sampler through four methods.

A sampler calls ``model_output`` (how the denoiser is evaluated), then the process's
``p_mean_variance``, then ``condition_mean`` (ancestral samplers) or ``condition_eps`` (DDIM,
DPM-Solver++, any eps-form sampler), and ``after_step`` on the state each step leaves. The base
class is "no guidance"; a guidance overrides what it changes. ``t`` is an index of the (possibly
respaced) process the sampler runs; the model and ``grad_log_p`` receive the ORIGINAL index
(``diffusion.model_t(t)``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion, Model, Prediction
from genzoo.interfaces import Condition, Guidance, SamplerKind, with_null_condition
from genzoo.registry import component, spec_field


class DiffusionGuidance(Guidance):
    """No guidance: the model's own prediction."""

    kind = SamplerKind.DIFFUSION

    def model_output(self, model: Model, x_t: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        return model(x_t, t, cond)

    def condition_mean(
        self, diffusion: GaussianDiffusion, pred: Prediction, x_t: Tensor, t: Tensor, cond: Condition | None
    ) -> Prediction:
        return pred

    def condition_eps(
        self, diffusion: GaussianDiffusion, pred: Prediction, x_t: Tensor, t: Tensor, cond: Condition | None
    ) -> Prediction:
        return pred

    def after_step(self, diffusion: GaussianDiffusion, x: Tensor, i: int, cond: Condition | None) -> Tensor:
        """The sampler's new state x at grid index ``i`` of ``diffusion`` (the respaced process; -1: x is the
        final x_0), as the guidance constrains it: a projection in pixel space (ILVR's low-pass, an inpainting
        mask's known region). Every sampler calls it after every step."""
        return x


def _autograd_ready(v: Any) -> Any:
    # tensors made under inference_mode cannot enter autograd; a clone made outside it can
    return v.detach().clone() if isinstance(v, Tensor) else v


def grad_wrt(output: Tensor, x: Tensor) -> Tensor:
    """d output / d x for a scalar ``output``. ``backward(inputs=...)`` rather than ``autograd.grad``:
    the same result, and it also runs under torch's FlopCounterMode, whose module hooks refuse
    ``autograd.grad`` (so sampling with guidance can be profiled)."""
    output.backward(inputs=[x])
    return x.grad


class GradientGuidance(DiffusionGuidance):
    """Guidance by the gradient of a log-density of the noised input: classifier and CLIP guidance."""

    scale: float

    @abstractmethod
    def grad_log_p(self, x_t: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        """grad_x log p(c | x_t), ``t`` the ORIGINAL timestep index. Autograd is on, even inside a sampler."""

    def gradient(
        self,
        diffusion: GaussianDiffusion,
        x_t: Tensor,
        t: Tensor,
        cond: Condition | None,
        pred: Prediction | None = None,
    ) -> Tensor:
        """s * grad log p(c | x_t). ``pred`` is the step's unguided prediction, for a guidance defined on x0_hat
        (``pred.pred_xstart``) rather than on x_t."""
        return self.scale * self.grad_log_p_at(x_t, diffusion.model_t(t), cond).to(x_t.dtype)

    def grad_log_p_at(self, x: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        """:meth:`grad_log_p` at (x, t), with autograd enabled inside no_grad and inference_mode alike."""
        with torch.inference_mode(False), torch.enable_grad():
            cond = {k: _autograd_ready(v) for k, v in cond.items()} if cond else cond
            return self.grad_log_p(_autograd_ready(x), _autograd_ready(t), cond)

    def condition_mean(self, diffusion, pred, x_t, t, cond):
        """mu' = mu + s Sigma grad log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 1)."""
        return replace(pred, mean=pred.mean + pred.variance * self.gradient(diffusion, x_t, t, cond, pred))

    def condition_eps(self, diffusion, pred, x_t, t, cond):
        """eps' = eps - sqrt(1 - abar_t) s grad log p(y | x_t); x0_hat and the mean follow (Alg. 2)."""
        g = self.gradient(diffusion, x_t, t, cond, pred)
        eps = pred.pred_eps - diffusion.extract("sqrt_one_minus_abar", t, x_t) * g
        return diffusion.prediction_from_eps(pred, x_t, t, eps)


class ClassifierGuidanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(
        1.0, description="gradient scale s; 0 is no guidance, 1 samples p(x | y) with an exact classifier"
    )
    classifier: dict[str, Any] = spec_field(
        "network",
        {"type": "noisy-classifier"},
        "the noisy classifier network p(y | x_t, t), trained on the decoder's own noised inputs",
    )


class ClassifierGuidance(nn.Module, GradientGuidance):
    """Classifier guidance with a classifier p(y | x_t, t) trained on noised inputs (Dhariwal & Nichol 2021, Sec. 4).

    ``classifier(x_t, t) -> logits``; the class is ``cond["y"]``.
    """

    def __init__(self, classifier: Callable[[Tensor, Tensor], Tensor], *, scale: float) -> None:
        super().__init__()
        self.classifier, self.scale = classifier, scale
        self.needs_condition = frozenset({"y"})

    def grad_log_p(self, x_t: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        if not cond or "y" not in cond:
            raise ValueError("classifier guidance needs a class: pass condition {'y': ...} (CLI: --class K)")
        x = x_t.detach().requires_grad_(True)
        logp = F.log_softmax(self.classifier(x, t).float(), dim=-1)
        # samples are independent, so the gradient of the batch sum is each sample's own gradient
        selected = logp.gather(1, cond["y"].view(-1, 1)).sum()
        return grad_wrt(selected, x)

    def training_losses(self, x0: Tensor, cond: Condition | None, diffusion: GaussianDiffusion) -> dict[str, Tensor]:
        """Cross-entropy on x_t ~ q(x_t | x0), t uniform over the decoder's own schedule."""
        if not cond or "y" not in cond:
            raise ValueError("training the noisy classifier needs labels: set the pipeline's condition to 'class'")
        logits = self.classifier(*noised(x0, diffusion))
        return {"loss": F.cross_entropy(logits, cond["y"]), "accuracy": (logits.argmax(-1) == cond["y"]).float().mean()}


def noised(x0: Tensor, diffusion: GaussianDiffusion) -> tuple[Tensor, Tensor]:
    """(x_t ~ q(x_t | x0), t) at t uniform over the decoder's own schedule: the inputs a guidance model meets."""
    t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
    return diffusion.q_sample(x0, t), diffusion.model_t(t)


@component("guidance", "classifier", config=ClassifierGuidanceConfig)
def make_classifier_guidance(cfg: ClassifierGuidanceConfig, ctx) -> ClassifierGuidance:
    """Classifier guidance: the gradient of a noisy classifier log p(y | x_t) shifts the mean (Dhariwal & Nichol
    2021)."""
    net = ctx.registry.build(
        "network", dict(cfg.classifier), data=ctx.data, where="guidance 'classifier': classifier: "
    )
    return ClassifierGuidance(net, scale=cfg.scale)


def noised_clip_losses(
    clip: Any, x0: Tensor, cond: Condition | None, diffusion: GaussianDiffusion
) -> dict[str, Tensor]:
    """CLIP's contrastive loss on x_t at t uniform over the decoder's schedule when the CLIP is noised
    (GLIDE Sec. 2.4), on x0 otherwise."""
    from genzoo.text.clip import clip_losses

    x_t, t = noised(x0, diffusion) if clip.noised else (x0, None)
    return clip_losses(clip, x_t, cond, t)


class CFGConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(
        3.0,
        description="s in eps_u + s (eps_c - eps_u); 1 is the conditional model, no guidance (GLIDE); 0 the "
        "unconditional",
    )


@component("guidance", "cfg", config=CFGConfig)
class ClassifierFreeGuidance(DiffusionGuidance):
    """eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2021, Eq. 6 with w = s - 1), both passes in one forward.

    The null half is marked by ``cond["drop"]``; the denoiser swaps in its learned null condition,
    as when it was trained with condition dropout. With a learned variance only the first C
    channels are mixed; the variance channels come from the conditional pass (GLIDE).
    """

    def __init__(self, cfg: CFGConfig) -> None:
        self.scale = cfg.scale

    def model_output(self, model: Model, x_t: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        if not cond:
            return model(x_t, t, cond)
        n, c = x_t.shape[0], x_t.shape[1]
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), with_null_condition(cond, n, x_t.device))
        cond_out, uncond_out = both[:n], both[n:]
        mixed = uncond_out[:, :c] + self.scale * (cond_out[:, :c] - uncond_out[:, :c])
        return torch.cat([mixed, cond_out[:, c:]], dim=1)
