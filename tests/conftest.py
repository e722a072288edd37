"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    # The test tensors and models are small and pytest-xdist already runs one worker per
    # core: a second intra-op thread only spins against the other worker, which on two
    # shared cores costs far more CPU than the work itself.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipeline() -> Any:
    """The seeded random-weight test pipeline (tiny-random), one per test module."""
    from meg.split.loading import load_pipeline

    torch.manual_seed(0)
    return load_pipeline("tiny-random")


@pytest.fixture(scope="module")
def engine(pipeline: Any) -> Any:
    from meg.split.engine import SplitEngine

    return SplitEngine(pipeline)


@pytest.fixture(scope="module")
def edge(pipeline: Any) -> Iterator[Any]:
    """An edge server on 127.0.0.1:0 serving the module's tiny-random pipeline (in-process rule policy)."""
    from meg.services.background import ServiceLoop, start_edge
    from meg.services.edge import EdgeConfig

    loop = ServiceLoop()
    server = start_edge(EdgeConfig(port=0, model="tiny-random"), pipeline=pipeline, loop=loop)
    yield server
    server.stop(0)
    loop.close()
