"""A captioning data set mmexit generates itself: simple scenes of shapes with 5 captions each.

No captioning data or pretrained weights can be installed on the project's machines, so the
quickstart trains on scenes drawn here. An image holds 1 to 3 shapes (circle, square, triangle)
of several colours and two sizes, at positions that give relations (left of, above, ...) and
counts ("two red circles"). Each image gets 5 captions from varied templates: some words need
the image (colour, shape, size, relation), some are predictable from the text alone ("a", "to
the left of", "on a white background"), so a per-token early exit has something to decide.

Written in both the COCO caption annotation format (``annotations/captions_<split>.json``) and
the Karpathy split format (``dataset_coco.json``), with PNG images under ``images/<split>/``.
Deterministic by seed; a few thousand images take well under a minute.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (235, 205, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.17, "large": 0.30}  # half-width as a fraction of the image side
NUMBERS = {1: "one", 2: "two", 3: "three"}
GENERATOR_VERSION = 1


@dataclass
class Shape:
    """One drawn object: kind, colour, size and centre (fractions of the image side)."""

    kind: str
    colour: str
    size: str
    x: float
    y: float

    def phrase(self, with_size: bool = True) -> str:
        size = f"{self.size} " if with_size else ""
        return f"{size}{self.colour} {self.kind}"


def _plural(kind: str) -> str:
    return kind + "s"


def _relation(a: Shape, b: Shape) -> str:
    """Where ``a`` is relative to ``b``: the dominant axis of their offset."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _where(shape: Shape) -> str:
    vertical = "top" if shape.y < 0.5 else "bottom"
    horizontal = "left" if shape.x < 0.5 else "right"
    return f"{vertical} {horizontal}"


def _sample_scene(rng: random.Random) -> list[Shape]:
    """1, 2 or 3 shapes in distinct cells of a 2x2 grid (with jitter), sometimes repeated."""
    count = rng.choices([1, 2, 3], weights=[0.35, 0.4, 0.25])[0]
    cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], count)
    if count >= 2 and rng.random() < 0.35:  # a repeated object: counting captions
        kind, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
        kinds = [(kind, colour, size)] * count
    else:
        kinds = [(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))) for _ in range(count)]
    shapes = []
    for (kind, colour, size), (cx, cy) in zip(kinds, cells):
        x = 0.25 + 0.5 * cx + rng.uniform(-0.05, 0.05)
        y = 0.25 + 0.5 * cy + rng.uniform(-0.05, 0.05)
        shapes.append(Shape(kind, colour, size, x, y))
    return shapes


def draw_scene(shapes: list[Shape], image_size: int, rng: random.Random) -> Image.Image:
    """Render shapes on a near-white background with a little pixel noise."""
    shade = rng.randint(235, 255)
    image = Image.new("RGB", (image_size, image_size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        half = SIZES[shape.size] * image_size * rng.uniform(0.85, 1.0) * 0.8
        cx, cy = shape.x * image_size, shape.y * image_size
        box = (cx - half, cy - half, cx + half, cy + half)
        colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[shape.colour])
        if shape.kind == "circle":
            draw.ellipse(box, fill=colour)
        elif shape.kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return image


def captions_for(shapes: list[Shape], rng: random.Random) -> list[str]:
    """Five different captions of one scene, from templates of varied wording and detail."""
    if len(shapes) == 1:
        (s,) = shapes
        pool = [
            f"a {s.phrase()}",
            f"a {s.phrase()} on a white background",
            f"there is one {s.phrase(False)} in the picture",
            f"a picture of a {s.phrase()}",
            f"a single {s.phrase()} in the {_where(s)}",
            f"one {s.phrase()} in the {_where(s)} of the image",
            f"an image with a {s.phrase()}",
        ]
    elif all((s.kind, s.colour, s.size) == (shapes[0].kind, shapes[0].colour, shapes[0].size) for s in shapes):
        s, n = shapes[0], NUMBERS[len(shapes)]
        plural = f"{s.colour} {_plural(s.kind)}"
        pool = [
            f"{n} {s.size} {plural}",
            f"{n} {plural} on a white background",
            f"there are {n} {plural} in the picture",
            f"a picture of {n} {s.size} {plural}",
            f"an image with {n} {plural}",
            f"{n} identical {plural}",
            f"a group of {n} {s.size} {plural}",
        ]
    elif len(shapes) == 2:
        a, b = shapes
        pool = [
            f"a {a.phrase()} {_relation(a, b)} a {b.phrase()}",
            f"a {b.phrase()} {_relation(b, a)} a {a.phrase()}",
            f"a {a.phrase(False)} and a {b.phrase(False)}",
            f"there is a {a.phrase()} and a {b.phrase()} in the picture",
            f"two shapes : a {a.phrase()} and a {b.phrase()}",
            f"a picture of a {b.phrase(False)} {_relation(b, a)} a {a.phrase(False)}",
            f"an image with a {a.phrase(False)} {_relation(a, b)} a {b.phrase(False)}",
        ]
    else:
        a, b, c = shapes
        pool = [
            f"a {a.phrase()} , a {b.phrase()} and a {c.phrase()}",
            f"three shapes : a {a.phrase(False)} , a {b.phrase(False)} and a {c.phrase(False)}",
            "there are three shapes in the picture",
            f"a {a.phrase(False)} {_relation(a, b)} a {b.phrase(False)} and a {c.phrase(False)}",
            f"an image with three shapes including a {c.phrase()}",
            "a picture of three shapes on a white background",
            f"a {b.phrase()} {_relation(b, c)} a {c.phrase()} and a {a.phrase(False)}",
        ]
    return rng.sample(pool, 5)


def generate_scenes(
    root: str | Path,
    num_train: int = 3000,
    num_val: int = 300,
    num_test: int = 300,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the data set under ``root`` (skipped when the same parameters were written before).

    Returns the path of the Karpathy file ``root/dataset_coco.json``. Image ids are unique over
    all splits; ``val`` is the calibration/validation split, ``test`` the evaluation split.
    """
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "num_test": num_test,
              "image_size": image_size, "seed": seed, "version": GENERATOR_VERSION}
    meta_path = root / "scenes_meta.json"
    karpathy_path = root / "dataset_coco.json"
    if meta_path.is_file() and karpathy_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == params:
                return karpathy_path
        except json.JSONDecodeError:
            pass
    rng = random.Random(seed)
    karpathy_images = []
    sentence_id = 0
    image_id = 0
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        coco_images, coco_annotations = [], []
        for _ in range(count):
            shapes = _sample_scene(rng)
            image = draw_scene(shapes, image_size, rng)
            captions = captions_for(shapes, rng)
            file_name = f"scene_{image_id:06d}.png"
            image.save(folder / file_name, compress_level=1)
            coco_images.append({"id": image_id, "file_name": file_name,
                                "width": image_size, "height": image_size})
            sentences = []
            for caption in captions:
                coco_annotations.append({"id": sentence_id, "image_id": image_id, "caption": caption})
                sentences.append({"raw": caption, "tokens": caption.split(), "imgid": image_id,
                                  "sentid": sentence_id})
                sentence_id += 1
            karpathy_images.append({
                "filepath": split, "filename": file_name, "imgid": image_id, "cocoid": image_id,
                "split": split, "sentences": sentences, "sentids": [s["sentid"] for s in sentences],
            })
            image_id += 1
        annotation = {"info": {"description": "mmexit generated scenes", "split": split},
                      "images": coco_images, "annotations": coco_annotations, "licenses": [],
                      "type": "captions"}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(annotation))
    karpathy_path.write_text(json.dumps({"dataset": "coco", "images": karpathy_images}))
    meta_path.write_text(json.dumps(params))
    return karpathy_path
