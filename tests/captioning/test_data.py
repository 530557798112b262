"""Generated scenes (deterministic, both formats) and the loaders' bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmexit.data.coco import check_items, load_coco_annotations, load_images, load_karpathy
from mmexit.data.scenes import generate_scenes
from mmexit.data.caption_tokenizer import train_word_tokenizer
from mmexit.errors import DataError


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_scenes(root, num_train=30, num_val=6, num_test=6, image_size=32, seed=3)
    return root


def test_scenes_are_deterministic_and_in_both_formats(scenes, tmp_path):
    other = tmp_path / "again"
    generate_scenes(other, num_train=30, num_val=6, num_test=6, image_size=32, seed=3)
    assert (scenes / "dataset_coco.json").read_text() == (other / "dataset_coco.json").read_text()
    assert (scenes / "images/train/scene_000000.png").read_bytes() == (other / "images/train/scene_000000.png").read_bytes()
    splits = load_karpathy(scenes / "dataset_coco.json", scenes / "images")
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "val": 6, "test": 6}
    assert all(len(item.captions) == 5 and len(set(item.captions)) == 5 for item in splits["train"])
    coco = load_coco_annotations(scenes / "annotations/captions_test.json", scenes / "images/test")
    assert [(i.image_id, i.captions) for i in coco] == [(i.image_id, i.captions) for i in splits["test"]]
    check_items(coco)
    assert load_images(coco, 32).shape == (6, 3, 32, 32)


def test_tokenizer_round_trip(scenes):
    splits = load_karpathy(scenes / "dataset_coco.json", scenes / "images")
    tokenizer = train_word_tokenizer([c for item in splits["train"] for c in item.captions])
    caption = splits["train"][0].captions[0]
    ids = tokenizer.encode(caption)
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    decoded = tokenizer.decode(ids + [tokenizer.eos_id])
    assert decoded.replace(",", " ,").replace(":", " :").split() == caption.split()


def test_missing_image(scenes, tmp_path):
    items = load_coco_annotations(scenes / "annotations/captions_val.json", tmp_path)
    with pytest.raises(DataError, match=r"image file does not exist: .*scene_\d+\.png \(image id \d+\)"):
        check_items(items)


def test_unreadable_image(scenes, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    items = load_coco_annotations(scenes / "annotations/captions_val.json", folder)
    for item in items:
        (folder / item.path.name).write_bytes((scenes / "images/val" / item.path.name).read_bytes())
    (folder / items[2].path.name).write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=rf"cannot read image .*{items[2].path.name} \(image id {items[2].image_id}\)"):
        check_items(items)


def test_caption_file_in_wrong_format(tmp_path, scenes):
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps([{"image_id": 1, "caption": "a results file, not annotations"}]))
    with pytest.raises(DataError, match="captions.json: wrong format"):
        load_coco_annotations(bad, scenes / "images/val")
    with pytest.raises(DataError, match="captions.json: wrong format"):
        load_karpathy(bad, scenes / "images")
    bad.write_text("{not json")
    with pytest.raises(DataError, match="captions.json: not a JSON caption file"):
        load_karpathy(bad, scenes / "images")


def test_image_id_without_captions(tmp_path, scenes):
    data = json.loads((scenes / "annotations/captions_val.json").read_text())
    lonely = data["images"][1]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != lonely]
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"image id {lonely} \(.*\) has no captions"):
        load_coco_annotations(path, scenes / "images/val")
    karpathy = json.loads((scenes / "dataset_coco.json").read_text())
    karpathy["images"][0]["sentences"] = []
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    with pytest.raises(DataError, match=rf"image id {karpathy['images'][0]['cocoid']} .* has no captions"):
        load_karpathy(path, scenes / "images")


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    """A phone photo is stored sideways with an EXIF tag saying how to turn it: the model sees it upright."""
    from PIL import Image

    from mmexit.data.coco import image_tensor, read_image

    upright = Image.new("RGB", (6, 8), (250, 0, 0))
    upright.paste((0, 0, 250), (0, 0, 6, 3))  # a blue top band: any turn moves it
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the camera wrote it: 8 x 6
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
    stored.save(tmp_path / "tagged.png", exif=exif)
    stored.save(tmp_path / "untagged.png")
    expected = image_tensor(upright, 8)
    assert torch.equal(read_image(tmp_path / "tagged.png", 8), expected)
    assert not torch.equal(read_image(tmp_path / "untagged.png", 8), expected)
