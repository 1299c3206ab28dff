"""What the page shows for one run, decided from the run and the registry (no gradio here).

* The conditioning inputs come from the run's recipe and model: the pipeline's ``condition`` (none, class, caption;
  a pipeline without the field is captioned when it has a text encoder and the data has captions), and the image
  modes of a pipeline that decodes CLIP image embeddings (DALL·E 2: ``variations`` and ``interpolate``), as
  `genzoo sample --image/--interpolate` decides.
* The controls are genzoo.swaps.SWAPS that the recipe can take: for each stage with a sampler, the sampler (choices:
  the registry's samplers of that sampler's kind), its steps when the sampler has a ``steps`` field, the guidance
  (choices: ``none`` and the registry's guidances of the same kind) and its scale; temperature, top-k and top-p when
  the recipe has a token sampler. A plugin's new sampler shows up in the dropdown without a change here.
* :func:`generate` applies them through :func:`genzoo.api.load_model` (``run, **swaps``), caching the loaded models
  per (run, swaps), and reports sampling progress by counting each sampler's model evaluations.
"""

from __future__ import annotations

import threading
import typing
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genzoo import runs as run_files
from genzoo.checkpoint import read_json, resolve
from genzoo.errors import GenzooError
from genzoo.interfaces import Sampler, SamplerKind
from genzoo.registry import Entry, Registry
from genzoo.swaps import BY_KEY, STAGES

CONDITION_INPUTS = ("prompt", "class_id", "mode", "image", "image_b", "n", "seed")  # every run's API takes these
MODES = ("sample", "variations", "interpolate")
USERS = {
    "": "decoder",
    "prior_": "prior",
    "upsampler_": "upsampler_decoder",
    "upsampler2_": "upsampler2_decoder",
}  # the component each stage's sampler drives


@dataclass
class Control:
    """One swap the page offers: ``key`` is the swap's keyword (``sampler``, ``prior_steps``, ``temperature``)."""

    key: str
    label: str
    type: str  # "choice", "int" or "float"
    value: Any  # the recipe's own value
    help: str
    choices: list[str] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None


@dataclass
class RunView:
    """A run as the page presents it."""

    path: Path  # what was passed (a run or checkpoint directory)
    name: str  # unique among the served runs
    recipe: dict[str, Any]
    meta: dict[str, Any]
    condition: str  # none, class or caption
    modes: list[str]
    classes: list[tuple[str, int]]
    image_size: int
    channels: int
    controls: list[Control]

    @property
    def run_dir(self) -> Path | None:
        return run_files.run_dir_of(self.path)

    def control(self, key: str) -> Control | None:
        return next((c for c in self.controls if c.key == key), None)

    @property
    def keys(self) -> list[str]:
        """The run's API parameters, in order: the conditioning inputs, then its controls."""
        return [*CONDITION_INPUTS, *(c.key for c in self.controls)]


def component_kind(entry: Entry) -> SamplerKind | None:
    """The :class:`SamplerKind` a registered sampler or guidance declares: its class's ``kind``, or that of the class a
    factory function is annotated to return (``make_classifier_guidance -> ClassifierGuidance``); None if neither."""
    kind = getattr(entry.factory, "kind", None)
    if kind is None:
        try:
            kind = getattr(typing.get_type_hints(entry.factory).get("return"), "kind", None)
        except Exception:  # an annotation that does not resolve: the kind is unknown
            kind = None
    return kind if isinstance(kind, SamplerKind) else None


def names_of_kind(registry: Registry, kind: str, sampler_kind: SamplerKind | None) -> list[str]:
    return [e.name for e in registry.entries(kind) if sampler_kind is not None and component_kind(e) is sampler_kind]


def _find_int(spec: Any, key: str) -> int | None:
    """The first integer ``key`` in a nested spec (a latent-diffusion decoder keeps ``timesteps`` one level down)."""
    if isinstance(spec, dict):
        if isinstance(spec.get(key), int):
            return spec[key]
        for v in spec.values():
            found = _find_int(v, key)
            if found is not None:
                return found
    return None


def controls_for(recipe: dict[str, Any], registry: Registry, *, conditional: bool) -> list[Control]:
    """The swaps ``recipe`` can take, with its own values and the registry's choices."""
    comps = recipe.get("components") or {}
    out: list[Control] = []
    for stage in STAGES:
        spec = comps.get(f"{stage}sampler")
        if not spec:
            continue
        entry = registry.get("sampler", spec["type"])
        kind = component_kind(entry)
        of = f" ({stage[:-1]} stage)" if stage else ""
        choices = names_of_kind(registry, "sampler", kind) or [spec["type"]]
        out.append(
            Control(
                f"{stage}sampler",
                f"sampler{of}",
                "choice",
                spec["type"],
                BY_KEY[f"{stage}sampler"].help,
                choices=choices if spec["type"] in choices else [spec["type"], *choices],
            )
        )
        if "steps" in entry.config.model_fields:
            steps = spec.get("steps")
            timesteps = _find_int(comps.get(USERS[stage]), "timesteps") or 1000
            out.append(
                Control(
                    f"{stage}steps",
                    f"steps{of}",
                    "int",
                    steps if isinstance(steps, int) else None,
                    BY_KEY[f"{stage}steps"].help,
                    minimum=1,
                    maximum=timesteps,
                )
            )
        g_spec = comps.get(f"{stage}guidance")
        if g_spec or (conditional and not stage):  # a guidance the recipe has, or one for the condition's own stage
            g_choices = ["none", *names_of_kind(registry, "guidance", kind)]
            g_type = g_spec["type"] if g_spec else "none"
            out.append(
                Control(
                    f"{stage}guidance",
                    f"guidance{of}",
                    "choice",
                    g_type,
                    BY_KEY[f"{stage}guidance"].help,
                    choices=g_choices if g_type in g_choices else [*g_choices, g_type],
                )
            )
            scale = (g_spec or {}).get("scale")
            out.append(
                Control(
                    f"{stage}scale",
                    f"guidance scale{of}",
                    "float",
                    scale if scale is not None else 3.0,
                    BY_KEY[f"{stage}scale"].help,
                    minimum=0.0,
                    maximum=20.0,
                )
            )
    token = next((s for s in comps.values() if s and s.get("type") == "token"), None)
    if token is not None:
        out.append(
            Control(
                "temperature",
                "temperature",
                "float",
                token.get("temperature", 1.0),
                BY_KEY["temperature"].help,
                minimum=0.05,
                maximum=3.0,
            )
        )
        out.append(Control("top_k", "top-k (0: all)", "int", token.get("top_k") or 0, BY_KEY["top_k"].help, minimum=0))
        out.append(
            Control(
                "top_p",
                "top-p (1: all)",
                "float",
                token.get("top_p") or 1.0,
                BY_KEY["top_p"].help,
                minimum=0.01,
                maximum=1.0,
            )
        )
    return out


def _condition_of(recipe: dict[str, Any], data_spec: dict[str, Any], model: Any) -> str:
    cond = (recipe.get("pipeline") or {}).get("condition")
    if cond in ("none", "class", "caption"):
        return cond
    comps = recipe.get("components") or {}
    return "caption" if comps.get("encoder") and data_spec.get("has_captions") else "none"


def describe_run(path: str | Path, name: str, model: Any, registry: Registry) -> RunView:
    """The page's view of the run at ``path`` whose default model (no swaps) is ``model``."""
    ckpt = resolve(path)
    recipe, meta = read_json(ckpt / "recipe.json"), read_json(ckpt / "meta.json")
    data_spec = meta.get("data_spec") or {}
    condition = _condition_of(recipe, data_spec, model)
    modes = ["sample", *(m for m in ("variations", "interpolate") if callable(getattr(model, m, None)))]
    names = list(data_spec.get("class_names") or [])
    classes = [(f"{i}: {names[i]}" if i < len(names) else str(i), i) for i in range(data_spec.get("num_classes") or 0)]
    c, h, _ = data_spec.get("image_shape", (3, 32, 32))
    image_size = getattr(model, "image_size", h)
    return RunView(
        Path(path),
        name,
        recipe,
        meta,
        condition,
        modes,
        classes,
        int(image_size),
        int(c),
        controls_for(recipe, registry, conditional=condition != "none"),
    )


# --------------------------------------------------------------------------- requests


def swaps_of(view: RunView, values: dict[str, Any]) -> dict[str, Any]:
    """The swap keywords for :func:`genzoo.api.load_model`: only those that differ from the recipe, so the default
    settings load the run as it is; a guidance of ``none`` takes no scale; top-k 0 and top-p 1 mean off."""
    out: dict[str, Any] = {}
    for c in view.controls:
        v = values.get(c.key)
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if c.key.endswith("scale"):
            guidance = (
                values.get(c.key[: -len("scale")] + "guidance")
                or view.control(c.key[: -len("scale")] + "guidance").value
            )
            if guidance == "none":
                continue
        if c.type == "int":
            if float(v) != int(float(v)):
                raise GenzooError(f"{c.label} must be a whole number, got {v}")
            v = int(float(v))
        elif c.type == "float":
            v = float(v)
        if c.key == "top_k" and v == 0 or c.key == "top_p" and v >= 1.0:
            v = None
        if c.key.endswith("steps") and v is not None and v < 1:
            raise GenzooError(f"{c.label} must be at least 1, got {v}")
        if c.key.endswith("steps") and c.maximum is not None and v is not None and v > c.maximum:
            raise GenzooError(f"{c.label} = {v} is more than the model's {int(c.maximum)} timesteps; use fewer steps")
        if c.type == "choice" and v not in c.choices:
            raise GenzooError(f"{c.label} '{v}' is not one of: {', '.join(c.choices)}")
        if (
            v != c.value
            and not (c.key == "top_k" and v is None and not c.value)
            and not (c.key == "top_p" and v is None and c.value in (None, 1.0))
        ):
            out[c.key] = v
    guidance_none = {k for k, v in out.items() if k.endswith("guidance") and v == "none"}
    for k in guidance_none:  # dropping a guidance: its scale goes with it
        out.pop(k[: -len("guidance")] + "scale", None)
    return out


class ModelCache:
    """Loaded models per (run, swaps), least recently used dropped beyond ``size``."""

    def __init__(self, load: Callable[..., Any], size: int = 4) -> None:
        self.load, self.size = load, size
        self._models: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.RLock()  # held while a model is loaded or samples (the progress hooks patch its samplers)

    def get(self, path: Path, swaps: dict[str, Any]) -> Any:
        key = (str(path), tuple(sorted(swaps.items())))
        with self.lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = self.load(path, **swaps)
            self._models[key] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return model

    def __len__(self) -> int:
        return len(self._models)


Report = Callable[[int, int | None, str], None]  # (done, total or None, what)


@contextmanager
def sampling_progress(model: Any, report: Report):
    """While the block runs, each sampler of ``model`` reports its progress: a diffusion sampler's model evaluations
    out of its ``nfe()``, a token sampler's tokens out of the length asked for. The samplers are patched on the
    instance and restored afterwards (callers hold the cache's lock)."""
    samplers = [(role, c) for role, c in getattr(model, "components", {}).items() if isinstance(c, Sampler)]
    stages = len(samplers)

    def wrap(index: int, role: str, sampler: Sampler) -> Callable[..., Any]:
        original = sampler.sample

        def sample(*args: Any, **kwargs: Any) -> Any:
            what = f"{role} ({index + 1}/{stages})" if stages > 1 else role
            done = [0]

            def tick(*_: Any) -> None:
                done[0] += 1
                report(done[0], total, what)

            if sampler.kind is SamplerKind.TOKEN:  # sample(logits_fn, prefix, length, ...)
                total = args[2] if len(args) > 2 else kwargs.get("length")
                fn = args[0] if args else kwargs.pop("logits_fn")
                counted = lambda *a, **k: (tick(), fn(*a, **k))[1]
                args = (counted, *args[1:]) if args else args
                if not args:
                    kwargs["logits_fn"] = counted
                report(0, total, what)
                return original(*args, **kwargs)
            total = sampler.nfe()  # sample(diffusion, model, shape, ...): count the denoiser's forward calls
            net = args[1] if len(args) > 1 else kwargs.get("model")
            report(0, total, what)
            if isinstance(net, torch.nn.Module):
                handle = net.register_forward_hook(tick)
                try:
                    return original(*args, **kwargs)
                finally:
                    handle.remove()
            return original(*args, **kwargs)

        return sample

    patched = []
    for i, (role, s) in enumerate(samplers):
        s.sample = wrap(i, role, s)  # an instance attribute shadows the method
        patched.append(s)
    try:
        yield
    finally:
        for s in patched:
            s.__dict__.pop("sample", None)


def generate(
    view: RunView,
    values: dict[str, Any],
    cache: ModelCache,
    *,
    device: torch.device,
    max_samples: int,
    report: Report | None = None,
    read_image: Callable[[Any], torch.Tensor] | None = None,
):
    """Images (B, C, H, W) in [-1, 1] for the page's ``values``; a bad input raises GenzooError naming it."""
    prompt = (values.get("prompt") or "").strip()
    mode = values.get("mode") or "sample"
    class_id = values.get("class_id")
    n = values.get("n")
    n = 1 if n is None else n
    if float(n) != int(float(n)) or not 1 <= int(float(n)) <= max_samples:
        raise GenzooError(f"the number of images must be a whole number from 1 to {max_samples}, got {n}")
    n = int(float(n))
    seed = values.get("seed")
    seed = 0 if seed is None else seed
    if float(seed) != int(float(seed)) or int(float(seed)) < 0:
        raise GenzooError(f"the seed must be a whole number >= 0, got {seed}")
    if mode not in view.modes:
        raise GenzooError(f"mode '{mode}' is not offered by run {view.name}; it offers: {', '.join(view.modes)}")
    cond: dict[str, Any] | None = None
    if mode == "sample":
        if prompt and view.condition != "caption":
            raise GenzooError(
                f"run {view.name} is {'class-conditional' if view.condition == 'class' else 'unconditional'}"
                "; it takes no prompt (clear the prompt)"
            )
        if class_id not in (None, "") and view.condition != "class":
            raise GenzooError(f"run {view.name} is not class-conditional; it takes no class")
        if view.condition == "caption":
            if not prompt:
                raise GenzooError(f"run {view.name} is conditioned on captions: enter a prompt")
            cond = {"caption": [prompt] * n}
        elif view.condition == "class":
            if class_id in (None, ""):
                raise GenzooError(f"run {view.name} is class-conditional: pick a class")
            if (
                isinstance(class_id, str)
                and not class_id.strip().isdigit()
                or int(class_id) >= len(view.classes)
                or int(class_id) < 0
            ):
                raise GenzooError(f"class {class_id!r} is not one of the run's classes 0..{len(view.classes) - 1}")
            cond = {"y": torch.full((n,), int(class_id), dtype=torch.long, device=device)}
    else:
        if prompt or class_id not in (None, ""):
            raise GenzooError(f"{mode} decodes image embeddings and takes no prompt or class; clear them")
        needed = ("image",) if mode == "variations" else ("image", "image_b")
        missing = [k for k in needed if values.get(k) is None]
        if missing:
            raise GenzooError(
                f"{mode} needs {'an image' if mode == 'variations' else 'two images'}: upload "
                + " and ".join("the second image" if k == "image_b" else "an image" for k in missing)
            )
        if mode == "interpolate" and n < 2:
            raise GenzooError("interpolate needs at least 2 images along the path; raise the number of images")
    swaps = swaps_of(view, values)
    with cache.lock:
        model = cache.get(view.path, swaps)
        g = torch.Generator(device=device).manual_seed(int(float(seed)))
        with sampling_progress(model, report or (lambda *_: None)), torch.no_grad():
            if mode == "sample":
                return model.sample(n, cond, generator=g)
            read = read_image or (lambda x: x)
            if mode == "variations":
                return model.variations(read(values["image"])[None].to(device), n, generator=g)
            return model.interpolate(
                read(values["image"]).to(device), read(values["image_b"]).to(device), n, generator=g
            )


# --------------------------------------------------------------------------- the run's files


def loss_rows(run_dir: Path | None) -> list[dict[str, Any]]:
    """(step, loss, stage) per logged line of ``metrics.jsonl``."""
    if run_dir is None:
        return []
    return [
        {"step": r["step"], "loss": float(r["loss"]), "stage": str(r.get("stage", "main"))}
        for r in run_files.metrics(run_dir)
        if isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float))
    ]


def evaluation_rows(run_dir: Path | None) -> list[dict[str, Any]]:
    """One row per recorded `genzoo eval`: step, samples, split, swaps, then every figure."""
    if run_dir is None:
        return []
    rows = []
    for e in run_files.evaluations(run_dir):
        row = {
            "step": e.get("step"),
            "samples": e.get("samples"),
            "split": e.get("split"),
            "swaps": " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (e.get("swaps") or {}).items()) or "-",
        }
        row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in (e.get("figures") or {}).items()})
        rows.append(row)
    return rows


def leaderboard(run_dir: Path | None) -> Path | None:
    """A `genzoo compare` leaderboard.md beside the run, or one level up (compare writes OUT/runs/NAME)."""
    if run_dir is None:
        return None
    for folder in (run_dir.parent, run_dir.parent.parent):
        if (folder / "leaderboard.md").is_file():
            return folder / "leaderboard.md"
    return None
