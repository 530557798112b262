"""Wall-clock timing by the BENCHMARKS.md protocol: alternate A B A B, warm up, take medians."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_alternating(
    candidates: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, calls: int = 1
) -> dict[str, float]:
    """Median seconds per call of each candidate, candidates interleaved per repeat.

    Every candidate runs ``warmup`` times untimed first; then ``repeats`` rounds call each
    candidate in turn (A B C, A B C, ...), so drift in machine load hits all alike. A sample is
    ``calls`` back-to-back calls of one candidate divided by ``calls`` (for calls too short to time alone).
    """
    if repeats < 1 or calls < 1:
        raise ValueError("repeats and calls must be >= 1")
    for function in candidates.values():
        for _ in range(warmup):
            function()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, function in candidates.items():
                _synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    function()
                _synchronize()
                samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine_info() -> dict:
    """What a reader needs to interpret absolute times: cores, threads, device, versions."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return info
