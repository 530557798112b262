"""Flickr8k/30k in the original layout and as a Karpathy file: the same items; bad inputs name file and entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmexit.data.coco import check_items, load_karpathy
from mmexit.data.flickr import load_flickr
from mmexit.errors import DataError
from mmexit.recipe import load_recipe, validate_recipe
from mmexit.tasks.captioning import load_splits

REPO = Path(__file__).resolve().parents[2]
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
NAMES = {"train": ["1000_a1.jpg", "2000_b2.jpg", "3000_c3.jpg"], "dev": ["4000_d4.jpg"], "test": ["5000_e5.jpg"]}


def make_flickr(root: Path) -> Path:
    """A tiny Flickr8k distribution: 5 photos, 2 captions each, the three split files, a Karpathy file."""
    images = root / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    lines, entries = [], []
    for split, names in NAMES.items():
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
        for name in names:
            Image.new("RGB", (16, 16), (int(name[0]) * 40, 20, 90)).save(images / name, quality=90)
            captions = [f"A dog number {name[0]} runs .", f"a {split} photo {name[:4]}"]
            lines += [f"{name}#{i}\t{caption}" for i, caption in enumerate(captions)]
            entries.append({"filename": name, "imgid": len(entries), "split": "val" if split == "dev" else split,
                            "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions]})
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "dataset_flickr8k.json").write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    return root


def _as_tuples(splits: dict) -> dict:
    return {name: [(i.image_id, i.path.resolve(), i.captions) for i in items] for name, items in splits.items()}


def test_original_layout_equals_karpathy_file(tmp_path):
    root = make_flickr(tmp_path / "flickr8k")
    original = load_flickr(root)
    karpathy = load_karpathy(root / "dataset_flickr8k.json", root / "Flicker8k_Dataset")
    assert {k: len(v) for k, v in original.items()} == {"train": 3, "val": 1, "test": 1}
    assert _as_tuples(original) == _as_tuples(karpathy)
    assert original["train"][1].image_id == 2000 and original["train"][1].captions[0] == "A dog number 2 runs ."
    check_items(original["train"])


def test_flickr30k_token_layout_without_split_files(tmp_path):
    root = make_flickr(tmp_path / "f30k")
    (root / "Flickr8k.token.txt").rename(root / "results_20130124.token")
    (root / "Flicker8k_Dataset").rename(root / "flickr30k-images")
    splits = load_flickr(root, "flickr30k")
    assert list(splits) == ["train"] and len(splits["train"]) == 5
    check_items(splits["train"])


def test_recipe_reads_flickr_and_dev_alias(tmp_path):
    root = make_flickr(tmp_path / "flickr8k")
    recipe = validate_recipe(load_recipe(REPO / "recipes" / "caption_quickstart.yaml", [
        "data.source=flickr8k", f"data.flickr.root={root}", "data.calib_split=dev"]))
    splits = load_splits(recipe)
    assert [i.image_id for i in splits["calib"]] == [4000] and [i.image_id for i in splits["test"]] == [5000]


def test_split_image_without_captions(tmp_path):
    root = make_flickr(tmp_path / "flickr8k")
    (root / "Flickr_8k.testImages.txt").write_text("5000_e5.jpg\n9999_zz.jpg\n")
    with pytest.raises(DataError, match=r"Flickr_8k\.testImages\.txt:2: image '9999_zz\.jpg' has no captions in "
                                        r".*Flickr8k\.token\.txt"):
        load_flickr(root)


def test_wrong_token_file(tmp_path):
    root = make_flickr(tmp_path / "flickr8k")
    (root / "Flickr8k.token.txt").write_text("1000_a1.jpg#0\tA dog .\nimage,caption\n")
    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt:2: expected '<image>#<i><TAB><caption>'"):
        load_flickr(root)
    (root / "Flickr8k.token.txt").unlink()
    with pytest.raises(DataError, match=r"caption file does not exist: .*Flickr8k\.token\.txt"):
        load_flickr(root)


def test_missing_photo_names_file_and_id(tmp_path):
    root = make_flickr(tmp_path / "flickr8k")
    (root / "Flicker8k_Dataset" / "3000_c3.jpg").unlink()
    recipe = validate_recipe(load_recipe(REPO / "recipes" / "caption_quickstart.yaml", [
        "data.source=flickr8k", f"data.flickr.root={root}"]))
    with pytest.raises(DataError, match=r"image file does not exist: .*3000_c3\.jpg \(image id 3000\)"):
        load_splits(recipe)


def test_no_root_is_a_recipe_error(tmp_path):
    from mmexit.errors import RecipeError

    recipe = validate_recipe(load_recipe(REPO / "recipes" / "caption_quickstart.yaml", ["data.source=flickr8k"]))
    with pytest.raises(RecipeError, match=r"data\.flickr\.root"):
        load_splits(recipe)


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason="../shared/data/flickr8k is absent (research data, not shipped)")
def test_real_flickr8k_layouts_agree():
    original = load_flickr(FLICKR8K)
    karpathy = load_karpathy(FLICKR8K / "dataset_flickr8k.json", FLICKR8K / "Flicker8k_Dataset")
    assert {k: len(v) for k, v in original.items()} == {"train": 6000, "val": 1000, "test": 1000}
    assert all(len(item.captions) == 5 for items in original.values() for item in items)
    assert _as_tuples(original) == _as_tuples(karpathy)
