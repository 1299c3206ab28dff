"""DDP under torchrun: 2 gloo processes on CPU give the single-process weights (same global batch)."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch
from tiny import run, torchrun, write_recipes

from genzoo.checkpoint import load_checkpoint

SCRIPT = textwrap.dedent('''
    import sys, torch
    from torch import nn
    from genzoo.interfaces import Pipeline
    from genzoo.training import TrainConfig, Trainer

    class Regress(Pipeline):
        """Deterministic loss (mean over the batch), so the DDP average equals the global-batch gradient."""
        def __init__(self):
            super().__init__({"decoder": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))})
        def training_losses(self, batch, *, optimizer="main", stage="main"):
            x = batch["image"].flatten(1)
            return {"loss": (self.components["decoder"](x).squeeze(1) - batch["label"].float()).pow(2).mean()}

    g = torch.Generator().manual_seed(0)
    data = {"image": torch.randn(64, 1, 2, 2, generator=g), "label": torch.randint(0, 3, (64,), generator=g)}
    torch.manual_seed(0)
    config = TrainConfig(steps=10, batch_size=16, lr=1e-2, ema_decay=None, grad_clip=None, device="cpu", log_every=5)
    Trainer(Regress(), data, config=config, run_dir=sys.argv[1], recipe={"name": "ddp"}, progress=False).fit()
''')


ENV = {"OMP_NUM_THREADS": "1", "RANK": None, "WORLD_SIZE": None}  # over the environment (tiny.environ)


def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    single = run(sys.executable, str(script), str(tmp_path / "single"), env=ENV)
    assert single.returncode == 0, single.stderr
    t0 = time.perf_counter()
    ddp = run(*torchrun(2), str(script), str(tmp_path / "ddp"), env=ENV)
    print(f"2-process DDP run: {time.perf_counter() - t0:.1f}s")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_checkpoint(tmp_path / "single").components["decoder"]
    b = load_checkpoint(tmp_path / "ddp").components["decoder"]
    assert a.keys() == b.keys()
    for k in a:  # float32 all-reduce sums in another order: equal to rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # rank 0 alone wrote the log
    rows = [json.loads(r) for r in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]
    # every parameter has a gradient every step: no search for unused ones (issue 21.4)
    assert "find_unused_parameters=True" not in ddp.stderr


def test_a_rank_that_fails_at_the_end_stops_both_with_its_own_error(tmp_path: Path) -> None:
    """Rank 0 failing after training (here in fit_after_training) must not leave rank 1 waiting at the group's
    teardown: both ranks agree that a run failed, destroy the group and exit, rank 0's error reported."""
    script = tmp_path / "fail_ddp.py"
    script.write_text(
        SCRIPT.replace(
            "\ng = torch.Generator()",
            "\ndef fit_after_training(self, data):\n"
            "    import torch.distributed as dist\n"
            "    if dist.get_rank() == 0:\n"
            "        raise RuntimeError('rank 0 cannot fit its prior')\n"
            "Regress.fit_after_training = fit_after_training\n"
            "g = torch.Generator()",
            1,
        )
    )
    t0 = time.perf_counter()
    r = run(*torchrun(2), str(script), str(tmp_path / "ddp"), env=ENV)
    assert r.returncode != 0 and "rank 0 cannot fit its prior" in r.stderr, r.stderr[-3000:]
    assert "terminate called" not in r.stderr and time.perf_counter() - t0 < 120
    assert (tmp_path / "ddp" / "checkpoints").is_dir()  # the trained weights were saved before the error


def test_genzoo_train_under_torchrun_reports_once(tmp_path: Path) -> None:
    """Issue 21.4: rank 1 printed `checkpoint None`, and every rank warned about find_unused_parameters."""
    recipes = write_recipes(tmp_path / "tiny.yaml", "tiny")  # trained 3 steps on the CPU here
    r = run(
        *(*torchrun(2), "-m", "genzoo", "train", "tiny", "--recipes", str(recipes), "--out", str(tmp_path / "run")),
        *("--steps", "3", "--device", "cpu", "--no-progress"),
        env=ENV,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [line for line in r.stdout.splitlines() if line.startswith("trained")]
    assert len(reports) == 1 and reports[0].startswith("trained tiny to step 3 in "), r.stdout
    assert reports[0].endswith(f"; checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-00000003'}")
    assert "None" not in r.stdout and "find_unused_parameters=True" not in r.stderr
    assert "terminate called" not in r.stderr  # the group is torn down, not left to the interpreter's exit


def test_the_last_flag_returns_only_when_the_backend_has_let_go_of_its_tensor(monkeypatch) -> None:
    """gloo's ``wait`` returns before its worker drops the tensor, and that drop takes the GIL: at the interpreter's
    exit it aborts the rank (CI, 11-30: ``terminate called without an active exception``; a real 2-process gloo
    group still held the tensor after 27 of 200 all-reduces). Here a thread plays the worker, holding a view of the
    tensor for 50 ms after the all-reduce returns: ``any_flag(settle=True)``, which ``teardown`` uses, waits it out;
    without ``settle`` it does not."""
    from genzoo.training import distributed

    def all_reduce(t, op=None):
        held, released = [t.view(1)], threading.Event()  # a view holds a C++ reference to t, as the worker's work does

        def worker():
            time.sleep(0.05)
            held.clear()  # the reference goes first, then the worker says so
            released.set()

        releases.append(released)
        threading.Thread(target=worker).start()

    releases: list[threading.Event] = []
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    info, cpu = distributed.DistInfo(rank=0, world_size=2), torch.device("cpu")
    assert distributed.any_flag(True, info, cpu, settle=True) is True and releases[-1].is_set()
    assert distributed.any_flag(False, info, cpu) is False and not releases[-1].is_set()
    assert releases[-1].wait(5)
