"""Fixtures for every test: few threads, no tokenizer fork warnings."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield
