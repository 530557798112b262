"""The per-token exit picture: words coloured by layer, a panel per photo; token ids to (word, layer)."""

from __future__ import annotations

from PIL import Image

from mmexit.data.caption_tokenizer import train_word_tokenizer
from mmexit.evaluation.caption_plot import plot_token_layers, token_words


def test_token_words_drop_specials_and_keep_layers():
    tokenizer = train_word_tokenizer(["a dog runs on the grass", "a cat sleeps"])
    ids = tokenizer.encode("a dog runs") + [tokenizer.eos_id]
    assert token_words(ids, [1, 3, 2, 6], tokenizer) == [("a", 1), ("dog", 3), ("runs", 2)]
    assert token_words(ids, None, tokenizer) == [("a", None), ("dog", None), ("runs", None)]


def test_picture_is_written(tmp_path):
    photos = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (40, 30), (80 * index, 100, 150)).save(path)
        photos.append(path)
    captions = [{"full": [("a", 6), ("dog", 6)], "maxprob@0.9": [("a", 1), ("dog", 4)]},
                {"full": [], "rule": [("x", None)] * 12}, {"full": [("long", 2)] * 20}]
    out = plot_token_layers(photos, captions, num_layers=6, path=tmp_path / "sub" / "picture.png", columns=2)
    assert out.read_bytes()[:4] == b"\x89PNG"
    with Image.open(out) as image:
        assert image.size[0] > 400 and image.size[1] > 400
