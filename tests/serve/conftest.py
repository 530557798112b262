"""Serving tests: one torch thread (tiny layers on a shared 2-core machine run faster without OpenMP sync)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():  # overrides tests/conftest.py's fixture of the same name
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    # restored: a later folder's module-scoped fixtures (built before its own thread fixture runs)
    # must not compute references at another thread count than its tests (float noise)
    torch.set_num_threads(before)
