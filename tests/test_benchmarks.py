"""benchmarks/gpu.py, the GPU check of issue 11, run at smoke sizes on this machine so it is known to work
before a GPU lease is spent on it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genzoo.nn.unet import UNetConfig, unet_flops

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--out", str(out), "--smoke", "--compile", ""],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads((out / "gpu.json").read_text())


def test_gpu_check_reports_every_figure(report):
    sys.path.insert(0, str(BENCH))
    from gpu import MODELS, SMOKE

    peak = report["matmul_tflops"]["bf16"]
    for name, kw in MODELS.items():
        fig = report[name]
        assert fig["ddim3_8px_images_per_s_fp32"] > 0 and fig["ddim3_8px_images_per_s_bf16"] > 0
        train = fig["train_bf16_eager_b2"]
        # MFU is the counted model FLOPs at the measured rate over the measured peak
        assert train["mfu_vs_measured"] == pytest.approx(
            train["model_tflop_per_step"] * train["it_per_s"] / peak, rel=1e-9
        )
        # forward + backward is about three forwards (backward: grads of inputs and of weights)
        forward = unet_flops(UNetConfig(in_channels=3, image_size=8, **{**kw, **SMOKE}), train["batch"])
        assert 2.8 < train["model_tflop_per_step"] * 1e12 / forward < 3.05
    first = report[next(iter(MODELS))]["train_bf16_trainer_b2"]  # the same step through genzoo's Trainer
    assert first["it_per_s"] > 0 and first["trainer_over_bare"] == pytest.approx(
        first["it_per_s"] / report[next(iter(MODELS))]["train_bf16_eager_b2"]["it_per_s"], rel=1e-9
    )


def test_the_inpainting_benchmark_hides_the_lower_half_of_a_box_around_the_object():
    sys.path.insert(0, str(BENCH))
    from inpaint import object_hole

    # shapes puts an object's centre at 0.22, 0.5 or 0.78 of the side; cell 4 is the middle, cell 6 bottom left
    mask = object_hole(torch.tensor([[0, 0, 0, 4], [0, 0, 0, 6]]), 32)
    assert mask.shape == (2, 1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
    centre = torch.zeros(32, 32)
    centre[16:24, 8:24] = 1  # rows from the centre (16) down a quarter side, columns a quarter side either way
    assert torch.equal(mask[0, 0], centre)
    ys, xs = mask[1, 0].nonzero(as_tuple=True)
    assert ys.min() == round(0.78 * 32) and 0.22 * 32 - 8 <= xs.min() and xs.max() < 0.22 * 32 + 8
    whole = object_hole(torch.tensor([[0, 0, 0, 4]]), 32, whole=True)[0, 0]
    centre[8:16, 8:24] = 1  # and the upper half
    assert torch.equal(whole, centre)
