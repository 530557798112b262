"""What the benches feed a model: texts from a file (the reader of ``mmexit predict --input``),
a built-in list, or the images of a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mmexit.errors import DataError
from mmexit.serve.predict_cli import image_inputs, read_text_inputs

BUILTIN_TEXTS = [
    "a gripping, beautifully shot film", "flat and dull from start to finish",
    "the cast is wonderful but the story goes nowhere", "one of the most original thrillers in years",
    "it is as if the director had never seen a comedy", "a warm, funny and surprisingly moving picture",
    "too long by half, and the jokes fall flat", "an ambitious mess that still holds your attention",
]


def read_texts(path: Optional[str], limit: Optional[int] = None) -> list[str]:
    """The texts of a .jsonl (a string or a "text" field per line), .tsv (a ``text`` column) or
    one-per-line file, at most ``limit``; no path: ``BUILTIN_TEXTS``."""
    if not path:
        texts = list(BUILTIN_TEXTS)
    else:
        texts = [row if isinstance(row, str) else row["text"] for row in read_text_inputs(Path(path))]
        if not texts:
            raise DataError(f"{path}: no texts in the file")
    return texts[:limit] if limit else texts


def read_images(folder: Optional[str], limit: int = 256) -> list[bytes]:
    """The bytes of the first ``limit`` images (.jpg, .jpeg, .png, .bmp, .webp) of a folder."""
    if not folder:
        raise DataError("--images: captioning needs a folder of images (--images DIR)")
    return [path.read_bytes() for path in image_inputs(Path(folder))[:limit]]
