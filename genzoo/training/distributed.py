"""torch.distributed when launched by torchrun; a single process otherwise. No engine of our own."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str) -> DistInfo:
    """Initialise the process group from torchrun's environment (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    reopen(info, device_type)
    return info


def reopen(info: DistInfo, device_type: str) -> None:
    """The process group of a torchrun launch, initialised unless it is (a second ``fit`` of one trainer finds the
    group its first tore down)."""
    if info.enabled and "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def teardown(info: DistInfo, device: torch.device, *, failed: bool) -> None:
    """Every rank says whether its run ended in an error (a collective, so each also waits for the others: rank 0
    has written the checkpoint, or has failed to), then the group is destroyed, on the error path too. That last
    collective waits for gloo's worker to let go of its tensor (``any_flag``'s ``settle``): the group's threads live
    on after ``destroy_process_group``, and one still behind at the interpreter's exit aborts the rank."""
    if info.enabled and dist.is_initialized():
        try:
            any_flag(failed, info, device, settle=True)
        except Exception:
            if not failed:  # a failing rank's own error is the one to report, not a peer's closed socket
                raise
        finally:
            dist.destroy_process_group()


def any_flag(flag: bool, info: DistInfo, device: torch.device, *, settle: bool = False) -> bool:
    """True on every rank when any rank raised it (stop on a signal or a time budget together).

    ``settle``: for the last collective of a run, return only once the backend's worker thread has let go of the
    tensor. ``wait`` returns when the work is marked complete, before the worker drops its reference, and that drop
    takes the GIL (a Python-visible tensor's refcount going 2 -> 1, c10/util/intrusive_ptr.h). The gloo group and its
    threads outlive ``destroy_process_group`` (DDP keeps a reference to it, measured with torch 2.14), so a worker
    that is still behind when the script ends takes the GIL during interpreter shutdown, and the rank aborts with
    ``terminate called without an active exception`` (pytorch/pytorch#190489; the mechanism: pytorch/pytorch#179291)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    raised = bool(t.item())
    if settle and device.type == "cpu":  # measured with gloo; NCCL's watchdog keeps its works longer (unmeasured)
        _settle(t)
    return raised


def _settle(t: torch.Tensor, timeout: float = 2.0) -> None:
    """Return once the caller holds the only reference to ``t`` (a collective's worker thread has dropped its own)."""
    use_count = getattr(t, "_use_count", None)  # private in torch: without it, the old race and nothing worse
    deadline = time.monotonic() + timeout
    while use_count is not None and use_count() > 1:
        if time.monotonic() > deadline:
            warnings.warn(f"a collective's tensor is still held {timeout:.0f} s after it completed", stacklevel=2)
            break
        time.sleep(1e-4)
