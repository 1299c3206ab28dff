"""Shared fixtures: a fresh registry, a temp run directory, CPU-only determinism."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# two threads (CI's cores); GENZOO_TEST_THREADS=1 leaves the other core to a job running beside the tests
torch.set_num_threads(int(os.environ.get("GENZOO_TEST_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): its models are
    tiny or its loops run thousands of small ops, so one thread is as fast and does not spin when other jobs
    share the cores."""
    from tiny import threads

    with threads(1):
        yield


@pytest.fixture
def registry():
    from genzoo.registry import Registry

    return Registry()


@pytest.fixture
def loaded_registry():
    """The registry with every installed plugin (built-ins included), loaded once per test."""
    from genzoo.plugins import load_plugins

    reg, infos = load_plugins()
    return reg


@pytest.fixture
def cheap_judges(tmp_path_factory, monkeypatch):
    """Judges trained in a few seconds into a private cache (the shipped defaults take about a minute)."""
    from genzoo.eval import judges

    monkeypatch.setenv("GENZOO_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setitem(judges.DEFAULT_TRAIN, "digits", judges.JudgeTrainConfig(steps=150, translate=1))
    monkeypatch.setitem(judges.DEFAULT_TRAIN, "shapes", judges.JudgeTrainConfig(steps=150))
