"""The Python API behind the command line; ``genzoo.create_model`` and friends are these functions.

Discover: :func:`list_components` (the registry, by kind), :func:`list_recipes`, :func:`resolve_recipe`
(a recipe after swaps and ``--set``s, every default filled). Build: :func:`create_model` (an untrained
pipeline from a recipe name or a resolved recipe), :func:`build_data` (its dataset). Load:
:func:`load_model` (a run or checkpoint directory, with swaps), :func:`init_from` (start a new model from a
run's matching weights), :func:`import_model` (a foreign model through a registered importer, e.g. a
diffusers pipeline; an importer saves it with :func:`save_imported_run`). Run: :func:`for_inference`,
:func:`compile_denoisers`. Training is :class:`genzoo.training.Trainer`; evaluation :mod:`genzoo.eval`.

>>> import genzoo
>>> genzoo.list_recipes()                       # doctest: +SKIP
>>> model = genzoo.create_model("ddpm-shapes")  # doctest: +SKIP
>>> model = genzoo.load_model("runs/ddpm")      # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from genzoo.checkpoint import Checkpoint, has_checkpoint, load_checkpoint, load_state_into
from genzoo.errors import GenzooError
from genzoo.interfaces import Pipeline
from genzoo.nn import CONV_MEMORY_FORMAT, MLPDenoiser, UNet
from genzoo.plugins import default_registry, plugin_infos
from genzoo.recipes import Recipe, apply_overrides, build_pipeline, get_recipe, load_recipes, refresh, resolve
from genzoo.registry import Entry, Registry


def list_components(kind: str | None = None, *, registry: Registry | None = None) -> list[Entry]:
    """Every registered component (of one kind), with the plugin that provided it."""
    return list((registry or default_registry()).entries(kind))


def recipes(
    files: Iterable[str | Path] = (),
    *,
    refused: list[tuple[str, str]] | None = None,
    sources: dict[str, str] | None = None,
) -> dict[str, Recipe]:
    """All recipes: ``registry.yaml``, those shipped by plugins, then the user's files.

    A plugin's recipe whose name is taken is left out; ``refused`` collects (plugin, why) (``genzoo plugins`` shows it);
    ``sources`` each recipe's plugin or file name.
    """
    plugin_files = [(info.name, f) for info in plugin_infos() for f in info.recipes]
    return load_recipes(files, plugin_files=plugin_files, refused=refused, sources=sources)


def list_recipes(files: Iterable[str | Path] = ()) -> list[str]:
    return sorted(recipes(files))


def resolve_recipe(
    name: str,
    *,
    files: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    registry: Registry | None = None,
    **swaps: Any,
) -> dict[str, Any]:
    """The fully resolved composition of a recipe after swaps (``sampler=``, ``steps=``, ...) and ``--set``s."""
    registry = registry or default_registry()
    recipe = apply_overrides(name, get_recipe(recipes(files), name), sets, **swaps)
    return resolve(name, recipe, registry)


def build_data(resolved: Mapping[str, Any], *, registry: Registry | None = None) -> Any:
    """The dataset source of a resolved recipe (``.spec``, ``.split(name)``)."""
    registry = registry or default_registry()
    return registry.build(
        "dataset", copy.deepcopy(resolved["data"]), where=f"recipe '{resolved.get('name', '?')}': data: "
    )


def data_spec_dict(spec: Any) -> dict[str, Any]:
    return asdict(spec) if is_dataclass(spec) else dict(spec)


def for_inference(pipeline: Pipeline, device: str | torch.device = "cpu") -> Pipeline:
    """``pipeline`` on ``device`` in eval mode with the inference memory format (what `load_model` returns)."""
    return pipeline.to(device, memory_format=CONV_MEMORY_FORMAT).eval()


def compile_denoisers(pipeline: Pipeline) -> list[str]:
    """``torch.compile`` in place every fixed-shape denoiser network of ``pipeline`` (U-Nets, MLP denoisers):
    the modules a diffusion sampler calls once per step. Token models are left alone (their sequence length
    grows each step, which would recompile). Returns the names compiled; the first call compiles."""
    names = [name for name, m in pipeline.named_modules() if isinstance(m, (UNet, MLPDenoiser))]
    for name in names:
        pipeline.get_submodule(name).compile()
    return names


def create_model(
    recipe: str | Mapping[str, Any],
    *,
    data_spec: Any = None,
    registry: Registry | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> Pipeline:
    """An untrained pipeline from a recipe name (``create_model("ddpm-shapes")``, as ``open_clip.create_model``)
    or a resolved recipe, for data described by ``data_spec`` (default: the recipe's dataset).

    The initial weights are drawn from ``seed`` (default: the recipe's ``train.seed``), not from the process's random
    state, so the same recipe builds the same weights; the caller's RNG is left as it was.
    """
    registry = registry or default_registry()
    resolved = resolve_recipe(recipe, registry=registry) if isinstance(recipe, str) else recipe
    if data_spec is None:
        data_spec = build_data(resolved, registry=registry).spec
    if seed is None:
        seed = (resolved.get("train") or {}).get("seed", 0)
    with torch.random.fork_rng(devices=[]):  # built on the CPU; moved to ``device`` afterwards
        torch.manual_seed(seed)
        pipeline = build_pipeline(resolved, registry, data_spec)
    return pipeline.to(device)


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    sets: Iterable[str] = (),
    registry: Registry | None = None,
    **swaps: Any,
) -> Pipeline:
    """Rebuild a trained pipeline from a checkpoint directory; no code or pickle is loaded.

    Swaps (``sampler=``, ``steps=``, ``guidance=``, ``scale=``) and ``sets`` may change the parts
    that hold no weights; changing an architecture makes the weights fail to load, with an error.
    """
    registry = registry or default_registry()
    ckpt = load_checkpoint(path)
    resolved = ckpt.recipe
    if swaps or sets:
        name = resolved.get("name", "checkpoint")
        body = {k: v for k, v in resolved.items() if k not in ("name",)}
        recipe = apply_overrides(
            name, Recipe.model_validate(body), sets, **{k: v for k, v in swaps.items() if v is not None}
        )
        resolved = resolve(name, recipe, registry)
    data_spec = _data_spec_from(ckpt)
    pipeline = build_pipeline(_own_weights_only(resolved), registry, data_spec)
    types = lambda r: {role: (s or {}).get("type") for role, s in r.get("components", {}).items()}  # noqa: E731
    before, after = types(ckpt.recipe), types(resolved)
    swapped = {role for role in before if after.get(role) != before[role]}
    load_weights(pipeline, ckpt, allow_unused=any(v is not None for v in swaps.values()) or bool(sets), swapped=swapped)
    _refit_swapped(pipeline, swapped if (swaps or sets) else set(), ckpt, registry)
    pipeline.checkpoint_meta = ckpt.meta
    return for_inference(pipeline, device)


def _own_weights_only(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe with every component's external ``weights`` path cleared: a checkpoint holds all its weights,
    so loading it must not depend on the run it was initialised from still being there."""
    out = copy.deepcopy(dict(resolved))
    for spec in out.get("components", {}).values():
        if isinstance(spec, dict) and spec.get("weights") is not None:
            spec["weights"] = None
    return out


def check_init_except(resolved: Mapping[str, Any], exclude: Collection[str]) -> None:
    """``exclude`` (``--init-except``) names only components of the recipe ``resolved``."""
    unknown = sorted(set(exclude) - set(resolved["components"]))
    if unknown:
        raise GenzooError(
            f"--init-except {', '.join(unknown)}: this recipe has no such component; its components are "
            f"{', '.join(sorted(resolved['components']))}"
        )


def init_from(
    pipeline: Pipeline,
    resolved: Mapping[str, Any],
    path: str | Path,
    *,
    registry: Registry | None = None,
    exclude: Collection[str] = (),
) -> list[str]:
    """Load into ``pipeline`` the weights of every component whose resolved spec equals the one in the
    checkpoint at ``path`` (the same type and fields, so the same architecture); returns those roles.
    Roles in ``exclude`` keep their fresh initialisation (``--init-except``).

    Fine-tuning starts from a trained run this way, and a recipe that differs in one component (the
    AR prior in place of the diffusion prior) trains only that one with the others' stages set to 0.
    """
    check_init_except(resolved, exclude)
    children = dict(pipeline.named_children())
    ckpt = load_checkpoint(path)
    theirs = refresh(ckpt.recipe, registry or default_registry())[
        "components"
    ]  # fields added since it was saved: defaults
    roles = [
        r
        for r in ckpt.components
        if r in children and r not in exclude and theirs.get(r) == resolved["components"].get(r)
    ]
    for role in roles:
        load_state_into(children[role], ckpt.components[role], role=role, where=ckpt.path)
    return roles


def _refit_swapped(pipeline: Pipeline, swapped: set[str], ckpt: Checkpoint, registry: Registry) -> None:
    """A swapped-in component fitted after training (an AE's ``gmm`` prior) is fitted now, on the
    training split the checkpoint was trained on (rebuilt from its recipe: bundled data only)."""
    unfitted = [
        r
        for r in swapped
        if getattr(pipeline.components.get(r), "fitted", None) is not None and not bool(pipeline.components[r].fitted)
    ]
    if not unfitted:
        return
    train = build_data(ckpt.recipe, registry=registry).split("train")
    if train.fingerprint() != ckpt.meta.get("data_fingerprint", train.fingerprint()):
        raise GenzooError(
            f"{ckpt.path}: the swapped-in {unfitted} must be fitted on the training data, which no longer "
            "matches the checkpoint's (its fingerprint differs)"
        )
    pipeline.fit_after_training(train.tensors())


def load_weights(
    pipeline: Pipeline, ckpt: Checkpoint, *, allow_unused: bool = False, swapped: set[str] = frozenset()
) -> None:
    """Load every component's weights; a component with weights the checkpoint lacks is an error.

    ``allow_unused`` lets a swap drop a trained component (e.g. sample without the classifier) or
    replace it by another type (``swapped`` roles: a VQ-VAE's GPT prior by the uniform one).
    """
    children = dict(pipeline.named_children())
    for role, state in ckpt.components.items():
        if role not in children or (allow_unused and role in swapped):
            if allow_unused:
                continue
            raise GenzooError(
                f"{ckpt.path}: the checkpoint has weights for '{role}' but the model has no such component"
            )
        load_state_into(children[role], state, role=role, where=ckpt.path)
    for role, child in children.items():
        if role not in ckpt.components and any(True for _ in child.parameters()):
            raise GenzooError(
                f"{ckpt.path} has no weights for {role} '{getattr(child, 'genzoo_spec', {}).get('type', role)}', which "
                f"needs training; train a recipe that includes it, or swap it for one without weights"
            )


def _data_spec_from(ckpt: Checkpoint) -> Any:
    from genzoo.data.base import DataSpec

    raw = ckpt.meta.get("data_spec")
    if raw is None:
        raise GenzooError(f"{ckpt.path}/meta.json has no data_spec; it was not written by `genzoo train`")
    return DataSpec.from_dict(raw)


def import_model(
    source: str | Path,
    out: str | Path,
    *,
    format: str | None = None,
    adapter: bool = False,
    data: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
) -> Path:
    """Turn a foreign checkpoint or pipeline (a folder or a hub id) into the genzoo run directory ``out``.

    The importer is the registered ``importer`` named ``format`` (``genzoo list --kind importer``), or the one whose
    ``detect(source)`` accepts it (several: an error asking for ``format``). ``adapter`` keeps the foreign network
    behind an adapter even where it maps onto genzoo's own; ``data`` is the dataset spec the model is evaluated
    against (default: the importer's choice);
    ``options`` are fields of the importer's config (docs/interop.md), e.g. OpenAI's ``classifier``.
    Returns the checkpoint folder written (``load_model(out)`` rebuilds it).
    """
    registry = registry or default_registry()
    names = registry.names("importer")
    if not names:
        raise GenzooError("no importer is installed; install the diffusers one with pip install 'genzoo[diffusers]'")
    if format is None:
        found = [n for n in names if registry.build("importer", {"type": n}).detect(str(source))]
        if not found:
            raise GenzooError(f"no importer recognises {source}; pass --format with one of: {', '.join(names)}")
        if len(found) > 1:  # guessing would import the same file two ways depending on plugin order
            raise GenzooError(
                f"{source} is recognised by several importers ({', '.join(found)}); pick one with --format"
            )
        (format,) = found
    elif format not in names:
        raise GenzooError(f"unknown import format '{format}'; installed: {', '.join(names)}")
    importer = registry.build("importer", {"type": format, **(options or {})})
    if has_checkpoint(out):  # for every importer: an existing run is never overwritten
        raise GenzooError(f"{out} already holds a genzoo run; import into a new directory")
    return Path(importer.run(str(source), Path(out), adapter=adapter, data=data))


def save_imported_run(
    out: str | Path,
    body: Mapping[str, Any],
    *,
    name: str,
    data_spec: Any,
    states: Iterable[tuple[str, Mapping[str, torch.Tensor]]],
    meta: Mapping[str, Any],
    where: str | Path,
    check: Any = None,
    registry: Registry | None = None,
) -> Path:
    """What an importer ends with: the recipe ``body`` resolved and built for ``data_spec``, ``check(model)`` when
    given, each ``role.attr`` of ``states`` (e.g. ``decoder.denoiser``) loaded from its state dict (errors name
    ``where``), and the model saved as the run ``out`` at step 0 (safetensors; ``meta`` beside the data spec and
    recipe name)."""
    from genzoo.checkpoint import save_checkpoint

    registry = registry or default_registry()
    resolved = resolve(name, Recipe.model_validate(dict(body)), registry)
    model = create_model(resolved, data_spec=data_spec, registry=registry)
    if check is not None:
        check(model)
    for target, state in states:
        role, *attrs = target.split(".")
        module = model.components[role]
        for attr in attrs:
            module = getattr(module, attr)
        load_state_into(module, state, role=target, where=where)
    components = {role: sd for role, child in model.named_children() if (sd := child.state_dict())}
    full = {"data_spec": data_spec.to_dict(), "recipe_name": name, **meta}
    return save_checkpoint(out, step=0, recipe=resolved, components=components, meta=full)


def image_shape(pipeline: Pipeline) -> tuple[int, ...]:
    """(C, H, W) of the images ``pipeline`` draws: the largest its decoder and a cascade's upsamplers produce."""
    shapes = [
        tuple(int(s) for s in d.produces.shape)
        for role, d in pipeline.components.items()
        if d is not None and (role == "decoder" or (role.startswith("upsampler") and role.endswith("_decoder")))
    ]
    return max(shapes, key=lambda s: s[-1])


def edit(
    pipeline: Pipeline,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    mode: str = "inpaint",
    n: int | None = None,
    condition: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    **settings: Any,
) -> Any:
    """Edit ``images`` (1 or n, C, H, W) in [-1, 1], at :func:`image_shape`, with a diffusion model (docs/editing.md).

    ``mode``: ``inpaint`` (``mask`` (1 or n, 1, H, W) is 1 where pixels are generated, 0 where kept: RePaint with
    resampling, or GLIDE's inpainting model), ``sdedit`` (noise to ``strength``, denoise; a mask keeps its 0 region)
    or ``invert`` (DDIM inversion to x_T and the reconstruction). ``settings``: the other fields of
    :class:`genzoo.diffusion.editing.EditConfig` (strength, jump_length, resample, invert_iters, project_final).
    ``condition`` as for ``pipeline.sample`` (a caption, a class). Returns an ``EditResult``: ``images`` (n, C, H, W)
    and, inverting, ``latents`` (x_T of each diffusion stage).
    """
    from genzoo.diffusion.editing import edit as run_edit
    from genzoo.diffusion.editing import edit_config

    cfg = edit_config(mode=mode, **settings)
    known = None if mask is None else 1 - mask.to(images)
    return run_edit(pipeline, images, known, cfg=cfg, n=n, condition=condition, generator=generator)


def invert(
    pipeline: Pipeline,
    images: torch.Tensor,
    *,
    condition: Mapping[str, Any] | None = None,
    invert_iters: int = 0,
    generator: torch.Generator | None = None,
) -> Any:
    """DDIM inversion of ``images`` (eta 0 run backwards to x_T on the recipe sampler's grid; ``invert_iters``
    fixed-point iterations per step) and the reconstruction from x_T: ``result.latents`` holds x_T of each diffusion
    stage, ``result.images`` the reconstruction, so ``result.images - images`` is the round-trip error."""
    return edit(pipeline, images, mode="invert", condition=condition, invert_iters=invert_iters, generator=generator)
