"""Extra training views (``train.augment``): crops and flips, seeded, and a training run that sees them."""

from __future__ import annotations

import json

import pytest
import torch

from mmexit.data.augment import augmented_views, with_views
from mmexit.errors import RecipeError
from mmexit.recipe import load_recipe, validate_recipe
from mmexit.runner import run_validated

from test_pipeline import QUICKSTART, TINY


def _images(count: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_views_are_seeded_and_laid_out_view_major():
    images = _images()
    views = augmented_views(images, 2, seed=5)
    assert views.shape == (6, 3, 8, 8)
    assert torch.equal(views, augmented_views(images, 2, seed=5))
    assert not torch.equal(views, augmented_views(images, 2, seed=6))
    assert augmented_views(images, 0).shape == (0, 3, 8, 8)


def test_full_crops_are_the_image_or_its_mirror():
    images = _images(count=16)
    views = augmented_views(images, 1, flip=True, min_crop=1.0, seed=0)
    same = [torch.equal(v, i) for v, i in zip(views, images)]
    mirrored = [torch.equal(v, i.flip(-1)) for v, i in zip(views, images)]
    assert all(a or b for a, b in zip(same, mirrored))
    assert any(same) and any(mirrored)  # p = 1/2 each, 16 draws
    assert torch.equal(augmented_views(images, 1, flip=False, min_crop=1.0), images)


def test_a_crop_is_a_resized_part_of_the_image():
    ramp = torch.arange(8.0).repeat(1, 3, 8, 1)  # [1, 3, 8, 8], value = column
    view = augmented_views(ramp, 1, flip=False, min_crop=0.5, seed=3)[0]
    assert view.shape == (3, 8, 8)
    assert view.min() >= 0 and view.max() <= 7
    assert (view[:, :, 1:] >= view[:, :, :-1]).all()  # still increasing left to right
    assert view.max() - view.min() < 7  # a part: not the whole width


def test_with_views_repeats_captions_per_view():
    images = _images(count=2)
    captions = [[[5, 6]], [[7]]]
    out, repeated = with_views(images, captions, {"views": 2})
    assert out.shape[0] == 6 and repeated == captions * 3
    assert torch.equal(out[:2], images)
    assert with_views(images, captions, None) == (images, captions)
    with pytest.raises(ValueError, match="min_crop"):
        augmented_views(images, 1, min_crop=0.0)


@pytest.mark.parametrize("setting, message", [("{views: -1}", r"train\.augment\.views: must be an integer >= 0"),
                                              ("{min_crop: 1.5}", r"train\.augment\.min_crop: must be in \(0, 1\]"),
                                              ("{view: 2}", r"train\.augment.*view")])
def test_bad_augment_settings_name_the_key(tmp_path, setting, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe(load_recipe(QUICKSTART, [*TINY, f"train.augment={setting}"]))


def test_training_sees_every_view(tmp_path):
    """One epoch with 2 extra views takes 3x the steps of one without."""
    steps = {}
    for views in (0, 2):
        out = tmp_path / f"out{views}"
        recipe = validate_recipe(load_recipe(QUICKSTART, [
            *TINY, f"data.root={tmp_path / 'scenes'}", f"run.output_dir={out}", "run.stages=[train]",
            "train.batch_size=16", f"train.augment={{views: {views}, min_crop: 0.8}}"]))
        run_validated(recipe)
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        steps[views] = max(entry["step"] for entry in log)
    assert steps[2] == 3 * steps[0]
