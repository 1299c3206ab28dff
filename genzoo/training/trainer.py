"""One trainer for every family: stages, several optimisers, EMA, exact resume, DDP under torchrun.

The pipeline says what to optimise (``stages``, ``optimizer_groups(stage)``) and the loss
(``training_losses``); the trainer owns everything else. Resume restores the raw weights, the
optimiser, scheduler and EMA states, the data order and every RNG, so on CPU ``N`` steps, resume,
``N`` steps equals ``2N`` steps bitwise.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from genzoo import precision
from genzoo.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from genzoo.errors import TrainingError
from genzoo.nn import CONV_MEMORY_FORMAT
from genzoo.plugins import default_registry
from genzoo.recipes import refresh
from genzoo.registry import Registry
from genzoo.training import distributed
from genzoo.training.config import TrainConfig
from genzoo.training.ema import EMA
from genzoo.training.images import grid_image, save_png
from genzoo.training.loggers import RunInfo, build_loggers


def resolve_device(name: str = "auto") -> torch.device:
    """The one place a device is chosen: ``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device '{name}' was asked for but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None


@dataclass
class TrainResult:
    step: int
    losses: dict[str, float]
    wall_time: float
    steps_per_sec: float
    checkpoint: Path | None
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    interrupted: str | None = None  # the signal (SIGINT, SIGTERM) that stopped the run, if one did
    rank: int = 0  # this process's rank under torchrun; only rank 0 saves (``checkpoint`` is None elsewhere)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Losses(nn.Module):
    """What DDP wraps: a forward that is the pipeline's loss, so gradients are synchronised."""

    def __init__(self, pipeline: nn.Module) -> None:
        super().__init__()
        self.pipeline = pipeline

    def forward(self, batch: dict[str, Any], optimizer: str, stage: str) -> dict[str, Tensor]:
        return self.pipeline.training_losses(batch, optimizer=optimizer, stage=stage)


class Trainer:
    def __init__(
        self,
        pipeline: nn.Module,
        train_data: Mapping[str, Any],
        *,
        config: TrainConfig,
        run_dir: str | Path,
        recipe: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
        progress: bool = True,
        registry: Registry | None = None,
    ) -> None:
        self.pipeline, self.data, self.cfg = pipeline, dict(train_data), config
        self.run_dir, self.recipe, self.meta, self.progress = Path(run_dir), dict(recipe), dict(meta or {}), progress
        self.registry = registry  # --resume compares a checkpoint's recipe as this (default: the plugins') resolves it
        self.device = resolve_device(config.device)
        self.dist = distributed.setup(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if config.batch_size % self.dist.world_size:
            raise TrainingError(
                f"train.batch_size {config.batch_size} is not divisible by the {self.dist.world_size} processes"
            )
        self.n = len(self.data["image"])
        if self.device.type == "cuda":
            self._keep_data_on_device()
        if self.n < config.batch_size:
            raise TrainingError(f"train.batch_size {config.batch_size} exceeds the {self.n} training items; lower it")
        self._stop_reason: str | None = None
        self.loggers = build_loggers(config.loggers, registry)  # built here, so a bad name fails before any work

    # ------------------------------------------------------------------ data
    def _next_indices(self) -> Tensor:
        b = self.cfg.batch_size
        if self.perm is None or self.pos + b > self.n:  # a new epoch; the remainder is dropped
            self.perm = torch.randperm(self.n, generator=self.data_gen)
            self.pos, self.epoch = 0, self.epoch + 1
        idx = self.perm[self.pos : self.pos + b]
        self.pos += b
        return idx[self.dist.rank :: self.dist.world_size]  # each rank a disjoint shard of the global batch

    def _keep_data_on_device(self) -> None:
        """Move the data set to the GPU once when it fits in a quarter of the free memory (a zoo data set does:
        shapes 32x32 is 123 MB), so a step gathers on the device instead of copying from pageable host memory."""
        tensors = {k: v for k, v in self.data.items() if isinstance(v, Tensor)}
        free, _ = torch.cuda.mem_get_info(self.device)
        if sum(v.nbytes for v in tensors.values()) <= free // 4:
            self.data.update({k: v.to(self.device) for k, v in tensors.items()})

    def _batch(self) -> dict[str, Any]:
        idx = self._next_indices()
        if self.data["image"].is_cuda:  # device-resident data: the indices cross from pinned memory, without a sync
            gather = idx.pin_memory().to(self.device, non_blocking=True)
        else:
            gather = idx
        return {
            k: v[gather].to(self.device, non_blocking=True) if isinstance(v, Tensor) else [v[i] for i in idx.tolist()]
            for k, v in self.data.items()
        }

    # ------------------------------------------------------------------ stages and optimisers
    def _stage_steps(self) -> list[tuple[str, int]]:
        stages = list(getattr(self.pipeline, "stages", ("main",)))
        if self.cfg.stages is None:
            if self.cfg.steps is None and self.cfg.minutes is None:
                raise TrainingError("train.steps is null and no --minutes budget is set; set one of them")
            return [(s, self.cfg.steps or 10**12) for s in stages]
        unknown = set(self.cfg.stages) - set(stages)
        if unknown:
            raise TrainingError(f"train.stages names {sorted(unknown)}, but this pipeline's stages are {stages}")
        return [(s, self.cfg.stages.get(s, 0)) for s in stages]

    def _optimizers(self, stage: str, total: int) -> tuple[dict, dict]:
        opts, scheds = {}, {}
        for name, params in self.pipeline.optimizer_groups(stage).items():
            o = self.cfg.optimizers.get(name)
            lr = (o and o.lr) or self.cfg.lr
            betas = (o and o.betas) or self.cfg.betas
            wd = self.cfg.weight_decay if (o is None or o.weight_decay is None) else o.weight_decay
            # on CUDA one fused kernel per step rather than a launch per tensor list; the CPU keeps torch's default
            fused = bool(params) and all(p.is_cuda for p in params)
            opts[name] = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd, fused=fused or None)
            f = lambda s: lr_factor(
                s,
                warmup=self.cfg.warmup_steps,
                total=total,
                schedule=self.cfg.lr_schedule,  # noqa: E731
                min_ratio=self.cfg.min_lr_ratio,
            )
            scheds[name] = torch.optim.lr_scheduler.LambdaLR(opts[name], f)
        return opts, scheds

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "model": self.pipeline.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.opts.items()},
            "schedulers": {k: s.state_dict() for k, s in self.scheds.items()},
            "ema": self.ema.state_dict() if self.ema else None,
            "data": {"gen": self.data_gen.get_state(), "perm": self.perm, "pos": self.pos, "epoch": self.epoch},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "python": random.getstate(),
                "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            },
            "step": self.step,
            "stage_index": self.stage_index,
            "stage_step": self.stage_step,
            "wall_time": self.wall_time,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.pipeline.load_state_dict(state["model"])
        self.step, self.stage_index, self.stage_step = state["step"], state["stage_index"], state["stage_step"]
        self.wall_time = state.get("wall_time", 0.0)
        self._setup_stage()
        for k, o in self.opts.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.scheds.items():
            s.load_state_dict(state["schedulers"][k])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        d = state["data"]
        self.data_gen.set_state(d["gen"])
        self.perm, self.pos, self.epoch = d["perm"], d["pos"], d["epoch"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        v, internal, gauss = rng["python"]
        random.setstate((v, tuple(internal), gauss))
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))

    def _setup_stage(self) -> None:
        stage, total = self.stages[self.stage_index]
        self.opts, self.scheds = self._optimizers(stage, total)

    def _save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        components = {}
        ema_sd = self.ema.weights_for(self.pipeline) if self.ema else self.pipeline.state_dict()
        for role, _ in self.pipeline.named_children():
            sd = {k[len(role) + 1 :]: v for k, v in ema_sd.items() if k.startswith(role + ".")}
            if sd:
                components[role] = sd
        meta = {
            **self.meta,
            "seed": self.cfg.seed,
            "stage": self.stages[self.stage_index][0],
            "wall_time": self.wall_time,
        }
        self.last_checkpoint = save_checkpoint(
            self.run_dir,
            step=self.step,
            recipe=self.recipe,
            components=components,
            meta=meta,
            trainer_state=self._state(),
            keep=self.cfg.keep_checkpoints,
        )
        return self.last_checkpoint

    @contextlib.contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """The EMA weights in the pipeline for a block, the raw ones again after it. Buffers written inside stay
        (a latent prior fitted here belongs with the averaged encoder that the checkpoint saves)."""
        if not self.ema:
            yield
            return
        raw = [p.detach().clone() for p in self.pipeline.parameters()]
        self.ema.copy_to(self.pipeline)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.pipeline.parameters(), raw):
                    p.copy_(r)

    def _sample_grid(self) -> None:
        if not self.dist.is_main:
            return
        rng = torch.get_rng_state()
        with self._averaged_weights():
            self.pipeline.eval()
            try:
                g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
                grid = grid_image(self.pipeline.sample(self.cfg.sample_n, generator=g))
                save_png(grid, self.run_dir / "samples" / f"step-{self.step:08d}.png")
                self.loggers.log_image("samples", grid, self.step)
            finally:
                torch.set_rng_state(rng)  # sampling must not change the training's random stream
                self.pipeline.train()

    def _log(self, step: int, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.loggers.log_metrics(record, step)

    @contextlib.contextmanager
    def _logging(self, resume: bool) -> Iterator[None]:
        """The loggers open on rank 0 for the loop and the final save, finished however the run ends."""
        if not self.dist.is_main:
            yield
            return
        name = str(self.recipe.get("name") or self.run_dir.name)
        phase = "resume" if resume else "train"
        self.loggers.start(RunInfo(run_dir=self.run_dir, name=name, config=self.recipe, phase=phase, step=self.step))
        status = "failed"
        try:
            yield
            status = "success"
        finally:
            self.loggers.finish(status)

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            self._stop_reason = signal.Signals(signum).name

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, *, stop_at: int | None = None) -> TrainResult:
        """Train (or continue) to the end of the last stage; ``stop_at`` stops after that global step as an
        interruption would. The loop of improved-diffusion's ``run_loop``: advance the stage, step, log, decide to
        save, and finish (fit the latent prior, save the last step once)."""
        distributed.reopen(self.dist, self.device.type)  # a previous fit on this trainer tore the group down
        self._begin(resume)
        with self._logging(resume):
            model = self._wrap(_Losses(self.pipeline))
            autocast = lambda: precision.autocast(self.device, self.cfg.precision)  # noqa: E731
            previous = self._install_signals()
            deadline = time.monotonic() + self.cfg.minutes * 60 if self.cfg.minutes else None
            bar = self._progress_bar()
            t0, steps_done, last, timed_out, finished = time.perf_counter(), 0, {}, False, False
            try:
                try:
                    while self._advance_stage():
                        stage = self.stages[self.stage_index][0]
                        last = self._train_step(model, stage, autocast)
                        self.step, self.stage_step, steps_done = self.step + 1, self.stage_step + 1, steps_done + 1
                        self._report(stage, last, steps_done, time.perf_counter() - t0, bar)
                        timed_out = deadline is not None and time.monotonic() > deadline
                        stop = distributed.any_flag(
                            self._stop_reason is not None or timed_out or self.step == stop_at, self.dist, self.device
                        )
                        if self._save_due(stop):
                            self._save()
                        if stop:
                            break
                finally:
                    bar.close()
                # still under our handlers: a second SIGTERM while the stopped run's checkpoint is written (a
                # scheduler repeating itself, an impatient `kill`) must not kill the write and lose the run
                result, finished = self._finish(t0, steps_done, last, timed_out), True
                return result
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)
                distributed.teardown(self.dist, self.device, failed=not finished)

    # ------------------------------------------------------------------ the loop's steps
    def _begin(self, resume: bool) -> None:
        """Seed, build the stages and optimisers (or restore them from the run's checkpoint), place the model."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if has_checkpoint(self.run_dir) and not resume:
            raise TrainingError(
                f"{self.run_dir} already holds a checkpoint; pass --resume to continue it or choose another --out"
            )
        torch.manual_seed(cfg.seed + self.dist.rank)  # ranks draw independent noise
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed(cfg.seed + self.dist.rank)
        self.pipeline.to(self.device).train()
        self.stages = self._stage_steps()
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.perm, self.pos, self.epoch = None, 0, 0
        self.step = self.stage_index = self.stage_step = 0
        self.wall_time = 0.0
        self.last_checkpoint = None
        self.ema = EMA(self.pipeline, cfg.ema_decay) if cfg.ema_decay else None
        if resume:
            self._resume()
        else:
            self._setup_stage()
            self.pipeline.begin_stage(self.stages[0][0], self.data)
        if cfg.channels_last:  # in place: the optimisers keep their parameters
            self.pipeline.to(memory_format=CONV_MEMORY_FORMAT)
            self._state_like_params()

    def _state_like_params(self) -> None:
        """Optimiser state restored from a checkpoint is contiguous; CUDA's fused AdamW refuses state whose memory
        format differs from its parameter's (channels_last conv weights), so each moment takes its parameter's."""
        for opt in self.opts.values():
            for p, state in opt.state.items():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                        state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)

    def _resume(self) -> None:
        if not has_checkpoint(self.run_dir):
            raise TrainingError(f"--resume: {self.run_dir} holds no checkpoint; train without --resume first")
        ck = load_checkpoint(self.run_dir, with_trainer_state=True)
        theirs = refresh(ck.recipe, self.registry or default_registry())
        for key in ("pipeline", "data", "components"):
            if theirs.get(key) != self.recipe.get(key):
                raise TrainingError(
                    f"--resume: the recipe's '{key}' differs from the checkpoint's in {self.run_dir}; "
                    "resume with the same recipe or train into a new --out"
                )
        self._restore(ck.trainer_state)
        self.last_checkpoint = ck.path
        if self.dist.rank:  # the state holds rank 0's RNG; other ranks must not repeat its noise
            torch.manual_seed(self.cfg.seed + self.dist.rank + 1_000_003 * self.step)

    def _find_unused_parameters(self) -> bool:
        """Whether DDP must look for parameters a step leaves without a gradient (an autograd traversal every step):
        only when some stage has several optimisers (a GAN) or leaves a trainable parameter out of its optimiser (a
        staged model, an AE's unused likelihood scale). A pipeline may say so itself: ``ddp_find_unused_parameters``."""
        declared = getattr(self.pipeline, "ddp_find_unused_parameters", None)
        if declared is not None:
            return bool(declared)
        trainable = {id(p) for p in self.pipeline.parameters() if p.requires_grad}
        for stage, steps in self.stages:
            groups = self.pipeline.optimizer_groups(stage)
            if steps and (len(groups) > 1 or trainable - {id(p) for ps in groups.values() for p in ps}):
                return True
        return False

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.enabled:
            model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=self._find_unused_parameters())
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    def _progress_bar(self) -> tqdm:
        total = sum(s for _, s in self.stages) if self.cfg.steps or self.cfg.stages else None
        show = self.progress and self.dist.is_main and sys.stderr.isatty()
        return tqdm(total=total, initial=self.step, disable=not show, dynamic_ncols=True)

    def _advance_stage(self) -> bool:
        """Move past finished stages; False when the last one is done."""
        while self.stage_step >= self.stages[self.stage_index][1]:
            if self.stage_index == len(self.stages) - 1:
                return False
            if self.ema:  # the next stage builds on the averaged weights, the ones saved and sampled with
                self.ema.copy_to(self.pipeline)
                # and its own weights start a fresh warm-up: with the global count at decay 0.999, a
                # 1000-step stage would be saved as 37% its initialisation
                self.ema.updates = 0
            self.stage_index, self.stage_step = self.stage_index + 1, 0
            self._setup_stage()
            self.pipeline.begin_stage(self.stages[self.stage_index][0], self.data)
        return True

    def _report(self, stage: str, last: dict[str, float], steps_done: int, elapsed: float, bar: tqdm) -> None:
        """The metrics log, the progress bar and the periodic sample grid."""
        if self.step % self.cfg.log_every == 0:
            lrs = {f"lr/{k}": s.get_last_lr()[0] for k, s in self.scheds.items()}
            self._log(self.step, {"stage": stage, **last, **lrs, "it_s": steps_done / elapsed, "time": elapsed})
        bar.update(1)
        bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}", stage=stage)
        if self.cfg.sample_every and self.step % self.cfg.sample_every == 0 and self.pipeline.ready_to_sample():
            self._sample_grid()

    def _save_due(self, stop: bool) -> bool:
        """A periodic save, except at the run's last step, which :meth:`_finish` saves once."""
        ends = stop or (
            self.stage_step >= self.stages[self.stage_index][1]
            and all(n == 0 for _, n in self.stages[self.stage_index + 1 :])
        )
        return self.step % self.cfg.checkpoint_every == 0 and not ends

    def _finish(self, t0: float, steps_done: int, last: dict[str, float], timed_out: bool) -> TrainResult:
        """Fit what is fitted after training (on a finished run), then save the last step."""
        finished = self.stage_index == len(self.stages) - 1 and self.stage_step >= self.stages[-1][1]
        try:
            if finished or (
                timed_out and self._stop_reason is None
            ):  # a spent --minutes budget ends a run normally; a signal does not
                with self._averaged_weights():
                    self.pipeline.fit_after_training(self.data)
        finally:  # the trained weights are saved even if fitting the latent prior fails
            wall = time.perf_counter() - t0
            self.wall_time += wall
            path = self._save()
        return TrainResult(
            step=self.step,
            losses=last,
            wall_time=wall,
            steps_per_sec=steps_done / max(wall, 1e-9),
            checkpoint=path,
            stopped_early=not finished,
            interrupted=self._stop_reason,
            rank=self.dist.rank,
        )

    def _train_step(self, model: nn.Module, stage: str, autocast) -> dict[str, float]:
        # Every logged scalar stays on the device until the step's end and then crosses in one transfer: on a
        # GPU each read-back stalls the host until the queue drains, so it is done once per step, not per term.
        cfg, names, values = self.cfg, [], []
        for name, opt in self.opts.items():
            prefix = f"{name}/" if len(self.opts) > 1 else ""
            for _ in range(cfg.optimizer_ratio.get(name, 1)):
                batch = self._batch()
                with autocast():
                    losses = model(batch, name, stage)
                terms = {k: v for k, v in losses.items() if v.dim() == 0}
                names += [(name, prefix + k) for k in terms]
                values += [v.detach().float() for v in terms.values()]
                self.pipeline.zero_grad(set_to_none=True)
                losses["loss"].backward()
                params = [p for g in opt.param_groups for p in g["params"]]
                if cfg.grad_clip:
                    names.append((name, f"grad_norm/{name}" if len(self.opts) > 1 else "grad_norm"))
                    values.append(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).float())
                opt.step()
            self.scheds[
                name
            ].step()  # once per global step, however often its optimiser stepped: the schedule counts steps
        flat = torch.stack(values).tolist()
        bad = next(
            ((o, k, v) for (o, k), v in zip(names, flat) if not k.startswith("grad_norm") and not math.isfinite(v)),
            None,
        )
        if bad:  # raised before the EMA and any checkpoint see this step, so nothing written holds it
            where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            optimizer, key, value = bad
            fix = (
                f"lower train.lr (train.grad_clip is already {cfg.grad_clip})"
                if cfg.grad_clip
                else "lower train.lr or set train.grad_clip"
            )
            raise TrainingError(
                f"step {self.step + 1} ({stage}/{optimizer}): loss term '{key.split('/')[-1]}' is {value}; "
                f"training stopped without saving the bad state{where}; {fix}"
            )
        if self.ema:
            self.ema.update(self.pipeline)
        return dict(zip((k for _, k in names), flat))
