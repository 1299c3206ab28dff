"""Issue 21.2 and 21.4: every bad input through the real command line is one `genzoo CMD: error: ...` line.

Each probe runs the command line in a process of its own and asserts a non-zero exit, one line on stderr naming the
file or field, and no traceback. One tiny run is trained once for the module; the probes damage copies of it.

Importing torch takes most of a `python -m genzoo` start (2-4 s of CPU), so the probes are forked from one process
that has imported genzoo once: each child runs ``genzoo.cli.main(argv)`` as the console script does, with its own
stdout and stderr, and loads the plugins itself. The SIGINT probe and the module's training run start
``python -m genzoo`` from scratch.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import environ, genzoo_argv, run_genzoo, write_recipes

ENV = {"OMP_NUM_THREADS": "1", "GENZOO_DEBUG": None}  # over the environment (tiny.environ): offline, no debug

SERVER = r"""
import json, os, sys, tempfile, traceback
import genzoo.cli, genzoo.api, genzoo.hub, genzoo.training  # torch and genzoo imported once; nothing run: safe to fork

for line in sys.stdin:
    request = json.loads(line)
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the probe: what `sys.exit(main())` of the console script does, uncaught exceptions included
        code = 1
        try:
            os.environ.update(request["env"])
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.argv = ["genzoo", *request["argv"]]
            try:
                code = genzoo.cli.main(request["argv"])
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(errors="replace"),
                      "stderr": err.read().decode(errors="replace")}), flush=True)
"""


class Probes:
    """The forking process; ``run(*argv)`` is one command line in a fresh child."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environ(**ENV)
        )

    def run(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        self.proc.stdin.write(json.dumps({"argv": list(argv), "env": env or {}}) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], 300)[0]:  # one answer per request: nothing is left buffered
            self.proc.kill()
            raise TimeoutError(f"genzoo {' '.join(argv)} did not finish in 300 s")
        answer = json.loads(self.proc.stdout.readline())
        return subprocess.CompletedProcess(["genzoo", *argv], answer["rc"], answer["stdout"], answer["stderr"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def probes():
    if not hasattr(os, "fork"):
        pytest.skip("the probes fork")
    p = Probes()
    yield p
    p.close()


def assert_one_line(r: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """A non-zero exit, exactly one line on stderr, `genzoo CMD: error: ...`, holding every needle."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"genzoo {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    return write_recipes(tmp_path_factory.mktemp("recipes") / "tiny.yaml", "tiny")


@pytest.fixture(scope="module")
def run(recipes: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    r = run_genzoo("train", "tiny", "--recipes", str(recipes), "--out", str(out), "--no-progress", env=ENV)
    assert r.returncode == 0, r.stderr
    return out


def checkpoint_of(run: Path) -> Path:
    return run / "checkpoints" / (run / "latest").read_text().strip()


def damaged(run: Path, tmp_path: Path, meta=None, files=None) -> Path:
    """A copy of the run's checkpoint with ``meta(dict)`` applied to meta.json and ``files(dir)`` run on it."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_of(run), ckpt)
    if meta is not None:
        m = json.loads((ckpt / "meta.json").read_text())
        meta(m)
        (ckpt / "meta.json").write_text(json.dumps(m))
    if files is not None:
        files(ckpt)
    return ckpt


# --------------------------------------------------------------------------- sample -n


@pytest.mark.parametrize("n", ["0", "-3"])
def test_sample_with_no_or_negative_n(probes: Probes, run: Path, tmp_path: Path, n: str) -> None:
    r = probes.run("sample", str(run), f"-n={n}", "--out", str(tmp_path / "g.png"))
    assert_one_line(r, "sample", f"-n {n}", "at least 1")


# --------------------------------------------------------------------------- train --init-except


def test_init_except_without_init_from_or_with_a_role_the_recipe_lacks(
    probes: Probes, recipes: Path, run: Path, tmp_path: Path
) -> None:
    train = ("train", "tiny", "--recipes", str(recipes), "--no-progress", "--init-except")
    r = probes.run(*train, "decoder", "--out", str(tmp_path / "a"))
    assert_one_line(r, "train", "--init-except", "pass --init-from too")
    r = probes.run(*train, "upsampler_decoder", "--init-from", str(run), "--out", str(tmp_path / "b"))
    assert_one_line(r, "train", "--init-except upsampler_decoder", "its components are")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before the run directory is made


# --------------------------------------------------------------------------- meta.json


def _append(f: Path, data: bytes) -> None:
    with open(f, "ab") as fh:
        fh.write(data)


META_PROBES = {
    "listed file missing": (None, lambda d: (d / "recipe.json").unlink(), ["recipe.json is missing"]),
    "component not listed": (
        lambda m: m["files"].pop("decoder.safetensors"),
        None,
        ["meta.json: ", "'files' has no entry for decoder.safetensors"],
    ),
    "no bytes": (
        lambda m: m["files"]["decoder.safetensors"].pop("bytes"),
        None,
        ["meta.json: ", "field 'files.decoder.safetensors.bytes'"],
    ),
    "format a string": (lambda m: m.update(format="1"), None, ["meta.json: ", "field 'format'"]),
    "files a list": (lambda m: m.update(files=sorted(m["files"])), None, ["meta.json: ", "field 'files'"]),
    "unknown data_spec field": (
        lambda m: m["data_spec"].update(colour_space="rgb"),
        None,
        ["meta.json: ", "field 'data_spec'", "colour_space"],
    ),
    "step missing": (lambda m: m.pop("step"), None, ["meta.json: ", "field 'step'"]),
    "file longer than recorded": (
        None,
        lambda d: _append(d / "decoder.safetensors", b"\0" * 8),
        ["decoder.safetensors is longer than meta.json records"],
    ),
    "file truncated": (
        None,
        lambda d: (d / "decoder.safetensors").write_bytes(b"\0" * 100),
        ["decoder.safetensors is truncated"],
    ),
    "meta.json deleted": (None, lambda d: (d / "meta.json").unlink(), ["meta.json is missing"]),
}


@pytest.mark.parametrize("probe", list(META_PROBES))
def test_damaged_checkpoint(probes: Probes, run: Path, tmp_path: Path, probe: str) -> None:
    meta, files, needles = META_PROBES[probe]
    ckpt = damaged(run, tmp_path, meta, files)
    line = assert_one_line(
        probes.run("sample", str(ckpt), "-n", "1", "--out", str(tmp_path / "g.png")), "sample", str(ckpt), *needles
    )
    if probe == "file longer than recorded":
        assert "truncated" not in line


def test_meta_json_deleted_in_a_run_directory_is_not_a_missing_checkpoint(
    probes: Probes, run: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (checkpoint_of(copy) / "meta.json").unlink()
    line = assert_one_line(
        probes.run("sample", str(copy), "--out", str(tmp_path / "g.png")),
        "sample",
        str(checkpoint_of(copy) / "meta.json") + " is missing",
    )
    assert "points at" not in line and "holds no genzoo checkpoint" not in line


# --------------------------------------------------------------------------- data


def _images(root: Path, n: int = 6) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("L", (10, 10), 40 * i).save(root / f"{i}.png")
    return root


def _corrupt(root: Path) -> str:
    _images(root)
    (root / "3.png").write_bytes(b"this is not a png")
    return "3.png"


def _truncated(root: Path) -> str:
    _images(root)
    whole = (root / "4.png").read_bytes()
    (root / "4.png").write_bytes(whole[: len(whole) // 2])
    return "4.png"


DATA_PROBES = {
    "missing root": (lambda root: None, "field 'root' is"),
    "empty root": (lambda root: root.mkdir(), "no images"),
    "corrupt image": (_corrupt, "3.png cannot be read as an image"),
    "truncated image": (_truncated, "4.png cannot be read as an image"),
}


def train_on(probes: Probes, recipes: Path, tmp_path: Path, data: str, *flags: str) -> subprocess.CompletedProcess:
    """`genzoo train tiny` into tmp_path/out with ``--set data={DATA}``."""
    out = str(tmp_path / "out")
    return probes.run("train", "tiny", "--recipes", str(recipes), "--out", out, *flags, "--set", f"data={{{data}}}")


def imagefolder(root: Path, more: str = "") -> str:
    return f"type: imagefolder, root: '{root}', image_size: 8, channels: 1{more}"


@pytest.mark.parametrize("probe", list(DATA_PROBES))
def test_imagefolder(probes: Probes, recipes: Path, tmp_path: Path, probe: str) -> None:
    make, needle = DATA_PROBES[probe]
    root = tmp_path / "images"
    make(root)
    assert_one_line(train_on(probes, recipes, tmp_path, imagefolder(root)), "train", "imagefolder: ", needle)


def test_imagefolder_missing_captions_file(probes: Probes, recipes: Path, tmp_path: Path) -> None:
    root = _images(tmp_path / "images")
    r = train_on(probes, recipes, tmp_path, imagefolder(root, ", captions: caps.jsonl"))
    assert_one_line(r, "train", str(root / "caps.jsonl"), "does not exist", "field 'captions'")


def test_imagefolder_skip_bad_trains_on_the_rest(probes: Probes, recipes: Path, tmp_path: Path) -> None:
    root = tmp_path / "images"
    _corrupt(root)
    r = train_on(probes, recipes, tmp_path, imagefolder(root, ", skip_bad: true"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "imagefolder: warning: skipped 1 unreadable image(s) of the train split" in r.stderr and "3.png" in r.stderr


def test_torchvision_dataset_not_downloaded(probes: Probes, recipes: Path, tmp_path: Path) -> None:
    r = train_on(probes, recipes, tmp_path, f"type: torchvision, name: MNIST, root: '{tmp_path / 'tv'}'")
    assert_one_line(r, "train", "torchvision MNIST: not found under", "set download: true")


# --------------------------------------------------------------------------- hub


def test_refused_pull_leaves_nothing_in_the_destination(probes: Probes, run: Path, tmp_path: Path) -> None:
    src = damaged(run, tmp_path, files=lambda d: _append(d / "decoder.safetensors", b"\0"))
    dest = tmp_path / "pulled"
    assert_one_line(
        probes.run("pull", str(src), str(dest)),
        "pull",
        "not a valid genzoo checkpoint",
        f"nothing was written to {dest}",
    )
    assert not dest.exists()


def test_pull_of_an_invalid_repo_id_is_not_an_unreachable_hub(probes: Probes, tmp_path: Path) -> None:
    line = assert_one_line(
        probes.run("pull", "not a repo!!", str(tmp_path / "out")),
        "pull",
        "'not a repo!!' is neither an existing local directory nor a valid Hub repo id",
    )
    assert "reach" not in line


def test_push_errors(probes: Probes, run: Path) -> None:
    line = assert_one_line(probes.run("push", str(run), "bad id!!"), "push", "'bad id!!' is not a valid Hub repo id")
    assert "reach" not in line
    line = assert_one_line(probes.run("push", str(run), "someone/genzoo-tiny"), "push", "HF_HUB_OFFLINE is set")
    assert "local directory" not in line  # a local directory is no answer to a failed upload


# --------------------------------------------------------------------------- an interrupted run


def test_sigint_stopped_run_exits_non_zero_and_says_it_was_interrupted(recipes: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = genzoo_argv(
        "train", "tiny", "--recipes", str(recipes), "--out", str(out), "--steps", "1000000", "--no-progress"
    )
    p = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ(OMP_NUM_THREADS="1")
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # the loop has taken a step once the log has a line
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "trained" not in stdout
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("genzoo train: interrupted by SIGINT at step ") and "continue with --resume" in last
    assert (out / "latest").exists()  # and the checkpoint it names was written
