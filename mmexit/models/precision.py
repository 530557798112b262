"""Inference precision: one dtype applied to a loaded model, for the recipe's ``evaluate.dtype``,
``mmexit predict --dtype`` and ``mmexit serve --dtype`` alike.

- ``float32``: the model as trained;
- ``bfloat16`` / ``float16``: every floating parameter and buffer cast (``model.to(dtype)``); hidden
  states, attention masks and K/V caches follow the weights' dtype; logits are read back as float32
  by the rules. float16 needs a GPU (CPUs lack float16 kernels for most ops): refused on CPU;
- ``int8``: dynamic quantization of the ``nn.Linear`` layers (weights int8 per output channel,
  activations quantized per call; ``torch.ao.quantization.quantize_dynamic``), CPU only. Embeddings and
  norms stay float32, and so do the down-projections (``in_features > out_features``: a feed-forward
  block's output layer, exit classifiers): they read the activation's outliers, which the 7-bit dynamic
  activation range of fbgemm's kernels clips (on the quickstart, quantizing them too costs 1.1 points
  of accuracy; keeping them float costs none). A model may name further modules that must keep float
  weights in ``float_modules`` (e.g. a captioner's LM head, whose weight rows it reads directly).

Training always runs in float32 (or accelerate's mixed precision); the dtype applies after it, so
calibration, evaluation and serving all see the deployed model.
"""

from __future__ import annotations

import warnings
from typing import Union

import torch
from torch import nn

from mmexit.errors import RecipeError

DTYPES = ("float32", "bfloat16", "float16", "int8")
DTYPE_DOC = ("inference precision of calibration, evaluation and serving (training stays float32): float32, "
             "bfloat16, float16 (GPU only) or int8 (CPU only: dynamic quantization of the Linear layers)")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(name: str, device: Union[str, torch.device], where: str = "evaluate.dtype") -> None:
    """Refuse an unknown dtype, float16 on CPU and int8 off CPU: one line naming ``where``."""
    if name not in DTYPES:
        raise RecipeError(f"{where}: {name!r} is not allowed; allowed: {', '.join(DTYPES)}")
    kind = torch.device(device).type
    if name == "float16" and kind == "cpu":
        raise RecipeError(f"{where}: float16 needs a GPU (device is cpu); on CPU use bfloat16 or int8")
    if name == "int8" and kind != "cpu":
        raise RecipeError(f"{where}: int8 (dynamic quantization) runs on CPU only (device is {kind}); "
                          "on a GPU use bfloat16 or float16")


def apply_precision(model: nn.Module, name: str, device: Union[str, torch.device],
                    where: str = "evaluate.dtype") -> nn.Module:
    """``model`` at precision ``name`` (in place where possible; use the returned module).

    The result carries ``mmexit_dtype`` (the name), read by ``precision_of``."""
    check_dtype(name, device, where)
    if name in FLOAT_DTYPES:
        model = model.to(FLOAT_DTYPES[name])
    else:
        model = quantize_linear_int8(model)
    model.mmexit_dtype = name
    return model


def quantize_linear_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every ``nn.Linear`` except down-projections and those under
    ``model.float_modules`` (see the module doc)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    keep = tuple(getattr(model, "float_modules", ()))
    spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.in_features <= module.out_features
            and not any(name == k or name.startswith(k + ".") for k in keep)}
    model = model.float()
    with warnings.catch_warnings():  # torch deprecates torch.ao quantization in favour of torchao (not a dependency)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
        # in place: adapters hold references to the backbone's module lists, which keep seeing the swapped layers
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def precision_of(model: nn.Module) -> str:
    """The dtype name a model was set to (``apply_precision``), or read from its first floating parameter."""
    name = getattr(model, "mmexit_dtype", None)
    if name:
        return name
    dtype = compute_dtype(model)
    return {v: k for k, v in FLOAT_DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype inputs (images, cached features) must have: that of the first floating parameter
    (float32 for an int8 model, whose quantized layers take float32 activations)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32
