"""Training curves (docs/training.md): `genzoo train --log tensorboard --log wandb` beside metrics.jsonl, read back from
TensorBoard's event files and W&B's offline run file and compared with the JSONL log; evaluations as eval/*; resume
drops what the repeated steps logged; a misspelt or missing logger is one line."""

from __future__ import annotations

import json
import math
import shutil
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import RecordingLogger, write_recipes

from genzoo import runs
from genzoo.cli import main

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


def train(tmp: Path, out: Path, *args: str) -> int:
    """`genzoo train tiny` (a U-Net of 8 channels on 8x8 digits) for 4 steps, each logged, a grid of 4 at step 4."""
    recipes = write_recipes(tmp / "tiny.yaml", "tiny")
    grid = ["--set", "train.sample_every=4", "--set", "train.sample_n=4"]
    argv = ["train", "tiny", "--recipes", str(recipes), "--out", str(out), "--device", "cpu", "--steps", "4", *grid]
    return main([*argv, "--no-progress", *args])


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    """The tiny run logged to metrics.jsonl, TensorBoard and W&B."""
    tmp = tmp_path_factory.mktemp("loggers")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_MODE", raising=False)  # the default: offline, whatever the developer's shell says
        mp.setenv("WANDB_CONFIG_DIR", str(tmp / "wandb-config"))
        mp.setenv("WANDB_CACHE_DIR", str(tmp / "wandb-cache"))
        mp.setenv("WANDB_DATA_DIR", str(tmp / "wandb-data"))
        assert train(tmp, tmp / "run", "--log", "tensorboard", "--log", "wandb", "--log", "tensorboard") == 0
    return tmp / "run"


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def numeric(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}


def events(run: Path, subdir: str = "tensorboard"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / subdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-ID.wandb``, what `wandb sync` uploads): a 7-byte ``:W&B`` header,
    then LevelDB's log format, 32 KiB blocks of chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, chunk, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def wandb_history(run_file: Path) -> list[dict]:
    """One dict per history row; an image's fields under ``TAG/field``."""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in wandb_records(run_file)
        if r.WhichOneof("record_type") == "history"
    ]


def offline_runs(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_tensorboard_scalars_equal_the_jsonl_log_and_the_grid_is_an_image(logged: Path) -> None:
    rows, acc = jsonl(logged), events(logged)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "loss" in rows[0] and "lr/main" in rows[0]
    assert set(acc.Tags()["scalars"]) == set(numeric(rows[0]))  # every number logged, and nothing else
    for tag in acc.Tags()["scalars"]:
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert got == [(r["step"], float(np.float32(r[tag]))) for r in rows], tag  # event files hold float32
    [grid] = acc.Images("samples")
    png = np.asarray(Image.open(logged / "samples" / "step-00000004.png"))  # digits: one channel
    pixels = np.asarray(Image.open(BytesIO(grid.encoded_image_string)))
    assert grid.step == 4 and np.array_equal(pixels if pixels.ndim == 2 else pixels[..., 0], png)
    assert "recipe/text_summary" in acc.Tags()["tensors"]  # the recipe on the Text tab
    assert len(list((logged / "tensorboard").glob("events.out.tfevents.*"))) == 1  # --log tensorboard twice: once


def test_wandb_offline_run_holds_the_jsonl_values_the_grid_and_the_recipe(logged: Path) -> None:
    [run_file] = offline_runs(logged)  # offline: the run lives under the run directory, nothing was sent
    run_id = (logged / "wandb" / "genzoo-run-id").read_text().strip()
    assert run_file.name == f"run-{run_id}.wandb"
    history = wandb_history(run_file)
    by_step = {}
    for h in history:
        by_step.setdefault(h["trainer/step"], {}).update(h)
    for r in jsonl(logged):
        assert {k: by_step[r["step"]][k] for k in numeric(r)} == numeric(r)  # JSON both sides: exact doubles
    assert by_step[4]["samples/_type"] == "image-file"
    media = np.asarray(Image.open(run_file.parent / "files" / by_step[4]["samples/path"]))
    png = np.asarray(Image.open(logged / "samples" / "step-00000004.png"))
    assert np.array_equal(media if media.ndim == 2 else media[..., 0], png)
    [run] = [r.run for r in wandb_records(run_file) if r.HasField("run")]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["name"] == "tiny" and config["train"]["loggers"] == ["jsonl", "tensorboard", "wandb"]
    assert run.run_id == run_id and run.project == "genzoo" and run.display_name == "tiny"


def test_loggers_do_not_change_what_the_run_draws(logged: Path, tmp_path: Path) -> None:
    assert train(tmp_path, tmp_path / "plain") == 0
    plain = tmp_path / "plain" / "checkpoints" / "step-00000004"
    assert (plain / "decoder.safetensors").read_bytes() == (
        logged / "checkpoints" / "step-00000004" / "decoder.safetensors"
    ).read_bytes()
    assert [r["loss"] for r in jsonl(tmp_path / "plain")] == [r["loss"] for r in jsonl(logged)]
    assert not (tmp_path / "plain" / "tensorboard").exists() and not (tmp_path / "plain" / "wandb").exists()


def test_an_evaluation_goes_to_the_runs_loggers_at_its_step(logged: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(logged, run)
    record = {"step": 4, "samples": 8, "split": "test", "swaps": {}, "sets": [], "figures": {"fd": 12.5, "kid": 0.25}}
    assert runs.record_evaluation(run, record) == run / runs.EVALUATIONS
    swapped = {**record, "swaps": {"sampler": "ddim", "steps": 5}, "figures": {"fd": 20.0}}
    runs.record_evaluation(run / "checkpoints" / "step-00000004", swapped)
    assert jsonl(run)[-2:] == [
        {"step": 4, "eval/fd": 12.5, "eval/kid": 0.25},
        {"step": 4, "eval/fd@sampler=ddim,steps=5": 20.0},
    ]
    acc = events(run)
    assert [(e.step, e.value) for e in acc.Scalars("eval/fd")] == [(4, 12.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/fd@sampler=ddim,steps=5")] == [(4, 20.0)]
    assert len(acc.Scalars("loss")) == 4  # the training curves are still all there
    later = offline_runs(run)[1:]  # one more offline session per evaluation, continuing the same W&B run id
    assert len(later) == 2 and all(p.name == offline_runs(run)[0].name for p in later)
    assert {"trainer/step": 4, "eval/fd": 12.5, "eval/kid": 0.25}.items() <= wandb_history(later[0])[0].items()


def test_a_resumed_run_logs_each_step_once(tmp_path: Path) -> None:
    """A run that died after step 4 with its last checkpoint at 2: resuming repeats steps 3 and 4, and both the JSONL
    log and TensorBoard (purge_step) keep only the repeated ones."""
    settings = {"checkpoint_every": 2, "loggers": ["jsonl", "tensorboard"]}
    fit_line(tmp_path, **settings)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")  # what a kill after step 4 leaves: the checkpoint at 2
    (tmp_path / "latest").write_text("step-00000002\n")
    died = [{**r, "loss": 99.0} if r["step"] > 2 else r for r in jsonl(tmp_path)]  # marks what the dead run logged
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in died) + '{"step": 5, "lo')
    fit_line(tmp_path, resume=True, **settings)
    rows = jsonl(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] != 99.0 for r in rows)
    assert rows[:2] == died[:2]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("loss")] == [
        (r["step"], float(np.float32(r["loss"]))) for r in rows
    ]


def test_an_unknown_logger_is_one_line_naming_the_field_and_the_choices(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, tmp_path / "run", "--log", "tensorbord") == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("genzoo train: error: train.loggers[1]: unknown logger 'tensorbord'")
    assert "did you mean 'tensorboard'" in line and "jsonl, tensorboard, wandb" in line
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("extra", ["tensorboard", "wandb"])
def test_without_the_extra_the_plugin_and_train_say_what_to_install(extra: str, tmp_path: Path, monkeypatch, capsys):
    import importlib.util

    import genzoo.plugins
    from genzoo.plugins import load_plugins

    real = importlib.util.find_spec  # as if the package were not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == extra else real(name, *a))
    loaded = load_plugins()
    [info] = [i for i in loaded[1] if i.name == extra]
    assert f"pip install 'genzoo[{extra}]'" in info.error and extra not in loaded[0].names("logger")
    monkeypatch.setattr(genzoo.plugins, "_DEFAULT", loaded)
    assert main(["plugins"]) == 0
    assert f"the {extra} plugin needs the {extra} package: pip install 'genzoo[{extra}]'" in capsys.readouterr().out
    assert train(tmp_path, tmp_path / "run", "--log", extra) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        f"genzoo train: error: train.loggers[1]: logger '{extra}' is not available: plugin '{extra}'"
    )
    assert f"pip install 'genzoo[{extra}]'" in line and not (tmp_path / "run").exists()
    other = ({"tensorboard", "wandb"} - {extra}).pop()  # everything else still loads
    assert loaded[0].names("logger") == sorted(["jsonl", other]) and "ddpm" in loaded[0].names("sampler")


class Line(torch.nn.Module):
    """The smallest pipeline the trainer takes: one weight fitted to the batch mean."""

    stages = ("main",)

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def optimizer_groups(self, stage):
        return {"main": [self.w]}

    def training_losses(self, batch, optimizer, stage):
        return {"loss": (self.w - batch["image"].mean()) ** 2}

    def begin_stage(self, stage, data):
        pass

    def ready_to_sample(self):
        return False

    def fit_after_training(self, data):
        pass


def fit_line(run: Path, resume: bool = False, **config) -> None:
    """4 steps of :class:`Line` through the Python API, each logged, with ``config`` over that."""
    from genzoo.training import TrainConfig, Trainer

    config = TrainConfig(**{"steps": 4, "batch_size": 2, "log_every": 1, "device": "cpu", **config})
    data = {"image": torch.arange(8.0).view(8, 1)}
    Trainer(Line(), data, config=config, run_dir=run, recipe={"name": "line"}, progress=False).fit(resume=resume)


def test_the_python_api_takes_loggers_in_the_train_config(tmp_path: Path) -> None:
    fit_line(tmp_path, loggers=["jsonl", {"type": "tensorboard", "subdir": "tb"}])
    losses = [(e.step, e.value) for e in events(tmp_path, "tb").Scalars("loss")]
    assert losses == [(r["step"], float(np.float32(r["loss"]))) for r in jsonl(tmp_path)] and len(losses) == 4
    assert all(math.isfinite(v) for _, v in losses)


def test_a_logger_that_cannot_start_is_one_error_naming_it(tmp_path: Path) -> None:
    from genzoo.errors import TrainingError

    (tmp_path / "blocker").write_text("a file where the event folder would go")
    with pytest.raises(TrainingError) as e:
        fit_line(tmp_path, loggers=["jsonl", {"type": "tensorboard", "subdir": "blocker"}])
    assert str(e.value).startswith("train.loggers: logger 'tensorboard' could not start: ")
    assert "genzoo info logger:tensorboard" in str(e.value) and "\n" not in str(e.value)


def log_to(monkeypatch, recorder: RecordingLogger, run_dir: Path, recipe: dict, record: dict) -> list:
    """`log_evaluation` with the run's loggers replaced by ``recorder``; returns the specs it was asked to build."""
    from genzoo.training import loggers

    asked = []

    def build(specs):
        asked.append(specs)
        return loggers.LoggerGroup([recorder])

    monkeypatch.setattr(loggers, "build_loggers", build)
    loggers.log_evaluation(run_dir, recipe, record)
    return asked


def test_an_evaluation_starts_the_loggers_as_an_evaluation_of_the_named_run(tmp_path: Path, monkeypatch) -> None:
    rec = RecordingLogger()
    recipe = {"name": "vae-shapes", "train": {"loggers": ["jsonl", "wandb"]}}
    record = {"step": 30, "sets": ["train.lr=0.1"], "swaps": {"sampler": "ddim"}, "figures": {"fd": 3.5}}
    assert log_to(monkeypatch, rec, tmp_path / "run-a", recipe, record) == [["jsonl", "wandb"]]
    (_, run), *rest = rec.events
    assert (run.name, run.phase, run.run_dir, run.config) == ("vae-shapes", "evaluation", tmp_path / "run-a", recipe)
    assert rest == [("metrics", {"eval/fd@sampler=ddim,train.lr=0.1": 3.5}, 30), ("finish", "success")]
    # a recipe without a name is named by its folder; a record without a step is logged at step 0
    rec = RecordingLogger()
    log_to(monkeypatch, rec, tmp_path / "run-b", {"train": {}}, {"figures": {"fd": 1.0}})
    assert rec.events[0][1].name == "run-b" and rec.events[1:] == [
        ("metrics", {"eval/fd": 1.0}, 0),
        ("finish", "success"),
    ]


def test_an_evaluation_of_an_old_recipe_uses_the_default_loggers(tmp_path: Path, monkeypatch) -> None:
    from genzoo.training import TrainConfig

    asked = log_to(monkeypatch, RecordingLogger(), tmp_path, {"train": {"no_such_field": 1}}, {"figures": {"fd": 1.0}})
    assert asked == [TrainConfig().loggers]


def test_a_logger_that_fails_on_an_evaluation_is_one_line_on_stderr(tmp_path: Path, monkeypatch, capsys) -> None:
    from genzoo.errors import TrainingError
    from genzoo.training import loggers

    rec = RecordingLogger(fail=RuntimeError("no login"))
    log_to(monkeypatch, rec, tmp_path, {}, {"step": 2, "figures": {"fd": 1.0}})
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("genzoo: the evaluation is not sent to the run's loggers: TrainingError: ")
    assert "no login" in err[-1] and [e[0] for e in rec.events] == ["start"]  # no figures, no finish

    def unavailable(specs):
        raise TrainingError("train.loggers[0]: unknown logger 'x'")

    monkeypatch.setattr(loggers, "build_loggers", unavailable)
    loggers.log_evaluation(tmp_path, {}, {"figures": {"fd": 1.0}})
    assert capsys.readouterr().err.strip() == (
        "genzoo: the evaluation is not sent to the run's loggers: train.loggers[0]: unknown logger 'x'"
    )


@pytest.mark.parametrize(
    ("line", "step"),
    [
        ('{"step": 3, "loss": 1.0}', 3),
        ('{"step": "3"}', math.inf),
        ('{"loss": 1.0}', math.inf),
        ('{"step": 5, "lo', math.inf),
        ("[1, 2]", math.inf),
    ],
)
def test_a_log_line_that_is_not_a_whole_record_sorts_after_every_step(line: str, step: float) -> None:
    from genzoo.training.loggers import _step_of

    assert _step_of(line) == step


def test_a_logger_that_cannot_start_is_named_with_its_errors_type_and_first_line(tmp_path: Path) -> None:
    from genzoo.errors import TrainingError
    from genzoo.training.loggers import LoggerGroup, RunInfo

    class NoLogin(RecordingLogger):
        pass

    no_login = NoLogin(fail=PermissionError("\n  no API key found\nrun `wandb login` first  \n"))
    with pytest.raises(TrainingError) as e:
        LoggerGroup([RecordingLogger(), no_login]).start(RunInfo(run_dir=tmp_path, name="r", config={}))
    assert str(e.value) == (
        "train.loggers: logger 'NoLogin' could not start: PermissionError: no API key found; "
        "fix its fields (`genzoo info logger:NoLogin`) or drop it"
    )


def test_the_jsonl_log_writes_numpy_and_tensor_scalars_as_numbers(tmp_path: Path) -> None:
    from genzoo.training.loggers import JsonlConfig, JsonlLogger, RunInfo

    logger = JsonlLogger(JsonlConfig())
    logger.start(RunInfo(run_dir=tmp_path, name="r", config={}))
    logger.log_metrics({"loss": np.float32(0.5), "grad_norm": torch.tensor(2.0), "stage": "decoder"}, 3)
    assert jsonl(tmp_path) == [{"step": 3, "loss": 0.5, "grad_norm": 2.0, "stage": "decoder"}]
