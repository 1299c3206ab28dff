"""The diffusion decoder's ``last_step_denoiser`` (genzoo/diffusion/decoder.py): a second network serves the
sampler's last model evaluation (Karlo's super_res_last), for every diffusion sampler; without it nothing changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genzoo.data import DataSpec
from genzoo.plugins import default_registry

REGISTRY = default_registry()
SAMPLERS = [n for n in REGISTRY.names("sampler") if REGISTRY.build("sampler", n).kind.value == "diffusion"]


class Recorder(nn.Module):
    """A denoiser that predicts a constant and records the original timesteps it is called at."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.calls = nn.Parameter(torch.tensor(value)), []

    def forward(self, x, t, cond=None):
        self.calls.append(int(t[0]))
        return torch.full_like(x, float(self.value))


def decoder(last: bool):
    spec = {"type": "diffusion-decoder", "timesteps": 50, "denoiser": {"type": "mlp-denoiser"}}
    if last:
        spec["last_step_denoiser"] = {"type": "mlp-denoiser"}
    return REGISTRY.build("decoder", spec, data=DataSpec("vectors", (4,)))


def test_without_one_the_decoder_is_as_before() -> None:
    dec = decoder(last=False)
    assert not hasattr(dec, "last_denoiser") and not any(k.startswith("last") for k in dec.state_dict())


@pytest.mark.parametrize("name", SAMPLERS)
def test_the_last_network_serves_exactly_the_last_model_evaluation(name: str) -> None:
    dec = decoder(last=True)
    assert any(k.startswith("last_denoiser.") for k in dec.state_dict())
    dec.denoiser, dec.last_denoiser = Recorder(0.1), Recorder(-0.1)
    sampler = REGISTRY.build("sampler", {"type": name, "steps": 6})
    x = dec.decode(
        torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
        None,
        sampler=sampler,
        generator=torch.Generator().manual_seed(1),
    )
    calls = dec.denoiser.calls + dec.last_denoiser.calls
    assert torch.isfinite(x).all() and dec.last_denoiser.calls, name
    assert set(dec.last_denoiser.calls) == {min(calls)} and min(calls) not in dec.denoiser.calls, name
