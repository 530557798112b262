"""Flickr8k / Flickr30k captions in their original distribution layout.

The original Flickr8k text files: ``Flickr8k.token.txt`` (``<image>.jpg#<i>\\t<caption>``, five per
image) and one file per standard split (``Flickr_8k.trainImages.txt`` / ``devImages`` /
``testImages``: one image file name a line), beside the image folder (``Flicker8k_Dataset``, the
distribution's own spelling). Flickr30k's ``results_20130124.token`` has the same token layout; it
ships no split files (give ``split_files``, or use its Karpathy file with ``data.source: karpathy``).

Both layouts give the same ``CaptionItem``s: the image id is the file name's leading number
(``1000268201_693b08cb0e.jpg`` -> 1000268201; unique in both data sets), the captions are the
token file's in order. The dev split is called ``val`` (Karpathy's name); ``dev`` is accepted as
an alias by the split lookup.
"""

from __future__ import annotations

from pathlib import Path

from mmexit.data.coco import CaptionItem, flickr_image_id
from mmexit.errors import DataError

#: source -> default file names inside ``data.flickr.root``
FLICKR_LAYOUTS = {
    "flickr8k": {
        "token_file": "Flickr8k.token.txt",
        "image_dir": "Flicker8k_Dataset",
        "split_files": {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"},
    },
    "flickr30k": {"token_file": "results_20130124.token", "image_dir": "flickr30k-images", "split_files": {}},
}


def read_token_file(path: Path) -> dict[str, list[str]]:
    """``<image>#<i>\\t<caption>`` lines -> {image file name: [captions in file order]}."""
    if not path.is_file():
        raise DataError(f"caption file does not exist: {path}")
    captions: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 (byte {error.object[error.start]:#04x})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_mark, _ = key.partition("#")
        if not tab or not hash_mark or not caption.strip():
            raise DataError(f"{path}:{number}: expected '<image>#<i><TAB><caption>' (a Flickr token file)")
        captions.setdefault(name.strip(), []).append(caption.strip())
    if not captions:
        raise DataError(f"{path}: no captions")
    return captions


def read_split_file(path: Path) -> list[str]:
    """One image file name a line (blank lines skipped)."""
    if not path.is_file():
        raise DataError(f"split file does not exist: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_flickr(root: str | Path, source: str = "flickr8k", token_file: str | None = None,
                image_dir: str | None = None, split_files: dict[str, str] | None = None) -> dict[str, list[CaptionItem]]:
    """The splits of a Flickr distribution: {split: [CaptionItem, ...]} in split-file order.

    Paths not given are the source's defaults (``FLICKR_LAYOUTS``), relative to ``root``. An image
    listed in a split file without captions in the token file is an error naming both files.
    Without split files every captioned image is in ``train``.
    """
    if source not in FLICKR_LAYOUTS:
        raise DataError(f"data.source: {source!r} is not a Flickr layout; allowed: {', '.join(FLICKR_LAYOUTS)}")
    root = Path(root)
    defaults = FLICKR_LAYOUTS[source]
    tokens = root / (token_file or defaults["token_file"])
    images = root / (image_dir or defaults["image_dir"])
    captions = read_token_file(tokens)
    seen: dict[int, str] = {}
    for name in captions:
        image_id = flickr_image_id(name, str(tokens))
        if seen.setdefault(image_id, name) != name:
            raise DataError(f"{tokens}: images {seen[image_id]!r} and {name!r} share the id {image_id}")
    files = split_files if split_files is not None else defaults["split_files"]
    if not files:
        return {"train": [CaptionItem(flickr_image_id(n, str(tokens)), images / n, c) for n, c in captions.items()]}
    splits: dict[str, list[CaptionItem]] = {}
    for split, name in files.items():
        path = root / name
        items = []
        for line_number, filename in enumerate(read_split_file(path), 1):
            if filename not in captions:
                raise DataError(f"{path}:{line_number}: image {filename!r} has no captions in {tokens}")
            items.append(CaptionItem(flickr_image_id(filename, str(path)), images / filename, captions[filename]))
        splits["val" if split == "dev" else split] = items
    return splits
