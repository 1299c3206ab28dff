"""``genzoo``: list | info | plugins | train | sample | edit | eval | compare | runs | push | pull | import | serve.

A user error prints one line and exits with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from genzoo import __version__
from genzoo.errors import GenzooError
from genzoo.swaps import SWAPS


def _add_repeatable(
    p: argparse.ArgumentParser, flag: str, metavar: str, text: str | None, dest: str | None = None
) -> None:
    """A flag that may be given many times; its values in order (none: an empty list)."""
    p.add_argument(
        flag, dest=dest or flag[2:].replace("-", "_"), action="append", default=[], metavar=metavar, help=text
    )


def _add_set_arg(p: argparse.ArgumentParser, text: str | None = None) -> None:
    _add_repeatable(p, "--set", "PATH=VALUE", text, dest="sets")


def _add_split_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--split",
        default="test",
        help="the split compared against and whose captions are asked for (shapes: test, or heldout for the unseen "
        "colour x shape pairs)",
    )


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    _add_repeatable(p, "--recipes", "FILE", "extra recipe YAML file (repeatable)")
    _add_set_arg(p, "override any recipe field, e.g. --set decoder.denoiser.model_channels=32 (repeatable)")


def _add_swap_args(p: argparse.ArgumentParser) -> None:
    for s in SWAPS:
        p.add_argument(s.flag, dest=s.key, type=s.type, help=s.help)


PRECISIONS = ("fp32", "bf16")  # genzoo.precision.PRECISIONS; not imported, so that building the parser needs no torch


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16: generate under bf16 autocast (on a CPU only where it has bf16 units; docs/performance.md)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the denoiser networks (the first batch compiles)"
    )


def _add_generation_args(p: argparse.ArgumentParser, set_help: str | None = None) -> None:
    """What every command that generates from a trained model takes: seed, device, the swaps, precision, --set."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_swap_args(p)
    _add_inference_args(p)
    _add_set_arg(p, set_help)


def _swaps(args: argparse.Namespace) -> dict[str, Any]:
    return {s.key: getattr(args, s.key) for s in SWAPS if getattr(args, s.key, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genzoo", description="A zoo of generative image models, from GANs to DALL·E 2."
    )
    parser.add_argument("--version", action="version", version=f"genzoo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered components (and recipes)")
    p.add_argument("--kind", help="only this component kind (or 'recipe')")
    p.add_argument("--json", action="store_true")
    _add_recipe_args(p)

    p = sub.add_parser("info", help="describe a recipe, or a component as KIND:NAME")
    p.add_argument("name", help="a recipe name or KIND:NAME, e.g. sampler:ddim")
    p.add_argument("--resolved", action="store_true", help="print the fully resolved composition (JSON)")
    _add_recipe_args(p)
    _add_swap_args(p)

    p = sub.add_parser("plugins", help="list plugins, what they registered and their load errors")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, sample grids)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="training steps")
    g.add_argument("--minutes", type=float, help="wall-clock budget in minutes")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument(
        "--init-from",
        metavar="DIR",
        help="start every component whose recipe spec equals DIR's from DIR's weights "
        "(fine-tuning; or train a swapped prior on a trained decoder with its stages set to 0)",
    )
    _add_repeatable(
        p,
        "--init-except",
        "ROLE",
        "with --init-from: leave this component (e.g. upsampler_decoder) at its fresh initialisation; repeatable",
    )
    _add_repeatable(
        p,
        "--log",
        "LOGGER",
        "also log to this logger beside metrics.jsonl: tensorboard, wandb (offline unless WANDB_MODE says "
        "otherwise); repeatable; `genzoo list --kind logger`",
    )
    p.add_argument("--no-progress", action="store_true")
    _add_recipe_args(p)

    p = sub.add_parser("sample", help="draw samples from a trained model")
    p.add_argument("dir", help="run or checkpoint directory")
    p.add_argument("-n", type=int, default=16, help="number of samples")
    p.add_argument("--out", default="samples.png", help="grid PNG to write")
    p.add_argument("--prompt", help="caption to condition on")
    p.add_argument("--class", dest="class_", type=int, help="class index to condition on")
    p.add_argument("--save", metavar="FILE.safetensors", help="also save the raw samples")
    p.add_argument(
        "--rerank", type=int, help="draw N candidates per prompt, keep the one the recipe's CLIP ranks first (DALL·E)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--image", metavar="FILE", help="draw n variations of this image (DALL·E 2: its CLIP embedding decoded again)"
    )
    g.add_argument(
        "--interpolate",
        nargs=2,
        metavar=("A", "B"),
        help="n images along the slerp between two images' CLIP embeddings (DALL·E 2)",
    )
    p.add_argument(
        "--text-diff",
        nargs=2,
        metavar=("FROM", "TO"),
        help="with --image: n edits of the image toward caption TO, FROM describing it as it is (DALL·E 2 text diffs)",
    )
    p.add_argument(
        "--theta", type=float, default=0.5, help="--text-diff: the largest slerp weight toward the text diff"
    )
    p.add_argument(
        "--fixed-noise",
        action="store_true",
        help="--text-diff: decode every frame from the same fresh noise instead of the image's DDIM inversion",
    )
    _add_generation_args(p)

    p = sub.add_parser("eval", help="evaluate a trained model against its data's test split")
    p.add_argument("dir")
    p.add_argument(
        "--metrics",
        default="",
        help="comma-separated metric names (default: fd,kid,precision-recall,...; see `genzoo list --kind metric`)",
    )
    p.add_argument("--samples", type=int, default=1000, help="samples drawn (and test images compared against)")
    _add_split_arg(p)
    p.add_argument("--json", action="store_true")
    _add_generation_args(
        p, "override a sampling-time field, e.g. --set pipeline.rerank=8 or --set prior_guidance.scale=3"
    )

    p = sub.add_parser("compare", help="train/evaluate several recipes on the same data, metrics and sample stream")
    p.add_argument(
        "recipes",
        nargs="+",
        help="RECIPE, RECIPE@SAMPLER:STEPS (e.g. ddpm-shapes@ddim:25) or RECIPE@GUIDANCE:SCALE; a list of values "
        "sweeps it, one row each, plotted (adm-digits@classifier:0,1,2,4); a run directory (an imported model) in "
        "place of RECIPE is evaluated as it is",
    )
    p.add_argument("--out", required=True, help="directory for runs/, grids/, leaderboard.{md,csv,json} and plots")
    p.add_argument("--budget-minutes", type=float, help="training budget per recipe (default: the recipe's steps)")
    p.add_argument("--samples", type=int, default=1000, help="samples per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", default="", help="comma-separated metric names (default set if empty)")
    _add_repeatable(
        p,
        "--sweep",
        "SAMPLER:S1,S2,...",
        "also evaluate each diffusion model at these sampler steps (repeatable), e.g. ddim:10,25,50",
    )
    p.add_argument("--segments", type=int, default=3, help="evaluations along training (quality vs training time)")
    _add_split_arg(p)
    _add_repeatable(
        p,
        "--prompt",
        "TEXT",
        "also draw 8 samples of this caption from every text-to-image model, one grid row per prompt (repeatable)",
        dest="prompts",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16: every model generates under bf16 autocast when evaluated (train with --set train.precision=bf16)",
    )
    p.add_argument("--device", default="auto")
    _add_repeatable(p, "--recipes", "FILE", "extra recipe YAML file", dest="recipe_files")
    _add_set_arg(p, "override a field in every recipe, e.g. --set data.image_size=16 (repeatable)")

    p = sub.add_parser("push", help="upload a checkpoint directory to the Hugging Face Hub, with a model card")
    p.add_argument("dir")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--license", default="mit", help="the model card's license (a Hub license id)")

    p = sub.add_parser("runs", help="a table of the runs under a directory: recipe, step, last loss, best FD, size")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("pull", help="download a checkpoint from the Hugging Face Hub (or a local directory)")
    p.add_argument("repo_id")
    p.add_argument("dir", nargs="?")
    p.add_argument("--revision")
    add_import_parser(sub)
    add_serve_parser(sub)
    add_edit_parser(sub)
    return parser


# --------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    from genzoo import api
    from genzoo.registry import KINDS

    sources: dict[str, str] = {}
    recipe_rows = [
        {"kind": "recipe", "name": n, "plugin": sources[n], "summary": r.description}
        for n, r in sorted(api.recipes(args.recipes, sources=sources).items())
    ]
    if args.kind == "recipe":
        rows = recipe_rows
    else:
        rows = [
            {"kind": e.kind, "name": e.name, "plugin": e.plugin, "summary": e.summary}
            for e in api.list_components(args.kind)
        ]
        if args.kind is None:
            rows += recipe_rows
    kinds = [args.kind] if args.kind else [*KINDS, "recipe"]
    if args.json:
        print(json.dumps({"kinds": kinds, "components": rows}, indent=2))
        return 0
    for kind in kinds:
        these = [r for r in rows if r["kind"] == kind]
        print(f"{kind} ({len(these)})")
        width = max((len(r["name"]) for r in these), default=0)
        pw = max((len(r["plugin"]) for r in these), default=0)
        for r in these:
            print(f"  {r['name']:<{width}}  [{r['plugin']:<{pw}}]  {r['summary'][:90]}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from genzoo import api
    from genzoo.plugins import default_registry

    if ":" in args.name:
        kind, name = args.name.split(":", 1)
        entry = default_registry().get(kind, name)
        print(f"{entry.kind} '{entry.name}' from plugin '{entry.plugin}'")
        print(f"  {entry.summary}")
        for f in entry.describe_fields():
            default = "required" if f["required"] else f"default {f['default']!r}"
            print(f"  {f['field']}: {f['type']} ({default})  {f['description']}")
        return 0
    resolved = api.resolve_recipe(args.name, files=args.recipes, sets=args.sets, **_swaps(args))
    if args.resolved:
        print(json.dumps(resolved, indent=2))
    else:
        recipe = api.recipes(args.recipes)[args.name]
        print(f"{args.name}: {recipe.description}")
        print(yaml.safe_dump(recipe.model_dump(mode="json", exclude={"description"}), sort_keys=False).rstrip())
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from genzoo import api
    from genzoo.plugins import plugin_infos

    infos = plugin_infos()
    recipe_refusals: list[tuple[str, str]] = []
    try:  # a plugin's recipes refused because registry.yaml (or an earlier plugin) has the name
        api.recipes(refused=recipe_refusals)
    except GenzooError:
        pass  # a broken registry.yaml is what the recipe commands report
    refused = [i.refused + [why for p, why in recipe_refusals if i.recipes and p == i.name] for i in infos]
    if args.json:
        print(json.dumps([{**i.as_dict(), "refused": r} for i, r in zip(infos, refused)], indent=2))
        return 0
    for i, r in zip(infos, refused):
        state = "disabled" if i.disabled else ("FAILED" if i.error else "ok")
        if r and state == "ok":
            state = f"ok, {len(r)} refused"
        print(f"{i.name} {i.version} ({i.module}) {state}")
        if i.error:
            print(f"  error: {i.error}")
        for why in r:
            print(f"  refused: {why}")
        if i.registered:
            print("  " + ", ".join(f"{k}:{n}" for k, n in i.registered))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from genzoo import api
    from genzoo.registry import split_spec
    from genzoo.training import TrainConfig, Trainer
    from genzoo.training.loggers import build_loggers

    if args.init_except and not args.init_from:
        raise GenzooError("--init-except names components not to load from --init-from DIR; pass --init-from too")
    sets = list(args.sets)
    for key in ("steps", "minutes", "device", "seed"):
        if getattr(args, key) is not None:
            sets.append(f"train.{key}={getattr(args, key)}")
    if args.minutes is not None:  # the time budget decides, not the recipe's step count
        sets.append("train.steps=null")
    if args.steps is not None or args.minutes is not None:  # one number for every stage of a staged recipe
        sets.append("train.stages=null")
    resolved = api.resolve_recipe(args.recipe, files=args.recipes, sets=sets)
    loggers = resolved["train"]["loggers"]  # --log adds to the recipe's train.loggers
    loggers += [name for name in dict.fromkeys(args.log) if name not in {split_spec("logger", s)[0] for s in loggers}]
    config = TrainConfig.model_validate(resolved["train"])
    build_loggers(config.loggers)  # a misspelt --log fails now, not after the data and the model are built
    api.check_init_except(resolved, args.init_except)  # and so does a misspelt --init-except
    t0 = time.perf_counter()
    source = api.build_data(resolved)
    train = source.split("train")
    print(
        f"data: {resolved['data']['type']} train split, {len(train)} items ({time.perf_counter() - t0:.1f}s)",
        file=sys.stderr,
    )
    pipeline = api.create_model(resolved, data_spec=source.spec)
    if args.init_from:
        if args.resume:
            raise GenzooError("--init-from starts a new run; --resume continues one: pass only one of them")
        roles = api.init_from(pipeline, resolved, args.init_from, exclude=args.init_except)
        print(f"initialised {', '.join(roles) or 'no component'} from {args.init_from}", file=sys.stderr)
    meta = {
        "data_spec": api.data_spec_dict(source.spec),
        "data_fingerprint": train.fingerprint(),
        "recipe_name": args.recipe,
    }
    result = Trainer(
        pipeline,
        train.tensors(),
        config=config,
        run_dir=args.out,
        recipe=resolved,
        meta=meta,
        progress=not args.no_progress,
    ).fit(resume=args.resume)
    if result.interrupted:  # not a finished run: say so, and exit as the signal asked (130 for SIGINT, 143 for SIGTERM)
        if result.rank == 0:
            print(
                f"genzoo train: interrupted by {result.interrupted} at step {result.step}; checkpoint written to "
                f"{result.checkpoint}; continue with --resume",
                file=sys.stderr,
            )
        return 128 + int(getattr(signal.Signals, result.interrupted, signal.SIGINT))
    if result.rank == 0:  # under torchrun only rank 0 saved, and only it reports
        print(f"trained {args.recipe} to step {result.step} in {result.wall_time:.1f}s; checkpoint {result.checkpoint}")
    return 0


def _condition(args: argparse.Namespace, n: int) -> dict[str, Any] | None:
    import torch

    cond: dict[str, Any] = {}
    if args.prompt is not None:
        cond["caption"] = [args.prompt] * n
    if args.class_ is not None:
        cond["y"] = torch.full((n,), args.class_, dtype=torch.long)
    return cond or None


def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from genzoo import api
    from genzoo.precision import autocast
    from genzoo.training import resolve_device
    from genzoo.training.images import save_grid

    if args.n < 1:
        raise GenzooError(f"-n {args.n}: the number of samples must be at least 1; pass -n 1 or more")
    device = resolve_device(args.device)
    sets = args.sets + ([f"pipeline.rerank={args.rerank}"] if args.rerank else [])
    model = api.load_model(args.dir, device=device, sets=sets, **_swaps(args))
    if args.compile:
        api.compile_denoisers(model)
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    with autocast(device, args.precision):
        x = _generate(args, model, device, g)
    dt = time.perf_counter() - t0
    save_grid(x.float(), args.out)
    if args.save:
        save_file({"samples": x.float().cpu().contiguous()}, args.save)
    print(f"wrote {args.n} samples to {args.out} in {dt:.2f}s ({args.n / dt:.2f} images/s)")
    return 0


def _generate(args: argparse.Namespace, model: Any, device: Any, g: Any) -> Any:
    """What `genzoo sample` draws: variations, text diffs or an interpolation of images, or samples for a condition."""
    if args.text_diff and not args.image:
        raise GenzooError(
            '--text-diff FROM TO edits an image: add --image FILE (FROM describes it, e.g. "a red circle")'
        )
    if args.image or args.interpolate:
        if args.prompt is not None or args.class_ is not None:
            raise GenzooError(
                "--image and --interpolate decode image embeddings and take no --prompt or --class; drop one"
            )
        if not hasattr(model, "variations"):
            raise GenzooError(
                "--image and --interpolate need a model that decodes CLIP image embeddings (a dalle2 recipe)"
            )
        from genzoo.training.images import load_image

        read = lambda path: load_image(
            path, size=model.image_size, channels=model.components["decoder"].produces.shape[0]
        ).to(device)  # noqa: E731
        if args.text_diff:
            return model.text_diff(
                read(args.image), *args.text_diff, args.n, theta=args.theta, invert=not args.fixed_noise, generator=g
            )
        if args.image:
            return model.variations(read(args.image)[None], args.n, generator=g)
        return model.interpolate(read(args.interpolate[0]), read(args.interpolate[1]), args.n, generator=g)
    cond = _condition(args, args.n)
    if cond and "y" in cond:
        cond["y"] = cond["y"].to(device)
    return model.sample(args.n, cond, generator=g)


def _metric_names(text: str) -> list[str]:
    from genzoo.eval.evaluate import DEFAULT_METRICS

    return [m.strip() for m in text.split(",") if m.strip()] or list(DEFAULT_METRICS)


def cmd_eval(args: argparse.Namespace) -> int:
    from genzoo import api
    from genzoo.checkpoint import load_checkpoint
    from genzoo.eval.evaluate import EvalSettings, evaluate
    from genzoo.eval.judges import load_judge
    from genzoo.plugins import default_registry
    from genzoo.training import resolve_device

    device = resolve_device(args.device)
    registry = default_registry()
    metrics = {m: registry.build("metric", {"type": m}, where="--metrics: ") for m in _metric_names(args.metrics)}
    model = api.load_model(args.dir, device=device, sets=args.sets, **_swaps(args))
    if args.compile:
        api.compile_denoisers(model)
    source = api.build_data(load_checkpoint(args.dir).recipe)
    judge = load_judge(source.spec.name, source.cfg.model_dump(), device=device)
    settings = EvalSettings(samples=args.samples, seed=args.seed, split=args.split, precision=args.precision)
    figures = evaluate(model, source, metrics=metrics, judge=judge, settings=settings, device=device)
    from genzoo.runs import record_evaluation

    record_evaluation(
        args.dir,
        {
            "step": model.checkpoint_meta.get("step"),
            "samples": args.samples,
            "split": args.split,
            "seed": args.seed,
            "swaps": _swaps(args),
            "sets": args.sets,
            "figures": figures,
        },
    )
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        for k, v in figures.items():
            print(f"{k:>18}  {v:.4g}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from genzoo import runs

    found = runs.find_runs(args.dir)
    if not found:
        raise GenzooError(
            f"no run directory under {args.dir} (a run holds `latest` and checkpoints/; see `genzoo train`)"
        )
    rows = [runs.summary(r) for r in found]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ("run", "recipe", "step", "last_loss", "best_fd", "size_mb")
    cells = [
        [("-" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])) for c in cols] for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    for row in [list(cols), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from genzoo.eval.compare import compare, parse_sweep
    from genzoo.eval.evaluate import EvalSettings
    from genzoo.training import resolve_device

    sweep = dict(parse_sweep(text) for text in args.sweep)
    t0 = time.perf_counter()
    settings = EvalSettings(samples=args.samples, seed=args.seed, split=args.split, precision=args.precision)
    rows = compare(
        args.recipes,
        out=Path(args.out),
        settings=settings,
        budget_minutes=args.budget_minutes,
        metric_names=_metric_names(args.metrics),
        sweep=sweep or None,
        segments=args.segments,
        device=resolve_device(args.device),
        files=args.recipe_files,
        sets=args.sets,
        prompts=args.prompts,
        log=lambda m: print(m, file=sys.stderr),
    )
    print((Path(args.out) / "leaderboard.md").read_text())
    failed = sum(bool(r.error) for r in rows)
    print(
        f"compared {len(rows)} entries in {time.perf_counter() - t0:.0f}s ({failed} failed); see "
        f"{args.out}/leaderboard.md"
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from genzoo.hub import push

    url = push(args.dir, args.repo_id, private=args.private, license=args.license)
    print(f"pushed {args.dir} to {url}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from genzoo.hub import pull

    path = pull(args.repo_id, args.dir, revision=args.revision)
    print(f"pulled {args.repo_id} to {path}")
    return 0


# --------------------------------------------------------------------------- import (docs/interop.md)


def add_import_parser(sub: Any) -> None:
    p = sub.add_parser("import", help="turn a foreign pipeline (a diffusers folder or hub id) into a genzoo run")
    p.add_argument("source", help="a folder or a hub id, e.g. google/ddpm-cifar10-32 (safetensors only)")
    p.add_argument("out", help="the run directory to write")
    p.add_argument("--format", help="the importer (`genzoo list --kind importer`); default: the one recognising SOURCE")
    p.add_argument(
        "--adapter",
        action="store_true",
        help="keep the foreign network behind its adapter, even where it maps "
        "exactly onto genzoo's own (which samples faster)",
    )
    p.add_argument("--data", metavar="SPEC", help="the dataset to evaluate against, as YAML, e.g. '{type: digits}'")
    _add_repeatable(
        p,
        "--option",
        "KEY=VALUE",
        "a field of the importer's config (docs/interop.md), e.g. "
        "flags='--image_size 64 ...' for an OpenAI file; repeatable",
    )
    p.add_argument("--classifier", metavar="FILE", help="a noisy classifier to guide with: --option classifier=FILE")


def cmd_import(args: argparse.Namespace) -> int:
    from genzoo import api

    data = yaml.safe_load(args.data) if args.data else None
    if data is not None and not (isinstance(data, dict) and "type" in data):
        raise GenzooError(
            f"--data {args.data!r}: expected a dataset spec with a type, e.g. '{{type: shapes, image_size: 32}}'"
        )
    bad = [o for o in args.option if "=" not in o]
    if bad:
        raise GenzooError(f"--option {bad[0]!r}: expected KEY=VALUE, e.g. --option classifier=64x64_classifier.pt")
    options = dict(o.split("=", 1) for o in args.option)
    if args.classifier:
        options["classifier"] = args.classifier
    path = api.import_model(args.source, args.out, format=args.format, adapter=args.adapter, data=data, options=options)
    how = json.loads((path / "meta.json").read_text()).get("imported_from", {})
    print(f"imported {args.source} ({how.get('pipeline', '?')}, {how.get('unet', '?')}) to {args.out}")
    for note in how.get("notes", []):  # what the importer read and how (e.g. a pickle, with weights_only=True)
        print(f"  {note}")
    return 0


# --------------------------------------------------------------------------- serve (a web page for runs; docs/ui.md)


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="a web page for trained runs: sample with any sampler, see curves (genzoo[ui])")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run or checkpoint directories")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="the port (default: the first free one from 7860)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-samples", type=int, default=16, help="the most images one request may ask for")
    p.add_argument("--app", default="gradio", help="the app component (`genzoo list --kind app`)")


def cmd_serve(args: argparse.Namespace) -> int:
    """Build the registered ``app`` component and serve until interrupted; genzoo itself imports no web framework."""
    from genzoo.plugins import default_registry

    registry = default_registry()
    if not registry.names("app"):
        raise GenzooError(
            "genzoo serve needs the web UI extra: pip install 'genzoo[ui]' (`genzoo plugins` shows why "
            "the ui plugin did not load)"
        )
    spec = {
        "type": args.app,
        "runs": args.runs,
        "host": args.host,
        "port": args.port,
        "device": args.device,
        "max_samples": args.max_samples,
    }
    app = registry.build("app", spec, where="genzoo serve: ")
    try:
        app.launch()
    except KeyboardInterrupt:
        pass
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise GenzooError(
            f"cannot serve on {args.host}:{args.port or 'the first free port from 7860'}: {e}; "
            "pick another --port or --host"
        ) from None
    return 0


# --------------------------------------------------------------------------- edit (docs/editing.md)


def add_edit_parser(sub: Any) -> None:
    p = sub.add_parser(
        "edit", help="edit an image with a diffusion model: inpaint, image-to-image (SDEdit), DDIM inversion"
    )
    p.add_argument("dir", help="run or checkpoint directory of a diffusion model")
    p.add_argument(
        "--image", required=True, metavar="FILE", help="the image to edit (PNG/JPEG, resized to the model's)"
    )
    p.add_argument(
        "--mask", metavar="FILE", help="the region to fill: white is generated, black kept (same size as --image)"
    )
    p.add_argument(
        "--mode",
        choices=("inpaint", "sdedit", "invert"),
        help="inpaint (RePaint, or GLIDE's inpainting model), sdedit (noise to --strength, denoise), invert (DDIM "
        "inversion and reconstruction); default: inpaint with --mask, else sdedit",
    )
    p.add_argument("--prompt", help="caption to condition on")
    p.add_argument("--class", dest="class_", type=int, help="class index to condition on")
    p.add_argument(
        "--strength", type=float, help="t_0 / T in (0, 1]: how far the image is noised (default 0.6 sdedit, 1 else)"
    )
    p.add_argument("--jump-length", type=int, default=10, help="RePaint's jump length j (with --mask)")
    p.add_argument("--resample", type=int, default=10, help="RePaint's resamplings r per jump; 1: none (with --mask)")
    p.add_argument(
        "--invert-iters", type=int, default=0, help="invert: fixed-point iterations per inversion step (0: plain DDIM)"
    )
    p.add_argument("-n", type=int, help="number of edits (default 4; 1 for invert, which is deterministic)")
    p.add_argument("--out", default="edit.png", help="PNG: the input, the masked input, then the edits")
    p.add_argument("--save", metavar="FILE.safetensors", help="also save the raw edits (and x_T when inverting)")
    _add_generation_args(p)


def cmd_edit(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from genzoo import api
    from genzoo.diffusion.editing import edit_config
    from genzoo.precision import autocast
    from genzoo.training import resolve_device
    from genzoo.training.images import load_image, save_grid

    mode = args.mode or ("inpaint" if args.mask else "sdedit")
    n = args.n if args.n is not None else (1 if mode == "invert" else 4)
    if n < 1:
        raise GenzooError(f"-n {n}: the number of edits must be at least 1; pass -n 1 or more")
    cfg = edit_config(  # bad values fail before the model loads
        mode=mode,
        strength=args.strength,
        jump_length=args.jump_length,
        resample=args.resample,
        invert_iters=args.invert_iters,
    )
    if args.mask:
        sizes = {}
        for flag, path in (("--image", args.image), ("--mask", args.mask)):
            try:
                with Image.open(path) as im:
                    sizes[flag] = im.size
            except OSError as e:
                raise GenzooError(f"could not read {flag} {path}: {e}; pass a PNG or JPEG file") from None
        if sizes["--mask"] != sizes["--image"]:
            (w, h), (mw, mh) = sizes["--image"], sizes["--mask"]
            raise GenzooError(
                f"--mask {args.mask} is {mw}x{mh} but --image {args.image} is {w}x{h}; pass a mask the size of "
                "the image"
            )
    device = resolve_device(args.device)
    model = api.load_model(args.dir, device=device, sets=args.sets, **_swaps(args))
    if args.compile:
        api.compile_denoisers(model)
    c, side = api.image_shape(model)[0], api.image_shape(model)[-1]
    image = load_image(args.image, size=side, channels=c)[None].to(device)
    mask = (load_image(args.mask, size=side, channels=1)[None] > 0).float().to(device) if args.mask else None
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    with autocast(device, args.precision):
        cond = _condition(args, n)
        if cond and "y" in cond:
            cond["y"] = cond["y"].to(device)
        result = api.edit(model, image, mask, n=n, condition=cond, generator=g, **cfg.model_dump())
    dt = time.perf_counter() - t0
    x = result.images.float()
    shown = [image] + ([image * (1 - mask)] if mask is not None else [])
    save_grid(torch.cat([*shown, x.to(device)]).cpu(), args.out, nrow=len(shown) + n)
    if args.save:
        save_file(
            {"edits": x.cpu().contiguous(), **{f"x_T/{r}": torch.cat(v).cpu() for r, v in result.latents.items()}},
            args.save,
        )
    print(f"wrote {n} {mode} edits of {args.image} to {args.out} in {dt:.2f}s")
    if mode == "invert":
        err = (x - image).flatten(1)
        print(
            f"DDIM inversion round trip: RMSE {err.pow(2).mean().sqrt():.3g}, max |error| {err.abs().max():.3g} "
            "(images in [-1, 1])"
        )
    elif mask is not None:
        kept = ((x - image).abs() * (1 - mask)).flatten(1).max()
        print(f"known region kept to max |error| {kept:.3g}")
    return 0


COMMANDS = {
    "list": cmd_list,
    "info": cmd_info,
    "plugins": cmd_plugins,
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "push": cmd_push,
    "pull": cmd_pull,
    "import": cmd_import,
    "runs": cmd_runs,
    "serve": cmd_serve,
    "edit": cmd_edit,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("GENZOO_DEBUG") == "1"
    try:
        return COMMANDS[args.command](args)
    except GenzooError as e:
        if debug:
            raise
        print(f"genzoo {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genzoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `genzoo list | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # not the user's input but a bug: still one line, the traceback behind --debug
        if debug:
            raise
        print(
            f"genzoo {args.command}: error: unexpected {type(e).__name__}: {_one_line(e)[:300]}; a bug in genzoo "
            "or a plugin: rerun with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return 1


def _one_line(e: BaseException) -> str:
    """The message on one line (a YAML or validation error may span several)."""
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
