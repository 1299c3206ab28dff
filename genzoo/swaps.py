"""The swap flags (``--sampler ddim --steps 50``), declared once: the CLI's options, the keywords of
:func:`genzoo.recipes.apply_overrides` and what each does to a recipe all come from :data:`SWAPS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genzoo.errors import RecipeError

STAGES = ("", "prior_", "upsampler_", "upsampler2_")  # the decoder's own, then a cascade's (DALL·E 2, GLIDE)


@dataclass(frozen=True)
class Swap:
    """``--{key}`` replaces the component in ``role`` (``field == "type"``) or sets its ``field``;
    ``role`` None sets ``field`` on every token sampler of the recipe."""

    key: str
    role: str | None
    field: str
    type: type
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def _stage(stage: str) -> tuple[Swap, ...]:
    of = f" of the {stage}stage" if stage else ""
    return (
        Swap(f"{stage}sampler", f"{stage}sampler", "type", str, f"swap the sampler{of}, e.g. ddim"),
        Swap(f"{stage}steps", f"{stage}sampler", "steps", int, f"sampler steps{of}"),
        Swap(f"{stage}guidance", f"{stage}guidance", "type", str, f"swap the guidance{of}, e.g. cfg, classifier, none"),
        Swap(f"{stage}scale", f"{stage}guidance", "scale", float, f"guidance scale{of}"),
    )


SWAPS: tuple[Swap, ...] = (
    Swap("prior", "prior", "type", str, "swap the prior, e.g. gmm, fitted-gaussian, uniform-tokens"),
    *(s for stage in STAGES for s in _stage(stage)),
    Swap("temperature", None, "temperature", float, "token sampler temperature"),
    Swap("top_k", None, "top_k", int, "token sampler top-k"),
    Swap("top_p", None, "top_p", float, "token sampler top-p (nucleus)"),
)
BY_KEY = {s.key: s for s in SWAPS}


def apply_swaps(name: str, components: dict[str, Any], swaps: dict[str, Any]) -> None:
    """Apply ``swaps`` (key -> value, None ignored) to a recipe's ``components`` in place: replacements first,
    then fields, so ``--sampler ddim --steps 50`` sets the new sampler's steps."""
    unknown = sorted(set(swaps) - set(BY_KEY))
    if unknown:
        raise TypeError(f"unknown swaps {unknown}; known: {sorted(BY_KEY)}")
    given = [(BY_KEY[k], v) for k, v in swaps.items() if v is not None]
    for s, value in sorted(given, key=lambda sv: sv[0].field != "type"):
        if s.field == "type":
            current = components.get(s.role)
            # the same type keeps the recipe's own spec (its trained fields); none drops the component
            components[s.role] = (
                None
                if value in ("none", "null")
                else current
                if current and current.get("type") == value
                else {"type": value}
            )
        elif s.role is None:
            roles = [r for r, c in components.items() if c and c.get("type") == "token"]
            if not roles:
                raise RecipeError(f"recipe '{name}' has no token sampler to take {s.flag}")
            for r in roles:
                components[r][s.field] = value
        else:
            if not components.get(s.role):
                raise RecipeError(f"recipe '{name}' has no {s.role} to take {s.flag}; add {BY_KEY[s.role].flag} NAME")
            components[s.role][s.field] = value
