"""A picture of per-token early exit: photos with captions whose words are coloured by exit layer.

``plot_token_layers`` draws one panel per photo: the photo, then one caption line per decoder
(e.g. the full model and an early-exit rule), each word coloured by the decoder layer it left
at (viridis without its light end, one colour per layer 1..L; a colour bar gives the scale). Used by
``mmexit predict RUN --input photos/ --plot FILE`` and ``tools/caption_picture.py``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from mmexit.data.coco import upright_rgb

#: words per caption line in a panel
WORDS_PER_LINE = 7


def token_words(tokens: Sequence[int], layers: Optional[Sequence[int]], tokenizer) -> list[tuple[str, Optional[int]]]:
    """(word, layer) per generated token, end-of-caption and padding left out."""
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    layers = list(layers) if layers is not None else [None] * len(tokens)
    return [(tokenizer.decode([token]) or "?", layer) for token, layer in zip(tokens, layers) if token not in specials]


def plot_token_layers(images: Sequence[str | Path], captions: Sequence[dict[str, list[tuple[str, Optional[int]]]]],
                      num_layers: int, path: str | Path, columns: int = 4, title: Optional[str] = None) -> Path:
    """Write a PNG: for each image a panel with the photo and, per label, its words coloured by layer.

    captions[i]: {label: [(word, layer or None), ...]} for images[i]; layers are 1..num_layers
    (None: not known, drawn black, e.g. beam search).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors
    from matplotlib.offsetbox import AnchoredOffsetbox, HPacker, TextArea, VPacker

    count = len(images)
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 5.6 * rows), squeeze=False)
    # viridis without its light yellow end (unreadable on white): one colour per layer 1..L
    levels = max(num_layers, 2)
    palette = colors.ListedColormap([matplotlib.colormaps["viridis"](0.85 * i / (levels - 1)) for i in range(levels)])
    scale = colors.BoundaryNorm([layer + 0.5 for layer in range(levels + 1)], levels)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= count:
            continue
        with Image.open(images[index]) as photo:
            axis.imshow(upright_rgb(photo))
        lines = [TextArea(textwrap.shorten(Path(images[index]).name, 40), textprops={"fontsize": 7, "color": "0.4"})]
        for label, words in captions[index].items():
            lines.append(TextArea(f"{label}:", textprops={"fontsize": 8, "fontweight": "bold"}))
            for start in range(0, max(len(words), 1), WORDS_PER_LINE):
                chunk = words[start:start + WORDS_PER_LINE] or [("(empty)", None)]
                areas = [TextArea(word, textprops={"fontsize": 9, "color": "black" if layer is None
                                                   else palette(scale(layer)), "fontweight": "bold"})
                         for word, layer in chunk]
                lines.append(HPacker(children=areas, align="baseline", pad=0, sep=3))
        box = AnchoredOffsetbox(loc="upper left", child=VPacker(children=lines, align="left", pad=0, sep=2),
                                bbox_to_anchor=(0.0, -0.02), bbox_transform=axis.transAxes, frameon=False,
                                borderpad=0)
        axis.add_artist(box)
    figure.subplots_adjust(hspace=0.7)  # before the colour bar, which takes its room from the laid-out axes
    mappable = cm.ScalarMappable(norm=scale, cmap=palette)
    bar = figure.colorbar(mappable, ax=axes.ravel().tolist(), location="top", fraction=0.03 / rows, pad=0.05,
                          aspect=60, ticks=list(range(1, levels + 1)))
    bar.set_label("decoder layer the token left at")
    if title:
        figure.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
