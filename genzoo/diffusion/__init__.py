"""Shared Gaussian diffusion: schedules, the process and its losses, samplers, guidance (docs/diffusion.md)."""

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, Prediction
from genzoo.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance, DiffusionGuidance, GradientGuidance
from genzoo.diffusion.samplers import AncestralSampler, DDIMSampler, DiffusionSampler, DPMSolverPlusPlus2M
from genzoo.diffusion.schedules import get_named_beta_schedule, solver_grid, space_timesteps
from genzoo.diffusion.solvers import DPMSolverPlusPlus3M, DPMSolverPlusPlus3MSDE, EDMHeun, UniPC

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "Prediction",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "DiffusionGuidance",
    "GradientGuidance",
    "AncestralSampler",
    "DDIMSampler",
    "DiffusionSampler",
    "DPMSolverPlusPlus2M",
    "DPMSolverPlusPlus3M",
    "DPMSolverPlusPlus3MSDE",
    "EDMHeun",
    "UniPC",
    "get_named_beta_schedule",
    "solver_grid",
    "space_timesteps",
]
