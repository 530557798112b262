"""COCO-style caption data: the Karpathy split file or COCO caption annotations + image folders.

Both loaders return the same thing: ``{split: [CaptionItem, ...]}``. Every input is checked before
the run writes anything (``check_items``): a missing image, an unreadable image, a caption file
in the wrong format, an image id with no captions each raise one ``DataError`` line naming the
file or id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm import tqdm

from mmexit.errors import DataError

KARPATHY_SPLITS = ("train", "restval", "val", "test")
#: the EXIF tag saying how a stored image is turned (1: as stored)
EXIF_ORIENTATION = 0x0112


@dataclass
class CaptionItem:
    """One image and its reference captions."""

    image_id: int
    path: Path
    captions: list[str] = field(default_factory=list)


def flickr_image_id(filename: str, where: str) -> int:
    """The leading number of a Flickr file name (``1000268201_693b08cb0e.jpg`` -> 1000268201)."""
    head = Path(filename).stem.split("_")[0]
    if not head.isdigit():
        raise DataError(f"{where}: image {filename!r} has no leading number (not a Flickr file name)")
    return int(head)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"caption file does not exist: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a JSON caption file ({error.__class__.__name__}: {error})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: wrong format, expected a JSON object with 'images'")
    return data


def load_karpathy(path: str | Path, image_root: str | Path) -> dict[str, list[CaptionItem]]:
    """Read ``dataset_coco.json`` (Karpathy): images with filepath, filename, split, sentences.

    ``restval`` images are merged into ``train`` as in the standard Karpathy training setup.
    Image paths are ``image_root/filepath/filename``. Image ids: ``cocoid``; for Flickr files
    (``dataset: flickr8k|flickr30k``) the file name's leading number, as the original layout gives.
    """
    path, image_root = Path(path), Path(image_root)
    data = _read_json(path)
    images = data.get("images")
    if not isinstance(images, list):
        raise DataError(f"{path}: wrong format, expected a Karpathy split file with an 'images' list")
    splits: dict[str, list[CaptionItem]] = {}
    flickr = str(data.get("dataset", "")).startswith("flickr")
    for position, entry in enumerate(images):
        if not isinstance(entry, dict) or not {"filename", "split", "sentences"} <= set(entry):
            raise DataError(f"{path}: images[{position}] lacks 'filename', 'split' or 'sentences' "
                            "(not a Karpathy split file)")
        if "cocoid" in entry:
            image_id = entry["cocoid"]
        elif flickr:  # the same ids as the original Flickr layout (mmexit.data.flickr)
            image_id = flickr_image_id(str(entry["filename"]), f"{path}: images[{position}]")
        else:
            image_id = entry.get("imgid", position)
        captions = []
        for sentence in entry["sentences"] or []:
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise DataError(f"{path}: image id {image_id}: a sentence lacks its 'raw' caption text")
            captions.append(raw.strip())
        if not captions:
            raise DataError(f"{path}: image id {image_id} ({entry['filename']}) has no captions")
        split = "train" if entry["split"] == "restval" else str(entry["split"])
        image_path = image_root / str(entry.get("filepath", "")) / str(entry["filename"])
        splits.setdefault(split, []).append(CaptionItem(int(image_id), image_path, captions))
    return splits


def load_coco_annotations(annotation_file: str | Path, image_dir: str | Path) -> list[CaptionItem]:
    """Read one COCO caption annotation file (``captions_*.json``) with its image folder."""
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    data = _read_json(annotation_file)
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(f"{annotation_file}: wrong format, expected COCO caption annotations "
                        "with 'images' and 'annotations' lists")
    captions: dict[int, list[str]] = {}
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or "image_id" not in annotation or not isinstance(annotation.get("caption"), str):
            raise DataError(f"{annotation_file}: annotations[{position}] lacks 'image_id' or 'caption'")
        captions.setdefault(int(annotation["image_id"]), []).append(annotation["caption"].strip())
    items = []
    for position, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataError(f"{annotation_file}: images[{position}] lacks 'id' or 'file_name'")
        image_id = int(image["id"])
        if not captions.get(image_id):
            raise DataError(f"{annotation_file}: image id {image_id} ({image['file_name']}) has no captions")
        items.append(CaptionItem(image_id, image_dir / image["file_name"], captions[image_id]))
    return items


def check_items(items: list[CaptionItem], verify_images: bool = True) -> None:
    """Raise DataError for the first missing or unreadable image (decoded, not only opened)."""
    for item in items:
        if not item.path.is_file():
            raise DataError(f"image file does not exist: {item.path} (image id {item.image_id})")
        if verify_images:
            try:
                with Image.open(item.path) as image:
                    image.load()
            except Exception as error:  # PIL raises many types for corrupt files
                raise DataError(f"cannot read image {item.path} (image id {item.image_id}): "
                                f"{error.__class__.__name__}") from None


def upright_rgb(image: Image.Image) -> Image.Image:
    """An image as it is meant to be seen: turned by its EXIF Orientation tag (phone photos are stored
    sideways with a tag saying so), then RGB. An unreadable tag leaves the pixels as stored."""
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
            image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: the stored orientation is all there is
        pass
    return image.convert("RGB")


def image_tensor(image: Image.Image, image_size: int, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> Tensor:
    """One PIL image -> upright RGB (``upright_rgb``), resized (bicubic) and normalised:
    [3, image_size, image_size]."""
    image = upright_rgb(image)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = array.view(image_size, image_size, 3).permute(2, 0, 1).float() / 255.0
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def load_images(items: list[CaptionItem], image_size: int, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                std: tuple[float, ...] = (0.5, 0.5, 0.5), progress: bool = False) -> Tensor:
    """Decode, resize and normalise images into one float tensor [N, 3, image_size, image_size]."""
    out = torch.empty(len(items), 3, image_size, image_size)
    for index, item in enumerate(tqdm(items, desc="images", disable=not progress)):
        out[index] = read_image(item.path, image_size, mean, std, f" (image id {item.image_id})")
    return out


def read_image(path: Path, image_size: int, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
               std: tuple[float, ...] = (0.5, 0.5, 0.5), where: str = "") -> Tensor:
    """One image file -> [3, image_size, image_size] (DataError naming the file when it cannot be read)."""
    try:
        with Image.open(path) as image:
            return image_tensor(image, image_size, mean, std)
    except Exception as error:
        raise DataError(f"cannot read image {path}{where}: {error.__class__.__name__}") from None
